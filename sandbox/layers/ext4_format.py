"""ext4 on-disk structures, packed byte for byte.

Source: the kernel's Documentation/filesystems/ext4/ (super.rst, group_descr.rst, inodes.rst, ifork.rst,
directory.rst, attributes.rst) and fs/ext4/ext4.h, fs/ext4/xattr.h. Field offsets are given in the comments.
Only what a compact, read-only image needs: 4 KiB blocks, 256-byte inodes, 32-byte group descriptors,
extents, no journal, no checksums, no htree.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

BLOCK_SIZE = 4096
LOG_BLOCK_SIZE = 2                  # s_log_block_size: 1024 << 2
BLOCKS_PER_GROUP = BLOCK_SIZE * 8   # one block bitmap block
MAX_INODES_PER_GROUP = BLOCK_SIZE * 8
INODE_SIZE = 256
INODE_EXTRA_ISIZE = 24              # i_extra_isize: fields up to i_crtime_extra (as hcsshim's compactext4)
INODE_XATTR_START = 128 + INODE_EXTRA_ISIZE   # the in-inode xattr area: 4-byte magic, entries, values
GROUP_DESC_SIZE = 32
FIRST_INO = 11
ROOT_INO = 2
MAGIC = 0xEF53
XATTR_MAGIC = 0xEA020000
EXTENT_MAGIC = 0xF30A
MAX_EXTENT_LEN = 32768              # longest initialised extent (ee_len <= 32768)
EXTENTS_IN_INODE = 4                # i_block: 12-byte header + 4 entries
EXTENTS_PER_BLOCK = (BLOCK_SIZE - 12) // 12
FAST_SYMLINK_MAX = 59               # targets up to this length live in i_block
MAX_NAME = 255
LINK_MAX = 65000                    # EXT4_LINK_MAX
DIRENT_HEADER = 8                   # inode u32, rec_len u16, name_len u8, file_type u8


class FileType(IntEnum):
    """Directory entry file_type (directory.rst, "ext4_dir_entry_2")."""

    unknown = 0
    regular = 1
    directory = 2
    char = 3
    block = 4
    fifo = 5
    socket = 6
    symlink = 7


S_IFMT = 0o170000
MODE_OF: dict[int, int] = {   # keyed by FileType; the writer looks up the plain int its inode array holds
    FileType.regular: 0o100000, FileType.directory: 0o040000, FileType.char: 0o020000,
    FileType.block: 0o060000, FileType.fifo: 0o010000, FileType.socket: 0o140000, FileType.symlink: 0o120000,
}


class InodeFlag(IntFlag):
    """i_flags (inodes.rst)."""

    HUGE_FILE = 0x40000             # i_blocks counts filesystem blocks, not 512-byte sectors
    EXTENTS = 0x80000


class Compat(IntFlag):
    EXT_ATTR = 0x8
    SPARSE_SUPER2 = 0x200


class Incompat(IntFlag):
    FILETYPE = 0x2
    EXTENTS = 0x40
    FLEX_BG = 0x200


class RoCompat(IntFlag):
    LARGE_FILE = 0x2
    HUGE_FILE = 0x8
    DIR_NLINK = 0x20
    EXTRA_ISIZE = 0x40
    READONLY = 0x1000


# Extended attribute name prefixes and their e_name_index (attributes.rst). Longest prefixes first.
XATTR_PREFIXES: tuple[tuple[bytes, int], ...] = (
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"system.richacl", 8),
    (b"system.", 7),
    (b"user.", 1),
    (b"trusted.", 4),
    (b"security.", 6),
)


def split_xattr_name(name: bytes) -> tuple[int, bytes] | None:
    """(e_name_index, suffix) for a full attribute name, or None when the namespace is not one ext4 stores."""
    for prefix, index in XATTR_PREFIXES:
        if name.startswith(prefix):
            return index, name[len(prefix):]
    return None


def xattr_entry_hash(name: bytes, value: bytes) -> int:
    """ext4_xattr_hash_entry (fs/ext4/xattr.c): name bytes as signed chars, then the value in LE words."""
    h = 0
    for c in name:
        c = c - 256 if c >= 128 else c
        h = ((h << 5) ^ (h >> 27) ^ c) & 0xFFFFFFFF
    padded = value + bytes(-len(value) % 4)
    for (word,) in struct.iter_unpack("<I", padded):
        h = ((h << 16) ^ (h >> 16) ^ word) & 0xFFFFFFFF
    return h


def xattr_block_hash(entry_hashes: list[int]) -> int:
    """ext4_xattr_rehash: the block header hash folds the entry hashes (0 if any entry hash is 0)."""
    h = 0
    for eh in entry_hashes:
        if eh == 0:
            return 0
        h = ((h << 16) ^ (h >> 16) ^ eh) & 0xFFFFFFFF
    return h


@dataclass(frozen=True)
class Xattr:
    index: int          # e_name_index
    name: bytes         # the name without its prefix
    value: bytes

    @property
    def entry_size(self) -> int:
        """struct ext4_xattr_entry (16 bytes) plus the name, padded to 4."""
        return 16 + ((len(self.name) + 3) & ~3)

    @property
    def value_size(self) -> int:
        return (len(self.value) + 3) & ~3

    @property
    def size(self) -> int:
        return self.entry_size + self.value_size

    def sort_key(self) -> tuple[int, int, bytes]:
        """The order the kernel's sorted lookup in xattr blocks expects: index, name length, name."""
        return self.index, len(self.name), self.name


