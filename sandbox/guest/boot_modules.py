"""The modules the agent imports before "ready", in one file: a bundle of their compiled code.

Python finds each module it imports by looking along sys.path, then stats, opens and reads its .pyc
file. Under TCG that work, done for about sixty modules (stdlib and agent) before the agent serves,
costs more than the modules' own code. The image build (sandbox/uvm/overlay.py) runs the guest's
python3 over the agent's start-up imports, notes which modules they load, and packs the code of each
one, as its .pyc file in the image holds it, into one file next to the agent. The init installs
`BundleFinder` first in sys.meta_path: a module in the bundle loads from memory, anything else the
usual way.

What runs does not change: the code is the bytes of the very .pyc files the path finder would load
(unchecked-hash .pyc files, which Python never checks against their source anyway), from the same
dm-verity root, and modules keep their __file__, __cached__ and, for packages, __path__, so that
submodules outside the bundle, tracebacks and linecache work as before. A bundle for another
interpreter is ignored. This module is imported before the bundle is installed, so it imports only
builtins (no typing, no os, no __future__).
"""

import _frozen_importlib  # importlib._bootstrap, always loaded: its ModuleSpec without importing importlib
import marshal
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:   # typing stays off the boot path (mypy treats this name as True)
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

BUNDLE_NAME = f"boot-modules.{sys.implementation.cache_tag}.marshal"
MAGIC = b"parma-sandbox boot modules v1\n"
PYC_HEADER = 16             # PEP 552: magic, flags, then the source hash (or mtime and size)
PYC_UNCHECKED_HASH = 0b01   # flags: hash-based, not checked against the source

# A bundle entry: (is_package, origin: the .py path, cached: the .pyc path, the marshalled code).
Entry = tuple[bool, str, str, bytes]


def _header() -> bytes:
    # Bytecode and marshal belong to the interpreter: its cache tag and exact version.
    return MAGIC + f"{sys.implementation.cache_tag} {sys.hexversion:#x}\n".encode()


def dumps(entries: "dict[str, Entry]") -> bytes:
    """A bundle file: the header, then marshal({module name: entry}) in name order."""
    return _header() + marshal.dumps({name: entries[name] for name in sorted(entries)})


def loads(data: bytes) -> "dict[str, Entry]":
    """A bundle file's entries; ValueError when it is for another interpreter or malformed."""
    header = _header()
    if not data.startswith(header):
        raise ValueError("not a boot-modules bundle for this interpreter")
    try:
        entries = marshal.loads(memoryview(data)[len(header):])   # no copy of the megabyte
    except (EOFError, TypeError, ValueError) as e:
        raise ValueError(f"malformed boot-modules bundle: {e}") from None
    if not isinstance(entries, dict) or not all(
            isinstance(name, str) and isinstance(e, tuple) and len(e) == 4 and isinstance(e[0], bool)
            and isinstance(e[1], str) and isinstance(e[2], str) and isinstance(e[3], bytes)
            for name, e in entries.items()):
        raise ValueError("malformed boot-modules bundle")
    return entries


class BundleFinder:
    """A meta path finder and loader for the modules of a bundle (see the module docstring).

    An entry is dropped once its module has run (the agent keeps no second copy of the code); a module
    imported again (reload, or after its import failed) goes the usual way."""

    def __init__(self, entries: "dict[str, Entry]") -> None:
        self.entries = entries
        self.loaded: list[str] = []

    def find_spec(self, name: str, path: "Sequence[str] | None" = None,
                  target: "ModuleType | None" = None) -> "ModuleSpec | None":
        entry = self.entries.get(name)
        if entry is None:
            return None
        is_package, origin, cached, _ = entry
        # The loader protocol is create_module and exec_module; typeshed asks for importlib.abc.Loader,
        # which would import importlib.abc on the boot path.
        spec: ModuleSpec = _frozen_importlib.ModuleSpec(name, self, origin=origin,  # type: ignore[arg-type]
                                                        is_package=is_package)
        spec.has_location = True
        spec.cached = cached
        if is_package:
            spec.submodule_search_locations = [origin.rpartition("/")[0]]
        return spec

    def create_module(self, spec: "ModuleSpec") -> None:
        return None     # the default module object

    def exec_module(self, module: "ModuleType") -> None:
        name = module.__name__      # the spec's name while the import system runs this
        entry = self.entries.pop(name, None)
        if entry is None:
            raise ImportError(f"{name} is no longer in the boot-modules bundle", name=name)
        self.loaded.append(name)
        exec(marshal.loads(entry[3]), module.__dict__)   # what SourceFileLoader does with the .pyc's code

    def is_package(self, name: str) -> bool:
        entry = self.entries.get(name)
        if entry is None:
            raise ImportError(f"{name} is not in the boot-modules bundle", name=name)
        return entry[0]


def default_path() -> str:
    """Where the image puts the bundle: the agent's root, next to the sandbox package."""
    return __file__.rsplit("/", 3)[0] + "/" + BUNDLE_NAME


def install(path: str | None = None) -> BundleFinder | None:
    """Put the bundle at `path` first in sys.meta_path. None (and nothing changed) when it is absent,
    for another interpreter or malformed: the agent then imports the usual way, only slower."""
    try:
        with open(path or default_path(), "rb") as f:
            entries = loads(f.read())
    except (OSError, ValueError):
        return None
    finder = BundleFinder(entries)
    sys.meta_path.insert(0, finder)
    return finder


def uninstall() -> None:
    """Take every BundleFinder out of sys.meta_path (tests)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, BundleFinder)]


def pack(modules: "Sequence[tuple[str, bool, str, str, str]]") -> bytes:
    """The bundle of `modules`: (name, is_package, origin and cached as in the image, the .pyc file to read
    now). Each .pyc must be an unchecked-hash one for this interpreter; ValueError otherwise."""
    import importlib.util

    entries: dict[str, Entry] = {}
    for name, is_package, origin, cached, pyc_file in modules:
        with open(pyc_file, "rb") as f:
            data = f.read()
        if data[:4] != importlib.util.MAGIC_NUMBER:
            raise ValueError(f"{pyc_file}: not a .pyc file of this interpreter")
        if int.from_bytes(data[4:8], "little") != PYC_UNCHECKED_HASH:
            raise ValueError(f"{pyc_file}: not an unchecked-hash .pyc file")
        marshal.loads(data[PYC_HEADER:])    # it must load; the bundle keeps the bytes as they are
        entries[name] = (bool(is_package), origin, cached, data[PYC_HEADER:])
    return dumps(entries)


def main(argv: "list[str]") -> None:
    """For the image build, run by the guest's python3: `pack DIR` (a JSON list of pack()'s tuples on
    stdin -> DIR/BUNDLE_NAME; prints BUNDLE_NAME). What goes in is listed by the build
    (sandbox/uvm/overlay.py, BOOT_IMPORTS_SCRIPT)."""
    if argv[:1] == ["pack"] and len(argv) == 2:
        import json

        data = pack([(str(n), bool(p), str(o), str(c), str(f)) for n, p, o, c, f in json.load(sys.stdin)])
        with open(argv[1] + "/" + BUNDLE_NAME, "wb") as f:
            f.write(data)
        print(BUNDLE_NAME)
    else:
        raise SystemExit("usage: boot_modules pack DIR")
