"""What the agent's imports compute at every boot, computed once when the UVM image is built.

Two stdlib mechanisms do work at import time that is the same at every boot, and under TCG they cost
more than half of the agent's start-up:
- `dataclasses` (Python 3.11) writes the source of each class's __init__, __repr__, __eq__, __hash__,
  __setattr__ and __delattr__ and compiles it with exec(); and for a class without a docstring it
  writes one from `inspect.signature(cls)`, so that importing it imports inspect and, with it, ast,
  dis, tokenize and linecache. The agent's modules define over a hundred dataclasses: about 650
  compilations and a hundred signatures.
- `re` parses and compiles each pattern a module compiles at import in pure Python (cryptography's,
  which the launch self-check loads, cost a third of its import under TCG).

The image build (sandbox/uvm/overlay.py) imports the agent, and cryptography as the agent loads it,
once with the guest's own python3 and records all three: every source `dataclasses` compiles, with its
code (marshal, zlib, by defining module); every docstring signature, by class; every regex program,
by pattern and flags (the arguments `re` hands to `_sre.compile`). The file lies next to the .pyc
files in the rootfs and, like them, under dm-verity. At boot `install()` gives `dataclasses` an `exec`
and an `inspect` of its own (module globals that shadow the builtin and the module there, and nowhere
else) and `re._compiler` a `compile`: each uses the record for what it knows and does exactly what the
stdlib does for anything else. The classes and patterns come out the same either way
(tests/unit/test_agent_startup.py compares them); only the work is saved. The cache names the
interpreter it was built with and is ignored by any other.
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

CACHE_NAME = f"boot-cache.{sys.implementation.cache_tag}.marshal"
MAGIC = b"parma-sandbox boot cache v1\n"
_FILENAME = "<string>"      # what the builtin exec() names code compiled from a string

# A regex program: (pattern, flags) -> the rest of the arguments of _sre.compile(pattern, ...).
RegexKey = tuple[object, int]
RegexArgs = tuple[int, list[int], int, dict[str, int], tuple[str | None, ...]]


def _header() -> bytes:
    # The bytecode and regex program formats belong to the interpreter: its cache tag and exact version.
    return MAGIC + f"{sys.implementation.cache_tag} {sys.hexversion:#x}\n".encode()


def compile_source(source: str) -> CodeType:
    """What exec(source) compiles: mode exec, file "<string>", no __future__ flags (dataclasses has none)."""
    return compile(source, _FILENAME, "exec", dont_inherit=True)


def class_key(cls: type) -> str:
    """Names a dataclass for its recorded signature: module, qualified name and fields."""
    fields = getattr(cls, "__dataclass_fields__", {})
    return f"{cls.__module__}:{cls.__qualname__}({','.join(fields)})"


class Recorded:
    """What a build recorded: dataclass sources by module, signatures by class, regex programs."""

    def __init__(self, sources: Mapping[str, Iterable[str]], signatures: Mapping[str, str],
                 regexes: Mapping[RegexKey, RegexArgs]) -> None:
        self.sources = {m: sorted(set(s)) for m, s in sorted(sources.items())}
        self.signatures = dict(sorted(signatures.items()))
        self.regexes = dict(sorted(regexes.items(), key=lambda kv: (type(kv[0][0]).__name__, repr(kv[0]))))

    def dumps(self) -> bytes:
        """The cache file: the header, then marshal((code, signatures, regexes)), where code is {module:
        zlib(marshal({source: code}))} (a module's part is unpacked when it defines its first dataclass,
        so the boot reads and unmarshals little more than it uses); everything in a fixed order."""
        packed = {module: zlib.compress(marshal.dumps({s: compile_source(s) for s in srcs}), 9)
                  for module, srcs in self.sources.items()}
        return _header() + marshal.dumps((packed, self.signatures, self.regexes))

    def to_json(self) -> list[Any]:
        return [self.sources, self.signatures,
                [[_jsonable(p), f, list(args)] for (p, f), args in self.regexes.items()]]

    @classmethod
    def from_json(cls, doc: list[Any]) -> Recorded:
        sources, signatures, regexes = doc
        return cls(sources, signatures, {(_unjson(p), f): (a[0], a[1], a[2], a[3], tuple(a[4]))
                                         for p, f, a in regexes})


def _jsonable(pattern: object) -> object:
    return {"bytes": pattern.hex()} if isinstance(pattern, bytes) else pattern


def _unjson(pattern: object) -> object:
    return bytes.fromhex(pattern["bytes"]) if isinstance(pattern, dict) else pattern


def load(data: bytes) -> tuple[dict[str, bytes], dict[str, str], dict[RegexKey, RegexArgs]]:
    """A cache file's packed code, signatures and regex programs; ValueError when it is for another
    interpreter or malformed."""
    header = _header()
    if not data.startswith(header):
        raise ValueError("not a boot cache for this interpreter")
    content = marshal.loads(data[len(header):])
    if not (isinstance(content, tuple) and len(content) == 3 and all(isinstance(c, dict) for c in content)
            and all(isinstance(v, bytes) for v in content[0].values())):
        raise ValueError("malformed boot cache")
    return content[0], content[1], content[2]


def unpack(packed: bytes) -> dict[str, CodeType]:
    """One module's {source: code}."""
    codes = marshal.loads(zlib.decompress(packed))
    if not isinstance(codes, dict):
        raise ValueError("malformed boot cache")
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

    def __call__(self, source: Any, globals: dict[str, Any] | None = None,  # exec's own names
                 locals: Mapping[str, Any] | None = None, /) -> None:
        code = None
        if isinstance(source, str):
            code = self._lookup(source, (globals or {}).get("__name__"))
            if code is None:
                code = compile_source(source)
                self.misses += 1
            else:
                self.hits += 1
        exec(source if code is None else code, globals, locals)  # what dataclasses itself does


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


