"""Finding disks by serial or WWN in a sysfs tree, as the guest kernel lays it out for virtio-blk disks and
for SCSI LUNs on virtio-scsi (VPD pages 0x80 and 0x83), without udev."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sandbox.guest import blockdev


def vpd80(serial: bytes) -> bytes:
    # Peripheral device type 0 (disk), page 0x80, length, serial (SPC-4 7.8.16).
    return bytes([0, 0x80]) + len(serial).to_bytes(2, "big") + serial


@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    sys_block, dev = tmp_path / "sys/block", tmp_path / "dev"
    sys_block.mkdir(parents=True)
    dev.mkdir()
    monkeypatch.setattr(blockdev, "SYS_BLOCK", sys_block)
    monkeypatch.setattr(blockdev, "DEV_DIR", dev)
    monkeypatch.setattr(blockdev, "_INDEX", blockdev._DiskIndex())
    disks = {
        "vda": ("253:0", {"serial": b"parma-root\n"}),
        "vdb": ("253:16", {"serial": b"parma-scratch\n"}),
        "sda": ("8:0", {"device/vpd_pg80": vpd80(b"L0"), "device/wwid": b"t10.QEMU    QEMU HARDDISK    L0\n"}),
        "sdb": ("8:16", {"device/vpd_pg80": vpd80(b"L1  "), "device/wwid": b"naa.5000c0de00000001\n"}),
        "sdaa": ("65:160", {"device/vpd_pg80": vpd80(b"V0\0\0")}),
        "sdc": ("8:32", {}),  # a SCSI disk without a serial page
    }
    for name, (devno, files) in disks.items():
        (sys_block / name).mkdir()
        (sys_block / name / "dev").write_text(devno + "\n")
        for rel, content in files.items():
            (sys_block / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (sys_block / name / rel).write_bytes(content)
    return tmp_path


def _rdev(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    assert stat.S_ISBLK(st.st_mode)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating device nodes needs root")
def test_serials_of_virtio_blk_and_scsi_disks(sysfs: Path) -> None:
    assert blockdev.find_by_serial("parma-root") == sysfs / "dev/vda"
    assert blockdev.find_by_serial("L0") == sysfs / "dev/sda"
    assert blockdev.find_by_serial("L1") == sysfs / "dev/sdb"        # space padding is not part of it
    assert blockdev.find_by_serial("V0") == sysfs / "dev/sdaa"       # nor NUL padding
    # The nodes did not exist (no devtmpfs here): they were made from the kernel's numbers.
    assert _rdev(sysfs / "dev/sdaa") == (65, 160)
    with pytest.raises(blockdev.BlockError, match="no disk with serial 'L9'"):
        blockdev.find_by_serial("L9")


@pytest.mark.skipif(os.geteuid() != 0, reason="creating device nodes needs root")
def test_wwn_names_only_naa_designators(sysfs: Path) -> None:
    assert blockdev.find_by_wwn(0x5000C0DE00000001) == sysfs / "dev/sdb"
    with pytest.raises(blockdev.BlockError, match="no disk with WWN"):
        blockdev.find_by_wwn(0x5000C0DE00000002)


def test_two_disks_with_one_serial_are_refused(sysfs: Path) -> None:
    (sysfs / "sys/block/sdc/device").mkdir()
    (sysfs / "sys/block/sdc/device/vpd_pg80").write_bytes(vpd80(b"L0"))
    with pytest.raises(blockdev.BlockError, match="2 disks carry serial 'L0' \\(sda, sdc\\)"):
        blockdev.find_by_serial("L0")


@pytest.mark.skipif(os.geteuid() != 0, reason="creating device nodes needs root")
def test_a_wrong_device_node_is_replaced(sysfs: Path) -> None:
    (sysfs / "dev/sda").write_text("not a device")
    assert blockdev.find_by_serial("L0") == sysfs / "dev/sda"
    assert _rdev(sysfs / "dev/sda") == (8, 0)
    # A correct node is left alone.
    before = os.stat(sysfs / "dev/sda").st_ino
    blockdev.find_by_serial("L0")
    assert os.stat(sysfs / "dev/sda").st_ino == before


def test_vpd_parsing() -> None:
    assert blockdev.scsi_unit_serial(vpd80(b"abc")) == "abc"
    assert blockdev.scsi_unit_serial(vpd80(b"abc") + b"trailing junk") == "abc"
    assert blockdev.scsi_unit_serial(bytes([0, 0x83, 0, 2]) + b"xy") is None   # another page
    assert blockdev.scsi_unit_serial(b"\0\x80") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="creating device nodes needs root")
def test_the_index_reads_each_disk_once_and_notices_changes(sysfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real = blockdev.disk_serial

    def counting(entry: Path) -> str | None:
        reads.append(entry.name)
        return real(entry)

    monkeypatch.setattr(blockdev, "disk_serial", counting)
    for serial in ("L0", "L1", "V0", "parma-root"):
        blockdev.find_by_serial(serial)
    # Six disks read once each, plus one re-read of each disk a lookup returned.
    assert len(reads) == 6 + 4
    # A disk that appears later is found; one whose serial changed under its name is not taken for the old.
    (sysfs / "sys/block/sdd/device").mkdir(parents=True)
    (sysfs / "sys/block/sdd/dev").write_text("8:48\n")
    (sysfs / "sys/block/sdd/device/vpd_pg80").write_bytes(vpd80(b"L7"))
    assert blockdev.find_by_serial("L7") == sysfs / "dev/sdd"
    (sysfs / "sys/block/sdd/device/vpd_pg80").write_bytes(vpd80(b"L8"))
    with pytest.raises(blockdev.BlockError, match="no disk with serial 'L7'"):
        blockdev.find_by_serial("L7")
    assert blockdev.find_by_serial("L8") == sysfs / "dev/sdd"
