"""The host side of the disk scratch: a sparse file, attached read-write."""

from __future__ import annotations

import stat
from pathlib import Path

from sandbox.launch.scratch_disk import SCRATCH_DISK_SERIAL, create_scratch_disk, scratch_vm_disk
from sandbox.vmm.config import DiskBus


def test_a_sparse_file_of_the_groups_size(tmp_path: Path) -> None:
    path = create_scratch_disk(tmp_path, 8)
    st = path.stat()
    assert st.st_size == 8 << 30 and st.st_blocks == 0
    assert stat.S_IMODE(st.st_mode) == 0o600
    path.write_bytes(b"old run")
    assert create_scratch_disk(tmp_path, 1).stat().st_size == 1 << 30      # replaced, not reused
    assert [p.name for p in tmp_path.iterdir()] == ["scratch.img"]


def test_attached_read_write(tmp_path: Path) -> None:
    disk = scratch_vm_disk(tmp_path / "scratch.img")
    assert (disk.serial, disk.readonly, disk.bus) == (SCRATCH_DISK_SERIAL, False, DiskBus.virtio_blk)
