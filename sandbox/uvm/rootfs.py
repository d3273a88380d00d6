"""The UVM root filesystem as a tar: a pinned Debian base plus the agent overlay.

Two cached stages, so an agent change only re-runs the cheap one:
1. base: mmdebstrap (Essential set + images/uvm/packages.txt) at the versions pinned in
   images/uvm/packages.lock.json, every .deb checked against its pinned SHA-256, the Python stdlib
   recompiled deterministically (images/uvm/customize.sh). Keyed by the recipe files and the lock.
2. overlay: the base tar with what a read-only UVM never uses dropped, plus the agent source
   (sandbox/__init__.py, sandbox/guest, sandbox/shared) and its .pyc files compiled by the guest's own
   python3 (unchecked-hash), and the init. Entries are sorted, owned by root, and their mtimes clamped
   to SOURCE_DATE_EPOCH, so the tar is a pure function of its inputs.
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
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from sandbox.fsutil import atomic_dir, atomic_write, file_lock
from sandbox.paths import cache_dir
from sandbox.progress import step
from sandbox.run import run
from sandbox.shared.errors import CheckFailed, InputError, StateError
from sandbox.uvm.fetch import sha256_file
from sandbox.uvm.source_tree import PACKAGE_DIR, UVM_IMAGE_DIR

RECIPE_VERSION = 1
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# Every file in the UVM carries this mtime (or an older one); 2025-01-01T00:00:00Z.
SOURCE_DATE_EPOCH = 1735689600
# Kept out of the image by dpkg itself: documentation, manuals, translations.
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/bash-completion/*",
    "path-exclude=/usr/share/zsh/*",
)
# Dropped from the base tar: package-manager state and caches a read-only UVM never uses, and /dev
# (the kernel mounts devtmpfs there).
DROP = re.compile(r"^(dev/.+|var/cache/.+|var/lib/apt/.+|var/log/.+|var/lib/dpkg/[^/]+-old"
                  r"|usr/lib/python3\.\d+/(idlelib|lib2to3|pydoc_data|turtledemo)(/.*)?|usr/lib/python3\.\d+/(pydoc|turtle)\.py"
                  r"|usr/lib/python3\.\d+/__pycache__/(pydoc|turtle)\..*)$")
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
AGENT_PREFIX = "usr/lib/parma-sandbox"
AGENT_PACKAGES = ("guest", "shared")
INIT_PATH = f"{AGENT_PREFIX}/init"

PACKAGES_TXT = UVM_IMAGE_DIR / "packages.txt"
LOCK_FILE = UVM_IMAGE_DIR / "packages.lock.json"
CUSTOMIZE_HOOK = UVM_IMAGE_DIR / "customize.sh"
INIT_SCRIPT = UVM_IMAGE_DIR / "init"
APT_PREFERENCES = UVM_IMAGE_DIR / "apt-preferences"


@dataclass(frozen=True)
class LockedPackage:
    name: str
    version: str
    arch: str
    sha256: str     # of the .deb
    size: int       # of the .deb, bytes


@dataclass(frozen=True)
class InstalledPackage:
    name: str
    version: str
    arch: str
    installed_kib: int


@dataclass(frozen=True)
class BaseArtifact:
    tar: Path
    key: str
    packages: tuple[LockedPackage, ...]
    installed: tuple[InstalledPackage, ...]


@dataclass(frozen=True)
class RootfsTar:
    tar: Path
    sha256: str
    key: str
    base: BaseArtifact


def read_package_list(path: Path = PACKAGES_TXT) -> list[str]:
    names = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", line):
            raise InputError(f"{path}:{lineno}: {line!r} is not a Debian package name",
                             hint="one package name per line; comments start with #")
        names.append(line)
    return names


def read_lock(path: Path = LOCK_FILE) -> tuple[LockedPackage, ...] | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        return tuple(LockedPackage(**p) for p in doc["packages"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} is not a valid package lock: {e}",
                         hint="regenerate it with 'parma-sandbox build rootfs --update-lock'") from e


def lock_document(packages: tuple[LockedPackage, ...]) -> str:
    doc = {
        "comment": "Exact packages of the UVM rootfs. Regenerate with 'parma-sandbox build rootfs --update-lock'.",
        "suite": SUITE,
        "packages": [asdict(p) for p in sorted(packages, key=lambda p: (p.name, p.arch))],
    }
    return json.dumps(doc, indent=1) + "\n"


def apt_preferences(packages: tuple[LockedPackage, ...]) -> str:
    """Pin every locked package to its version (priority > 1000 also allows the exact version only)."""
    return "".join(f"Package: {p.name}\nPin: version {p.version}\nPin-Priority: 1001\n\n" for p in packages)


def preferences_text(lock: tuple[LockedPackage, ...] | None) -> str:
    """images/uvm/apt-preferences, plus the version pins of the lock (none when re-resolving)."""
    text = APT_PREFERENCES.read_text().rstrip("\n") + "\n\n"
    return text + (apt_preferences(lock) if lock else "")


def base_key(lock: tuple[LockedPackage, ...] | None) -> str:
    doc = {
        "recipe": RECIPE_VERSION,
        "suite": SUITE,
        "mirrors": MIRRORS,
        "packages": read_package_list(),
        "lock": lock_document(lock) if lock is not None else None,
        "customize": hashlib.sha256(CUSTOMIZE_HOOK.read_bytes()).hexdigest(),
        "preferences": hashlib.sha256(APT_PREFERENCES.read_bytes()).hexdigest(),
        "dpkg": DPKG_EXCLUDES,
        "epoch": SOURCE_DATE_EPOCH,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def uvm_cache() -> Path:
    return cache_dir() / "uvm"


def _deb_identity(path: Path) -> tuple[str, str, str]:
    """(name, version, arch) from the .deb's control file."""
    out = run(["dpkg-deb", "-f", path, "Package", "Version", "Architecture"]).stdout.decode()
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return fields["Package"], fields["Version"], fields["Architecture"]


