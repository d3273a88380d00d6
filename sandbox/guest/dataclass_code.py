"""What `@dataclass` computes at import time, computed once when the UVM image is built.

`dataclasses` (Python 3.11) writes the source of each class's __init__, __repr__, __eq__, __hash__,
__setattr__ and __delattr__ and compiles it with exec(); and for a class without a docstring it writes
one from `inspect.signature(cls)`, so that importing it imports inspect and, with it, ast, dis, tokenize
and linecache. The agent's modules define over a hundred dataclasses: about 650 compilations and a
hundred signatures, more than half of its start-up under TCG.

The image build (sandbox/uvm/overlay.py) imports the agent once with the guest's own python3 and records
both: every source `dataclasses` compiles, with its code (marshal, zlib, by defining module), and every
docstring signature, by class. The file lies next to the .pyc files in the rootfs and, like them, under
dm-verity. At boot `install()` hands the `dataclasses` module an `exec` and an `inspect` of its own
(module globals shadow the builtin and the module there, and nowhere else): the exec runs the stored code
for a source it knows and compiles anything else exactly as the builtin would; the inspect answers
`signature()` with the recorded text for a class it knows and asks the real inspect for any other. The
classes come out the same either way (tests/unit/test_agent_startup.py compares them); only the
compiling and the imports are saved. The cache names the interpreter it was built with and is ignored by
any other.
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
MAGIC = b"parma-sandbox dataclass code v3\n"
_FILENAME = "<string>"      # what the builtin exec() names code compiled from a string


def _header() -> bytes:
    # The bytecode format belongs to the interpreter: its cache tag and exact version name it.
    return MAGIC + f"{sys.implementation.cache_tag} {sys.hexversion:#x}\n".encode()


def compile_source(source: str) -> CodeType:
    """What exec(source) compiles: mode exec, file "<string>", no __future__ flags (dataclasses has none)."""
    return compile(source, _FILENAME, "exec", dont_inherit=True)


def class_key(cls: type) -> str:
    """Names a dataclass for its recorded signature: module, qualified name and fields."""
    fields = getattr(cls, "__dataclass_fields__", {})
    return f"{cls.__module__}:{cls.__qualname__}({','.join(fields)})"


def dump(sources: Mapping[str, Iterable[str]], signatures: Mapping[str, str]) -> bytes:
    """The cache file: the header, then marshal((code, signatures)), where code is {module: zlib(marshal(
    {source: code}))} (a module's part is unpacked when it defines its first dataclass, so the boot reads
    and unmarshals little more than it uses) and signatures is {class_key: text}; everything sorted."""
    packed = {module: zlib.compress(marshal.dumps({s: compile_source(s) for s in sorted(set(srcs))}), 9)
              for module, srcs in sorted(sources.items())}
    return _header() + marshal.dumps((packed, dict(sorted(signatures.items()))))


def load(data: bytes) -> tuple[dict[str, bytes], dict[str, str]]:
    """The packed code and the signatures of a cache file; ValueError when built for another interpreter."""
    header = _header()
    if not data.startswith(header):
        raise ValueError("not a dataclass code cache for this interpreter")
    content = marshal.loads(data[len(header):])
    if not (isinstance(content, tuple) and len(content) == 2 and isinstance(content[0], dict)
            and isinstance(content[1], dict) and all(isinstance(v, bytes) for v in content[0].values())):
        raise ValueError("malformed dataclass code cache")
    return content[0], content[1]


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


class RecordedSignatures:
    """The `inspect` that `dataclasses` sees: `signature(cls)` (all it uses, for the docstring of a class
    without one) is the recorded text for a known class; anything else goes to the real inspect."""

    def __init__(self, signatures: dict[str, str]) -> None:
        self.signatures = signatures
        self.hits = 0
        self.misses = 0

    def signature(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        text = self.signatures.get(class_key(obj)) if isinstance(obj, type) and not (args or kwargs) else None
        if text is None:
            self.misses += 1
            import inspect

            return inspect.signature(obj, *args, **kwargs)
        self.hits += 1
        return text     # dataclasses takes str() of it

    def __getattr__(self, name: str) -> Any:
        import inspect

        return getattr(inspect, name)


class Installed:
    def __init__(self, exec_: CachedExec, signatures: RecordedSignatures) -> None:
        self.exec = exec_
        self.signatures = signatures

    @property
    def hits(self) -> int:
        return self.exec.hits

    @property
    def misses(self) -> int:
        return self.exec.misses


def install(path: str | None = None) -> Installed | None:
    """Let `dataclasses` use the cache at `path`. None (and nothing changed) when it is absent or stale.

    Imports `dataclasses` if it is not yet: while it loads, `inspect` is a placeholder in sys.modules, so
    that its `import inspect` costs nothing; the placeholder is gone before anything else can import."""
    try:
        with open(path or default_path(), "rb") as f:
            packed, signatures = load(f.read())
    except (OSError, ValueError, EOFError, TypeError):
        return None
    if "dataclasses" not in sys.modules and "inspect" not in sys.modules:
        import types

        placeholder = types.ModuleType("inspect", "stands in while dataclasses loads (dataclass_code.py)")
        sys.modules["inspect"] = placeholder
        try:
            import dataclasses
        finally:
            if sys.modules.get("inspect") is placeholder:
                del sys.modules["inspect"]
    import dataclasses

    installed = Installed(CachedExec(packed), RecordedSignatures(signatures))
    dataclasses.exec = installed.exec  # type: ignore[attr-defined]
    dataclasses.inspect = installed.signatures  # type: ignore[attr-defined]
    return installed


def uninstall() -> None:
    """Back to the builtin exec and the real inspect (tests)."""
    import dataclasses
    import inspect

    dataclasses.__dict__.pop("exec", None)
    dataclasses.inspect = inspect  # type: ignore[attr-defined]


def record(modules: Iterable[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Import `modules` (in a fresh process); what `dataclasses` computed meanwhile: the sources it compiled,
    by defining module, and the docstring signatures, by class_key()."""
    import dataclasses
    import importlib
    import inspect

    seen: dict[str, set[str]] = {}
    signatures: dict[str, str] = {}
    unstable: set[str] = set()

    def recording_exec(source: Any, globals: dict[str, Any] | None = None,  # noqa: A002
                       locals: Mapping[str, Any] | None = None, /) -> None:  # noqa: A002
        module = (globals or {}).get("__name__")
        if isinstance(source, str) and isinstance(module, str):
            seen.setdefault(module, set()).add(source)
        exec(compile_source(source) if isinstance(source, str) else source, globals, locals)  # noqa: S102

    class RecordingInspect:
        def signature(self, obj: Any) -> inspect.Signature:
            sig = inspect.signature(obj)
            key, text = class_key(obj), str(sig)
            if " at 0x" in text or (key in signatures and signatures[key] != text):
                unstable.add(key)   # a default whose repr is an address, or two classes of one name
            signatures[key] = text
            return sig

        def __getattr__(self, name: str) -> Any:
            return getattr(inspect, name)

    dataclasses.exec = recording_exec  # type: ignore[attr-defined]
    dataclasses.inspect = RecordingInspect()  # type: ignore[attr-defined]
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        uninstall()
    return ({module: sorted(sources) for module, sources in sorted(seen.items())},
            {k: v for k, v in sorted(signatures.items()) if k not in unstable})


def main(argv: list[str]) -> None:
    """For the image build, run by the guest's python3 with the agent's files on sys.path:
    `record` (a JSON list of module names on stdin -> JSON [{module: [sources]}, {class: signature}] on
    stdout) and `dump DIR` (that JSON on stdin -> DIR/CACHE_NAME; prints CACHE_NAME)."""
    import json
    import os

    if argv[:1] == ["record"]:
        json.dump(record(json.load(sys.stdin)), sys.stdout)
    elif argv[:1] == ["dump"] and len(argv) == 2:
        sources, signatures = json.load(sys.stdin)
        with open(os.path.join(argv[1], CACHE_NAME), "wb") as f:
            f.write(dump(sources, signatures))
        print(CACHE_NAME)
    else:
        raise SystemExit("usage: dataclass_code record | dump DIR")


def default_path() -> str:
    """Where the image puts the cache: the agent's root, next to the sandbox package."""
    import os

    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), CACHE_NAME)