def pack_xattrs(xattrs: list[Xattr], region: int, value_base: int, *,
                empty_value_offs: bool = False) -> tuple[bytes, list[int]]:
    """Entries from the start of a region of `region` bytes, values packed downwards from its end.

    e_value_offs counts from `value_base` bytes before the region start (0 for the in-inode area, whose
    offsets are relative to the first entry; 32 for a block, whose entries follow the 32-byte header).
    The entry list ends with 4 zero bytes. Returns the region and the entry hashes. An empty value gets
    e_value_offs 0, or with `empty_value_offs` the current value offset, as hcsshim's compactext4 writes.
    """
    out = bytearray(region)
    pos = 0
    end = region
    hashes = []
    for x in xattrs:
        if x.value or empty_value_offs:
            end -= x.value_size
            out[end:end + len(x.value)] = x.value
            offs = end + value_base
        else:
            offs = 0
        h = xattr_entry_hash(x.name, x.value)
        hashes.append(h)
        # struct ext4_xattr_entry: e_name_len u8, e_name_index u8, e_value_offs u16, e_value_inum u32,
        # e_value_size u32, e_hash u32, e_name.
        struct.pack_into("<BBHIII", out, pos, len(x.name), x.index, offs, 0, len(x.value), h)
        out[pos + 16:pos + 16 + len(x.name)] = x.name
        pos += x.entry_size
    if pos + 4 > end:
        raise ValueError("xattrs do not fit")          # callers check sizes before packing
    return bytes(out), hashes


def pack_inode_xattrs(xattrs: list[Xattr], *, empty_value_offs: bool = False) -> bytes:
    """The in-inode xattr area (after i_extra_isize): ext4_xattr_ibody_header magic, then entries."""
    body, _ = pack_xattrs(xattrs, INODE_SIZE - INODE_XATTR_START - 4, 0, empty_value_offs=empty_value_offs)
    return struct.pack("<I", XATTR_MAGIC) + body


def pack_xattr_block(xattrs: list[Xattr]) -> bytes:
    """An xattr block: struct ext4_xattr_header (magic, refcount 1, blocks 1, hash), then entries."""
    body, hashes = pack_xattrs(xattrs, BLOCK_SIZE - 32, 32)
    header = struct.pack("<IIII16x", XATTR_MAGIC, 1, 1, xattr_block_hash(hashes))
    return header + body


INODE_XATTR_ROOM = INODE_SIZE - INODE_XATTR_START - 4 - 4     # magic and the 4-byte end marker
BLOCK_XATTR_ROOM = BLOCK_SIZE - 32 - 4                          # header and the end marker


# --- timestamps ---------------------------------------------------------------------------------------

