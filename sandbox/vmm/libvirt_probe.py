"""What `parma-sandbox check` says about libvirt: version, SEV-SNP support, who runs QEMU, KVM access.

libvirt >= 10.5 is needed for <launchSecurity type='sev-snp'> (Debian 12: from bookworm-backports).
A system libvirtd runs QEMU as its own user (libvirt-qemu on Debian); the probe reads that user from
the DAC security model's base label, says where domain files get published for it
(sandbox/vmm/libvirt_share.py), and whether that user can open /dev/kvm: without udev (containers,
minimal hosts) /dev/kvm is often 0600 root, which breaks kvm domains and, with libvirt 9.x, makes
every API call re-probe QEMU (about 2 minutes per domain start).
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import stat
from pathlib import Path

from sandbox.hostcheck import Availability, CheckReport, Item
from sandbox.log import log
from sandbox.run import find_tool, run
from sandbox.shared.errors import SandboxError
from sandbox.vmm.backend import DAEMON_HINT, LaunchError, default_uri, libvirt_module
from sandbox.vmm.libvirt_share import parse_dac_label, share_root
from sandbox.vmm.snp import parse_domcaps_sev

LIBVIRT_SNP_MIN = (10, 5, 0)     # <launchSecurity type='sev-snp'>
LIBVIRT_SOCKETS = (Path("/run/libvirt/libvirt-sock"), Path("/var/run/libvirt/libvirt-sock"))


def _version_text(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def _libvirt_number(n: int) -> tuple[int, int, int]:
    return n // 1_000_000, n // 1000 % 1000, n % 1000


def installed_libvirt() -> tuple[int, int, int] | None:
    """The version of the installed libvirtd binary (`libvirtd --version`)."""
    try:
        out = run([find_tool("libvirtd"), "--version"], check=False, timeout=10).stdout.decode(errors="replace")
    except SandboxError:
        return None
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def can_open(path: Path, uid: int, gids: set[int]) -> bool:
    """Whether uid (with these groups) may read and write `path` by its mode bits."""
    try:
        st = path.stat()
    except OSError:
        return False
    if uid == 0:
        return True
    if st.st_uid == uid:
        bits = stat.S_IRUSR | stat.S_IWUSR
    elif st.st_gid in gids:
        bits = stat.S_IRGRP | stat.S_IWGRP
    else:
        bits = stat.S_IROTH | stat.S_IWOTH
    return st.st_mode & bits == bits


def _user_groups(uid: int, gid: int) -> tuple[str, set[int]]:
    """The user's name and the groups its processes get (libvirt: the label's gid plus getgrouplist())."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return str(uid), {gid}
    return entry.pw_name, {gid, entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem)}


def probe_libvirt(kvm_ok: bool) -> list[Item]:
    """libvirtd: reachable? which version, does it offer sev-snp, who runs QEMU, can that user use KVM."""
    uri = default_uri()
    installed = installed_libvirt()
    items = []
    too_old = installed if installed is not None and installed < LIBVIRT_SNP_MIN else None
    old_hint = "install libvirt from bookworm-backports ('make setup' does this)"
    daemon = None
    if uri.startswith("qemu:///system"):
        daemon = next((s for s in LIBVIRT_SOCKETS if s.exists()), None)
        if daemon is None:
            what = f"libvirt {_version_text(installed)} installed" if installed else "libvirt is not installed"
            items.append(Item("libvirtd", Availability.missing,
                              f"not running ({what}; only needed for --backend libvirt)",
                              DAEMON_HINT if installed else "run 'make setup'"))
            if too_old is not None:
                items.append(Item("libvirt sev-snp", Availability.missing,
                                  f"libvirt {_version_text(too_old)} predates SEV-SNP launch security (needs "
                                  f"{_version_text(LIBVIRT_SNP_MIN)})", old_hint))
            return items
    try:
        libvirt = libvirt_module()
    except LaunchError as e:
        return [Item("libvirtd", Availability.unusable, e.message, e.hint)]
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        return [Item("libvirtd", Availability.unusable, f"{uri}: {e.get_error_message()}", DAEMON_HINT)]
    try:
        version = _libvirt_number(conn.getLibVersion())
        hyper = _libvirt_number(conn.getVersion())
        items.append(Item("libvirtd", Availability.ok, f"libvirt {_version_text(version)} at {uri} "
                                                 f"(QEMU {_version_text(hyper)})"))
        virt = "kvm" if kvm_ok else "qemu"
        if version < LIBVIRT_SNP_MIN:
            items.append(Item("libvirt sev-snp", Availability.missing,
                              f"libvirt {_version_text(version)} predates SEV-SNP launch security (needs "
                              f"{_version_text(LIBVIRT_SNP_MIN)})", old_hint))
        else:
            try:
                sev, snp = parse_domcaps_sev(conn.getDomainCapabilities(None, "x86_64", "q35", "kvm"))
            except libvirt.libvirtError as e:
                sev, snp = None, False
                log.debug("domain capabilities: %s", e)
            detail = (f"domain capabilities offer sev-snp (cbitpos {sev.cbitpos}, reduced-phys-bits "
                      f"{sev.reduced_phys_bits})" if snp and sev else
                      f"libvirt {_version_text(version)} supports it, but this host's domain capabilities "
                      "offer no sev-snp (no SEV-SNP hardware, or kvm_amd without sev_snp=1)")
            items.append(Item("libvirt sev-snp", Availability.ok if snp else Availability.missing, detail))
        user = parse_dac_label(conn.getCapabilities(), virt)
    finally:
        conn.close()
    if user is None or user.uid == os.getuid():
        items.append(Item("libvirt qemu user", Availability.ok, "QEMU runs as you: domains use the files in place"))
        return items
    name, groups = _user_groups(user.uid, user.gid)
    items.append(Item("libvirt qemu user", Availability.ok,
                      f"QEMU runs as {name} (uid {user.uid}): each domain's files are published for it in "
                      f"{share_root()}/<domain> (hard links of the read-only disks, copies of the rest)"))
    kvm = Path("/dev/kvm")
    if kvm.exists() and not can_open(kvm, user.uid, groups):
        st = kvm.stat()
        detail = (f"/dev/kvm is {stat.S_IMODE(st.st_mode):04o} {_owner(st)}: libvirt's QEMU ({name}) cannot use "
                  "KVM: libvirt's kvm domains fail, and libvirt 9.x also re-probes QEMU on every call "
                  "(about 2 minutes per domain start)")
        items.append(Item("libvirt /dev/kvm", Availability.unusable if kvm_ok else Availability.info, detail,
                          "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm (what udev's rule does on a normal host)"))
    return items


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def with_libvirt(report: CheckReport) -> CheckReport:
    """`report` with the libvirt items added after the firmware ones (informational: the TEE verdict is
    the same for both backends)."""
    kvm_ok = report.item("kvm").status == Availability.ok
    items = list(report.items)
    at = next((i + 1 for i, it in enumerate(items) if it.name.startswith("ovmf (AmdSev")), len(items))
    items[at:at] = probe_libvirt(kvm_ok)
    return dataclasses.replace(report, items=tuple(items))
