"""The UVM's Debian base: mmdebstrap at the pinned package versions, cached by recipe and lock.

`mmdebstrap --variant=essential` (unshare mode when not root) installs the Essential set plus
images/uvm/packages.txt, with merged /usr from mmdebstrap's own hook, documentation excluded by dpkg,
every package pinned by apt preferences to the version in the lock, and the Python stdlib recompiled
deterministically (images/uvm/customize.sh). Every fetched .deb must match the lock byte for byte, or
the build stops and says how to re-pin. With SOURCE_DATE_EPOCH the tar is reproducible.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from sandbox.fsutil import atomic_dir, atomic_write, file_lock
from sandbox.paths import cache_dir
from sandbox.progress import step
from sandbox.run import run
from sandbox.shared.errors import CheckFailed, InputError, StateError
from sandbox.uvm.fetch import sha256_file
from sandbox.uvm.packages import (
    APT_PREFERENCES,
    LOCK_FILE,
    SUITE,
    InstalledPackage,
    LockedPackage,
    compare_with_lock,
    deb_identity,
    installed_packages,
    lock_document,
    preferences_text,
    read_lock,
    read_package_list,
)
from sandbox.uvm.source_tree import UVM_IMAGE_DIR

RECIPE_VERSION = 1
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
# Merged /usr via directory symlinks, as debootstrap does (a hook that ships with mmdebstrap).
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
CUSTOMIZE_HOOK = UVM_IMAGE_DIR / "customize.sh"


@dataclass(frozen=True)
class BaseArtifact:
    tar: Path
    key: str
    packages: tuple[LockedPackage, ...]
    installed: tuple[InstalledPackage, ...]


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
        # In the system temp dir: in unshare mode the build's mapped root user must reach the chroot and
        # write the fetched .debs, which a private home directory (and so the cache) would not allow.
        with tempfile.TemporaryDirectory(prefix="parma-uvm-base-") as tmp_name:
            tmp = Path(tmp_name)
            os.chmod(tmp, 0o755)
            debs = tmp / "debs"
            debs.mkdir()
            os.chmod(debs, 0o777 if os.geteuid() != 0 else 0o755)
            prefs = tmp / "parma-uvm.pref"
            prefs.write_text(preferences_text(None if update_lock else lock))
            out_tar = tmp / "base.tar"
            with step("Building the UVM base (mmdebstrap)"):
                run(_mmdebstrap_argv(out_tar, debs, prefs),
                    env={"SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH), "TMPDIR": str(tmp)})
            with step("Checking packages against the lock"):
                resolved = []
                for deb in sorted(debs.glob("*.deb")):
                    name, version, arch = deb_identity(deb)
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
                shutil.move(out_tar, stage / "base.tar")     # /tmp may be another filesystem
                (stage / "base.json").write_text(json.dumps({
                    "packages": [asdict(p) for p in resolved_t],
                    "installed": [asdict(p) for p in installed],
                }, indent=1) + "\n")
    hit = cached_base(key)
    assert hit is not None
    return hit


# ---- overlay -------------------------------------------------------------------------------------

