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
e2fsck expects, can leave out lost+found, keeps sparse files sparse and can replace a file's data.

Memory: one small object per inode; file data goes straight to the output.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from sandbox.layers import ext4_format as F
from sandbox.shared.errors import InputError

DEFAULT_MAX_DISK_SIZE = 128 << 30       # what dmverity-vhd reserves descriptors for: 8 GDT blocks
ZERO_TIME = (0, 0)
_FLUSH_AT = 4 << 20
_ZERO_BLOCK = bytes(F.BLOCK_SIZE)


class Ext4LimitError(InputError):
    """Content that ext4 (or this writer's reserved geometry) cannot represent."""


class Node:
    """One inode while the image is being built.

    Kept small (a layer may hold hundreds of thousands of entries): block runs are plain ints, and a file
    whose data is one contiguous run stores no extent bytes (its extents follow from the run at close).
    """

    __slots__ = ("ino", "ftype", "perm", "uid", "gid", "atime", "ctime", "mtime", "crtime", "links", "size",
                 "xattrs", "xattr_block", "data_start", "data_count", "tree_start", "tree_count", "mapping",
                 "i_block", "children", "device", "has_whiteouts")

    def __init__(self, ino: int, ftype: F.FileType, perm: int = 0, uid: int = 0, gid: int = 0) -> None:
        self.ino = ino
        self.ftype = ftype
        self.perm = perm
        self.uid = uid
        self.gid = gid
        self.atime = self.ctime = self.mtime = self.crtime = ZERO_TIME   # encoded (seconds, extra)
        self.links = 0
        self.size = 0
        self.xattrs: dict[bytes, bytes] | None = None
        self.xattr_block = 0
        self.data_start = self.data_count = 0          # the file's data (or directory) blocks
        self.tree_start = self.tree_count = 0          # extent index/leaf blocks, right after the data
        self.mapping = NO_EXTENTS
        self.i_block = b""                             # fast symlink target, or explicit extent tree root
        self.children: dict[bytes, Node] | None = {} if ftype == F.FileType.directory else None
        self.device = (0, 0)
        self.has_whiteouts = False

    @property
    def is_dir(self) -> bool:
        return self.ftype == F.FileType.directory

    @property
    def mode(self) -> int:
        return F.MODE_OF[self.ftype] | self.perm

    @property
    def data_blocks(self) -> list[tuple[int, int]]:
        """(first block, count) runs of file data."""
        return [(self.data_start, self.data_count)] if self.data_count else []

    @property
    def tree_blocks(self) -> list[int]:
        return list(range(self.tree_start, self.tree_start + self.tree_count))

    def reset_content(self) -> None:
        self.size = 0
        self.data_start = self.data_count = self.tree_start = self.tree_count = 0
        self.mapping = NO_EXTENTS
        self.i_block = b""
        self.device = (0, 0)


NO_EXTENTS = 0          # no extents flag: empty files, devices, fifos, fast symlinks
CONTIGUOUS = 1          # one run of data from logical block 0: extents derived from data_start/data_count
EXPLICIT = 2            # i_block holds the extent tree root (holes, or more than 4 extents)


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


