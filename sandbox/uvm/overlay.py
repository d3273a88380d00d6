"""The UVM rootfs tar: the Debian base plus the agent, as a pure function of its inputs.

The base tar minus what a read-only UVM never uses (caches, package-manager state, /dev, unused stdlib
parts), plus the agent source (sandbox/__init__.py, sandbox/guest, sandbox/shared) under
/usr/lib/parma-sandbox with .pyc files compiled by the guest's own python3 (unchecked-hash), and the
init. Entries are sorted, owned by root, mtimes clamped to SOURCE_DATE_EPOCH. Cheap (no network, no
mmdebstrap), so an agent change only re-runs this step.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sandbox.fsutil import atomic_dir, file_lock
from sandbox.progress import step
from sandbox.run import run
from sandbox.shared.errors import StateError
from sandbox.uvm.base import SOURCE_DATE_EPOCH, BaseArtifact, build_base, uvm_cache
from sandbox.uvm.fetch import sha256_file
from sandbox.uvm.source_tree import PACKAGE_DIR, UVM_IMAGE_DIR

RECIPE_VERSION = 4
# Dropped from the base tar: package-manager state and caches a read-only UVM never uses, unused stdlib
# parts, and /dev (the kernel mounts devtmpfs there).
DROP = re.compile(r"^(dev/.+|var/cache/.+|var/lib/apt/.+|var/log/.+|var/lib/dpkg/[^/]+-old"
                  r"|usr/lib/python3\.\d+/(idlelib|lib2to3|pydoc_data|turtledemo)(/.*)?|usr/lib/python3\.\d+/(pydoc|turtle)\.py"
                  r"|usr/lib/python3\.\d+/__pycache__/(pydoc|turtle)\..*)$")
AGENT_PREFIX = "usr/lib/parma-sandbox"
AGENT_PACKAGES = ("guest", "shared")
INIT_PATH = f"{AGENT_PREFIX}/init"
INIT_SCRIPT = UVM_IMAGE_DIR / "init"


@dataclass(frozen=True)
class RootfsTar:
    tar: Path
    sha256: str
    key: str
    base: BaseArtifact


def agent_files(package_dir: Path = PACKAGE_DIR) -> list[tuple[str, Path]]:
    """(path inside the image, source file) for the agent: sandbox/__init__.py, guest/ and shared/."""
    files = [(f"{AGENT_PREFIX}/sandbox/__init__.py", package_dir / "__init__.py")]
    for sub in AGENT_PACKAGES:
        for src in sorted((package_dir / sub).rglob("*")):
            rel = src.relative_to(package_dir)
            if src.is_dir() or "__pycache__" in rel.parts or src.suffix in (".pyc", ".pyo"):
                continue
            files.append((f"{AGENT_PREFIX}/sandbox/{rel.as_posix()}", src))
    return files


def overlay_key(base: BaseArtifact) -> str:
    h = hashlib.sha256()
    h.update(f"overlay-recipe {RECIPE_VERSION} base {base.key} epoch {SOURCE_DATE_EPOCH}\n".encode())
    h.update(DROP.pattern.encode() + b"\n")
    for dest, src in agent_files() + [(INIT_PATH, INIT_SCRIPT)]:
        h.update(f"{dest} {hashlib.sha256(src.read_bytes()).hexdigest()} {src.stat().st_mode & 0o111:o}\n".encode())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class GuestPython:
    argv: tuple[str, ...]
    env: dict[str, str]
    cache_tag: str          # e.g. "cpython-311": names the __pycache__ files
    dist_packages: tuple[str, ...] = ()     # the base's Debian dist-packages (python3-cryptography), extracted


@contextlib.contextmanager
def guest_python(base_tar: Path) -> Iterator[GuestPython]:
    """The guest's own python3, runnable on the host through the guest's dynamic loader.

    Compiling with the exact interpreter the UVM runs keeps the .pyc files valid there and makes them
    independent of the host's Python.
    """
    with tempfile.TemporaryDirectory(prefix="uvm-python-") as tmp:
        root = Path(tmp)
        with tarfile.open(base_tar, "r:") as tf:
            libdirs = sorted({m.name.split("/")[3] for m in tf.getmembers()
                              if re.match(r"^\./usr/lib/python3(\.\d+)?/", m.name)})
        run(["tar", "-xf", base_tar, "-C", root, "--no-same-owner", "--no-same-permissions",
             "./usr/bin", "./usr/lib/x86_64-linux-gnu", *[f"./usr/lib/{d}" for d in libdirs]])
        dist = root / "usr/lib/python3/dist-packages"
        pythons = sorted(p for p in (root / "usr/bin").glob("python3.*") if re.fullmatch(r"python3\.\d+", p.name))
        if not pythons:
            raise StateError(f"no python3.X interpreter in {base_tar}")
        lib = root / "usr/lib/x86_64-linux-gnu"
        argv = (str(lib / "ld-linux-x86-64.so.2"), "--library-path", str(lib), str(pythons[-1]), "-S")
        env = {"PYTHONHOME": str(root / "usr"), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        tag = run([*argv, "-c", "import sys; print(sys.implementation.cache_tag)"], env=env).stdout.decode().strip()
        yield GuestPython(argv, env, tag, (str(dist),) if dist.is_dir() else ())


COMPILE_SCRIPT = """
import json, py_compile, sys
for src, dfile, cfile in json.load(sys.stdin):
    py_compile.compile(src, cfile=cfile, dfile=dfile, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


def compile_agent(py: GuestPython, files: list[tuple[str, Path]], out_dir: Path) -> list[tuple[str, Path]]:
    """Compile the agent's .py files; returns (path inside the image, compiled file) pairs."""
    jobs, result = [], []
    for dest, src in files:
        if not dest.endswith(".py"):
            continue
        d = PurePosixPath(dest)
        pyc_dest = str(d.parent / "__pycache__" / f"{d.stem}.{py.cache_tag}.pyc")
        cfile = out_dir / pyc_dest
        jobs.append((str(src), "/" + dest, str(cfile)))
        result.append((pyc_dest, cfile))
    run([*py.argv, "-c", COMPILE_SCRIPT], input=json.dumps(jobs).encode(), env=py.env)
    return result


PYC_UNCHECKED_HASH = 0b01  # PEP 552 flags: hash-based (bit 0), check_source (bit 1) off
PYC_CHECKED_DIRS = re.compile(r"^usr/lib/python3(\.\d+)?/")


def check_pyc(name: str, header: bytes) -> None:
    """Refuse a .pyc under /usr/lib/python3* that is not an unchecked-hash one (PEP 552).

    The rootfs clamps every mtime, so a timestamp-based .pyc never matches its source in the guest:
    Python would compile the module from source at every boot (and could not write the result).
    """
    flags = int.from_bytes(header[4:8], "little") if len(header) >= 16 else -1
    if flags != PYC_UNCHECKED_HASH:
        kind = {0: "timestamp-based", 0b11: "checked-hash"}.get(flags, "malformed")
        raise StateError(f"/{name} in the UVM base is a {kind} .pyc, not an unchecked-hash one",
                         hint="images/uvm/customize.sh compiles the stdlib with --invalidation-mode "
                              "unchecked-hash; rebuild the base (delete its cache entry)")


def agent_modules(files: list[tuple[str, Path]]) -> list[str]:
    """The importable module names among the agent's files (sandbox, sandbox.guest.agent, ...)."""
    names = []
    for dest, _ in files:
        if dest.endswith(".py"):
            parts = PurePosixPath(dest).relative_to(AGENT_PREFIX).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(names)


# What the agent loads besides its own modules, for the boot cache to record: cryptography, as the
# first report loads it (sandbox/guest/keys.py).
BOOT_CACHE_WARM = ("sandbox.guest.keys:load", "sandbox.guest.keys:RuntimeKey.generate")


def agent_tree(files: list[tuple[str, Path]], out_dir: Path) -> Path:
    """A copy of exactly the agent files the image gets, laid out as under AGENT_PREFIX: the guest's python3
    imports the agent from it to build the boot cache and the boot-modules bundle."""
    tree = out_dir / "agent-tree"
    for dest, src in files:
        target = tree / PurePosixPath(dest).relative_to(AGENT_PREFIX)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
    return tree


def build_boot_cache(py: GuestPython, files: list[tuple[str, Path]], tree: Path, out_dir: Path) -> tuple[str, Path]:
    """The boot cache (sandbox/guest/boot_cache.py) for the agent, made by the guest's python3.

    One run imports every agent module from a copy of exactly the files the image gets (and cryptography,
    from the base's dist-packages) and records what dataclasses and re compute; a second, fresh run
    compiles the sources (deterministic: same interpreter, PYTHONHASHSEED=0, nothing else in the
    process). `tree` is agent_tree(files). Returns (path inside the image, file)."""
    env = {**py.env, "PYTHONPATH": os.pathsep.join([str(tree), *py.dist_packages]), "OPENSSL_CONF": os.devnull}
    entry = "import sys\nfrom sandbox.guest.boot_cache import main\nmain(sys.argv[1:])\n"
    recorded = run([*py.argv, "-c", entry, "record", *BOOT_CACHE_WARM], input=json.dumps(agent_modules(files)).encode(),
                   env=env).stdout
    name = run([*py.argv, "-c", entry, "dump", out_dir], input=recorded, env=env).stdout.decode().strip()
    return f"{AGENT_PREFIX}/{name}", out_dir / name


# Run by the guest's python3 with the agent's files on sys.path: what the init and agent.main() import
# before "ready", in their order, with the boot cache at argv[1] (which keeps inspect away, as in the
# agent) -> a JSON list of [name, origin, is_package] of every module loaded from a .py file meanwhile.
BOOT_IMPORTS_SCRIPT = """
import sys
from sandbox.guest import boot_modules  # the init imports it before installing the bundle
before = set(sys.modules)
from sandbox.guest import agent, boot_cache
boot_cache.install(sys.argv[1])
for name in agent.SERVING:
    __import__(name)
specs = [(name, getattr(module, "__spec__", None)) for name, module in list(sys.modules.items())]
found = sorted((name, spec.origin, spec.submodule_search_locations is not None) for name, spec in specs
               if name not in before and spec is not None and str(spec.origin).endswith(".py"))
import json
json.dump(found, sys.stdout)
"""


def build_boot_modules(py: GuestPython, tree: Path, compiled: list[tuple[str, Path]], boot_cache: Path,
                       out_dir: Path) -> tuple[str, Path]:
    """The boot-modules bundle (sandbox/guest/boot_modules.py): the code of every module the agent imports
    before "ready", from the very .pyc files the image holds, made by the guest's python3.

    One run imports what the agent imports (with the boot cache, as the agent does) and lists the modules;
    a second packs their .pyc files: the agent's as compiled above, the stdlib's from the base (the guest
    python's copy of it). `tree` is agent_tree() of the agent's files. Returns (path inside the image, file)."""
    home = Path(py.env["PYTHONHOME"]).parent    # the guest python's root: <home>/usr/lib/python3.X/...
    env = {**py.env, "PYTHONPATH": str(tree)}
    # -P: the agent's modules come from the tree, not from the current directory
    listed = json.loads(run([*py.argv, "-P", "-c", BOOT_IMPORTS_SCRIPT, str(boot_cache)], env=env).stdout)
    pycs = {dest: path for dest, path in compiled}
    modules = []
    for name, origin, is_package in listed:
        source = Path(origin)
        if source.is_relative_to(tree):
            dest = PurePosixPath(AGENT_PREFIX) / source.relative_to(tree).as_posix()
        elif source.is_relative_to(home):
            dest = PurePosixPath(source.relative_to(home).as_posix())
        else:
            continue    # not from the image (nothing the agent imports before "ready")
        cached = dest.parent / "__pycache__" / f"{dest.stem}.{py.cache_tag}.pyc"
        pyc = pycs.get(str(cached)) or home / cached
        modules.append((name, is_package, f"/{dest}", f"/{cached}", str(pyc)))
    entry = "import sys\nfrom sandbox.guest.boot_modules import main\nmain(sys.argv[1:])\n"
    name = run([*py.argv, "-c", entry, "pack", str(out_dir)], input=json.dumps(modules).encode(),
               env=env).stdout.decode().strip()
    return f"{AGENT_PREFIX}/{name}", out_dir / name


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = min(int(info.mtime), SOURCE_DATE_EPOCH)
    info.uname = info.gname = ""
    info.pax_headers = {}
    return info


def _new_entry(name: str, *, mode: int, kind: bytes = tarfile.REGTYPE, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo("./" + name)
    info.type, info.mode, info.size = kind, mode, size
    info.uid = info.gid = 0
    info.mtime = SOURCE_DATE_EPOCH
    return info


def write_rootfs_tar(base: BaseArtifact, out: Path) -> None:
    """base.tar minus DROP, plus the agent, its .pyc files and the init, sorted and normalized."""
    files = agent_files()
    with tempfile.TemporaryDirectory(prefix="uvm-overlay-") as tmp, guest_python(base.tar) as py:
        compiled = compile_agent(py, files, Path(tmp))
        tree = agent_tree(files, Path(tmp))
        boot_cache = build_boot_cache(py, files, tree, Path(tmp))
        boot_modules = build_boot_modules(py, tree, compiled, boot_cache[1], Path(tmp))
        added: dict[str, tuple[tarfile.TarInfo, Path | None]] = {}
        for dest, path in [*files, *compiled, boot_cache, boot_modules, (INIT_PATH, INIT_SCRIPT)]:
            parts = PurePosixPath(dest).parts
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                added.setdefault(d, (_new_entry(d, mode=0o755, kind=tarfile.DIRTYPE), None))
            mode = 0o755 if dest == INIT_PATH else 0o644
            added[dest] = (_new_entry(dest, mode=mode, size=path.stat().st_size), path)
        with tarfile.open(base.tar, "r:") as src_tar, open(out, "wb") as f, \
                tarfile.open(fileobj=f, mode="w:", format=tarfile.GNU_FORMAT) as dst:
            entries: dict[str, tuple[tarfile.TarInfo, tarfile.TarInfo | Path | None]] = {}
            for m in src_tar.getmembers():
                rel = m.name.removeprefix("./").rstrip("/")
                if rel and DROP.match(rel):
                    continue
                if m.isreg() and rel.endswith(".pyc") and PYC_CHECKED_DIRS.match(rel):
                    header = src_tar.extractfile(m)
                    assert header is not None
                    check_pyc(rel, header.read(16))
                entries[rel or "."] = (m, m)
            for rel, (info, src) in added.items():
                if rel in entries and info.isdir():
                    continue    # usr/, usr/lib/ come from the base
                if rel in entries:
                    raise StateError(f"the agent overlay would replace /{rel} from the Debian base")
                entries[rel] = (info, src)
            for rel in sorted(entries, key=lambda r: "" if r == "." else r):
                info, content = entries[rel]
                out_info = _normalize(copy.copy(info))
                if isinstance(content, tarfile.TarInfo):
                    data = src_tar.extractfile(content) if content.isreg() else None
                    dst.addfile(out_info, data)
                elif isinstance(content, Path):
                    with open(content, "rb") as data:
                        dst.addfile(out_info, data)
                else:
                    dst.addfile(out_info)


def cached_rootfs_tar(key: str, base: BaseArtifact) -> RootfsTar | None:
    d = uvm_cache() / "rootfs-tar" / key
    meta = d / "rootfs-tar.json"
    if not meta.is_file():
        return None
    return RootfsTar(tar=d / "rootfs.tar", sha256=json.loads(meta.read_text())["sha256"], key=key, base=base)


def build_rootfs_tar(base: BaseArtifact | None = None) -> RootfsTar:
    """The complete rootfs tar for the current agent source (cheap: no network, no mmdebstrap)."""
    base = base or build_base()
    key = overlay_key(base)
    if hit := cached_rootfs_tar(key, base):
        return hit
    final = uvm_cache() / "rootfs-tar" / key
    with file_lock(final.with_name(f"{key}.lock")):
        if hit := cached_rootfs_tar(key, base):
            return hit
        with step("Adding the agent to the UVM rootfs"), atomic_dir(final) as stage:
            write_rootfs_tar(base, stage / "rootfs.tar")
            digest = sha256_file(stage / "rootfs.tar")
            (stage / "rootfs-tar.json").write_text(json.dumps({"sha256": digest, "base": base.key}) + "\n")
    hit = cached_rootfs_tar(key, base)
    assert hit is not None
    return hit