def _parse_dpkg_status(text: str) -> tuple[InstalledPackage, ...]:
    found = []
    for para in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in para.splitlines():
            if line and not line[0].isspace() and ":" in line:
                k, v = line.split(":", 1)
                fields[k] = v.strip()
        if fields.get("Status", "").endswith(" installed"):
            found.append(InstalledPackage(fields["Package"], fields["Version"], fields["Architecture"],
                                          int(fields.get("Installed-Size", "0"))))
    return tuple(sorted(found, key=lambda p: (p.name, p.arch)))


def installed_packages(base_tar: Path) -> tuple[InstalledPackage, ...]:
    with tarfile.open(base_tar, "r:") as tf:
        member = tf.extractfile("./var/lib/dpkg/status")
        assert member is not None
        return _parse_dpkg_status(member.read().decode())


def compare_with_lock(resolved: tuple[LockedPackage, ...], lock: tuple[LockedPackage, ...]) -> list[str]:
    """Differences between what mmdebstrap fetched and the lock, as human lines (empty: identical)."""
    want = {(p.name, p.arch): p for p in lock}
    got = {(p.name, p.arch): p for p in resolved}
    diffs = []
    for key in sorted(want.keys() | got.keys()):
        w, g = want.get(key), got.get(key)
        if w is None:
            diffs.append(f"{g.name} {g.version}: not in the lock")
        elif g is None:
            diffs.append(f"{w.name} {w.version}: locked but not installed")
        elif w.version != g.version:
            diffs.append(f"{w.name}: locked {w.version}, the mirror gave {g.version}")
        elif w.sha256 != g.sha256:
            diffs.append(f"{w.name} {w.version}: .deb SHA-256 {g.sha256} differs from the locked {w.sha256}")
    return diffs


def _mmdebstrap_argv(out_tar: Path, debs_dir: Path, prefs: Path) -> list[str | Path]:
    mode = "root" if os.geteuid() == 0 else "unshare"
    argv: list[str | Path] = ["mmdebstrap", f"--mode={mode}", "--variant=essential", "--format=tar",
                              "--include=" + ",".join(read_package_list()), "--skip=essential/unlink",
                              "--aptopt=APT::Install-Recommends \"false\""]
    argv += [f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES]
    # Merged /usr via directory symlinks (as debootstrap does) instead of the usrmerge package, which
    # drags perl in; the hook ships with mmdebstrap.
    argv += [f"--hook-dir={MERGED_USR_HOOKS}",
             f"--setup-hook=copy-in {prefs} /etc/apt/preferences.d/",
             f"--customize-hook=sync-out /var/cache/apt/archives {debs_dir}",
             f"--customize-hook=rm -f \"$1/etc/apt/preferences.d/{prefs.name}\"",
             f"--customize-hook={CUSTOMIZE_HOOK}",
             SUITE, out_tar, *MIRRORS]
    return argv


def cached_base(key: str) -> BaseArtifact | None:
    d = uvm_cache() / "rootfs-base" / key
    meta = d / "base.json"
    if not meta.is_file():
        return None
    doc = json.loads(meta.read_text())
    return BaseArtifact(tar=d / "base.tar", key=key,
                        packages=tuple(LockedPackage(**p) for p in doc["packages"]),
                        installed=tuple(InstalledPackage(**p) for p in doc["installed"]))


