"""The agent's ext4 writer against the real e2fsprogs and the host kernel's ext4: e2fsck finds every size
clean, and a loop mount with the scratch mount options takes files until ENOSPC, staying clean after."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sandbox.guest import mkext4

pytestmark = pytest.mark.skipif(shutil.which("e2fsck") is None, reason="e2fsprogs is not installed")


def make(path: Path, size: int) -> mkext4.Layout:
    path.write_bytes(b"")
    os.truncate(path, size)
    fd = os.open(path, os.O_WRONLY)
    try:
        return mkext4.format_device(fd, size)
    finally:
        os.close(fd)


def fsck(path: Path) -> str:
    r = subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("size", [1 << 20, (8 << 20) + 4096 * 77, 128 << 20, (128 << 20) + 100 * 4096,
                                  (160 << 20) + 12345, 3 << 30, (17 << 30) + (5 << 20)])
def test_e2fsck_finds_every_size_clean(tmp_path: Path, size: int) -> None:
    layout = make(tmp_path / "fs.img", size)
    out = fsck(tmp_path / "fs.img")
    assert f"11/{layout.groups * layout.inodes_per_group} files" in out
    features = subprocess.run(["dumpe2fs", "-h", str(tmp_path / "fs.img")], capture_output=True, text=True).stdout
    assert "uninit_bg" in features and "has_journal" not in features


@pytest.mark.skipif(os.geteuid() != 0, reason="loop mounts need root")
def test_the_host_kernel_mounts_it_and_fills_it_to_enospc(tmp_path: Path) -> None:
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    make(img, 96 << 20)
    mnt.mkdir()
    r = subprocess.run(["mount", "-o", f"loop,{mkext4.MOUNT_OPTIONS}", str(img), str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount here: {r.stderr.strip()}")
    try:
        assert sorted(os.listdir(mnt)) == ["lost+found"]
        for i in range(200):
            (mnt / "d" / str(i % 7)).mkdir(parents=True, exist_ok=True)
            (mnt / "d" / str(i % 7) / f"f{i}").write_text(f"file {i}\n")
        chunk = os.urandom(1 << 20)
        with pytest.raises(OSError) as e, (mnt / "big").open("wb") as f:
            for _ in range(200):
                f.write(chunk)
                f.flush()
        assert e.value.errno == errno.ENOSPC
        assert (mnt / "d/3/f3").read_text() == "file 3\n"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    fsck(img)
