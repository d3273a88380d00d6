"""Layer and volume disks as SCSI LUNs on virtio-scsi controllers: the argv and the domain XML agree, the
root disk and everything measured are the same with 0, 3 or 300 layers, and golden files pin the shape.

Regenerate after an intended change with PARMA_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from sandbox.vmm.config import SCSI_LUNS_PER_CONTROLLER, Accel, Disk, DiskBus, Tee, VmConfig, VmConfigError
from sandbox.vmm.libvirt_xml import build_domain_xml
from sandbox.vmm.qemu import build_argv, scsi_address
from tests.unit.test_vmm_render import check_golden

RUN = Path("/run/user/0/parma-sandbox/big")
CACHE = Path("/root/.cache/parma-sandbox")
ROOT = Disk(CACHE / "uvm/abc/rootfs.img", "parma-root")


def layer(i: int, **kw: object) -> Disk:
    return Disk(CACHE / f"layers/l{i}.img", f"L{i}", bus=DiskBus.scsi, **kw)


def config(*extra: Disk) -> VmConfig:
    return VmConfig(
        name="big", tee=Tee.emulated, accel=Accel.tcg, vcpus=1, memory_mib=512, kernel=CACHE / "uvm/abc/bzImage",
        cmdline="console=ttyS0 root=/dev/dm-0 ro", disks=(ROOT, *extra),
        agent_sockets=(RUN / "agent-0.sock",), console_log=RUN / "console.log", qmp_socket=RUN / "qmp.sock",
        network=False)


GOLDEN_DISKS = (layer(0), layer(1, wwn=0x5000C0DE00000001),
                Disk(CACHE / "volumes/www.img", "V0", bus=DiskBus.scsi),
                Disk(RUN / "scratch.img", "parma-scratch", readonly=False))


def test_scsi_argv_golden() -> None:
    check_golden("qemu-scsi-layers.argv", "\n".join(build_argv(config(*GOLDEN_DISKS))) + "\n")


def test_scsi_xml_golden() -> None:
    check_golden("libvirt-scsi-layers.xml", build_domain_xml(config(*GOLDEN_DISKS)))


def _scsi_devices(argv: list[str]) -> list[dict[str, str]]:
    out = []
    for i, a in enumerate(argv):
        if a == "-device" and argv[i + 1].startswith("scsi-hd,"):
            out.append(dict(kv.split("=", 1) for kv in argv[i + 1].split(",")[1:]))
    return out


def _drives(argv: list[str]) -> dict[str, dict[str, str]]:
    drives = [dict(kv.split("=", 1) for kv in argv[i + 1].split(",") if "=" in kv)
              for i, a in enumerate(argv) if a == "-drive"]
    return {d["id"]: d for d in drives}


def test_three_hundred_layers_fill_two_controllers_and_agree_with_the_xml() -> None:
    disks = tuple(layer(i) for i in range(300))
    cfg = config(*disks)
    argv = build_argv(cfg)
    controllers = [argv[i + 1] for i, a in enumerate(argv) if a == "-device" and argv[i + 1].startswith("virtio-scsi")]
    assert controllers == ["virtio-scsi-pci,id=scsi0", "virtio-scsi-pci,id=scsi1"]
    devices = _scsi_devices(argv)
    drives = _drives(argv)
    assert len(devices) == 300
    for n, dev in enumerate(devices):
        controller, lun = divmod(n, SCSI_LUNS_PER_CONTROLLER)
        assert dev["bus"] == f"scsi{controller}.0" and dev["scsi-id"] == "0" and dev["lun"] == str(lun)
        assert dev["serial"] == f"L{n}"
        assert drives[dev["drive"]]["file"] == os.fspath(disks[n].path)
        assert drives[dev["drive"]]["readonly"] == "on"
    # The libvirt domain holds the same disks at the same addresses.
    dom = ET.fromstring(build_domain_xml(cfg))
    xml_controllers = [(c.get("index"), c.get("model")) for c in dom.iter("controller") if c.get("type") == "scsi"]
    assert xml_controllers == [("0", "virtio-scsi"), ("1", "virtio-scsi")]
    scsi = [d for d in dom.iter("disk") if d.find("target").get("bus") == "scsi"]
    assert [(d.find("source").get("file"), d.find("serial").text,
             int(d.find("address").get("controller")), int(d.find("address").get("unit"))) for d in scsi] == \
        [(os.fspath(d.path), d.serial, *scsi_address(n)) for n, d in enumerate(disks)]
    assert len({d.find("target").get("dev") for d in scsi}) == 300
    assert {d.find("address").get("target") for d in scsi} == {"0"}


def test_the_root_disk_and_boot_arguments_do_not_change_with_the_number_of_layers() -> None:
    def measured_part(argv: list[str]) -> list[str]:
        # Everything but the SCSI controllers, their drives and disks: kernel, cmdline, machine, root disk.
        out, skip = [], 0
        for i, a in enumerate(argv):
            if skip:
                skip -= 1
                continue
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            if a == "-device" and nxt.startswith(("virtio-scsi-pci", "scsi-hd")):
                skip = 1
                continue
            if a == "-drive" and any(f"id={d}," in nxt for d in _scsi_drive_ids(argv)):
                skip = 1
                continue
            out.append(a)
        return out

    def _scsi_drive_ids(argv: list[str]) -> set[str]:
        return {d["drive"] for d in _scsi_devices(argv)}

    base = build_argv(config())
    for n in (1, 60, 300):
        argv = build_argv(config(*(layer(i) for i in range(n))))
        assert measured_part(argv) == base
    assert "-drive" in base and "virtio-blk-pci,drive=disk0,serial=parma-root" in base


def test_a_writable_disk_keeps_virtio_blk_and_read_write() -> None:
    argv = build_argv(config(Disk(RUN / "scratch.img", "parma-scratch", readonly=False)))
    drive = _drives(argv)["disk1"]
    assert "readonly" not in drive
    assert "virtio-blk-pci,drive=disk1,serial=parma-scratch" in argv


def test_config_rejects_a_scsi_root_disk_and_misplaced_wwns() -> None:
    with pytest.raises(VmConfigError, match="root disk"):
        replace(config(), disks=(layer(0),))
    with pytest.raises(VmConfigError, match="WWN"):
        config(Disk(CACHE / "x.img", "X", wwn=1))
    with pytest.raises(VmConfigError, match="WWN"):
        config(layer(0, wwn=0))
    with pytest.raises(VmConfigError, match="unique"):
        config(layer(0), layer(0))


def test_publishing_for_libvirts_qemu_user_keeps_the_bus_and_wwn(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from sandbox.vmm import libvirt_share

    monkeypatch.setenv(libvirt_share.SHARE_ENV, str(tmp_path / "share"))
    files = {n: tmp_path / n for n in ("bzImage", "root.img", "l0.img", "scratch.img")}
    for f in files.values():
        f.write_bytes(b"x" * 4096)
    cfg = replace(config(), kernel=files["bzImage"], disks=(
        Disk(files["root.img"], "parma-root"), Disk(files["l0.img"], "L0", bus=DiskBus.scsi, wwn=0x5000C0DE00000007),
        Disk(files["scratch.img"], "parma-scratch", readonly=False)))
    published = libvirt_share.publish(cfg, "parma-sandbox-big", libvirt_share.QemuUser(os.getuid() + 1, os.getgid()))
    try:
        assert [(d.serial, d.bus, d.wwn, d.readonly) for d in published.config.disks] == \
            [(d.serial, d.bus, d.wwn, d.readonly) for d in cfg.disks]
    finally:
        libvirt_share.remove(published.directory)