def build_base(*, update_lock: bool = False) -> BaseArtifact:
    """The mmdebstrap base for the current recipe and lock (update_lock: resolve afresh, rewrite the lock)."""
    lock = read_lock()
    if lock is None and not update_lock:
        raise InputError(f"the UVM package lock {LOCK_FILE} is missing",
                         hint="create it with 'parma-sandbox build rootfs --update-lock'")
    key = base_key(None if update_lock else lock)
    if not update_lock and (hit := cached_base(key)):
        return hit
    final = uvm_cache() / "rootfs-base" / key
    with file_lock(final.with_name(f"{key}.lock")):
        if not update_lock and (hit := cached_base(key)):
            return hit
        with tempfile.TemporaryDirectory(prefix="uvm-base-", dir=final.parent) as tmp_name:
            tmp = Path(tmp_name)
            # In unshare mode the unprivileged build user must reach these paths.
            os.chmod(tmp, 0o755)
            debs = tmp / "debs"
            debs.mkdir()
            prefs = tmp / "parma-uvm.pref"
            prefs.write_text(preferences_text(None if update_lock else lock))
            out_tar = tmp / "base.tar"
            with step("Building the UVM base (mmdebstrap)"):
                run(_mmdebstrap_argv(out_tar, debs, prefs),
                    env={"SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH), "TMPDIR": str(tmp)})
            with step("Checking packages against the lock"):
                resolved = []
                for deb in sorted(debs.glob("*.deb")):
                    name, version, arch = _deb_identity(deb)
                    resolved.append(LockedPackage(name, version, arch, sha256_file(deb), deb.stat().st_size))
                resolved_t = tuple(sorted(resolved, key=lambda p: (p.name, p.arch)))
                installed = installed_packages(out_tar)
                inst = {(p.name, p.version, p.arch) for p in installed}
                fetched = {(p.name, p.version, p.arch) for p in resolved_t}
                if inst != fetched:
                    raise StateError("the packages mmdebstrap installed differ from the .debs it fetched: "
                                     f"{sorted(inst ^ fetched)}")
                if update_lock:
                    atomic_write(LOCK_FILE, lock_document(resolved_t).encode())
                    lock = resolved_t
                    key = base_key(lock)
                    final = uvm_cache() / "rootfs-base" / key
                else:
                    assert lock is not None
                    diffs = compare_with_lock(resolved_t, lock)
                    if diffs:
                        raise CheckFailed(
                            f"the UVM packages differ from {LOCK_FILE.name} ({len(diffs)} difference(s)): "
                            + "; ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else ""),
                            hint="the Debian mirror moved on (point release or security update). Review the "
                                 "change and re-pin with 'parma-sandbox build rootfs --update-lock'; the "
                                 "rootfs root hash and the expected measurement change with it")
            with atomic_dir(final) as stage:
                os.rename(out_tar, stage / "base.tar")
                (stage / "base.json").write_text(json.dumps({
                    "packages": [asdict(p) for p in resolved_t],
                    "installed": [asdict(p) for p in installed],
                }, indent=1) + "\n")
    hit = cached_base(key)
    assert hit is not None
    return hit


# ---- overlay -------------------------------------------------------------------------------------


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
                              if re.match(r"^\./usr/lib/python3\.\d+/", m.name)})
        run(["tar", "-xf", base_tar, "-C", root, "--no-same-owner", "--no-same-permissions",
             "./usr/bin", "./usr/lib/x86_64-linux-gnu", *[f"./usr/lib/{d}" for d in libdirs]])
        pythons = sorted(p for p in (root / "usr/bin").glob("python3.*") if re.fullmatch(r"python3\.\d+", p.name))
        if not pythons:
            raise StateError(f"no python3.X interpreter in {base_tar}")
        lib = root / "usr/lib/x86_64-linux-gnu"
        argv = (str(lib / "ld-linux-x86-64.so.2"), "--library-path", str(lib), str(pythons[-1]), "-S")
        env = {"PYTHONHOME": str(root / "usr"), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        tag = run([*argv, "-c", "import sys; print(sys.implementation.cache_tag)"], env=env).stdout.decode().strip()
        yield GuestPython(argv, env, tag)


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
        added: dict[str, tuple[tarfile.TarInfo, Path | None]] = {}
        for dest, src in [*files, *compiled, (INIT_PATH, INIT_SCRIPT)]:
            parts = PurePosixPath(dest).parts
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                added.setdefault(d, (_new_entry(d, mode=0o755, kind=tarfile.DIRTYPE), None))
            mode = 0o755 if dest == INIT_PATH else 0o644
            added[dest] = (_new_entry(dest, mode=mode, size=src.stat().st_size), src)
        with tarfile.open(base.tar, "r:") as src_tar, open(out, "wb") as f, \
                tarfile.open(fileobj=f, mode="w:", format=tarfile.GNU_FORMAT) as dst:
            entries: dict[str, tuple[tarfile.TarInfo, tarfile.TarInfo | Path | None]] = {}
            for m in src_tar.getmembers():
                rel = m.name.removeprefix("./").rstrip("/")
                if rel and DROP.match(rel):
                    continue
                entries[rel or "."] = (m, m)
            for rel, (info, src) in added.items():
                if rel in entries and info.isdir():
                    continue    # usr/, usr/lib/ come from the base
                if rel in entries:
                    raise StateError(f"the agent overlay would replace /{rel} from the Debian base")
                entries[rel] = (info, src)
            for rel in sorted(entries, key=lambda r: "" if r == "." else r):
                info, src = entries[rel]
                out_info = _normalize(copy.copy(info))
                if isinstance(src, tarfile.TarInfo):
                    data = src_tar.extractfile(src) if src.isreg() else None
                    dst.addfile(out_info, data)
                elif isinstance(src, Path):
                    with open(src, "rb") as data:
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
