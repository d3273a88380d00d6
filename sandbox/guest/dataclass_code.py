"""Precompiled code for the methods `@dataclass` writes at import time, built with the UVM image.

`dataclasses` (Python 3.11) writes the source of each class's __init__, __repr__, __eq__, __hash__,
__setattr__ and __delattr__ and compiles it with exec(): the agent's modules define over a hundred
dataclasses, so its start-up compiles about 650 small functions, more than half of its import time
under TCG. The image build (sandbox/uvm/overlay.py) imports the agent once with the guest's own
python3, records every source `dataclasses` generates and stores it with its compiled code (marshal,
zlib, by defining module) in the rootfs, next to the .pyc files and like them under dm-verity.

At boot `install()` gives the `dataclasses` module an `exec` of its own (a module global shadows the
builtin there and nowhere else): for a source it has code for, it runs that code; anything else it
compiles exactly as the builtin would. The classes come out the same either way; only the compiling is
saved. The cache names the interpreter it was built with and is ignored by any other.
"""

from __future__ import annotations

import marshal
import sys
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # typing and collections.abc stay off the boot path: this module loads first
    from collections.abc import Iterable, Mapping
    from types import CodeType
    from typing import Any

CACHE_NAME = f"dataclass-code.{sys.implementation.cache_tag}.marshal"
MAGIC = b"parma-sandbox dataclass code v2\n"
_FILENAME = "<string>"      # what the builtin exec() names code compiled from a string


def _header() -> bytes:
    # The bytecode format belongs to the interpreter: its cache tag and exact version name it.
    return MAGIC + f"{sys.implementation.cache_tag} {sys.hexversion:#x}\n".encode()


def compile_source(source: str) -> CodeType:
    """What exec(source) compiles: mode exec, file "<string>", no __future__ flags (dataclasses has none)."""
    return compile(source, _FILENAME, "exec", dont_inherit=True)


def dump(sources: Mapping[str, Iterable[str]]) -> bytes:
    """The cache file for {module: sources}: the header, then a marshalled {module: zlib(marshal({source:
    code}))}, everything sorted. A module's part is unpacked when that module defines its first dataclass,
    so the boot reads and unmarshals little more than it uses."""
    packed = {module: zlib.compress(marshal.dumps({s: compile_source(s) for s in sorted(set(srcs))}), 9)
              for module, srcs in sorted(sources.items())}
    return _header() + marshal.dumps(packed)


def load(data: bytes) -> dict[str, bytes]:
    """The {module: packed codes} of a cache file; ValueError when it was built for another interpreter."""
    header = _header()
    if not data.startswith(header):
        raise ValueError("not a dataclass code cache for this interpreter")
    packed = marshal.loads(data[len(header):])
    if not isinstance(packed, dict) or not all(isinstance(v, bytes) for v in packed.values()):
        raise ValueError("malformed dataclass code cache")
    return packed


def unpack(packed: bytes) -> dict[str, CodeType]:
    """One module's {source: code}."""
    codes = marshal.loads(zlib.decompress(packed))
    if not isinstance(codes, dict):
        raise ValueError("malformed dataclass code cache")
    return codes


class CachedExec:
    """The `exec` that `dataclasses` calls: stored code for a known source, the builtin otherwise.

    dataclasses passes the defining module's globals, whose __name__ says which part of the cache to look
    in. Safe from several threads: at worst two unpack the same part, or one compiles while another unpacks."""

    def __init__(self, packed: dict[str, bytes]) -> None:
        self.packed = packed
        self.codes: dict[str, dict[str, CodeType]] = {}
        self.hits = 0
        self.misses = 0

    def _lookup(self, source: str, module: object) -> CodeType | None:
        if not isinstance(module, str):
            return None
        table = self.codes.get(module)
        if table is None:
            packed = self.packed.get(module)
            if packed is None:
                return None
            try:
                table = self.codes[module] = unpack(packed)
            except (ValueError, EOFError, TypeError, zlib.error):
                table = self.codes[module] = {}
        return table.get(source)

    def __call__(self, source: Any, globals: dict[str, Any] | None = None,  # noqa: A002 - exec's own names
                 locals: Mapping[str, Any] | None = None, /) -> None:  # noqa: A002
        code = None
        if isinstance(source, str):
            code = self._lookup(source, (globals or {}).get("__name__"))
            if code is None:
                code = compile_source(source)
                self.misses += 1
            else:
                self.hits += 1
        exec(source if code is None else code, globals, locals)  # noqa: S102 - what dataclasses itself does


def install(path: str | None = None) -> CachedExec | None:
    """Let `dataclasses` use the cache at `path`. None (and nothing changed) when it is absent or stale."""
    try:
        with open(path or default_path(), "rb") as f:
            packed = load(f.read())
    except (OSError, ValueError, EOFError, TypeError):
        return None
    import dataclasses

    cached = CachedExec(packed)
    dataclasses.exec = cached  # type: ignore[attr-defined]
    return cached


def uninstall() -> None:
    """Back to the builtin exec (tests)."""
    import dataclasses

    dataclasses.__dict__.pop("exec", None)


def record(modules: Iterable[str]) -> dict[str, list[str]]:
    """Import `modules` (in a fresh process); the sources `dataclasses` generated meanwhile, by defining module."""
    import dataclasses
    import importlib

    seen: dict[str, set[str]] = {}

    def recording_exec(source: Any, globals: dict[str, Any] | None = None,  # noqa: A002
                       locals: Mapping[str, Any] | None = None, /) -> None:  # noqa: A002
        module = (globals or {}).get("__name__")
        if isinstance(source, str) and isinstance(module, str):
            seen.setdefault(module, set()).add(source)
        exec(compile_source(source) if isinstance(source, str) else source, globals, locals)  # noqa: S102

    dataclasses.exec = recording_exec  # type: ignore[attr-defined]
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        uninstall()
    return {module: sorted(sources) for module, sources in sorted(seen.items())}


def main(argv: list[str]) -> None:
    """For the image build, run by the guest's python3 with the agent's files on sys.path:
    `record` (a JSON list of module names on stdin -> {module: [sources]} as JSON on stdout) and
    `dump DIR` (that JSON on stdin -> DIR/CACHE_NAME; prints CACHE_NAME)."""
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
