"""An empty ext4 filesystem for the encrypted scratch disk, written by the agent (the UVM has no mkfs).

Byte layout from the kernel's Documentation/filesystems/ext4/ (super.rst, group_descr.rst, inodes.rst,
ifork.rst, directory.rst, blockgroup.rst) and fs/ext4/ext4.h; offsets are in the comments. The shape
is what `mkfs.ext4 -O ^has_journal,^resize_inode,^flex_bg,uninit_bg -E lazy_itable_init=1` makes:
4 KiB blocks, 256-byte inodes, one inode per 16 KiB, 32-byte group descriptors, sparse superblock
backups, extents, htree directories, no journal (scratch does not outlive the VM).

Why lazily initialised groups (uninit_bg): the device underneath is dm-integrity, where a sector that was
never written fails its integrity check when read. So this writer never reads, and it writes only the
metadata the kernel reads: block 0 (superblock), the group descriptor table and its sparse backups, the
first group's bitmaps and first inode-table block, the root and lost+found directories, and the last
group's block bitmap. Every other group is marked BLOCK_UNINIT|INODE_UNINIT, so the kernel builds its
bitmaps in memory, and an inode-table block is first written when its first inode is allocated. Mount
with `noinit_itable,inode_readahead_blks=0` (MOUNT_OPTIONS) so the kernel neither zeroes the tables in the
background nor reads ahead into blocks nobody wrote. `e2fsck -fn` finds the result clean.
"""

from __future__ import annotations

import os
import struct
import time
import uuid as uuidlib
from dataclasses import dataclass

from sandbox.shared.errors import GuestOperationFailed

BLOCK = 4096
LOG_BLOCK = 2                        # s_log_block_size: 1024 << 2
BLOCKS_PER_GROUP = BLOCK * 8         # one bitmap block per group
INODE_SIZE = 256
INODES_PER_BLOCK = BLOCK // INODE_SIZE
BYTES_PER_INODE = 16384
MAX_INODES_PER_GROUP = 8192          # BLOCKS_PER_GROUP * BLOCK / BYTES_PER_INODE
DESC_SIZE = 32
DESCS_PER_BLOCK = BLOCK // DESC_SIZE
FIRST_INO = 11                       # inodes 1-10 are reserved; 2 is the root
ROOT_INO = 2
LOST_FOUND_INO = 11
EXTRA_ISIZE = 32
MIN_GROUP_DATA = 64                  # a last group with fewer free blocks than this is dropped (mke2fs: 50)
MAX_BLOCKS = 1 << 32                 # 32-bit block numbers (no 64bit feature): 16 TiB

MAGIC = 0xEF53
STATE_CLEAN = 1
ERRORS_REMOUNT_RO = 2
COMPAT = 0x8 | 0x20                                  # ext_attr, dir_index
INCOMPAT = 0x2 | 0x40                                # filetype, extents
RO_COMPAT = 0x1 | 0x2 | 0x8 | 0x10 | 0x20 | 0x40     # sparse_super, large_file, huge_file, gdt_csum, dir_nlink,
#                                                      extra_isize
FLAGS_SIGNED_HASH = 0x1              # s_flags: how the kernel hashes names (x86's char is signed)
HASH_HALF_MD4 = 1
BG_INODE_UNINIT = 0x1
BG_BLOCK_UNINIT = 0x2
EXTENTS_FL = 0x80000
EXTENT_MAGIC = 0xF30A
S_IFDIR = 0o040000
FT_DIR = 2

# What the scratch filesystem is mounted with (see the module docstring).
MOUNT_OPTIONS = "noinit_itable,inode_readahead_blks=0,errors=remount-ro"


class Ext4FormatError(GuestOperationFailed):
    pass


def crc16(crc: int, data: bytes) -> int:
    """lib/crc16.c: CRC-16 with polynomial 0x8005, bit-reversed (0xA001), no final inversion."""
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def has_super(group: int) -> bool:
    """sparse_super: backups in groups 0, 1 and powers of 3, 5 and 7."""
    if group <= 1:
        return True
    for base in (3, 5, 7):
        n = base
        while n < group:
            n *= base
        if n == group:
            return True
    return False


@dataclass(frozen=True)
class Layout:
    blocks: int
    groups: int
    inodes_per_group: int
    gdt_blocks: int

    @property
    def itable_blocks(self) -> int:
        return self.inodes_per_group // INODES_PER_BLOCK

    def group_start(self, g: int) -> int:
        return g * BLOCKS_PER_GROUP

    def group_blocks(self, g: int) -> int:
        return min(BLOCKS_PER_GROUP, self.blocks - self.group_start(g))

    def block_bitmap(self, g: int) -> int:
        return self.group_start(g) + (1 + self.gdt_blocks if has_super(g) else 0)

    def inode_bitmap(self, g: int) -> int:
        return self.block_bitmap(g) + 1

    def inode_table(self, g: int) -> int:
        return self.block_bitmap(g) + 2

    def overhead(self, g: int) -> int:
        """Blocks at the start of group g that hold metadata: superblock copy, GDT copy, bitmaps, inode table."""
        return self.inode_table(g) + self.itable_blocks - self.group_start(g)

    @property
    def root_block(self) -> int:
        return self.inode_table(0) + self.itable_blocks

    @property
    def lost_found_block(self) -> int:
        return self.root_block + 1


