"""The UVM's Debian packages: the list to install, the lock that pins them, and what got installed.

images/uvm/packages.txt names what goes on top of the Essential set; images/uvm/packages.lock.json pins
every package of the result (name, version, architecture, SHA-256 and size of the .deb). The base build
pins apt to the locked versions, then compares what it fetched with the lock.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from sandbox.run import run
from sandbox.shared.errors import InputError
from sandbox.uvm.source_tree import UVM_IMAGE_DIR

SUITE = "bookworm"
PACKAGES_TXT = UVM_IMAGE_DIR / "packages.txt"
LOCK_FILE = UVM_IMAGE_DIR / "packages.lock.json"
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


def deb_identity(path: Path) -> tuple[str, str, str]:
    """(name, version, arch) from the .deb's control file."""
    out = run(["dpkg-deb", "-f", path, "Package", "Version", "Architecture"]).stdout.decode()
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return fields["Package"], fields["Version"], fields["Architecture"]


def parse_dpkg_status(text: str) -> tuple[InstalledPackage, ...]:
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
        return parse_dpkg_status(member.read().decode())


def compare_with_lock(resolved: tuple[LockedPackage, ...], lock: tuple[LockedPackage, ...]) -> list[str]:
    """Differences between what mmdebstrap fetched and the lock, as human lines (empty: identical)."""
    want = {(p.name, p.arch): p for p in lock}
    got = {(p.name, p.arch): p for p in resolved}
    diffs = []
    for key in sorted(want.keys() | got.keys()):
        w, g = want.get(key), got.get(key)
        if w is None:
            g = got[key]                            # the key came from one of the two
            diffs.append(f"{g.name} {g.version}: not in the lock")
        elif g is None:
            diffs.append(f"{w.name} {w.version}: locked but not installed")
        elif w.version != g.version:
            diffs.append(f"{w.name}: locked {w.version}, the mirror gave {g.version}")
        elif w.sha256 != g.sha256:
            diffs.append(f"{w.name} {w.version}: .deb SHA-256 {g.sha256} differs from the locked {w.sha256}")
    return diffs
