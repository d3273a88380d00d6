"""Build the UVM kernel: tinyconfig + the fragments in kernel_configs/, everything built in.

The result is cached under <cache>/uvm/kernel/<key>/ where the key covers the pinned source, the
fragments and this recipe's version, so a changed fragment rebuilds and nothing else does. After
`olddefconfig` every option the fragments ask for is checked against the final .config: Kconfig drops
options whose dependencies are missing without a word, and a silently missing DM_INIT or SEV_GUEST
would only show up much later as an unbootable or unattestable UVM.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sandbox.fsutil import atomic_dir, file_lock
from sandbox.paths import cache_dir
from sandbox.progress import step
from sandbox.run import PathLike, find_tool, run
from sandbox.shared.errors import CheckFailed, InputError
from sandbox.uvm.fetch import fetch_pinned, sha256_file
from sandbox.uvm.longrun import require_build_tools, run_logged
from sandbox.uvm.pins import KERNEL, KernelSource
from sandbox.uvm.source_tree import KERNEL_CONFIGS

RECIPE_VERSION = 1
# Reproducible-build settings: the kernel embeds these in its version banner.
BUILD_ENV = {
    "KBUILD_BUILD_TIMESTAMP": "1970-01-01 00:00:00 UTC",
    "KBUILD_BUILD_USER": "parma",
    "KBUILD_BUILD_HOST": "parma-sandbox",
    "KBUILD_BUILD_VERSION": "1",
    "LC_ALL": "C",
}
# Tools the kernel build calls, checked up front so a missing one fails fast with an install hint.
BUILD_TOOLS = ("make", "gcc", "flex", "bison", "bc", "perl", "lz4", "dpkg-deb", "tar", "xz")
BUILD_HEADERS = {"/usr/include/gelf.h": "libelf-dev", "/usr/include/openssl/opensslv.h": "libssl-dev"}
# Compile steps of a full build with these fragments (counted once); only drives the progress bar.
EXPECTED_STEPS = 1640

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


@dataclass(frozen=True)
class KernelArtifact:
    bzimage: Path
    config: Path
    key: str
    source_version: str     # the Debian package version
    release: str            # e.g. "6.12.117"


def parse_config(text: str, *, source: str = "<config>", strict: bool = False) -> dict[str, str]:
    """CONFIG_X=v lines and '# CONFIG_X is not set' (recorded as 'n'). strict: reject anything else."""
    options: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if m := _SET.match(line):
            options[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            options[m.group(1)] = "n"
        elif strict and line and not line.startswith("#"):
            raise InputError(f"{source}:{lineno}: not a kernel config line: {raw!r}",
                             hint="use 'CONFIG_NAME=value' or '# CONFIG_NAME is not set'")
    return options


def fragment_files(directory: Path = KERNEL_CONFIGS) -> list[Path]:
    files = sorted(directory.glob("*.config"))
    if not files:
        raise InputError(f"no kernel config fragments (*.config) in {directory}",
                         hint="the UVM kernel is built from tinyconfig plus these fragments")
    return files


def requested_options(files: list[Path]) -> dict[str, str]:
    wanted: dict[str, str] = {}
    for f in files:
        for name, value in parse_config(f.read_text(), source=str(f), strict=True).items():
            if name in wanted and wanted[name] != value:
                raise InputError(f"{f}: {name}={value} contradicts {name}={wanted[name]} in an earlier fragment",
                                 hint="each option may be set by one fragment only")
            wanted[name] = value
    return wanted


def missing_options(wanted: dict[str, str], final: dict[str, str]) -> list[str]:
    """Options whose final value differs from the request ('n' and absent are the same)."""
    bad = []
    for name, value in sorted(wanted.items()):
        got = final.get(name, "n")
        if got != value:
            bad.append(f"{name}: wanted {value}, got {got}")
    return bad


def kernel_key(src: KernelSource = KERNEL, files: list[Path] | None = None) -> str:
    files = fragment_files() if files is None else files
    doc = {
        "recipe": RECIPE_VERSION,
        "package": src.package,
        "version": src.version,
        "tarball": src.tarball_sha256,
        "fragments": [[f.name, hashlib.sha256(f.read_bytes()).hexdigest()] for f in files],
        "env": BUILD_ENV,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def kernel_dir(key: str) -> Path:
    return cache_dir() / "uvm" / "kernel" / key


def cached_kernel(key: str | None = None) -> KernelArtifact | None:
    key = key or kernel_key()
    out = kernel_dir(key)
    meta = out / "kernel.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    return KernelArtifact(bzimage=out / "bzImage", config=out / "config", key=key,
                          source_version=info["source_version"], release=info["release"])


def check_build_dependencies() -> None:
    require_build_tools(BUILD_TOOLS, BUILD_HEADERS, what="the kernel build")


def _bump_hint(src: KernelSource) -> str:
    return (f"move the pin in kernel_configs/linux-source.json to the version 'apt-cache policy {src.package}' offers, "
            "with the SHA-256 of its .deb (apt-cache show) and of the tarball inside it")


def _unpack_source(src: KernelSource, work: Path) -> Path:
    deb = fetch_pinned(src.deb, what=f"{src.package} {src.version}", bump_hint=_bump_hint(src))
    tree = work / src.tree
    if (tree / "Makefile").is_file():
        return tree
    with step(f"Unpacking {src.package} {src.version}"):
        debdir = work / "deb"
        shutil.rmtree(debdir, ignore_errors=True)
        run(["dpkg-deb", "-x", deb, debdir])
        tarball = debdir / src.tarball_member
        got = sha256_file(tarball)
        if got != src.tarball_sha256:
            raise CheckFailed(f"{tarball.name} inside {deb.name} has SHA-256 {got}, expected {src.tarball_sha256}",
                              hint=_bump_hint(src))
        staging = work / "unpack"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        run(["tar", "-xf", tarball, "-C", staging])
        os.rename(staging / src.tree, tree)
        shutil.rmtree(staging)
        shutil.rmtree(debdir)
    return tree


def _configure(tree: Path, out: Path, files: list[Path]) -> None:
    wanted = requested_options(files)
    with step("Configuring the kernel (tinyconfig + fragments)"):
        env = {**BUILD_ENV}
        run(["make", "-C", tree, f"O={out}", "tinyconfig"], env=env)
        run([tree / "scripts/kconfig/merge_config.sh", "-m", "-O", out, out / ".config", *files],
            env={**env, "KCONFIG_CONFIG": str(out / ".config")}, cwd=tree)
        run(["make", "-C", tree, f"O={out}", "olddefconfig"], env=env)
    final = parse_config((out / ".config").read_text())
    bad = missing_options(wanted, final)
    if bad:
        raise CheckFailed(f"{len(bad)} kernel option(s) from kernel_configs/ did not stick: " + "; ".join(bad),
                          hint="an option is dropped when its dependencies are not enabled; add them to a "
                               "fragment (see 'make menuconfig' help for the option)")


def _make_bzimage(tree: Path, out: Path) -> None:
    jobs = os.cpu_count() or 1
    argv: list[PathLike] = [find_tool("nice"), "-n", "10", "make", "-C", tree, f"O={out}", f"-j{jobs}", "bzImage"]
    run_logged(argv, out / "build.log", what="Compiling the kernel", env=BUILD_ENV, total=EXPECTED_STEPS,
               unit_prefix=b"  CC ")


def build_kernel(*, force: bool = False) -> KernelArtifact:
    """Return the cached kernel for the current fragments, building it if needed."""
    files = fragment_files()
    key = kernel_key(files=files)
    if not force and (hit := cached_kernel(key)):
        return hit
    check_build_dependencies()
    final_dir = kernel_dir(key)
    with file_lock(final_dir.with_name(f"{key}.lock")):
        if not force and (hit := cached_kernel(key)):
            return hit
        work = final_dir.with_name(f"work-{key}")
        work.mkdir(parents=True, exist_ok=True)
        tree = _unpack_source(KERNEL, work)
        out = work / "out"
        out.mkdir(exist_ok=True)
        _configure(tree, out, files)
        _make_bzimage(tree, out)
        release = (out / "include/config/kernel.release").read_text().strip()
        with atomic_dir(final_dir) as stage:
            shutil.copy2(out / "arch/x86/boot/bzImage", stage / "bzImage")
            shutil.copy2(out / ".config", stage / "config")
            shutil.copy2(out / "build.log", stage / "build.log")
            (stage / "kernel.json").write_text(json.dumps({
                "source_package": KERNEL.package, "source_version": KERNEL.version, "release": release,
                "tarball_sha256": KERNEL.tarball_sha256, "fragments": [f.name for f in files],
                "bzimage_sha256": sha256_file(out / "arch/x86/boot/bzImage"),
            }, indent=2) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    hit = cached_kernel(key)
    assert hit is not None
    return hit