MIN_TIME = -(1 << 31)
MAX_TIME = (1 << 34) - (1 << 31) - 1    # 2446-05-10: the largest second the epoch bits can express


def encode_time(seconds: int, nanoseconds: int) -> tuple[int, int]:
    """(i_*time, i_*time_extra): low 32 bits of the signed seconds, and epoch bits | nanoseconds << 2.

    inodes.rst "Inode Timestamps": the two epoch bits extend the signed 32-bit seconds; times outside
    1901..2446 are clamped.
    """
    if seconds < MIN_TIME:
        seconds, nanoseconds = MIN_TIME, 0
    elif seconds > MAX_TIME:
        seconds, nanoseconds = MAX_TIME, 999_999_999
    epoch = ((seconds - MIN_TIME) >> 32) & 3
    return seconds & 0xFFFFFFFF, epoch | (nanoseconds << 2)


# --- extents --------------------------------------------------------------------------------------------

def pack_extent_header(entries: int, max_entries: int, depth: int) -> bytes:
    """struct ext4_extent_header: eh_magic, eh_entries, eh_max, eh_depth, eh_generation."""
    return struct.pack("<HHHHI", EXTENT_MAGIC, entries, max_entries, depth, 0)


def pack_extent_leaf(logical: int, length: int, physical: int) -> bytes:
    """struct ext4_extent: ee_block, ee_len, ee_start_hi, ee_start_lo."""
    return struct.pack("<IHHI", logical, length, physical >> 32, physical & 0xFFFFFFFF)


def pack_extent_index(logical: int, leaf: int) -> bytes:
    """struct ext4_extent_idx: ei_block, ei_leaf_lo, ei_leaf_hi, ei_unused."""
    return struct.pack("<IIHH", logical, leaf & 0xFFFFFFFF, leaf >> 32, 0)


# --- directory entries ------------------------------------------------------------------------------------

DIRENT_HEADER_STRUCT = struct.Struct("<IHBB")    # inode, rec_len, name_len, file_type


def dirent_size(name_len: int) -> int:
    return (DIRENT_HEADER + name_len + 3) & ~3


def pack_dirent(ino: int, rec_len: int, name: bytes, file_type: int) -> bytes:
    """struct ext4_dir_entry_2, padded with zeros to rec_len."""
    return struct.pack("<IHBB", ino, rec_len, len(name), file_type) + name + bytes(rec_len - 8 - len(name))


# --- device numbers -----------------------------------------------------------------------------------

def encode_device(major: int, minor: int) -> int:
    """The "new" encoding the kernel reads from i_block[1] (new_encode_dev): minor low byte, major, minor rest.

    Callers check major < 4096 and minor < 2**20 (a 32-bit dev_t).
    """
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


# --- inode --------------------------------------------------------------------------------------------

_INODE = struct.Struct("<HHIIIIIHHIII60sIIIIHHHHHHHHIIIII")
assert _INODE.size == INODE_XATTR_START


def pack_inode(mode: int, uid: int, gid: int, size: int, links: int, blocks: int, flags: int, i_block: bytes,
               xattr_block: int, atime: tuple[int, int], ctime: tuple[int, int], mtime: tuple[int, int],
               crtime: tuple[int, int], inline_xattrs: bytes = b"") -> bytes:
    """struct ext4_inode with i_extra_isize fields, then the in-inode xattr area (or zeros): 256 bytes.

    `blocks` is i_blocks in filesystem blocks (HUGE_FILE flag set); `i_block` up to 60 bytes (extent tree
    root, fast symlink target or device number); times are (seconds, extra) pairs as from encode_time.
    """
    # struct ext4_inode: i_mode @0, i_uid @2, i_size_lo @4, i_atime @8, i_ctime @12, i_mtime @16,
    # i_dtime @20, i_gid @24, i_links_count @26, i_blocks_lo @28, i_flags @32, osd1 @36, i_block @40,
    # i_generation @100, i_file_acl_lo @104, i_size_high @108, i_obso_faddr @112, osd2 @116
    # (l_i_blocks_high, l_i_file_acl_high, l_i_uid_high, l_i_gid_high, l_i_checksum_lo, l_i_reserved),
    # i_extra_isize @128, i_checksum_hi @130, i_ctime_extra @132, i_mtime_extra @136,
    # i_atime_extra @140, i_crtime @144, i_crtime_extra @148.
    raw = _INODE.pack(
        mode, uid & 0xFFFF, size & 0xFFFFFFFF, atime[0], ctime[0], mtime[0], 0,
        gid & 0xFFFF, links, blocks & 0xFFFFFFFF, flags, 0, i_block,
        0, xattr_block & 0xFFFFFFFF, size >> 32, 0,
        (blocks >> 32) & 0xFFFF, xattr_block >> 32, uid >> 16, gid >> 16, 0, 0,
        INODE_EXTRA_ISIZE, 0, ctime[1], mtime[1], atime[1], crtime[0], crtime[1])
    return raw + inline_xattrs + bytes(INODE_SIZE - INODE_XATTR_START - len(inline_xattrs))


