"""VmConfig -> QEMU argv: a pure function built from one small fragment per concern (golden-tested).

Machine choice: q35 in every mode. Under TCG it boots as fast as `pc` without microvm's early-boot
hangs, and SEV-SNP requires it. Emulated launches boot the kernel directly with QEMU's default
firmware (SeaBIOS adds nothing to wait for); SEV-SNP launches use the AmdSev OVMF with kernel hashes,
so the measurement covers kernel, cmdline (hence the rootfs root hash) and initrd.
"""

from __future__ import annotations

import os

from sandbox.shared.snp.psp_port import PORT_NAME as PSP_PORT_NAME
from sandbox.vmm.config import SCSI_LUNS_PER_CONTROLLER, Accel, Disk, DiskBus, VmConfig

QEMU_BINARY = "qemu-system-x86_64"
NET_SLOT = "0x1e"


def _opts(*pairs: tuple[str, object] | str) -> str:
    """Join QEMU option pairs, escaping commas in values (QEMU's ',,')."""
    parts = []
    for p in pairs:
        if isinstance(p, str):
            parts.append(p)
        else:
            key, value = p
            parts.append(f"{key}={str(value).replace(',', ',,')}")
    return ",".join(parts)


def machine_args(cfg: VmConfig) -> list[str]:
    machine: list[tuple[str, object] | str] = ["q35", ("accel", cfg.accel.value)]
    if cfg.snp is not None:
        machine += [("confidential-guest-support", "sev0"), ("memory-backend", "ram0")]
    args = ["-machine", _opts(*machine)]
    if cfg.snp is not None:
        args += ["-cpu", cfg.snp.cpu_model]      # measured: its CPUID(1).EAX is in every VMSA
    elif cfg.accel == Accel.kvm:
        args += ["-cpu", "host"]
    args += ["-smp", str(cfg.vcpus), "-m", f"{cfg.memory_mib}M"]
    return args


def snp_args(cfg: VmConfig) -> list[str]:
    snp = cfg.snp
    if snp is None:
        return []
    guest: list[tuple[str, object] | str] = [
        "sev-snp-guest", ("id", "sev0"), ("cbitpos", snp.cbitpos), ("reduced-phys-bits", snp.reduced_phys_bits),
        ("policy", f"{snp.policy:#x}"), ("kernel-hashes", "on" if snp.kernel_hashes else "off"),
        ("host-data", snp.host_data_b64())]
    if snp.id_block is not None and snp.id_auth is not None:
        guest += [("id-block", snp.b64(snp.id_block)), ("id-auth", snp.b64(snp.id_auth)),
                  ("author-key-enabled", "on" if snp.author_key_enabled else "off")]
    return [
        "-object", _opts("memory-backend-memfd", ("id", "ram0"), ("size", f"{cfg.memory_mib}M"),
                         ("share", "true"), ("prealloc", "false")),
        "-object", _opts(*guest),
        "-bios", os.fspath(snp.firmware),
    ]


def base_args(cfg: VmConfig) -> list[str]:
    args = ["-name", _opts(("guest", cfg.name)), "-nodefaults", "-no-user-config", "-display", "none",
            "-vga", "none", "-no-reboot"]
    if cfg.pidfile is not None:
        args += ["-pidfile", os.fspath(cfg.pidfile)]
    return args


def boot_args(cfg: VmConfig) -> list[str]:
    args = ["-kernel", os.fspath(cfg.kernel), "-append", cfg.cmdline]
    if cfg.initrd is not None:
        args += ["-initrd", os.fspath(cfg.initrd)]
    return args


def console_args(cfg: VmConfig) -> list[str]:
    return [
        "-chardev", _opts("file", ("id", "console0"), ("path", os.fspath(cfg.console_log))),
        "-serial", "chardev:console0",
        "-chardev", _opts("socket", ("id", "qmp0"), ("path", os.fspath(cfg.qmp_socket)), ("server", "on"),
                          ("wait", "off")),
        "-mon", _opts(("chardev", "qmp0"), ("mode", "control")),
    ]


def agent_args(cfg: VmConfig) -> list[str]:
    args = ["-device", _opts("virtio-serial-pci", ("id", "vserial0"))]
    for i, sock in enumerate(cfg.agent_sockets):
        args += [
            "-chardev", _opts("socket", ("id", f"agent{i}"), ("path", os.fspath(sock)), ("server", "on"),
                              ("wait", "off")),
            "-device", _opts("virtserialport", ("bus", "vserial0.0"), ("chardev", f"agent{i}"),
                             ("name", cfg.port_name(i))),
        ]
    if cfg.psp_socket is not None:
        args += [
            "-chardev", _opts("socket", ("id", "psp0"), ("path", os.fspath(cfg.psp_socket)), ("server", "on"),
                              ("wait", "off")),
            "-device", _opts("virtserialport", ("bus", "vserial0.0"), ("chardev", "psp0"), ("name", PSP_PORT_NAME)),
        ]
    return args