class CachedRegexCompiler:
    """The `compile` of `re._compiler`: _sre.compile() with the recorded program for a known pattern and
    flags (what the parser and the compiler would produce), the stdlib's own compile for anything else."""

    def __init__(self, programs: dict[RegexKey, RegexArgs], original: Any, sre_compile: Any) -> None:
        self.programs = programs
        self.original = original
        self._sre_compile = sre_compile
        self.hits = 0
        self.misses = 0

    def __call__(self, p: Any, flags: int = 0) -> Any:
        args = self.programs.get((p, int(flags))) if isinstance(p, str | bytes) else None
        if args is None:
            self.misses += 1
            return self.original(p, flags)
        self.hits += 1
        flags_out, code, groups, groupindex, indexgroup = args
        return self._sre_compile(p, flags_out, list(code), groups, dict(groupindex), tuple(indexgroup))


class Installed:
    def __init__(self, exec_: CachedExec, signatures: RecordedSignatures, regexes: CachedRegexCompiler) -> None:
        self.exec = exec_
        self.signatures = signatures
        self.regexes = regexes


def install(path: str | None = None) -> Installed | None:
    """Use the cache at `path`. None (and nothing changed) when it is absent or stale.

    Imports `dataclasses` if it is not yet: while it loads, `inspect` is a placeholder in sys.modules, so
    that its `import inspect` costs nothing; the placeholder is gone before anything else can import."""
    try:
        with open(path or default_path(), "rb") as f:
            packed, signatures, regexes = load(f.read())
    except (OSError, ValueError, EOFError, TypeError):
        return None
    import _sre  # type: ignore[import-not-found]  # CPython internal: typeshed has no stub
    import re._compiler  # type: ignore[import-not-found]  # CPython internal: typeshed has no stub

    if "dataclasses" not in sys.modules and "inspect" not in sys.modules:
        import types

        placeholder = types.ModuleType("inspect", "stands in while dataclasses loads (boot_cache.py)")
        sys.modules["inspect"] = placeholder
        try:
            import dataclasses
        finally:
            if sys.modules.get("inspect") is placeholder:
                del sys.modules["inspect"]
    import dataclasses

    installed = Installed(CachedExec(packed), RecordedSignatures(signatures),
                          CachedRegexCompiler(regexes, re._compiler.compile, _sre.compile))
    dataclasses.exec = installed.exec  # type: ignore[attr-defined]
    dataclasses.inspect = installed.signatures  # type: ignore[attr-defined]
    re._compiler.compile = installed.regexes
    return installed


