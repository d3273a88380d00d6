"""A streaming writer for compact, read-only ext4 images.

The layout follows hcsshim's compactext4 (the writer behind ACI's layer hashes) so that a byte-identical mode
stays a small step away:
- block 0 holds the superblock; blocks 1.. the group descriptor table, reserved for a maximum disk size;
- file data follows in creation order, each file contiguous and block-aligned, an entry's xattr block just
  before its data, extent tree blocks of large files right after it;
- at close: directories (pre-order, entries by inode number), then the inode table of every group, then a
  block and an inode bitmap per group; the superblock and descriptors are written last.
Inodes are numbered in creation order from 11; 1-10 are reserved, 2 is the root. No journal, no
checksums, no htree; the image is marked read-only. Unlike compactext4 it sets the bitmap padding bits
e2fsck expects (see Ext4Dialect), can leave out lost+found, keeps sparse files sparse and can replace a
file's data.

Memory stays bounded whatever the number of entries (a layer may hold hundreds of thousands): an inode is
a row of fixed-width columns (array.array, 56 bytes), the rare extras (symlink targets, extent roots,
device numbers, xattrs) sit in dicts keyed by inode number, and directory entries live in a DirIndex that
moves to an SQLite file past a threshold. File data goes straight to the output.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from sandbox.layers import ext4_format as F
from sandbox.layers.dirindex import DirIndex
from sandbox.shared.errors import InputError

DEFAULT_MAX_DISK_SIZE = 128 << 30       # what dmverity-vhd reserves descriptors for: 8 GDT blocks
ZERO_TIME = (0, 0)
FREE = F.FileType.unknown               # the file type of an inode number that is not in use
_FLUSH_AT = 256 << 10                   # small enough to stay in the CPU cache between copy and write
_DIRECT_AT = 64 << 10                   # data pieces at least this large are written without the buffer
_ZERO_INODE = bytes(F.INODE_SIZE)
_INODES_PER_WRITE = 256                 # inode records packed and written at once
_ZERO_INODES = bytes(F.INODE_SIZE * _INODES_PER_WRITE)
_ZEROS = memoryview(bytes(F.BLOCK_SIZE))
_HUGE_FILE, _EXTENTS = int(F.InodeFlag.HUGE_FILE), int(F.InodeFlag.EXTENTS)
_ONE_EXTENT = struct.Struct("<HHHHIIHHI")      # extent header (depth 0) and one leaf: i_block of a small file
_GROW = 4096                            # inode rows added to the columns at a time
_BITS = bytes.maketrans(bytes(range(256)), b"0" + b"1" * 255)   # file type -> "is the inode in use"

NO_EXTENTS = 0          # no extents flag: empty files, devices, fifos, fast symlinks
CONTIGUOUS = 1          # one run of data from logical block 0: extents derived from data_start/data_count
EXPLICIT = 2            # i_block holds the extent tree root (holes, or more than 4 extents)


class Ext4LimitError(InputError):
    """Content that ext4 (or this writer's reserved geometry) cannot represent."""


def sorted_xattr_block(block: list[F.Xattr]) -> bytes:
    """An xattr block as the kernel writes it: entries in its lookup order, the header hash filled in."""
    return F.pack_xattr_block(sorted(block, key=F.Xattr.sort_key))


@dataclass(frozen=True)
class Ext4Dialect:
    """Byte-level habits in which compact ext4 writers differ. The defaults give e2fsck-clean images;
    sandbox/aci/ext4compat.py defines hcsshim compactext4's, which ACI's layer hashes depend on."""

    inode_bitmap_padding: bool = True           # set the bits after a group's last inode, as e2fsck expects
    max_mount_count: int = -1                   # s_max_mnt_count; -1: no mount-count checks
    empty_xattr_value_offs: bool = False        # in-inode xattrs: an empty value's e_value_offs is the offset
    xattr_block: Callable[[list[F.Xattr]], bytes] = sorted_xattr_block


DEFAULT_DIALECT = Ext4Dialect()


@dataclass(frozen=True)
class Ext4Stats:
    blocks: int             # filesystem size in blocks
    inodes: int             # inodes in use (reserved ones included)
    groups: int
    inodes_per_group: int

    @property
    def size(self) -> int:
        return self.blocks * F.BLOCK_SIZE


def _set_bits(bitmap: bytearray, start: int, end: int) -> None:
    """Set bits [start, end) of a little-endian bitmap."""
    if start >= end:
        return
    first_full, last_full = -(-start // 8), end // 8
    if first_full > last_full:                  # inside one byte
        for b in range(start, end):
            bitmap[b >> 3] |= 1 << (b & 7)
        return
    for b in range(start, first_full * 8):
        bitmap[b >> 3] |= 1 << (b & 7)
    bitmap[first_full:last_full] = b"\xff" * (last_full - first_full)
    for b in range(last_full * 8, end):
        bitmap[b >> 3] |= 1 << (b & 7)


def _clear_bits(bitmap: bytearray, start: int, end: int) -> None:
    for b in range(start, end):
        bitmap[b >> 3] &= ~(1 << (b & 7)) & 0xFF


def _used_bitmap(ftypes: bytes) -> bytes:
    """One bit per inode, set where its file type says it is in use (little-endian within each byte)."""
    if not ftypes:
        return b""
    flags = ftypes.translate(_BITS)[::-1]       # '1'/'0' per inode, the last inode first
    return int(flags, 2).to_bytes(-(-len(ftypes) // 8), "little")


class WriteWatcher(Protocol):
    """Told how far the image is written (sandbox/layers/treehash.py hashes it meanwhile)."""

    def written(self, end: int) -> None:
        """Bytes [0, end) are written for good, but for the superblock and descriptor blocks (written at
        close) and blocks rewritten() names."""

    def rewritten(self, block: int) -> None:
        """Block `block` was written again."""


def descriptor_blocks(max_disk_size: int) -> int:
    """Blocks the group descriptor table takes, reserved for `max_disk_size`: blocks 1.. of the image."""
    max_blocks = -(-max_disk_size // F.BLOCK_SIZE)
    max_groups = -(-max_blocks // F.BLOCKS_PER_GROUP)
    return -(-max_groups * F.GROUP_DESC_SIZE // F.BLOCK_SIZE)


class Ext4Writer:
    """Build an ext4 image in a file opened for writing (`fd`), starting at offset 0.

    Inodes are referred to by number. Their fields are columns indexed by inode number; a number whose
    file type is FREE is not in use (reserved, or released when its last name went away).
    """

    def __init__(self, fd: int, *, max_disk_size: int = DEFAULT_MAX_DISK_SIZE, lost_and_found: bool = False,
                 uuid: bytes = bytes(16), volume_name: bytes = b"", dialect: Ext4Dialect = DEFAULT_DIALECT,
                 dirs: DirIndex | None = None, watcher: WriteWatcher | None = None) -> None:
        self.fd = fd
        self.dialect = dialect
        self.watcher = watcher
        max_blocks = -(-max_disk_size // F.BLOCK_SIZE)
        if max_blocks > 1 << 32:
            raise Ext4LimitError(f"a maximum disk size of {max_disk_size} bytes needs 64-bit block numbers")
        self.max_blocks = max_blocks
        self.gd_blocks = descriptor_blocks(max_disk_size)
        self.uuid = uuid
        self.volume_name = volume_name
        self.next_block = 1 + self.gd_blocks
        self._buf = bytearray(_FLUSH_AT + _DIRECT_AT)  # fixed size: reallocating it would fragment the heap
        self._view = memoryview(self._buf)
        self._fill = 0                                  # bytes of it in use
        self._buf_pos = self.next_block * F.BLOCK_SIZE      # byte offset of the buffer's first byte
        self.freed: list[tuple[int, int]] = []      # (start, count) of blocks released by replaced content
        self.dirs = dirs if dirs is not None else DirIndex()
        # Columns, indexed by inode number (index 0 is unused), grown _GROW rows at a time; rows past
        # `_next_ino` are zero. Times are (seconds, extra) pairs split over two columns.
        self.ftype = array("B")
        self.perm = array("H")
        self.uid = array("I")
        self.gid = array("I")
        self.links = array("I")
        self.size = array("Q")
        self.data_start = array("I")
        self.data_count = array("I")
        self.mapping = array("B")
        self.times = [array("I") for _ in range(8)]     # atime, atime extra, ctime, ..., crtime extra
        self._columns = [self.ftype, self.perm, self.uid, self.gid, self.links, self.size, self.data_start,
                         self.data_count, self.mapping, *self.times]
        self._rows = 0
        self._grow()
        self._next_ino = F.FIRST_INO
        # Rare fields: inode number -> value.
        self.i_block: dict[int, bytes] = {}         # fast symlink target, or explicit extent tree root
        self.device: dict[int, tuple[int, int]] = {}
        self.xattrs: dict[int, dict[bytes, bytes]] = {}
        self.xattr_block: dict[int, int] = {}
        self.tree: dict[int, tuple[int, int]] = {}  # (first block, count) of extent index/leaf blocks
        self.root = F.ROOT_INO
        self.ftype[self.root] = F.FileType.directory
        self.perm[self.root] = 0o755
        self.links[self.root] = 2
        self.dirs.new_dir(self.root)
        self.lost_and_found = 0
        if lost_and_found:
            lpf = self.new_inode(F.FileType.directory, 0o700)
            self.link(self.root, b"lost+found", lpf)
            self.lost_and_found = lpf

    # --- inodes and names -----------------------------------------------------------------------------

    @property
    def inode_count(self) -> int:
        """Inode numbers handed out so far, the reserved ones included."""
        return self._next_ino - 1

    def _grow(self) -> None:
        for column in self._columns:
            column.frombytes(bytes(column.itemsize * _GROW))
        self._rows += _GROW

    def is_dir(self, ino: int) -> bool:
        return self.ftype[ino] == F.FileType.directory

    def new_inode(self, ftype: F.FileType, perm: int = 0, uid: int = 0, gid: int = 0) -> int:
        """A new inode number, its row zero but for these fields."""
        ino = self._next_ino
        self._next_ino = ino + 1
        if ino >= self._rows:
            self._grow()
        self.ftype[ino] = ftype
        if perm:
            self.perm[ino] = perm
        if uid or gid:
            self.uid[ino], self.gid[ino] = uid, gid
        if ftype == F.FileType.directory:
            self.links[ino] = 1                     # its own "."
            self.dirs.new_dir(ino)
        return ino

    def set_times(self, ino: int, atime: tuple[int, int], ctime: tuple[int, int], mtime: tuple[int, int],
                  crtime: tuple[int, int]) -> None:
        """Encoded (seconds, extra) pairs, as from ext4_format.encode_time."""
        t = self.times
        t[0][ino], t[1][ino] = atime
        t[2][ino], t[3][ino] = ctime
        t[4][ino], t[5][ino] = mtime
        t[6][ino], t[7][ino] = crtime

    def get_times(self, ino: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(atime, ctime, mtime, crtime) as set_times takes them."""
        t = self.times
        return (t[0][ino], t[1][ino]), (t[2][ino], t[3][ino]), (t[4][ino], t[5][ino]), (t[6][ino], t[7][ino])

    def link(self, parent: int, name: bytes, ino: int) -> None:
        """Enter inode `ino` in directory `parent` under `name` (which must be free)."""
        is_dir = self.ftype[ino] == F.FileType.directory
        if self.links[ino] >= F.LINK_MAX and not is_dir:
            raise Ext4LimitError(f"more than {F.LINK_MAX} hard links to one file")
        self.dirs.add(parent, name, ino)
        self.links[ino] += 1
        if is_dir:
            self.links[parent] += 1                 # the child's ".."

    def unlink(self, parent: int, name: bytes) -> int:
        """Remove a name; an inode left without names is released, a directory with everything below it."""
        ino = self.dirs.remove(parent, name)
        self.links[ino] -= 1
        if self.ftype[ino] == F.FileType.directory:
            self.links[parent] -= 1
            self._release_tree(ino)
        elif self.links[ino] == 0:
            self.release(ino)
        return ino

    def _release_tree(self, ino: int) -> None:
        for name, _ in self.dirs.children(ino):
            self.unlink(ino, name)
        self.dirs.drop_dir(ino)
        self.release(ino)

    def release(self, ino: int) -> None:
        """Free an inode number and the blocks behind it."""
        self.release_blocks(ino, xattr_block=True)
        self.xattrs.pop(ino, None)
        self.ftype[ino] = FREE

    def release_blocks(self, ino: int, *, xattr_block: bool) -> None:
        """Free the inode's data (and extent tree) blocks, and its xattr block if asked; reset its content."""
        if self.data_count[ino]:
            self.freed.append((self.data_start[ino], self.data_count[ino]))
        if tree := self.tree.pop(ino, None):
            self.freed.append(tree)
        if xattr_block and (block := self.xattr_block.pop(ino, 0)):
            self.freed.append((block, 1))
        self.reset_content(ino)

    def reset_content(self, ino: int) -> None:
        """Forget the inode's size, data and device number (release_blocks frees the blocks first)."""
        self.size[ino] = self.data_start[ino] = self.data_count[ino] = 0
        self.mapping[ino] = NO_EXTENTS
        self.i_block.pop(ino, None)
        self.tree.pop(ino, None)
        self.device.pop(ino, None)

    def has_data_blocks(self, ino: int) -> bool:
        return self.data_count[ino] != 0

    # --- output -------------------------------------------------------------------------------------

    def _append(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if n >= _DIRECT_AT:
            self._flush()
            self._pwrite(data, self._buf_pos)
            self._buf_pos += n
            if self.watcher is not None:
                self.watcher.written(self._buf_pos)
            return
        if self._fill >= _FLUSH_AT:     # write_file's fast path fills past _FLUSH_AT without flushing
            self._flush()
        fill = self._fill               # < _FLUSH_AT, so the piece fits: the buffer never grows
        self._buf[fill:fill + n] = data
        self._fill = fill + n
        if self._fill >= _FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        if self._fill:
            self._pwrite(self._view[:self._fill], self._buf_pos)
            self._buf_pos += self._fill
            self._fill = 0
            if self.watcher is not None:
                self.watcher.written(self._buf_pos)

    def _pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def _pad(self, written: int) -> int:
        """Zero-fill up to the next block boundary after `written` bytes of content; returns the padding."""
        pad = -written % F.BLOCK_SIZE
        if pad:
            self._append(_ZEROS[:pad])
        return pad

    def _alloc_written(self, blocks: int) -> int:
        """Account for `blocks` blocks just appended; returns the first one's number."""
        first = self.next_block
        self.next_block += blocks
        if self.next_block > self.max_blocks:
            raise Ext4LimitError(f"the image would exceed its maximum size of {self.max_blocks * F.BLOCK_SIZE} "
                                 "bytes", hint="the layer is too large for one image")
        return first

    def _write_block(self, data: bytes) -> int:
        """Append one block (zero-padded) and return its number."""
        self._append(data)
        self._pad(len(data))
        return self._alloc_written(1)

    def _rewrite_block(self, block: int, data: bytes) -> None:
        """Replace a block written earlier; it may lie on disk, in the buffer, or across the two."""
        data = data.ljust(F.BLOCK_SIZE, b"\0")
        offset = block * F.BLOCK_SIZE
        if self.watcher is not None:
            self.watcher.rewritten(block)
        flushed = max(0, min(F.BLOCK_SIZE, self._buf_pos - offset))
        if flushed:
            self._pwrite(data[:flushed], offset)
        if flushed < F.BLOCK_SIZE:
            start = offset + flushed - self._buf_pos
            self._buf[start:start + F.BLOCK_SIZE - flushed] = data[flushed:]

    # --- content ------------------------------------------------------------------------------------

    def set_xattrs(self, ino: int, xattrs: dict[bytes, bytes]) -> None:
        """Replace the inode's xattrs; the overflow block is written now (reusing the inode's old one)."""
        if xattrs:
            self.xattrs[ino] = dict(xattrs)
        elif self.xattrs.pop(ino, None) is None and ino not in self.xattr_block:
            return
        _, block = split_xattrs(xattrs)
        if not block:
            if old := self.xattr_block.pop(ino, 0):
                self.freed.append((old, 1))
            return
        raw = self.dialect.xattr_block(block)
        if old := self.xattr_block.get(ino, 0):
            self._rewrite_block(old, raw)
        else:
            self.xattr_block[ino] = self._write_block(raw)

    def write_file(self, ino: int, pieces: Iterable[bytes | memoryview], size: int) -> None:
        """Stream a regular file's content that has no holes: `pieces` are its bytes in order."""
        start = self.next_block
        written = 0
        for piece in pieces:
            n = len(piece)
            fill = self._fill
            if n < _DIRECT_AT and fill < _FLUSH_AT:     # the usual small piece: straight into the buffer
                self._buf[fill:fill + n] = piece
                self._fill = fill + n
            else:
                self._append(piece)
            written += n
        if written != size:
            raise Ext4LimitError(f"file data does not match its size ({written} != {size})")
        self.size[ino] = size
        if not written:
            self.mapping[ino] = NO_EXTENTS
            self.i_block.pop(ino, None)
            return
        blocks = (written + self._pad(written)) // F.BLOCK_SIZE
        self._alloc_written(blocks)
        self.data_start[ino], self.data_count[ino] = start, blocks
        self._finish_extents(ino, [(0, start)])

    def write_data(self, ino: int, segments: Iterable[tuple[int, bytes | memoryview]], size: int) -> None:
        """Stream a regular file's (or long symlink's) content.

        `segments` yields (offset, bytes) in increasing, non-overlapping order; ranges never yielded are
        holes. A hole spanning at least one whole block stays unallocated; partial blocks are zero-filled.
        """
        bs = F.BLOCK_SIZE
        runs: list[tuple[int, int]] = []            # (logical block, physical block) where each run starts
        pos = -1                                    # logical byte position reached in the open run
        start = self.next_block
        written = 0                                 # bytes appended for this file
        append = self._append
        for off, data in segments:
            if not data:
                continue
            if pos >= 0 and off // bs <= -(-pos // bs):
                gap = off - pos                     # same or next block: fill with zeros
            else:
                if pos >= 0:
                    written += self._pad(written)
                runs.append((off // bs, start + written // bs))
                gap = off % bs
            if gap:
                append(bytes(gap))
            append(data)
            written += gap + len(data)
            pos = off + len(data)
        if pos > size:
            raise Ext4LimitError(f"file data runs past its size ({pos} > {size})")
        if written:
            written += self._pad(written)
        blocks = written // bs
        if blocks:
            self._alloc_written(blocks)
            self.data_start[ino], self.data_count[ino] = start, blocks
        self.size[ino] = size
        self._finish_extents(ino, runs)

    def _finish_extents(self, ino: int, runs: list[tuple[int, int]]) -> None:
        """Map the data: up to 4 extents in the inode, else leaf (and index) blocks right after the data.

        `runs` are (logical block, physical block) where each run of data starts (see write_data).
        """
        count = self.data_count[ino]
        if not count:
            self.mapping[ino] = NO_EXTENTS          # an empty file: no extents flag, zero i_block
            self.i_block.pop(ino, None)
            return
        start = self.data_start[ino]
        if len(runs) == 1 and runs[0] == (0, start) and count <= F.EXTENTS_IN_INODE * F.MAX_EXTENT_LEN:
            self.mapping[ino] = CONTIGUOUS
            self.i_block.pop(ino, None)
            return
        extents = _runs_to_extents(runs, start + count)
        self.mapping[ino] = EXPLICIT
        if len(extents) <= F.EXTENTS_IN_INODE:
            self.i_block[ino] = _extent_root(extents)
            return
        level: list[tuple[int, int]] = []           # (first logical block, tree block) of each node
        per = F.EXTENTS_PER_BLOCK
        tree_start = self.next_block
        for i in range(0, len(extents), per):
            chunk = extents[i:i + per]
            raw = F.pack_extent_header(len(chunk), per, 0) + b"".join(F.pack_extent_leaf(*e) for e in chunk)
            level.append((chunk[0][0], self._write_block(raw)))
        depth = 1
        while len(level) > F.EXTENTS_IN_INODE:
            upper: list[tuple[int, int]] = []
            for i in range(0, len(level), per):
                nodes = level[i:i + per]
                raw = F.pack_extent_header(len(nodes), per, depth) + b"".join(
                    F.pack_extent_index(*c) for c in nodes)
                upper.append((nodes[0][0], self._write_block(raw)))
            level = upper
            depth += 1
        self.tree[ino] = (tree_start, self.next_block - tree_start)
        self.i_block[ino] = F.pack_extent_header(len(level), F.EXTENTS_IN_INODE, depth) + b"".join(
            F.pack_extent_index(*c) for c in level)

    def set_symlink(self, ino: int, target: bytes) -> None:
        if len(target) <= F.FAST_SYMLINK_MAX:
            self.size[ino] = len(target)
            self.i_block[ino] = target              # a "fast" symlink: the target lives in i_block
        else:
            self.write_data(ino, [(0, target)], len(target))

    def set_device(self, ino: int, major: int, minor: int) -> None:
        if major or minor:
            self.device[ino] = (major, minor)
        else:
            self.device.pop(ino, None)

    # --- close --------------------------------------------------------------------------------------

    def close(self) -> Ext4Stats:
        """Write directories, inode table, bitmaps, descriptors and superblock. Returns the geometry."""
        self._write_dirs()
        self._flush()
        table_start = self.next_block
        inode_count = self.inode_count
        groups, ipg = best_group_count(table_start, inode_count)
        if -(-groups * F.GROUP_DESC_SIZE // F.BLOCK_SIZE) > self.gd_blocks:
            raise Ext4LimitError(f"the image needs {groups} block groups, more than its maximum size allows")
        table_blocks_per_group = ipg * F.INODE_SIZE // F.BLOCK_SIZE
        self._write_inode_table(groups * ipg)
        bitmap_start = self.next_block
        valid_end = bitmap_start + 2 * groups
        disk_blocks = max(valid_end, (groups - 1) * F.BLOCKS_PER_GROUP + 1)
        if disk_blocks > self.max_blocks:
            raise Ext4LimitError(f"the image would exceed its maximum size of {self.max_blocks * F.BLOCK_SIZE} "
                                 "bytes")
        used_gd = -(-groups * F.GROUP_DESC_SIZE // F.BLOCK_SIZE)
        free_ranges = [(1 + used_gd, self.gd_blocks - used_gd), *self.freed]
        # Reserved inode numbers count as used; only the root among them is a directory.
        in_use = bytes([1] * (F.FIRST_INO - 1)) + self.ftype[F.FIRST_INO:inode_count + 1].tobytes()
        descs = []
        total_free_blocks = total_free_inodes = 0
        for g in range(groups):
            lo, hi = g * F.BLOCKS_PER_GROUP, (g + 1) * F.BLOCKS_PER_GROUP
            bbm = bytearray(F.BLOCK_SIZE)
            _set_bits(bbm, 0, max(0, min(valid_end, hi) - lo))
            for start, count in free_ranges:
                a, b = max(start, lo), min(start + count, hi)
                if a < b:
                    _clear_bits(bbm, a - lo, b - lo)
            if disk_blocks < hi:                    # blocks past the end of the disk count as used
                _set_bits(bbm, disk_blocks - lo, F.BLOCKS_PER_GROUP)
            free_blocks = F.BLOCKS_PER_GROUP - _popcount(bbm)
            group_inodes = in_use[g * ipg:(g + 1) * ipg]
            ibm = bytearray(_used_bitmap(group_inodes).ljust(F.BLOCK_SIZE, b"\0"))
            used_dirs = self.ftype[1 + g * ipg:min(1 + (g + 1) * ipg, inode_count + 1)].tobytes().count(
                F.FileType.directory)
            free_inodes = ipg - _popcount(ibm)
            if self.dialect.inode_bitmap_padding:
                _set_bits(ibm, ipg, F.BLOCK_SIZE * 8)     # padding after the group's last inode
            self._append(bbm)
            self._append(ibm)
            descs.append(F.pack_group_desc(block_bitmap=bitmap_start + 2 * g, inode_bitmap=bitmap_start + 2 * g + 1,
                                           inode_table=table_start + g * table_blocks_per_group,
                                           free_blocks=free_blocks, free_inodes=free_inodes, used_dirs=used_dirs))
            total_free_blocks += free_blocks
            total_free_inodes += free_inodes
        self._alloc_written(2 * groups)
        self._flush()
        os.ftruncate(self.fd, disk_blocks * F.BLOCK_SIZE)
        gdt = b"".join(descs).ljust(self.gd_blocks * F.BLOCK_SIZE, b"\0")
        self._pwrite(gdt, F.BLOCK_SIZE)
        ro_compat = F.RoCompat.LARGE_FILE | F.RoCompat.HUGE_FILE | F.RoCompat.EXTRA_ISIZE | F.RoCompat.READONLY
        if any(self.links[ino] > F.LINK_MAX for ino in self.dirs.directories()):
            ro_compat |= F.RoCompat.DIR_NLINK
        sb = F.pack_superblock(F.SuperblockFields(
            inodes_count=groups * ipg, blocks_count=disk_blocks, free_blocks=total_free_blocks,
            free_inodes=total_free_inodes, inodes_per_group=ipg, ro_compat=ro_compat, uuid=self.uuid,
            volume_name=self.volume_name, lpf_ino=self.lost_and_found, max_mnt_count=self.dialect.max_mount_count))
        self._pwrite(bytes(1024) + sb + bytes(F.BLOCK_SIZE - 2048), 0)
        self.dirs.close()
        return Ext4Stats(blocks=disk_blocks, inodes=inode_count, groups=groups, inodes_per_group=ipg)

    def _write_dirs(self) -> None:
        """Every directory's blocks, in pre-order from the root (an explicit stack: trees can be deep)."""
        stack = [(self.root, self.root)]
        while stack:
            ino, parent = stack.pop()
            children = self.dirs.sorted_children(ino)
            self._write_dir(ino, parent, children)
            ftype = self.ftype
            stack.extend((child, ino) for _, child in reversed(children) if ftype[child] == F.FileType.directory)

    def _write_dir(self, ino: int, parent: int, children: list[tuple[bytes, int]]) -> None:
        bs = F.BLOCK_SIZE
        ftype = self.ftype
        start = self.next_block
        block = bytearray()
        blocks = 0
        pack = F.DIRENT_HEADER_STRUCT.pack
        for name, child, kind in [(b".", ino, F.FileType.directory), (b"..", parent, F.FileType.directory),
                                  *((n, c, ftype[c]) for n, c in children)]:
            rec = (F.DIRENT_HEADER + len(name) + 3) & ~3
            if bs - len(block) < rec + 12:
                # compactext4's rule: each block ends with an empty entry spanning what is left.
                block += pack(0, bs - len(block), 0, 0)
                self._append(block.ljust(bs, b"\0"))
                blocks += 1
                block = bytearray()
            block += pack(child, rec, len(name), kind) + name + _ZEROS[:rec - F.DIRENT_HEADER - len(name)]
        block += pack(0, bs - len(block), 0, 0)
        self._append(block.ljust(bs, b"\0"))
        blocks += 1
        self._alloc_written(blocks)
        self.size[ino] = blocks * bs
        self.data_start[ino], self.data_count[ino] = start, blocks
        self._finish_extents(ino, [(0, start)])

    def _write_inode_table(self, slots: int) -> None:
        count = self.inode_count
        ftype = self.ftype
        record = self._inode_record
        batch: list[bytes] = []
        for first in range(1, min(count, slots) + 1, _INODES_PER_WRITE):
            batch = [_ZERO_INODE if ftype[ino] == FREE else record(ino)
                     for ino in range(first, min(first + _INODES_PER_WRITE, count + 1, slots + 1))]
            self._append(b"".join(batch))
        unused = slots - min(count, slots)           # the rest of the last group's table
        for _ in range(unused // _INODES_PER_WRITE):
            self._append(_ZERO_INODES)
        if unused % _INODES_PER_WRITE:
            self._append(_ZERO_INODES[:unused % _INODES_PER_WRITE * F.INODE_SIZE])
        self._alloc_written(slots * F.INODE_SIZE // F.BLOCK_SIZE)

    def _inode_record(self, ino: int) -> bytes:
        ftype = self.ftype[ino]
        mapping = self.mapping[ino]
        if mapping == CONTIGUOUS:
            start, count = self.data_start[ino], self.data_count[ino]
            if count <= F.MAX_EXTENT_LEN:
                i_block = _ONE_EXTENT.pack(F.EXTENT_MAGIC, 1, F.EXTENTS_IN_INODE, 0, 0, 0, count, start >> 32,
                                           start & 0xFFFFFFFF)
            else:
                i_block = _extent_root(_runs_to_extents([(0, start)], start + count))
            flags = _HUGE_FILE | _EXTENTS
        else:
            i_block = self.i_block.get(ino, b"")
            flags = _HUGE_FILE if mapping == NO_EXTENTS else _HUGE_FILE | _EXTENTS
        if ftype == F.FileType.char or ftype == F.FileType.block:
            i_block = bytes(4) + F.encode_device(*self.device.get(ino, (0, 0))).to_bytes(4, "little")
        xattr_block = self.xattr_block.get(ino, 0)
        tree = self.tree.get(ino)
        blocks = self.data_count[ino] + (tree[1] if tree else 0) + (1 if xattr_block else 0)
        inline_xattrs = b""
        if xattrs := self.xattrs.get(ino):
            inline, _ = split_xattrs(xattrs)
            if inline:
                inline_xattrs = F.pack_inode_xattrs(inline, empty_value_offs=self.dialect.empty_xattr_value_offs)
        links = self.links[ino]
        if ftype == F.FileType.directory and links > F.LINK_MAX:
            links = 1                               # dir_nlink: "more than the counter can hold"
        t = self.times
        return F.pack_inode(F.MODE_OF[ftype] | self.perm[ino], self.uid[ino], self.gid[ino], self.size[ino], links,
                            blocks, flags, i_block, xattr_block, (t[0][ino], t[1][ino]), (t[2][ino], t[3][ino]),
                            (t[4][ino], t[5][ino]), (t[6][ino], t[7][ino]), inline_xattrs)


def _extent_root(extents: list[tuple[int, int, int]]) -> bytes:
    """i_block holding up to 4 extents directly (a depth-0 tree)."""
    return F.pack_extent_header(len(extents), F.EXTENTS_IN_INODE, 0) + b"".join(
        F.pack_extent_leaf(*e) for e in extents)


def split_xattrs(xattrs: dict[bytes, bytes] | None) -> tuple[list[F.Xattr], list[F.Xattr]]:
    """Place xattrs (by sorted full name) in the inode while they fit, the rest in one block.

    Raises Ext4LimitError naming the attribute that fits in neither, or one in a namespace ext4 cannot
    store (callers filter those out first).
    """
    inode: list[F.Xattr] = []
    block: list[F.Xattr] = []
    if not xattrs:
        return inode, block
    inode_left, block_left = F.INODE_XATTR_ROOM, F.BLOCK_XATTR_ROOM
    for full in sorted(xattrs):
        split = F.split_xattr_name(full)
        if split is None:
            raise Ext4LimitError(f"extended attribute {full!r} is in a namespace ext4 cannot store")
        x = F.Xattr(split[0], split[1], xattrs[full])
        if len(x.name) > 255:
            raise Ext4LimitError(f"extended attribute name {full!r} is longer than 255 bytes")
        if x.size <= inode_left:
            inode.append(x)
            inode_left -= x.size
        elif x.size <= block_left:
            block.append(x)
            block_left -= x.size
        else:
            raise Ext4LimitError(f"extended attribute {full.decode(errors='replace')!r} "
                                 f"({len(x.value)} bytes) does not fit in the inode and one xattr block")
    return inode, block


def _runs_to_extents(runs: list[tuple[int, int]], phys_end: int) -> list[tuple[int, int, int]]:
    """Extents (logical, length, physical) from run starts; each run ends where the next begins physically."""
    extents = []
    for i, (logical, physical) in enumerate(runs):
        end = runs[i + 1][1] if i + 1 < len(runs) else phys_end
        length = end - physical
        while length > 0:
            n = min(length, F.MAX_EXTENT_LEN)
            extents.append((logical, n, physical))
            logical += n
            physical += n
            length -= n
    return extents


def _popcount(bitmap: bytearray) -> int:
    return int.from_bytes(bitmap, "little").bit_count()


def best_group_count(blocks: int, inodes: int) -> tuple[int, int]:
    """(groups, inodes per group) for `blocks` blocks of content and `inodes` inodes.

    As compactext4: try inode-per-group counts in steps of one inode-table block (16 inodes) and keep the
    first that needs the fewest groups, each group giving up its inode-table share and two bitmap blocks.
    """
    best = (1 << 62, 0)
    step = F.BLOCK_SIZE // F.INODE_SIZE
    for ipg in range(step, F.MAX_INODES_PER_GROUP + 1, step):
        data_per_group = F.BLOCKS_PER_GROUP - ipg * F.INODE_SIZE // F.BLOCK_SIZE - 2
        need = max(blocks, (inodes - 1) // ipg * data_per_group + 1)
        groups = -(-need // data_per_group)
        if groups < best[0]:
            best = (groups, ipg)
    return best
