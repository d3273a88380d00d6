"""The agent's ext4 writer for the scratch disk: layout arithmetic, checksums, and that it writes only the
few metadata blocks the kernel reads (the device underneath fails reads of never-written sectors)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from sandbox.guest import mkext4
from tests.ext4read import Ext4Image

GIB = 1 << 30


def test_crc16_is_the_kernels() -> None:
    # lib/crc16.c with ~0 as the seed is CRC-16/MODBUS; its check value over "123456789" is 0x4B37.
    assert mkext4.crc16(0xFFFF, b"123456789") == 0x4B37


def test_sparse_superblock_groups() -> None:
    assert [g for g in range(130) if mkext4.has_super(g)] == [0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125]


@pytest.mark.parametrize(("size", "groups", "ipg", "blocks"), [
    (GIB, 8, 8192, 262144),
    (16 * GIB, 128, 8192, 4194304),
    (17 * GIB, 136, 8192, 4456448),                          # 2 GDT blocks
    (128 << 20, 1, 8192, 32768),
    ((128 << 20) + 100 * 4096, 1, 8192, 32768),              # a 100-block tail cannot hold a group: dropped
    ((128 << 20) + 4096 * 4096, 2, 8192, 36864),             # a 4096-block tail can
    (8 << 20, 1, 512, 2048),
    ((1 << 20) + 123, 1, 64, 256),
])
def test_plan(size: int, groups: int, ipg: int, blocks: int) -> None:
    layout = mkext4.plan(size)
    assert (layout.groups, layout.inodes_per_group, layout.blocks) == (groups, ipg, blocks)
    assert layout.gdt_blocks == -(-groups // 128)


def test_too_small_is_an_error() -> None:
    with pytest.raises(mkext4.Ext4FormatError, match="too small"):
        mkext4.plan(512 * 1024)


def _written_blocks(path: Path) -> set[int]:
    """Blocks of a sparse file that hold data (SEEK_DATA/SEEK_HOLE)."""
    out: set[int] = set()
    size = path.stat().st_size
    with path.open("rb") as f:
        fd, pos = f.fileno(), 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.update(range(start // 4096, -(-end // 4096)))
            pos = end
    return out


def _format(path: Path, size: int) -> mkext4.Layout:
    path.write_bytes(b"")
    os.truncate(path, size)
    fd = os.open(path, os.O_WRONLY)
    try:
        return mkext4.format_device(fd, size, fs_uuid=bytes(range(16)), hash_seed=bytes(16), now=1_700_000_000)
    finally:
        os.close(fd)


def test_only_metadata_blocks_are_written(tmp_path: Path) -> None:
    img = tmp_path / "scratch.img"
    layout = _format(img, 4 * GIB)
    written = _written_blocks(img)
    # Superblock + GDT in groups 0, 1, 3, 5, 7, 9, 25, 27; group 0's bitmaps, first inode-table block and the
    # two directory blocks; the last group's block bitmap. Nothing else: 8 + 2 + 1 + 2 + 1 blocks at most.
    expected = {layout.group_start(g) + i for g in range(layout.groups) if mkext4.has_super(g)
                for i in range(1 + layout.gdt_blocks)}
    expected |= {layout.block_bitmap(0), layout.inode_bitmap(0), layout.inode_table(0), layout.root_block,
                 layout.lost_found_block, layout.block_bitmap(layout.groups - 1)}
    if written - expected:   # tmpfs may report whole pages; every written block must be an expected one
        raise AssertionError(f"unexpected blocks written: {sorted(written - expected)[:10]}")
    assert written <= expected and len(expected) == 8 * 2 + 6


def test_the_result_reads_as_ext4(tmp_path: Path) -> None:
    img = tmp_path / "scratch.img"
    layout = _format(img, GIB)
    raw = img.read_bytes()[:8 * 4096]
    magic, = struct.unpack_from("<H", raw, 1024 + 0x38)
    assert magic == 0xEF53
    # The group descriptors carry the uninit_bg checksum the kernel verifies at mount.
    for g in range(layout.groups):
        desc = raw[4096 + 32 * g:4096 + 32 * g + 32]
        want = mkext4.crc16(mkext4.crc16(mkext4.crc16(0xFFFF, bytes(range(16))), struct.pack("<I", g)), desc[:30])
        assert struct.unpack_from("<H", desc, 30)[0] == want
    fs = Ext4Image(img)
    root = fs.inode(2)
    assert root.type == "directory" and root.perm == 0o755
    assert [(name, ino) for name, ino, _ in fs.listdir(root)] == [(b".", 2), (b"..", 2), (b"lost+found", 11)]
    assert [(name, ino) for name, ino, _ in fs.listdir(fs.inode(11))] == [(b".", 11), (b"..", 2)]


def test_bitmaps_set_exactly_the_bits_of_each_range() -> None:
    def bit_by_bit(used: list[tuple[int, int]]) -> bytes:
        bits = bytearray(mkext4.BLOCK)
        for start, end in used:
            for bit in range(start, end):
                bits[bit >> 3] |= 1 << (bit & 7)
        return bytes(bits)

    edges = (0, 1, 7, 8, 9, 15, 16, 17, 523, 4095, 4096, 32760, 32767, 32768)
    cases = [[(a, b)] for a in edges for b in edges if a <= b]
    cases += [[(0, 3), (3, 9), (100, 100), (517, 32768)], [(5, 6), (1, 2), (8, 16)], []]
    for used in cases:
        assert mkext4._bitmap(used) == bit_by_bit(used), used
