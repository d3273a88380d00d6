"""Pinned upstream sources for the UVM build: exact versions, URLs and SHA-256s.

The pins are data in the source tree: kernel_configs/linux-source.json (Debian's linux-source .deb) and
firmware/edk2.json (Debian's edk2 source package). Bumping a pin is a deliberate change: update the
version, the URLs' hashes and sizes, and re-run `make uvm`.
The hashes of .deb files are the ones in Debian's signed Packages/Sources indices (`apt-cache show`,
`apt-get source --print-uris`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sandbox.shared.errors import StateError
from sandbox.uvm.source_tree import FIRMWARE_DIR, KERNEL_CONFIGS


@dataclass(frozen=True)
class PinnedFile:
    url: str
    sha256: str
    size: int

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1].replace("%2b", "+")


@dataclass(frozen=True)
class KernelSource:
    """Debian's linux-source package: a .deb carrying the upstream+Debian tarball."""

    package: str
    version: str
    deb: PinnedFile
    tarball_member: str     # path of the tarball inside the .deb's data archive
    tarball_sha256: str
    tree: str               # top directory inside the tarball


@dataclass(frozen=True)
class Edk2Source:
    """Debian's edk2 source package (3.0 quilt): upstream tarball plus the Debian patch set."""

    version: str
    orig: PinnedFile
    debian: PinnedFile
    tree: str


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StateError(f"cannot read the source pin {path}: {e}",
                         hint="the UVM recipes come from the source tree; reinstall or check out again") from None


def _pinned(d: dict) -> PinnedFile:
    return PinnedFile(url=d["url"], sha256=d["sha256"], size=d["size"])


def load_kernel_source(path: Path = KERNEL_CONFIGS / "linux-source.json") -> KernelSource:
    d = _load(path)
    return KernelSource(package=d["package"], version=d["version"], deb=_pinned(d["deb"]),
                        tarball_member=d["tarball_member"], tarball_sha256=d["tarball_sha256"], tree=d["tree"])


def load_edk2_source(path: Path = FIRMWARE_DIR / "edk2.json") -> Edk2Source:
    d = _load(path)
    return Edk2Source(version=d["version"], orig=_pinned(d["orig"]), debian=_pinned(d["debian"]), tree=d["tree"])


KERNEL = load_kernel_source()    # kernel_configs/linux-source.json
EDK2 = load_edk2_source()        # firmware/edk2.json