# --- group descriptor and superblock --------------------------------------------------------------------

def pack_group_desc(*, block_bitmap: int, inode_bitmap: int, inode_table: int, free_blocks: int,
                    free_inodes: int, used_dirs: int) -> bytes:
    """struct ext4_group_desc, 32-byte form: bitmaps and table locations, free counts, used dirs; no flags,
    no checksums (neither uninit_bg nor metadata_csum is enabled)."""
    return struct.pack("<IIIHHHH12x", block_bitmap, inode_bitmap, inode_table, free_blocks, free_inodes,
                       used_dirs, 0)


@dataclass(frozen=True)
class SuperblockFields:
    inodes_count: int
    blocks_count: int
    free_blocks: int
    free_inodes: int
    inodes_per_group: int
    ro_compat: int
    uuid: bytes = bytes(16)
    volume_name: bytes = b""
    lpf_ino: int = 0
    max_mnt_count: int = -1     # -1: no mount-count checks; hcsshim's compactext4 writes 0


def pack_superblock(f: SuperblockFields) -> bytes:
    """struct ext4_super_block (1024 bytes, at byte 1024 of the image). Offsets in hex per super.rst."""
    sb = bytearray(1024)
    for off, fmt, value in (
        (0x00, "I", f.inodes_count),
        (0x04, "I", f.blocks_count),                # s_blocks_count_lo
        (0x0C, "I", f.free_blocks),                 # s_free_blocks_count_lo
        (0x10, "I", f.free_inodes),
        (0x14, "I", 0),                             # s_first_data_block: 0 with 4 KiB blocks
        (0x18, "I", LOG_BLOCK_SIZE),
        (0x1C, "I", LOG_BLOCK_SIZE),                # s_log_cluster_size
        (0x20, "I", BLOCKS_PER_GROUP),
        (0x24, "I", BLOCKS_PER_GROUP),              # s_clusters_per_group
        (0x28, "I", f.inodes_per_group),
        (0x36, "h", f.max_mnt_count),               # s_max_mnt_count
        (0x38, "H", MAGIC),
        (0x3A, "H", 1),                             # s_state: cleanly unmounted
        (0x3C, "H", 1),                             # s_errors: continue
        (0x4C, "I", 1),                             # s_rev_level: dynamic inode sizes
        (0x54, "I", FIRST_INO),
        (0x58, "H", INODE_SIZE),
        (0x5C, "I", Compat.EXT_ATTR | Compat.SPARSE_SUPER2),
        (0x60, "I", Incompat.FILETYPE | Incompat.EXTENTS | Incompat.FLEX_BG),
        (0x64, "I", f.ro_compat),
        (0x15C, "H", INODE_EXTRA_ISIZE),            # s_min_extra_isize
        (0x15E, "H", INODE_EXTRA_ISIZE),            # s_want_extra_isize
        (0x174, "B", 31),                           # s_log_groups_per_flex: metadata may sit anywhere
        (0x268, "I", f.lpf_ino),                    # s_lpf_ino
    ):
        struct.pack_into("<" + fmt, sb, off, value)
    sb[0x68:0x78] = f.uuid                          # s_uuid
    sb[0x78:0x88] = f.volume_name.ljust(16, b"\0")[:16]
    return bytes(sb)
