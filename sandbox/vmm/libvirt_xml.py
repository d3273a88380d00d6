"""VmConfig -> libvirt domain XML with the same devices as the QEMU argv (golden-tested).

Written for libvirt >= 10.5 (SEV-SNP launch security; the tests validate every rendering with the
installed libvirt's own schema, virt-xml-validate). User-mode networking with host port forwards has
no native element without the passt backend and goes through <qemu:commandline> as the same
-netdev/-device pair the QEMU backend uses; fw_cfg entries use <sysinfo type='fwcfg'>.

SEV-SNP uses libvirt's own form: <launchSecurity type='sev-snp'> with the same cbitpos,
reduced-phys-bits, policy, host data and ID block as the QEMU object, a custom CPU model, and the
AmdSev OVMF as a stateless ROM (<loader type='rom' stateless='yes'>: one image, no NVRAM; QEMU gets
it with -bios, as in the QEMU argv).

Read-only disks are content-addressed files shared with the cache and with other VMs: each carries
<seclabel model='dac' relabel='no'/> so that libvirt's dynamic ownership never chowns them to the
QEMU user (who could then write to them); the backend makes them readable instead
(sandbox/vmm/libvirt_share.py).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from sandbox.shared.snp.psp_port import PORT_NAME as PSP_PORT_NAME
from sandbox.vmm.config import Accel, Disk, VmConfig, VmConfigError
from sandbox.vmm.qemu import network_args, scsi_address

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DOMAIN_PREFIX = "parma-sandbox-"


def domain_name(cfg: VmConfig) -> str:
    return DOMAIN_PREFIX + cfg.name


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _disk_target(index: int, prefix: str = "vd") -> str:
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return prefix + letters


def _disk_driver(parent: ET.Element, disk: Disk) -> None:
    # Writable disks report host-side write errors to the guest (as the QEMU argv: werror=report).
    extra = {} if disk.readonly else {"error_policy": "report"}
    _sub(parent, "driver", name="qemu", type="raw", **extra)


def _disk_source(parent: ET.Element, disk: Disk) -> None:
    source = _sub(parent, "source", file=os.fspath(disk.path))
    if disk.readonly:
        _sub(source, "seclabel", model="dac", relabel="no")


def scsi_disk_elements(cfg: VmConfig, devices: ET.Element) -> None:
    """The SCSI disks as libvirt renders them: virtio-scsi controllers and <disk bus='scsi'> elements at
    the same (controller, target 0, LUN) addresses as the QEMU argv (sandbox.vmm.qemu.scsi_disk_args)."""
    for n, disk in enumerate(cfg.scsi_disks):
        controller, lun = scsi_address(n)
        if lun == 0:
            _sub(devices, "controller", type="scsi", index=str(controller), model="virtio-scsi")
        d = _sub(devices, "disk", type="file", device="disk")
        _disk_driver(d, disk)
        _disk_source(d, disk)
        _sub(d, "target", dev=_disk_target(n, "sd"), bus="scsi")
        if disk.readonly:
            _sub(d, "readonly")
        _sub(d, "serial", disk.serial)
        if disk.wwn is not None:
            _sub(d, "wwn", f"{disk.wwn:016x}")
        _sub(d, "address", type="drive", controller=str(controller), bus="0", target="0", unit=str(lun))


def build_domain_xml(cfg: VmConfig) -> str:
    if cfg.netns is not None:
        # libvirt starts QEMU itself, in its own namespaces: a domain cannot take a pod's netns this way, and
        # ignoring it would put the group's port forwards on the host's network instead.
        raise VmConfigError("a launch in a network namespace needs the qemu backend, not libvirt")
    ET.register_namespace("qemu", QEMU_NS)
    dom = ET.Element("domain", {"type": "kvm" if cfg.accel == Accel.kvm else "qemu"})
    _sub(dom, "name", domain_name(cfg))
    _sub(dom, "memory", str(cfg.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(cfg.vcpus))
    if cfg.snp is not None:
        backing = _sub(dom, "memoryBacking")
        _sub(backing, "source", type="memfd")
        _sub(backing, "access", mode="shared")

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
    if cfg.snp is not None:
        _sub(os_el, "loader", os.fspath(cfg.snp.firmware), type="rom", stateless="yes")
    _sub(os_el, "kernel", os.fspath(cfg.kernel))
    if cfg.initrd is not None:
        _sub(os_el, "initrd", os.fspath(cfg.initrd))
    _sub(os_el, "cmdline", cfg.cmdline)

    if cfg.fw_cfg:
        sysinfo = _sub(dom, "sysinfo", type="fwcfg")
        for entry in cfg.fw_cfg:
            _sub(sysinfo, "entry", name=entry.name, file=os.fspath(entry.path))

    features = _sub(dom, "features")
    _sub(features, "acpi")
    if cfg.snp is not None:
        cpu = _sub(dom, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", cfg.snp.cpu_model, fallback="forbid")  # measured: the same model as -cpu
    elif cfg.accel == Accel.kvm:
        _sub(dom, "cpu", mode="host-passthrough")
    _sub(dom, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(dom, event, "destroy")

    devices = _sub(dom, "devices")
    for i, disk in enumerate(cfg.blk_disks):
        d = _sub(devices, "disk", type="file", device="disk")
        _disk_driver(d, disk)
        _disk_source(d, disk)
        _sub(d, "target", dev=_disk_target(i), bus="virtio")
        if disk.readonly:
            _sub(d, "readonly")
        _sub(d, "serial", disk.serial)
    scsi_disk_elements(cfg, devices)
    _sub(devices, "controller", type="virtio-serial", index="0")
    for i, sock in enumerate(cfg.agent_sockets):
        ch = _sub(devices, "channel", type="unix")
        _sub(ch, "source", mode="bind", path=os.fspath(sock))
        _sub(ch, "target", type="virtio", name=cfg.port_name(i))
    if cfg.psp_socket is not None:
        ch = _sub(devices, "channel", type="unix")
        _sub(ch, "source", mode="bind", path=os.fspath(cfg.psp_socket))
        _sub(ch, "target", type="virtio", name=PSP_PORT_NAME)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=os.fspath(cfg.console_log), append="off")
    _sub(serial, "target", port="0")
    if cfg.snp is None:  # an SNP guest takes no entropy from the host (see qemu.device_args)
        rng = _sub(devices, "rng", model="virtio")
        _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(devices, "memballoon", model="none")

    if cfg.snp is not None:
        snp = cfg.snp
        attrs = {"type": "sev-snp", "kernelHashes": "yes" if snp.kernel_hashes else "no"}
        if snp.id_block is not None:
            attrs["authorKey"] = "yes" if snp.author_key_enabled else "no"
        ls = _sub(dom, "launchSecurity", **attrs)
        _sub(ls, "cbitpos", str(snp.cbitpos))
        _sub(ls, "reducedPhysBits", str(snp.reduced_phys_bits))
        _sub(ls, "policy", f"0x{snp.policy:08x}")
        if snp.id_block is not None and snp.id_auth is not None:
            _sub(ls, "idBlock", snp.b64(snp.id_block))
            _sub(ls, "idAuth", snp.b64(snp.id_auth))
        _sub(ls, "hostData", snp.host_data_b64())

    net = network_args(cfg)
    if net:
        cmd = _sub(dom, f"{{{QEMU_NS}}}commandline")
        for arg in net:
            _sub(cmd, f"{{{QEMU_NS}}}arg", value=arg)

    ET.indent(dom, space="  ")
    return ET.tostring(dom, encoding="unicode") + "\n"
