"""The VM configuration: everything the QEMU argv and the libvirt domain XML are pure functions of."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from sandbox.hostcheck import Accel, Tee
from sandbox.shared.protocol import PORT_PREFIX
from sandbox.vmm.snp import SnpLaunch, VmConfigError

__all__ = ["Accel", "Backend", "Disk", "DiskBus", "FwCfgFile", "GuestForward", "PortForward", "SnpLaunch", "Tee",
           "VmConfig"]

ROOT_DISK_SERIAL = "parma-root"
# virtio-scsi: disks sit on target 0 of a controller as LUNs 0..255 (the guest kernel finds them with one
# REPORT LUNS); a further controller is added per 256 disks. hcsshim attaches layers the same way
# (SCSI controller/LUN), with 4 controllers of 64 LUNs.
SCSI_LUNS_PER_CONTROLLER = 256
SLIRP_NETWORK = ipaddress.ip_network("10.0.2.0/24")    # QEMU user networking's default guest network


class Backend(StrEnum):
    qemu = "qemu"
    libvirt = "libvirt"


class DiskBus(StrEnum):
    virtio_blk = "virtio-blk"    # one PCI device per disk: the root disk (/dev/vda on the measured cmdline)
    scsi = "scsi"                # LUNs on virtio-scsi controllers: layers and volumes, hundreds of them


@dataclass(frozen=True)
class Disk:
    path: Path
    serial: str              # how the guest finds it: /sys/block/vdX/serial, or SCSI VPD page 0x80
    readonly: bool = True
    bus: DiskBus = DiskBus.virtio_blk
    wwn: int | None = None   # SCSI only: a 64-bit NAA world wide name (VPD page 0x83), a second identity


@dataclass(frozen=True)
class PortForward:
    guest_port: int
    host_port: int
    protocol: str = "tcp"            # tcp | udp
    host_address: str = "127.0.0.1"


@dataclass(frozen=True)
class GuestForward:
    """TCP connections the guest makes to guest_address:guest_port in QEMU's user network, forwarded to
    host_address:host_port on the host (slirp's guestfwd: one relay process per connection)."""

    guest_address: str
    guest_port: int
    host_address: str
    host_port: int

    def __post_init__(self) -> None:
        # These end up in a command line QEMU runs: only addresses and numbers, never free text.
        guest, host = ipaddress.ip_address(self.guest_address), ipaddress.ip_address(self.host_address)
        if guest.version != 4 or guest not in SLIRP_NETWORK:
            raise ValueError(f"guest forward address {self.guest_address} is not in QEMU's user network {SLIRP_NETWORK}")
        if not (0 < self.guest_port < 65536 and 0 < self.host_port < 65536):
            raise ValueError("guest forward ports must be 1-65535")
        object.__setattr__(self, "host_address", str(host))


@dataclass(frozen=True)
class FwCfgFile:
    name: str                # e.g. opt/parma/host_data (QEMU requires the opt/ prefix for user entries)
    path: Path


@dataclass(frozen=True)
class VmConfig:
    name: str
    tee: Tee
    accel: Accel
    vcpus: int
    memory_mib: int
    kernel: Path
    cmdline: str
    disks: tuple[Disk, ...]                  # disks[0] is the UVM rootfs, so the guest sees it as /dev/vda
    agent_sockets: tuple[Path, ...]          # host ends of the virtio-serial ports org.parma.agent.<i>
    console_log: Path
    qmp_socket: Path
    forwards: tuple[PortForward, ...] = ()
    guest_forwards: tuple[GuestForward, ...] = ()
    fw_cfg: tuple[FwCfgFile, ...] = ()
    psp_socket: Path | None = None           # emulation: host end of the port org.parma.psp (the emulated PSP)
    snp: SnpLaunch | None = None
    initrd: Path | None = None
    pidfile: Path | None = None
    network: bool = True
    netns: Path | None = None                # run QEMU in this network namespace (nsenter --net)
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if (self.tee == Tee.sev_snp) != (self.snp is not None):
            raise VmConfigError("an sev-snp VM needs SnpLaunch parameters, and only it")
        if self.tee == Tee.sev_snp and self.accel != Accel.kvm:
            raise VmConfigError("SEV-SNP needs KVM")
        if self.tee == Tee.sev_snp and self.psp_socket is not None:
            raise VmConfigError("an SEV-SNP guest asks its real PSP: it gets no emulated PSP port")
        serials = [d.serial for d in self.disks]
        if len(set(serials)) != len(serials):
            raise VmConfigError("disk serials must be unique")
        if self.disks and self.disks[0].bus != DiskBus.virtio_blk:
            raise VmConfigError("disks[0] is the root disk (/dev/vda on the measured command line): it must be virtio-blk")
        if any(d.wwn is not None and (d.bus != DiskBus.scsi or not 0 < d.wwn < 1 << 64) for d in self.disks):
            raise VmConfigError("a WWN is a non-zero 64-bit number, and only SCSI disks have one")

    @property
    def blk_disks(self) -> tuple[Disk, ...]:
        """The virtio-blk disks, in order (the first is the root disk, /dev/vda)."""
        return tuple(d for d in self.disks if d.bus == DiskBus.virtio_blk)

    @property
    def scsi_disks(self) -> tuple[Disk, ...]:
        """The SCSI disks, in order: disk i is LUN i % 256 of controller i // 256."""
        return tuple(d for d in self.disks if d.bus == DiskBus.scsi)

    def port_name(self, index: int) -> str:
        return f"{PORT_PREFIX}{index}"
