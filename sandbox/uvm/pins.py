"""Pinned upstream sources for the UVM build: exact versions, URLs and SHA-256s.

Bumping a pin is a deliberate change: update the version, both URLs' hashes and re-run `make uvm`.
The hashes of .deb files are the ones in Debian's signed Packages/Sources indices (`apt-cache show`,
`apt-get source --print-uris`).
"""

from __future__ import annotations

from dataclasses import dataclass


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


# linux-source-6.12 from bookworm-security: 6.12 has configfs-tsm (TSM_REPORTS) and the SNP guest fixes.
KERNEL = KernelSource(
    package="linux-source-6.12",
    version="6.12.117-1~deb12u1",
    deb=PinnedFile(
        url="https://deb.debian.org/debian-security/pool/updates/main/l/linux-6.12/"
            "linux-source-6.12_6.12.117-1~deb12u1_all.deb",
        sha256="e849faf31ca3555757f3a8877cb01af92122f744f75d1f3102734651c4e14703",
        size=153476148,
    ),
    tarball_member="./usr/src/linux-source-6.12.tar.xz",
    tarball_sha256="585a4a074597aefa2b1a68ada83a3184ba351c127544dea80618bbcceaa3961f",
    tree="linux-source-6.12",
)

# edk2 from trixie: bookworm's 2022.11 lacks the SNP_KERNEL_HASHES metadata section that measured
# direct boot (QEMU kernel-hashes=on) and sev-snp-measure need; 2025.02 has it.
EDK2 = Edk2Source(
    version="2025.02-8+deb13u1",
    orig=PinnedFile(
        url="https://deb.debian.org/debian/pool/main/e/edk2/edk2_2025.02.orig.tar.xz",
        sha256="b63b6053d6d89c74d9291f9e96fde1584be99e6fb9c169ba9511505129d6b049",
        size=29646336,
    ),
    debian=PinnedFile(
        url="https://deb.debian.org/debian/pool/main/e/edk2/edk2_2025.02-8%2bdeb13u1.debian.tar.xz",
        sha256="e2a7f6fc58640818416a028d6d5e9dfc255697a7cdc60c14566c236df6bd9b08",
        size=53652,
    ),
    tree="edk2-2025.02",
)
