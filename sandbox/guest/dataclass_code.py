"""Precompiled code for the methods `@dataclass` writes at import time, built with the UVM image.

`dataclasses` (Python 3.11) writes the source of each class's __init__, __repr__, __eq__, __hash__,
__setattr__ and __delattr__ and compiles it with exec(): the agent's modules define over a hundred
dataclasses, so its start-up compiles about 650 small functions, more than half of its import time
under TCG. The image build (sandbox/uvm/overlay.py) imports the agent once with the guest's own
python3, records every source `dataclasses` generates and stores it with its compiled code (marshal)
in the rootfs, next to the .pyc files and like them under dm-verity.

At boot `install()` gives the `dataclasses` module an `exec` of its own (a module global shadows the
builtin there and nowhere else): for a source it has code for, it runs that code; anything else it
compiles exactly as the builtin would. The classes come out the same either way; only the compiling is
saved. The cache names the interpreter it was built with and is ignored by any other.
"""

from __future__ import annotations

import marshal
import sys
from collections.abc import Iterable, Mapping
from types import CodeType
from typing import Any

CACHE_NAME = f"dataclass-code.{sys.implementation.cache_tag}.marshal"
MAGIC = b"parma-sandbox dataclass code v1\n"
_FILENAME = "<string>"      # what the builtin exec() names code compiled from a string


def _header() -> bytes:
    # The bytecode format changes with the interpreter: its cache tag and .pyc magic name it.
    from importlib.util import MAGIC_NUMBER

    return MAGIC + sys.implementation.cache_tag.encode() + b" " + MAGIC_NUMBER.hex().encode() + b"\n"


def compile_source(source: str) -> CodeType:
    """What exec(source) compiles: mode exec, file "<string>", no __future__ flags (dataclasses has none)."""
    return compile(source, _FILENAME, "exec", dont_inherit=True)


def dump(sources: Iterable[str]) -> bytes:
    """The cache file for these sources: header, then a marshalled {source: code}, sorted by source."""
    return _header() + marshal.dumps({s: compile_source(s) for s in sorted(set(sources))})


def load(data: bytes) -> dict[str, CodeType]:
    """The {source: code} of a cache file; ValueError when it was built for another interpreter."""
    header = _header()
    if not data.startswith(header):
        raise ValueError("not a dataclass code cache for this interpreter")
    codes = marshal.loads(data[len(header):])
    if not isinstance(codes, dict):
        raise ValueError("malformed dataclass code cache")
    return codes


class CachedExec:
    """The `exec` that `dataclasses` calls: stored code for a known source, the builtin otherwise."""

    def __init__(self, codes: Mapping[str, CodeType]) -> None:
        self.codes = codes
        self.hits = 0
        self.misses = 0

    def __call__(self, source: Any, globals: dict[str, Any] | None = None,  # noqa: A002 - exec's own names
                 locals: Mapping[str, Any] | None = None, /) -> None:  # noqa: A002
        code = self.codes.get(source) if isinstance(source, str) else None
        if code is None:
            self.misses += 1
            code = compile_source(source) if isinstance(source, str) else source
        else:
            self.hits += 1
        exec(code, globals, locals)  # noqa: S102 - exactly what dataclasses itself does


def install(path: str | None = None) -> CachedExec | None:
    """Let `dataclasses` use the cache at `path`. None (and nothing changed) when it is absent or stale."""
    try:
        with open(path or default_path(), "rb") as f:
            codes = load(f.read())
    except (OSError, ValueError, EOFError, TypeError):
        return None
    import dataclasses

    cached = CachedExec(codes)
    dataclasses.exec = cached  # type: ignore[attr-defined]
    return cached


def uninstall() -> None:
    """Back to the builtin exec (tests)."""
    import dataclasses

    dataclasses.__dict__.pop("exec", None)


def record(modules: Iterable[str]) -> list[str]:
    """Import `modules` (in a fresh process) and return the sources `dataclasses` generated meanwhile."""
    import dataclasses
    import importlib

    seen: set[str] = set()

    def recording_exec(source: Any, globals: dict[str, Any] | None = None,  # noqa: A002
                       locals: Mapping[str, Any] | None = None, /) -> None:  # noqa: A002
        if isinstance(source, str):
            seen.add(source)
        exec(compile_source(source) if isinstance(source, str) else source, globals, locals)  # noqa: S102

    dataclasses.exec = recording_exec  # type: ignore[attr-defined]
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        uninstall()
    return sorted(seen)


def main(argv: list[str]) -> None:
    """For the image build, run by the guest's python3 with the agent's files on sys.path:
    `record` (a JSON list of module names on stdin -> the JSON list of sources on stdout) and
    `dump DIR` (the JSON list of sources on stdin -> DIR/CACHE_NAME; prints CACHE_NAME)."""
    import json
    import os

    if argv[:1] == ["record"]:
        json.dump(record(json.load(sys.stdin)), sys.stdout)
    elif argv[:1] == ["dump"] and len(argv) == 2:
        with open(os.path.join(argv[1], CACHE_NAME), "wb") as f:
            f.write(dump(json.load(sys.stdin)))
        print(CACHE_NAME)
    else:
        raise SystemExit("usage: dataclass_code record | dump DIR")


def default_path() -> str:
    """Where the image puts the cache: the agent's root, next to the sandbox package."""
    import os

    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), CACHE_NAME)