def plan(size_bytes: int) -> Layout:
    """Groups and inode counts for a device of `size_bytes` (the tail that is no whole block is unused)."""
    blocks = min(size_bytes // BLOCK, MAX_BLOCKS - 1)
    if blocks < 256:
        raise Ext4FormatError(f"{size_bytes} bytes is too small for the scratch filesystem (at least 1 MiB)")
    ipg = min(MAX_INODES_PER_GROUP, min(blocks, BLOCKS_PER_GROUP) * BLOCK // BYTES_PER_INODE)
    ipg = max(INODES_PER_BLOCK, ipg - ipg % INODES_PER_BLOCK)
    groups = -(-blocks // BLOCKS_PER_GROUP)
    layout = Layout(blocks, groups, ipg, -(-groups // DESCS_PER_BLOCK))
    last = groups - 1
    if last > 0 and layout.group_blocks(last) < layout.overhead(last) + MIN_GROUP_DATA:
        blocks = last * BLOCKS_PER_GROUP
        groups = last
        layout = Layout(blocks, groups, ipg, -(-groups // DESCS_PER_BLOCK))
    if layout.overhead(0) + 2 + MIN_GROUP_DATA > layout.group_blocks(0):
        raise Ext4FormatError(f"{size_bytes} bytes is too small for the scratch filesystem")
    return layout


def _bitmap(used: list[tuple[int, int]]) -> bytes:
    """A one-block bitmap with the bits of each [start, end) range set (bit i is bit i % 8 of byte i // 8).

    Whole bytes are filled at once: the last group's bitmap marks up to 32767 blocks past the end of the
    device, which bit by bit costs tens of milliseconds under TCG."""
    bits = bytearray(BLOCK)
    for start, end in used:
        if start >= end:
            continue
        first, last = start >> 3, (end - 1) >> 3
        if first == last:
            bits[first] |= ((1 << (end - start)) - 1) << (start & 7)
            continue
        bits[first] |= (0xFF << (start & 7)) & 0xFF
        bits[first + 1:last] = b"\xff" * (last - first - 1)
        bits[last] |= (1 << (((end - 1) & 7) + 1)) - 1
    return bytes(bits)


@dataclass(frozen=True)
class _GroupState:
    free_blocks: int
    free_inodes: int
    used_dirs: int
    flags: int
    itable_unused: int


def _group_states(layout: Layout) -> list[_GroupState]:
    ipg = layout.inodes_per_group
    last = layout.groups - 1
    out = []
    for g in range(layout.groups):
        free = layout.group_blocks(g) - layout.overhead(g)
        if g == 0:
            out.append(_GroupState(free - 2, ipg - LOST_FOUND_INO, 2, 0, ipg - LOST_FOUND_INO))
        else:
            flags = BG_INODE_UNINIT | (0 if g == last else BG_BLOCK_UNINIT)
            out.append(_GroupState(free, ipg, 0, flags, ipg))
    return out


def _group_descriptor(layout: Layout, g: int, st: _GroupState, fs_uuid: bytes) -> bytes:
    # group_descr.rst: block/inode bitmap, inode table, free blocks/inodes, used dirs, flags,
    # exclude bitmap (0), bitmap checksums (0 without metadata_csum), itable_unused, then bg_checksum.
    body = struct.pack("<IIIHHHHIHHH", layout.block_bitmap(g), layout.inode_bitmap(g), layout.inode_table(g),
                       st.free_blocks, st.free_inodes, st.used_dirs, st.flags, 0, 0, 0, st.itable_unused)
    csum = crc16(crc16(crc16(0xFFFF, fs_uuid), struct.pack("<I", g)), body)
    return body + struct.pack("<H", csum)


def _superblock(layout: Layout, states: list[_GroupState], group: int, fs_uuid: bytes, hash_seed: bytes,
                now: int, label: bytes) -> bytes:
    sb = bytearray(1024)
    inodes = layout.groups * layout.inodes_per_group
    struct.pack_into("<IIIIIIIIIIIIIHhHHHHIIIIHHIHH", sb, 0x0,
                     inodes, layout.blocks, 0, sum(s.free_blocks for s in states),   # 0x0 counts
                     sum(s.free_inodes for s in states), 0, LOG_BLOCK, LOG_BLOCK,     # 0x10 first data block, logs
                     BLOCKS_PER_GROUP, BLOCKS_PER_GROUP, layout.inodes_per_group,     # 0x20 per-group counts
                     now, now,                                                        # 0x2C mtime, wtime
                     0, -1, MAGIC, STATE_CLEAN, ERRORS_REMOUNT_RO, 0,                 # 0x34 mnt counts .. minor rev
                     now, 0, 0, 1,                                                    # 0x40 lastcheck .. rev level
                     0, 0, FIRST_INO, INODE_SIZE, group)                              # 0x50 resuid .. group nr
    struct.pack_into("<III", sb, 0x5C, COMPAT, INCOMPAT, RO_COMPAT)
    sb[0x68:0x78] = fs_uuid
    sb[0x78:0x88] = label[:16].ljust(16, b"\0")
    sb[0xEC:0xFC] = hash_seed
    sb[0xFC] = HASH_HALF_MD4                                                          # s_def_hash_version
    struct.pack_into("<I", sb, 0x108, now)                                            # s_mkfs_time
    struct.pack_into("<HHI", sb, 0x15C, EXTRA_ISIZE, EXTRA_ISIZE, FLAGS_SIGNED_HASH)  # min/want isize, s_flags
    return bytes(sb)


def _dir_inode(block: int, links: int, now: int) -> bytes:
    # inodes.rst: mode, uid, size, a/c/m/dtime, gid, links, i_blocks (512-byte units), flags, osd1, then
    # i_block holding the extent header (ifork.rst) and one leaf: logical 0, length 1, physical block.
    ino = bytearray(INODE_SIZE)
    struct.pack_into("<HHIIIIIHHII", ino, 0, S_IFDIR | 0o755, 0, BLOCK, now, now, now, 0, 0, links,
                     BLOCK // 512, EXTENTS_FL)
    struct.pack_into("<HHHHI", ino, 0x28, EXTENT_MAGIC, 1, 4, 0, 0)
    struct.pack_into("<IHHI", ino, 0x34, 0, 1, block >> 32, block & 0xFFFFFFFF)
    struct.pack_into("<H", ino, 0x80, EXTRA_ISIZE)                                    # i_extra_isize
    struct.pack_into("<I", ino, 0x90, now)                                            # i_crtime
    return bytes(ino)


def _dir_block(entries: list[tuple[int, bytes]]) -> bytes:
    """directory.rst, ext4_dir_entry_2 (inode, rec_len, name_len, file_type, name); the last entry's rec_len
    runs to the end of the block."""
    out = bytearray()
    for i, (ino, name) in enumerate(entries):
        size = (8 + len(name) + 3) & ~3
        rec_len = BLOCK - len(out) if i == len(entries) - 1 else size
        out += struct.pack("<IHBB", ino, rec_len, len(name), FT_DIR) + name.ljust(size - 8, b"\0")
    return bytes(out.ljust(BLOCK, b"\0"))


def format_device(fd: int, size_bytes: int, *, fs_uuid: bytes | None = None, hash_seed: bytes | None = None,
                  now: int | None = None, label: bytes = b"parma-scratch") -> Layout:
    """Write an empty ext4 filesystem of `size_bytes` to the open file or block device `fd` (whole 4 KiB
    blocks at 4 KiB offsets, never a read), then fsync. Returns the layout it wrote."""
    layout = plan(size_bytes)
    fs_uuid = fs_uuid or uuidlib.uuid4().bytes
    hash_seed = hash_seed or uuidlib.uuid4().bytes
    now = int(time.time()) if now is None else now
    states = _group_states(layout)
    gdt = b"".join(_group_descriptor(layout, g, st, fs_uuid) for g, st in enumerate(states))
    gdt = gdt.ljust(layout.gdt_blocks * BLOCK, b"\0")
    ipg = layout.inodes_per_group

    def write(block: int, data: bytes) -> None:
        assert len(data) % BLOCK == 0
        if os.pwrite(fd, data, block * BLOCK) != len(data):
            raise Ext4FormatError(f"short write at block {block}")

    for g in range(layout.groups):
        if has_super(g):
            sb = _superblock(layout, states, g, fs_uuid, hash_seed, now, label)
            # Group 0's superblock sits 1024 bytes into block 0; each backup starts its group.
            write(layout.group_start(g), (b"\0" * 1024 + sb if g == 0 else sb).ljust(BLOCK, b"\0") + gdt)
        if not states[g].flags & BG_BLOCK_UNINIT:
            used = [(0, layout.overhead(g) + (2 if g == 0 else 0)), (layout.group_blocks(g), BLOCKS_PER_GROUP)]
            write(layout.block_bitmap(g), _bitmap(used))
        if not states[g].flags & BG_INODE_UNINIT:
            write(layout.inode_bitmap(g), _bitmap([(0, LOST_FOUND_INO), (ipg, BLOCKS_PER_GROUP)]))
    # Inode-table block 0 of group 0: inodes 1-16, of which 2 (root) and 11 (lost+found) are directories.
    table = bytearray(BLOCK)
    table[(ROOT_INO - 1) * INODE_SIZE:ROOT_INO * INODE_SIZE] = _dir_inode(layout.root_block, 3, now)
    table[(LOST_FOUND_INO - 1) * INODE_SIZE:LOST_FOUND_INO * INODE_SIZE] = _dir_inode(layout.lost_found_block, 2, now)
    write(layout.inode_table(0), bytes(table))
    write(layout.root_block, _dir_block([(ROOT_INO, b"."), (ROOT_INO, b".."), (LOST_FOUND_INO, b"lost+found")]))
    write(layout.lost_found_block, _dir_block([(LOST_FOUND_INO, b"."), (ROOT_INO, b"..")]))
    os.fsync(fd)
    return layout
