"""The SEV-SNP firmware: OVMF's AmdSevX64 platform, built from Debian's edk2 source at a pinned version.

AmdSevX64 is the OVMF build for measured direct boot: a single image (no VARS store) with the
SNP_KERNEL_HASHES metadata section, whose BlobVerifier checks the kernel, initrd and command line
against the hashes QEMU injects with `kernel-hashes=on`. Debian ships no such build, so we make one:
the pinned upstream tarball plus Debian's patch series, BaseTools, then `build -p
OvmfPkg/AmdSev/AmdSevX64.dsc`. The result is cached under <cache>/uvm/firmware/<key>/OVMF.amdsev.fd
and its SHA-256 recorded; a copy at <cache>/firmware/OVMF.amdsev.fd is what `parma-sandbox check` finds.

Emulation mode does not need it (the kernel boots directly), but the UVM manifest's expected SNP
measurement covers the whole firmware image, so the UVM build produces it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sandbox.fsutil import atomic_dir, atomic_output, file_lock
from sandbox.paths import cache_dir
from sandbox.progress import step
from sandbox.run import PathLike, find_tool, run
from sandbox.shared.errors import StateError
from sandbox.uvm.fetch import fetch_pinned, sha256_file
from sandbox.uvm.longrun import require_build_tools, run_logged
from sandbox.uvm.pins import EDK2, Edk2Source

RECIPE_VERSION = 2
TOOLCHAIN = "GCC5"          # the tag Debian's edk2 packaging builds with
PLATFORM = "OvmfPkg/AmdSev/AmdSevX64.dsc"
OUTPUT = "Build/AmdSev/RELEASE_GCC5/FV/OVMF.fd"
# AmdSevX64 embeds a GRUB (for SEV secret injection) built by grub.sh from a GRUB source tree. We
# boot the kernel directly, so an empty grub.efi stands in (as AMD's own SNP build scripts do).
GRUB_PLACEHOLDER = "OvmfPkg/AmdSev/Grub/grub.efi"
# Reproducibility. GenFw writes the absolute path of each module's .dll into the PE debug directory
# (its length shapes the image) and a time stamp; both end up in the compressed firmware volume.
# So the build runs at a fixed path, and GenFw zeroes its debug data and time stamps (--zero).
WORK_ROOT = Path("/tmp/parma-sandbox-edk2")
TOOLS_DEF = "BaseTools/Conf/tools_def.template"
GENFW_FLAGS_LINE = "*_*_*_GENFW_FLAGS                  ="
BUILD_TOOLS = ("make", "gcc", "g++", "nasm", "iasl", "python3", "patch", "bash", "tar", "xz")
BUILD_HEADERS = {"/usr/include/uuid/uuid.h": "uuid-dev"}
# Reproducibility: edk2 stamps nothing from the clock into the image, but pin the locale and TZ.
BUILD_ENV = {"LC_ALL": "C", "TZ": "UTC", "SOURCE_DATE_EPOCH": "1735689600"}
# Modules a full AmdSevX64 build compiles (counted in a build log); only drives the progress bar.
EXPECTED_STEPS = 235


@dataclass(frozen=True)
class FirmwareArtifact:
    path: Path
    sha256: str
    key: str
    source_version: str


def firmware_key(src: Edk2Source = EDK2) -> str:
    doc = {"recipe": RECIPE_VERSION, "version": src.version, "orig": src.orig.sha256,
           "debian": src.debian.sha256, "platform": PLATFORM, "toolchain": TOOLCHAIN, "env": BUILD_ENV}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def firmware_dir(key: str) -> Path:
    return cache_dir() / "uvm" / "firmware" / key


def published_path() -> Path:
    """Where `parma-sandbox check` and the launcher look for the AmdSev OVMF."""
    return cache_dir() / "firmware" / "OVMF.amdsev.fd"


def cached_firmware(key: str | None = None) -> FirmwareArtifact | None:
    key = key or firmware_key()
    d = firmware_dir(key)
    meta = d / "firmware.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    return FirmwareArtifact(path=d / "OVMF.amdsev.fd", sha256=info["sha256"], key=key,
                            source_version=info["source_version"])


def check_build_dependencies() -> None:
    require_build_tools(BUILD_TOOLS, BUILD_HEADERS, what="the firmware build")


def _bump_hint() -> str:
    return ("move the edk2 pin in firmware/edk2.json to a version on the mirror (apt-get source "
            "--print-uris edk2 with a deb-src line for the suite), with its SHA-256s")


def _unpack(src: Edk2Source, work: Path) -> Path:
    orig = fetch_pinned(src.orig, what=f"edk2 {src.version} source", bump_hint=_bump_hint())
    debian = fetch_pinned(src.debian, what=f"edk2 {src.version} Debian patches", bump_hint=_bump_hint())
    tree = work / src.tree
    if (tree / ".parma-unpacked").is_file():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    with step(f"Unpacking edk2 {src.version}"):
        run(["tar", "-xf", orig, "-C", work])
        run(["tar", "-xf", debian, "-C", tree])
        series = (tree / "debian/patches/series").read_text().split()
        for name in (s for s in series if not s.startswith("#")):
            run(["patch", "-p1", "--quiet", "--forward", "-i", tree / "debian/patches" / name], cwd=tree)
        (tree / GRUB_PLACEHOLDER).write_bytes(b"")
        tools_def = tree / TOOLS_DEF
        text = tools_def.read_text()
        if text.count(GENFW_FLAGS_LINE + "\n") != 1:
            raise StateError(f"{TOOLS_DEF} in edk2 {src.version} has no default GENFW_FLAGS line to set",
                             hint="the reproducibility setting needs updating for this edk2 version")
        tools_def.write_text(text.replace(GENFW_FLAGS_LINE + "\n", GENFW_FLAGS_LINE + " --zero\n"))
        (tree / ".parma-unpacked").write_text(src.version + "\n")
    return tree


def _edk2(tree: Path, command: str, log_path: Path, *, what: str, total: int | None = None) -> None:
    """Run `command` after sourcing edksetup.sh (edk2's documented entry point), logging to log_path."""
    argv: list[PathLike] = [find_tool("nice"), "-n", "10", "bash", "-c", f"set -e; . ./edksetup.sh >/dev/null; {command}"]
    run_logged(argv, log_path, what=what, cwd=tree, total=total,
               unit_prefix=b"Building ... " if total else None,
               env={**BUILD_ENV, "WORKSPACE": str(tree), "PYTHON_COMMAND": "python3"})


def build_firmware(*, force: bool = False) -> FirmwareArtifact:
    """Return the cached AmdSevX64 OVMF, building it if needed (2 to 4 minutes on 2 cores)."""
    key = firmware_key()
    if not force and (hit := cached_firmware(key)):
        _publish(hit)
        return hit
    check_build_dependencies()
    final = firmware_dir(key)
    with file_lock(final.with_name(f"{key}.lock")):
        if not force and (hit := cached_firmware(key)):
            _publish(hit)
            return hit
        work = WORK_ROOT / key
        work.mkdir(parents=True, exist_ok=True)
        if work.stat().st_uid != os.getuid():
            raise StateError(f"the firmware build directory {work} belongs to another user",
                             hint="the build needs this fixed path for a reproducible image; remove it or "
                                  "build as that user")
        tree = _unpack(EDK2, work)
        log_path = work / "build.log"
        jobs = os.cpu_count() or 1
        _edk2(tree, f"make -C BaseTools -j{jobs}", log_path, what="Building the edk2 BaseTools")
        _edk2(tree, f"build -a X64 -t {TOOLCHAIN} -b RELEASE -n {jobs} -p {PLATFORM}", log_path,
              what="Building the AmdSev OVMF firmware", total=EXPECTED_STEPS)
        image = tree / OUTPUT
        digest = sha256_file(image)
        with atomic_dir(final) as stage:
            shutil.copy2(image, stage / "OVMF.amdsev.fd")
            shutil.copy2(log_path, stage / "build.log")
            (stage / "firmware.json").write_text(json.dumps({
                "platform": PLATFORM, "source_version": EDK2.version, "orig_sha256": EDK2.orig.sha256,
                "debian_sha256": EDK2.debian.sha256, "sha256": digest, "size": image.stat().st_size,
            }, indent=2) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    hit = cached_firmware(key)
    assert hit is not None
    _publish(hit)
    return hit


def _publish(fw: FirmwareArtifact) -> None:
    """Keep <cache>/firmware/OVMF.amdsev.fd equal to the current build (atomically replaced)."""
    target = published_path()
    if target.is_file() and target.stat().st_size == fw.path.stat().st_size and sha256_file(target) == fw.sha256:
        return
    with atomic_output(target) as tmp:
        shutil.copyfile(fw.path, tmp)