class Ext4Writer:
    """Build an ext4 image in a file opened for writing (`fd`), starting at offset 0."""

    def __init__(self, fd: int, *, max_disk_size: int = DEFAULT_MAX_DISK_SIZE, lost_and_found: bool = False,
                 uuid: bytes = bytes(16), volume_name: bytes = b"", compat_aci: bool = False) -> None:
        self.fd = fd
        # compat_aci (sandbox/aci/ext4compat.py): the two bytes-level habits of hcsshim's compactext4 that this
        # writer otherwise avoids: inode-bitmap padding bits left clear (e2fsck flags it) and s_max_mnt_count 0.
        self.compat_aci = compat_aci
        max_blocks = -(-max_disk_size // F.BLOCK_SIZE)
        max_groups = -(-max_blocks // F.BLOCKS_PER_GROUP)
        self.max_blocks = max_blocks
        self.gd_blocks = -(-max_groups * F.GROUP_DESC_SIZE // F.BLOCK_SIZE)
        self.uuid = uuid
        self.volume_name = volume_name
        self.next_block = 1 + self.gd_blocks
        self._buf = bytearray()
        self._buf_block = self.next_block
        self.freed: list[tuple[int, int]] = []      # (start, count) of blocks released by replaced content
        self.nodes: list[Node | None] = [None] * (F.FIRST_INO - 1)
        self.root = Node(F.ROOT_INO, F.FileType.directory, 0o755)
        self.root.links = 2
        self.nodes[F.ROOT_INO - 1] = self.root
        self.lost_and_found: Node | None = None
        if lost_and_found:
            lpf = self.new_node(F.FileType.directory, 0o700)
            self.link(self.root, b"lost+found", lpf)
            self.lost_and_found = lpf

    # --- inodes and names -----------------------------------------------------------------------------

    def new_node(self, ftype: F.FileType, perm: int = 0, uid: int = 0, gid: int = 0) -> Node:
        node = Node(len(self.nodes) + 1, ftype, perm, uid, gid)
        if node.is_dir:
            node.links = 1                          # its own "."
        self.nodes.append(node)
        return node

    def link(self, parent: Node, name: bytes, node: Node) -> None:
        """Enter `node` in `parent` under `name` (which must be free)."""
        assert parent.children is not None and name not in parent.children
        if node.links >= F.LINK_MAX and not node.is_dir:
            raise Ext4LimitError(f"more than {F.LINK_MAX} hard links to one file")
        parent.children[name] = node
        node.links += 1
        if node.is_dir:
            parent.links += 1                       # the child's ".."

    def unlink(self, parent: Node, name: bytes) -> Node:
        """Remove a name; an inode left without names is released, a directory with everything below it."""
        assert parent.children is not None
        node = parent.children.pop(name)
        node.links -= 1
        if node.is_dir:
            parent.links -= 1
            self._release_tree(node)
        elif node.links == 0:
            self.release(node)
        return node

    def _release_tree(self, node: Node) -> None:
        assert node.children is not None
        for name in list(node.children):
            self.unlink(node, name)
        self.release(node)

    def release(self, node: Node) -> None:
        """Free an inode number and the blocks behind it."""
        self.release_blocks(node, xattr_block=True)
        self.nodes[node.ino - 1] = None

    def release_blocks(self, node: Node, *, xattr_block: bool) -> None:
        if node.data_count:
            self.freed.append((node.data_start, node.data_count))
        if node.tree_count:
            self.freed.append((node.tree_start, node.tree_count))
        if xattr_block and node.xattr_block:
            self.freed.append((node.xattr_block, 1))
            node.xattr_block = 0
        node.reset_content()

    # --- output -------------------------------------------------------------------------------------

    def _append(self, data: bytes | memoryview) -> None:
        self._buf += data
        if len(self._buf) >= _FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        whole = len(self._buf) - len(self._buf) % F.BLOCK_SIZE
        if whole:
            self._pwrite(memoryview(self._buf)[:whole], self._buf_block * F.BLOCK_SIZE)
            del self._buf[:whole]
            self._buf_block += whole // F.BLOCK_SIZE

    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def _pad_block(self) -> None:
        if tail := len(self._buf) % F.BLOCK_SIZE:
            self._buf += bytes(F.BLOCK_SIZE - tail)

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
        self._pad_block()
        return self._alloc_written(1)

    def _rewrite_block(self, block: int, data: bytes) -> None:
        data = data.ljust(F.BLOCK_SIZE, b"\0")
        if block >= self._buf_block:
            off = (block - self._buf_block) * F.BLOCK_SIZE
            self._buf[off:off + F.BLOCK_SIZE] = data
        else:
            self._pwrite(data, block * F.BLOCK_SIZE)

    # --- content ------------------------------------------------------------------------------------

    def set_xattrs(self, node: Node, xattrs: dict[bytes, bytes]) -> None:
        """Replace the node's xattrs; the overflow block is written now (reusing the node's old one)."""
        node.xattrs = dict(xattrs) if xattrs else None
        _, block = split_xattrs(node.xattrs)
        if not block:
            if node.xattr_block:
                self.freed.append((node.xattr_block, 1))
                node.xattr_block = 0
            return
        if self.compat_aci:
            from sandbox.aci.ext4compat import xattr_block_aci  # tar2ext4's entry order and zero hash
            raw = xattr_block_aci(block)
        else:
            raw = F.pack_xattr_block(sorted(block, key=F.Xattr.sort_key))
        if node.xattr_block:
            self._rewrite_block(node.xattr_block, raw)
        else:
            node.xattr_block = self._write_block(raw)

    def write_data(self, node: Node, segments: Iterable[tuple[int, bytes | memoryview]], size: int) -> None:
        """Stream a regular file's (or long symlink's) content.

        `segments` yields (offset, bytes) in increasing, non-overlapping order; ranges never yielded are
        holes. A hole spanning at least one whole block stays unallocated; partial blocks are zero-filled.
        """
        bs = F.BLOCK_SIZE
        runs: list[tuple[int, int]] = []            # (logical block, physical block) where each run starts
        pos = -1                                    # logical byte position reached in the open run
        start = self.next_block
        written = 0                                 # bytes appended for this file
        for off, data in segments:
            if not data:
                continue
            if pos >= 0 and off // bs <= -(-pos // bs):
                gap = off - pos                     # same or next block: fill with zeros
            else:
                if pos >= 0:
                    written += self._pad_run(written)
                runs.append((off // bs, start + written // bs))
                gap = off % bs
            if gap:
                self._append(bytes(gap))
            self._append(data)
            written += gap + len(data)
            pos = off + len(data)
        if pos > size:
            raise Ext4LimitError(f"file data runs past its size ({pos} > {size})")
        if written:
            written += self._pad_run(written)
        blocks = written // bs
        if blocks:
            self._alloc_written(blocks)
            node.data_start, node.data_count = start, blocks
        node.size = size
        self._finish_extents(node, runs)

    def _pad_run(self, written: int) -> int:
        pad = -written % F.BLOCK_SIZE
        if pad:
            self._append(bytes(pad))
        return pad

    def _finish_extents(self, node: Node, runs: list[tuple[int, int]]) -> None:
        """Map the data: up to 4 extents in the inode, else leaf (and index) blocks right after the data.

        `runs` are (logical block, physical block) where each run of data starts (see write_data).
        """
        if not node.data_count:
            node.mapping, node.i_block = NO_EXTENTS, b""    # an empty file: no extents flag, zero i_block
            return
        if runs == [(0, node.data_start)] and node.data_count <= F.EXTENTS_IN_INODE * F.MAX_EXTENT_LEN:
            node.mapping, node.i_block = CONTIGUOUS, b""
            return
        extents = _runs_to_extents(runs, node.data_start + node.data_count)
        node.mapping = EXPLICIT
        if len(extents) <= F.EXTENTS_IN_INODE:
            node.i_block = _extent_root(extents)
            return
        level: list[tuple[int, int]] = []           # (first logical block, tree block) of each node
        per = F.EXTENTS_PER_BLOCK
        node.tree_start = self.next_block
        for i in range(0, len(extents), per):
            chunk = extents[i:i + per]
            raw = F.pack_extent_header(len(chunk), per, 0) + b"".join(F.pack_extent_leaf(*e) for e in chunk)
            level.append((chunk[0][0], self._write_block(raw)))
        depth = 1
        while len(level) > F.EXTENTS_IN_INODE:
            upper = []
            for i in range(0, len(level), per):
                chunk = level[i:i + per]
                raw = F.pack_extent_header(len(chunk), per, depth) + b"".join(
                    F.pack_extent_index(*c) for c in chunk)
                upper.append((chunk[0][0], self._write_block(raw)))
            level = upper
            depth += 1
        node.tree_count = self.next_block - node.tree_start
        node.i_block = F.pack_extent_header(len(level), F.EXTENTS_IN_INODE, depth) + b"".join(
            F.pack_extent_index(*c) for c in level)

    def set_symlink(self, node: Node, target: bytes) -> None:
        node.size = len(target)
        if len(target) <= F.FAST_SYMLINK_MAX:
            node.i_block = target                   # a "fast" symlink: the target lives in i_block
        else:
            self.write_data(node, [(0, target)], len(target))

    def set_device(self, node: Node, major: int, minor: int) -> None:
        node.device = (major, minor)

    # --- close --------------------------------------------------------------------------------------

    def close(self) -> Ext4Stats:
        """Write directories, inode table, bitmaps, descriptors and superblock. Returns the geometry."""
        self._write_dir(self.root, self.root)
        self._flush()
        table_start = self.next_block
        inode_count = len(self.nodes)
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
            ibm = bytearray(F.BLOCK_SIZE)
            used_dirs = 0
            for j in range(ipg):
                ino = g * ipg + j + 1
                node = self.nodes[ino - 1] if ino <= inode_count else None
                if ino < F.FIRST_INO or node is not None:
                    ibm[j >> 3] |= 1 << (j & 7)
                    if node is not None and node.is_dir:
                        used_dirs += 1
            free_inodes = ipg - _popcount(ibm)
            if not self.compat_aci:
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
        if any(n is not None and n.is_dir and n.links > F.LINK_MAX for n in self.nodes):
            ro_compat |= F.RoCompat.DIR_NLINK
        sb = F.pack_superblock(F.SuperblockFields(
            inodes_count=groups * ipg, blocks_count=disk_blocks, free_blocks=total_free_blocks,
            free_inodes=total_free_inodes, inodes_per_group=ipg, ro_compat=ro_compat, uuid=self.uuid,
            volume_name=self.volume_name,
            lpf_ino=self.lost_and_found.ino if self.lost_and_found else 0,
            max_mnt_count=0 if self.compat_aci else -1))
        self._pwrite(bytes(1024) + sb + bytes(F.BLOCK_SIZE - 2048), 0)
        return Ext4Stats(blocks=disk_blocks, inodes=inode_count, groups=groups, inodes_per_group=ipg)

    def _write_dir(self, node: Node, parent: Node) -> None:
        assert node.children is not None
        children = sorted(node.children.items(), key=lambda kv: (kv[1].ino, kv[0]))
        start = self.next_block
        block = bytearray()
        out: list[bytes] = []

        def finish_block() -> None:
            # compactext4's rule: each block ends with an empty entry spanning what is left.
            left = F.BLOCK_SIZE - len(block)
            block.extend(F.pack_dirent(0, left, b"", 0))
            out.append(bytes(block))
            block.clear()

        for ino, name, ftype in [(node.ino, b".", F.FileType.directory), (parent.ino, b"..", F.FileType.directory),
                                 *((c.ino, n, c.ftype) for n, c in children)]:
            rec = F.dirent_size(len(name))
            if F.BLOCK_SIZE - len(block) < rec + 12:
                finish_block()
            block.extend(F.pack_dirent(ino, rec, name, ftype))
        finish_block()
        for raw in out:
            self._append(raw)
        self._alloc_written(len(out))
        node.size = len(out) * F.BLOCK_SIZE
        node.data_start, node.data_count = start, len(out)
        self._finish_extents(node, [(0, start)])
        for _, child in children:
            if child.is_dir:
                self._write_dir(child, node)

    def _write_inode_table(self, slots: int) -> None:
        for ino in range(1, slots + 1):
            node = self.nodes[ino - 1] if ino <= len(self.nodes) else None
            self._append(_ZERO_BLOCK[:F.INODE_SIZE] if node is None else self._inode_record(node).pack())
        self._alloc_written(slots * F.INODE_SIZE // F.BLOCK_SIZE)

    def _inode_record(self, node: Node) -> F.InodeRecord:
        flags = F.InodeFlag.HUGE_FILE
        i_block = node.i_block
        if node.mapping == CONTIGUOUS:
            i_block = _extent_root(_runs_to_extents([(0, node.data_start)], node.data_start + node.data_count))
        if node.mapping != NO_EXTENTS:
            flags |= F.InodeFlag.EXTENTS
        if node.ftype in (F.FileType.char, F.FileType.block):
            i_block = bytes(4) + F.encode_device(*node.device).to_bytes(4, "little")
        blocks = node.data_count + node.tree_count + (1 if node.xattr_block else 0)
        inline, _ = split_xattrs(node.xattrs)
        links = node.links
        if node.is_dir and links > F.LINK_MAX:
            links = 1                               # dir_nlink: "more than the counter can hold"
        return F.InodeRecord(
            mode=node.mode, uid=node.uid, gid=node.gid, size=node.size, links=links, blocks=blocks, flags=flags,
            i_block=i_block, xattr_block=node.xattr_block, atime=node.atime, ctime=node.ctime, mtime=node.mtime,
            crtime=node.crtime, inline_xattrs=F.pack_inode_xattrs(inline, empty_value_offs=self.compat_aci) if inline else b"")


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
