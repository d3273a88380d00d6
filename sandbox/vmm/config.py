"""The VM configuration: everything the QEMU argv and the libvirt domain XML are pure functions of."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from sandbox.hostcheck import Accel, Tee
from sandbox.shared.protocol import PORT_PREFIX
from sandbox.vmm.snp import SnpLaunch

__all__ = ["Accel", "Backend", "Disk", "FwCfgFile", "PortForward", "SnpLaunch", "Tee", "VmConfig"]

ROOT_DISK_SERIAL = "parma-root"


class Backend(StrEnum):
    qemu = "qemu"
    libvirt = "libvirt"


@dataclass(frozen=True)
class Disk:
    path: Path
    serial: str              # how the guest finds it: /sys/block/vdX/serial
    readonly: bool = True


@dataclass(frozen=True)
class PortForward:
    guest_port: int
    host_port: int
    protocol: str = "tcp"            # tcp | udp
    host_address: str = "127.0.0.1"


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
    fw_cfg: tuple[FwCfgFile, ...] = ()
    snp: SnpLaunch | None = None
    initrd: Path | None = None
    pidfile: Path | None = None
    network: bool = True
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if (self.tee == Tee.sev_snp) != (self.snp is not None):
            raise ValueError("an sev-snp VM needs SnpLaunch parameters, and only it")
        if self.tee == Tee.sev_snp and self.accel != Accel.kvm:
            raise ValueError("SEV-SNP needs KVM")
        serials = [d.serial for d in self.disks]
        if len(set(serials)) != len(serials):
            raise ValueError("disk serials must be unique")

    def port_name(self, index: int) -> str:
        return f"{PORT_PREFIX}{index}"
