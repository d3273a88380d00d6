"""SCSI layer disks as the real QEMU and a real libvirtd take them: both backends start the tiny guest with
virtio-scsi LUNs (serials, a WWN) next to a writable virtio-blk disk, and QEMU reports the same drives."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from sandbox.vmm import backend as vmm
from sandbox.vmm.config import Backend, Disk, DiskBus, VmConfig
from sandbox.vmm.qmp import QmpClient

sys.path.insert(0, str(Path(__file__).parent))
from libvirt_daemon import libvirtd  # noqa: F401 - a fixture
from test_vmm_backends import wait_marker
from tinyguest import tiny_config

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed")
LUNS = 300   # more than one controller's 256


def scsi_config(tmp: Path, name: str) -> VmConfig:
    cfg = tiny_config(tmp, name)
    disks = []
    for i in range(LUNS):
        img = tmp / f"l{i}.img"
        img.write_bytes(b"\0" * 4096)
        disks.append(Disk(img, f"L{i}", bus=DiskBus.scsi, wwn=0x5000C0DE00000000 + i if i == 1 else None))
    scratch = tmp / "scratch.img"
    scratch.write_bytes(b"")
    os.truncate(scratch, 1 << 20)
    return replace(cfg, disks=(*cfg.disks, *disks, Disk(scratch, "parma-scratch", readonly=False)))


def _block_devices(cfg: VmConfig) -> dict[str, bool]:
    """Every drive QEMU has, file name -> read-only."""
    with QmpClient(cfg.qmp_socket) as qmp:
        return {b["inserted"]["file"]: b["inserted"]["ro"] for b in qmp.execute("query-block") if "inserted" in b}


def _check_drives(cfg: VmConfig) -> None:
    drives = _block_devices(cfg)
    for d in cfg.disks:
        assert drives[os.fspath(d.path)] == d.readonly


def test_qemu_takes_three_hundred_scsi_disks(tmp_path: Path) -> None:
    cfg = scsi_config(tmp_path, "scsi")
    vm = vmm.launch(cfg, Backend.qemu, log_file=tmp_path / "qemu.log", attached=True)
    try:
        assert vm.alive() and wait_marker(cfg.console_log), (tmp_path / "qemu.log").read_text()
        _check_drives(cfg)
    finally:
        vm.stop(5)


@pytest.mark.usefixtures("libvirtd")
def test_libvirt_takes_the_same_disks(tmp_path: Path) -> None:
    import libvirt

    cfg = scsi_config(tmp_path, f"scsi-{os.getpid()}")
    vm = vmm.launch(cfg, Backend.libvirt, log_file=tmp_path / "qemu.log", attached=False)
    try:
        assert vm.alive() and wait_marker(cfg.console_log)
        conn = libvirt.open(vmm.LIBVIRT_URI)
        try:
            xml = conn.lookupByName(f"parma-sandbox-{cfg.name}").XMLDesc()
        finally:
            conn.close()
        assert xml.count("model='virtio-scsi'") == 2
        assert "<serial>L299</serial>" in xml and "<wwn>5000c0de00000001</wwn>" in xml
        assert "unit='43'" in xml and "controller='1'" in xml
    finally:
        vmm.attach(vm.record()).stop(5)
