"""Make a domain's files readable by libvirt's QEMU, which runs as another user (libvirt-qemu).

A stock system libvirtd runs QEMU as `libvirt-qemu` with dynamic ownership: at start it chowns the
kernel, the initrd and the fw_cfg files to that user (restoring them at shutdown) and QEMU opens them
itself, so they must sit where that user can reach them; our cache (~/.cache) and state directory
(0700) are not. Sockets and the serial log are opened by libvirtd itself and stay where they are.

So the launch publishes, per domain, into a directory the QEMU user can traverse:
- copies of the kernel, initrd, firmware and fw_cfg files (small; libvirt chowns them, and a copy
  keeps the cache's own files out of QEMU's reach), the fw_cfg copies readable only by the QEMU group;
- hard links of the read-only disks (large, shared, content-addressed: never copied, never chowned:
  the domain XML marks them relabel='no'); a disk that is not world-readable or sits on another
  filesystem is copied instead.
The directory is removed when the domain stops. Nothing is published when QEMU runs as the calling
user (qemu:///session, or a qemu.conf with user = "root").
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from sandbox.log import log
from sandbox.shared.errors import InputError, StateError
from sandbox.vmm.config import FwCfgFile, VmConfig

SHARE_ENV = "PARMA_SANDBOX_LIBVIRT_SHARE"
ROOT_SHARE = Path("/var/lib/libvirt/images/parma-sandbox")
MARKER = ".parma-sandbox-share"     # only directories carrying it are ever removed


@dataclass(frozen=True)
class QemuUser:
    """The uid/gid libvirt runs QEMU as (its DAC security model's base label)."""

    uid: int
    gid: int

    def is_caller(self) -> bool:
        return self.uid == os.getuid()


def parse_dac_label(capabilities_xml: str, virt_type: str) -> QemuUser | None:
    """The DAC base label (`+uid:+gid`) for `virt_type` ('qemu' or 'kvm') from host capabilities XML."""
    root = ET.fromstring(capabilities_xml)
    for secmodel in root.iter("secmodel"):
        if secmodel.findtext("model") != "dac":
            continue
        for label in secmodel.findall("baselabel"):
            if label.get("type") == virt_type and label.text:
                m = re.fullmatch(r"\+?(\d+):\+?(\d+)", label.text.strip())
                if m:
                    return QemuUser(int(m.group(1)), int(m.group(2)))
    return None


def share_root() -> Path:
    """Where per-domain directories go: $PARMA_SANDBOX_LIBVIRT_SHARE, libvirt's image directory for
    root, else /var/tmp/parma-sandbox-libvirt-<uid>."""
    if env := os.environ.get(SHARE_ENV):
        return Path(env)
    return ROOT_SHARE if os.getuid() == 0 else Path(f"/var/tmp/parma-sandbox-libvirt-{os.getuid()}")


@dataclass(frozen=True)
class Published:
    config: VmConfig           # the same VM, with the paths QEMU opens moved into `directory`
    directory: Path | None     # None: nothing needed publishing


def _traversable(path: Path) -> None:
    """Create `path` and its missing parents as 0711 (others may pass through, not list)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=0o711)
        os.chmod(d, 0o711)  # mkdir's mode is masked by the umask


def _copy(src: Path, dst: Path, mode: int, gid: int | None = None) -> None:
    shutil.copyfile(src, dst)
    if gid is not None:
        os.chown(dst, -1, gid)
    os.chmod(dst, mode)


def _link_or_copy(src: Path, dst: Path, *, readable: bool) -> None:
    """Hard-link (when `readable` is not needed or the file is world-readable), else copy."""
    if not readable or src.stat().st_mode & stat.S_IROTH:
        try:
            os.link(src, dst)
            return
        except OSError as e:
            log.debug("cannot hard-link %s into %s (%s); copying it", src, dst.parent, e.strerror)
    _copy(src, dst, 0o644 if readable else 0o600)


def publish(cfg: VmConfig, domain: str, user: QemuUser | None) -> Published:
    """Publish what QEMU opens for `cfg` so that `user` can read it; see the module docstring."""
    if user is None or user.is_caller():
        return Published(cfg, None)
    root = share_root()
    target = root / domain
    try:
        _traversable(root)
        remove(target)
        target.mkdir(mode=0o711)
        os.chmod(target, 0o711)
        (target / MARKER).write_text(domain + "\n")

        def place(src: Path, name: str, how: str) -> Path:
            dst = target / name
            if how == "copy":           # libvirt chowns it for the run: keep the original out of reach
                _copy(src, dst, 0o644)
            elif how == "private":      # fw_cfg files (e.g. the broker's location): the QEMU group only
                _copy(src, dst, 0o640, user.gid)
            elif how == "shared":       # read-only and never relabelled: QEMU reads it as "other"
                _link_or_copy(src, dst, readable=True)
            else:                       # writable: libvirt chowns it to QEMU for the run
                _link_or_copy(src, dst, readable=False)
            return dst

        kernel = place(cfg.kernel, "kernel", "copy")
        initrd = place(cfg.initrd, "initrd", "copy") if cfg.initrd is not None else None
        snp = cfg.snp
        if snp is not None:
            snp = dataclasses.replace(snp, firmware=place(snp.firmware, "firmware.fd", "copy"))
        disks = tuple(dataclasses.replace(d, path=place(d.path, f"disk{i}.img", "shared" if d.readonly else "relabel"))
                      for i, d in enumerate(cfg.disks))
        fw_cfg = tuple(FwCfgFile(f.name, place(f.path, f"fwcfg{i}", "private")) for i, f in enumerate(cfg.fw_cfg))
    except OSError as e:
        remove(target)
        raise StateError(f"cannot publish the domain's files in {target} for libvirt's QEMU "
                         f"(uid {user.uid}): {e.strerror or e}",
                         hint=f"set {SHARE_ENV} to a directory you can write and uid {user.uid} can traverse, "
                              "or use qemu:///session (PARMA_SANDBOX_LIBVIRT_URI)") from e
    published = dataclasses.replace(cfg, kernel=kernel, initrd=initrd, snp=snp, disks=disks, fw_cfg=fw_cfg)
    return Published(published, target)


def remove(directory: Path | None) -> None:
    """Remove a published directory (only one that carries our marker)."""
    if directory is None or not directory.exists():
        return
    if not (directory / MARKER).is_file():
        raise InputError(f"refusing to remove {directory}: not a directory parma-sandbox published for libvirt")
    shutil.rmtree(directory, ignore_errors=True)