def _drive(index: int, disk: Disk) -> list[str]:
    drive: list[tuple[str, object] | str] = [("if", "none"), ("id", f"disk{index}"), ("file", os.fspath(disk.path)),
                                              ("format", "raw")]
    if disk.readonly:
        drive.append(("readonly", "on"))
    else:
        # A write the host cannot store (its disk is full) becomes an I/O error in the guest, not a VM that
        # QEMU pauses (werror=enospc, the default) and nobody resumes.
        drive.append(("werror", "report"))
    return ["-drive", _opts(*drive)]


def disk_args(cfg: VmConfig) -> list[str]:
    args = []
    for i, disk in enumerate(cfg.disks):
        if disk.bus == DiskBus.virtio_blk:
            args += [*_drive(i, disk),
                     "-device", _opts("virtio-blk-pci", ("drive", f"disk{i}"), ("serial", disk.serial))]
    return args + scsi_disk_args(cfg)


def scsi_address(scsi_index: int) -> tuple[int, int]:
    """(controller, LUN) of the scsi_index-th SCSI disk; every disk is on target 0 of its controller."""
    return divmod(scsi_index, SCSI_LUNS_PER_CONTROLLER)


def scsi_disk_args(cfg: VmConfig) -> list[str]:
    """virtio-scsi controllers and one scsi-hd per SCSI disk (layers and volumes), found in the guest by
    serial (VPD page 0x80) or WWN (VPD page 0x83). Nothing here is on the measured path: the root disk
    stays the first virtio-blk device, and the command line does not name these disks."""
    args: list[str] = []
    scsi = [(i, d) for i, d in enumerate(cfg.disks) if d.bus == DiskBus.scsi]
    for n, (i, disk) in enumerate(scsi):
        controller, lun = scsi_address(n)
        if lun == 0:
            args += ["-device", _opts("virtio-scsi-pci", ("id", f"scsi{controller}"))]
        device: list[tuple[str, object] | str] = [
            "scsi-hd", ("bus", f"scsi{controller}.0"), ("channel", 0), ("scsi-id", 0), ("lun", lun),
            ("drive", f"disk{i}"), ("serial", disk.serial)]
        if disk.wwn is not None:
            device.append(("wwn", f"{disk.wwn:#018x}"))
        args += [*_drive(i, disk), "-device", _opts(*device)]
    return args


def network_args(cfg: VmConfig) -> list[str]:
    if not cfg.network:
        return []
    netdev: list[tuple[str, object] | str] = ["user", ("id", "net0")]
    for fwd in cfg.forwards:
        netdev.append(("hostfwd", f"{fwd.protocol}:{fwd.host_address}:{fwd.host_port}-:{fwd.guest_port}"))
    for g in cfg.guest_forwards:
        # QEMU runs the command for each connection, its stdin and stdout being the connection.
        host = f"TCP6:[{g.host_address}]" if ":" in g.host_address else f"TCP4:{g.host_address}"
        netdev.append(("guestfwd", f"tcp:{g.guest_address}:{g.guest_port}-cmd:socat STDIO {host}:{g.host_port}"))
    # A fixed slot: libvirt assigns every other slot itself and would collide with an unplaced device
    # passed through <qemu:commandline>. 0x1e is unused on q35 with -nodefaults (0x1f holds the LPC).
    return ["-netdev", _opts(*netdev), "-device", _opts("virtio-net-pci", ("netdev", "net0"), ("romfile", ""),
                                                        ("bus", "pcie.0"), ("addr", NET_SLOT))]


def device_args(cfg: VmConfig) -> list[str]:
    # An SNP guest takes no entropy from the host (the host is the attacker): RDRAND/RDSEED feed it.
    args = [] if cfg.snp is not None else ["-device", "virtio-rng-pci"]
    for entry in cfg.fw_cfg:
        args += ["-fw_cfg", _opts(("name", entry.name), ("file", os.fspath(entry.path)))]
    return args


def netns_prefix(cfg: VmConfig) -> list[str]:
    """QEMU in another network namespace: nsenter joins it and execs QEMU (same pid, no fork), so QEMU's
    user-mode network and its host forwards live there (a pod's netns: its IP, its loopback)."""
    return ["nsenter", f"--net={os.fspath(cfg.netns)}", "--"] if cfg.netns is not None else []


def build_argv(cfg: VmConfig, qemu: str = QEMU_BINARY) -> list[str]:
    return [*netns_prefix(cfg), qemu, *base_args(cfg), *machine_args(cfg), *snp_args(cfg), *boot_args(cfg), *console_args(cfg),
            *agent_args(cfg), *disk_args(cfg), *network_args(cfg), *device_args(cfg)]