def uninstall() -> None:
    """Back to the builtin exec, the real inspect and the stdlib's regex compiler (tests)."""
    import dataclasses
    import inspect
    import re._compiler

    dataclasses.__dict__.pop("exec", None)
    dataclasses.inspect = inspect  # type: ignore[attr-defined]
    compiler = re._compiler.compile
    if isinstance(compiler, CachedRegexCompiler):
        re._compiler.compile = compiler.original


def record(modules: Iterable[str], *, warm: Iterable[str] = ()) -> Recorded:
    """Import `modules` (in a fresh process), then call each `warm` callable ("module:attribute.path");
    what `dataclasses` and `re` computed meanwhile."""
    import dataclasses
    import importlib
    import inspect
    import re._compiler

    seen: dict[str, set[str]] = {}
    signatures: dict[str, str] = {}
    unstable: set[str] = set()
    regexes: dict[RegexKey, RegexArgs] = {}

    def recording_exec(source: Any, globals: dict[str, Any] | None = None,
                       locals: Mapping[str, Any] | None = None, /) -> None:
        module = (globals or {}).get("__name__")
        if isinstance(source, str) and isinstance(module, str):
            seen.setdefault(module, set()).add(source)
        exec(compile_source(source) if isinstance(source, str) else source, globals, locals)

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

    class RecordingSre:
        """re._compiler's view of _sre: compile() records its arguments."""

        def __init__(self, sre: Any) -> None:
            self._sre = sre
            self.flags_in: int | None = None

        def compile(self, pattern: Any, flags: int, code: list[int], groups: int, groupindex: dict[str, int],
                    indexgroup: tuple[str | None, ...]) -> Any:
            if isinstance(pattern, str | bytes) and self.flags_in is not None:
                regexes[(pattern, self.flags_in)] = (flags, list(code), groups, dict(groupindex), tuple(indexgroup))
            return self._sre.compile(pattern, flags, code, groups, groupindex, indexgroup)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._sre, name)

    original_compile = re._compiler.compile
    recording_sre = RecordingSre(re._compiler._sre)

    def recording_compile(p: Any, flags: int = 0) -> Any:
        recording_sre.flags_in = int(flags) if isinstance(p, str | bytes) else None
        try:
            return original_compile(p, flags)
        finally:
            recording_sre.flags_in = None

    dataclasses.exec = recording_exec  # type: ignore[attr-defined]
    dataclasses.inspect = RecordingInspect()  # type: ignore[attr-defined]
    re._compiler._sre = recording_sre
    re._compiler.compile = recording_compile
    try:
        for name in modules:
            importlib.import_module(name)
        for target in warm:
            module, _, attribute = target.partition(":")
            function: Any = importlib.import_module(module)
            for name in attribute.split("."):
                function = getattr(function, name)
            function()
    finally:
        re._compiler._sre = recording_sre._sre
        re._compiler.compile = original_compile
        uninstall()
    return Recorded(seen, {k: v for k, v in signatures.items() if k not in unstable}, regexes)


def main(argv: list[str]) -> None:
    """For the image build, run by the guest's python3 with the agent's files on sys.path:
    `record [MODULE:FUNCTION...]` (a JSON list of module names on stdin, the warm-up calls as arguments
    -> the record as JSON on stdout) and `dump DIR` (that JSON on stdin -> DIR/CACHE_NAME; prints
    CACHE_NAME)."""
    import json
    import os

    if argv[:1] == ["record"]:
        json.dump(record(json.load(sys.stdin), warm=argv[1:]).to_json(), sys.stdout)
    elif argv[:1] == ["dump"] and len(argv) == 2:
        with open(os.path.join(argv[1], CACHE_NAME), "wb") as f:
            f.write(Recorded.from_json(json.load(sys.stdin)).dumps())
        print(CACHE_NAME)
    else:
        raise SystemExit("usage: boot_cache record [MODULE:FUNCTION...] | dump DIR")


def default_path() -> str:
    """Where the image puts the cache: the agent's root, next to the sandbox package."""
    import os

    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), CACHE_NAME)
