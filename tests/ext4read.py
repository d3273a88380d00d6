"""A minimal read-only ext4 parser for tests, written from the kernel's ext4 documentation.

Independent of sandbox.layers.ext4_format on purpose (it re-derives every offset), so that a layout mistake
in the writer is not silently mirrored here. Handles what our images use: 4 KiB blocks, 32-byte group
descriptors, extent trees of any depth, linear directories, in-inode and block xattrs.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

S_IFMT = 0o170000
TYPE_NAMES = {0o100000: "file", 0o040000: "directory", 0o120000: "symlink", 0o020000: "char",
              0o060000: "block", 0o010000: "fifo", 0o140000: "socket"}
XATTR_PREFIX = {1: b"user.", 2: b"system.posix_acl_access", 3: b"system.posix_acl_default", 4: b"trusted.",
                6: b"security.", 7: b"system."}


@dataclass
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    links: int
    flags: int
    mtime: tuple[int, int]
    atime: tuple[int, int]
    ctime: tuple[int, int]
    crtime: tuple[int, int]
    i_block: bytes
    xattr_block: int
    blocks: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return TYPE_NAMES[self.mode & S_IFMT]

    @property
    def perm(self) -> int:
        return self.mode & 0o7777


def _time(lo: int, extra: int) -> tuple[int, int]:
    seconds = struct.unpack("<i", struct.pack("<I", lo))[0] + ((extra & 3) << 32)
    return seconds, extra >> 2


class Ext4Image:
    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        sb = self.data[1024:2048]
        self.magic = struct.unpack_from("<H", sb, 0x38)[0]
        assert self.magic == 0xEF53, "not ext4"
        self.inodes_count, self.blocks_count = struct.unpack_from("<II", sb, 0)
        self.block_size = 1024 << struct.unpack_from("<I", sb, 0x18)[0]
        self.inodes_per_group = struct.unpack_from("<I", sb, 0x28)[0]
        self.inode_size = struct.unpack_from("<H", sb, 0x58)[0]
        self.feature_compat, self.feature_incompat, self.feature_ro_compat = struct.unpack_from("<III", sb, 0x5C)
        self.uuid = sb[0x68:0x78]
        assert self.block_size == 4096
        assert not self.feature_incompat & 0x80, "64bit descriptors not handled"

    def block(self, n: int, count: int = 1) -> bytes:
        return self.data[n * self.block_size:(n + count) * self.block_size]

    def group_desc(self, g: int) -> tuple[int, int, int]:
        off = self.block_size + g * 32
        return struct.unpack_from("<III", self.data, off)

    def inode(self, ino: int) -> Inode:
        g, idx = divmod(ino - 1, self.inodes_per_group)
        table = self.group_desc(g)[2]
        off = table * self.block_size + idx * self.inode_size
        raw = self.data[off:off + self.inode_size]
        mode, uid_lo, size_lo, atime, ctime, mtime, _dtime, gid_lo, links, blocks_lo, flags = \
            struct.unpack_from("<HHIIIIIHHII", raw, 0)
        i_block = raw[40:100]
        file_acl_lo, size_hi = struct.unpack_from("<II", raw, 104)
        blocks_hi, file_acl_hi, uid_hi, gid_hi = struct.unpack_from("<HHHH", raw, 116)
        extra_isize = struct.unpack_from("<H", raw, 128)[0]
        ctime_x, mtime_x, atime_x, crtime, crtime_x = struct.unpack_from("<IIIII", raw, 132)
        node = Inode(ino=ino, mode=mode, uid=uid_lo | uid_hi << 16, gid=gid_lo | gid_hi << 16,
                     size=size_lo | size_hi << 32, links=links, flags=flags, mtime=_time(mtime, mtime_x),
                     atime=_time(atime, atime_x), ctime=_time(ctime, ctime_x), crtime=_time(crtime, crtime_x),
                     i_block=i_block, xattr_block=file_acl_lo | file_acl_hi << 32,
                     blocks=blocks_lo | blocks_hi << 32)
        start = 128 + extra_isize
        if struct.unpack_from("<I", raw, start)[0] == 0xEA020000:
            self._xattr_entries(raw, start + 4, start + 4, node.xattrs)
        if node.xattr_block:
            blk = self.block(node.xattr_block)
            assert struct.unpack_from("<I", blk, 0)[0] == 0xEA020000
            self._xattr_entries(blk, 32, 0, node.xattrs)
        return node

    @staticmethod
    def _xattr_entries(raw: bytes, pos: int, value_base: int, out: dict[bytes, bytes]) -> None:
        while struct.unpack_from("<I", raw, pos)[0] != 0:
            name_len, index, offs, inum, size, _hash = struct.unpack_from("<BBHIII", raw, pos)
            assert inum == 0
            name = XATTR_PREFIX[index] + raw[pos + 16:pos + 16 + name_len]
            out[name] = raw[value_base + offs:value_base + offs + size] if size else b""
            pos += 16 + ((name_len + 3) & ~3)

    def extents(self, node: Inode) -> list[tuple[int, int, int]]:
        """(logical, length, physical) of a file/dir/long symlink, walking the extent tree."""
        assert node.flags & 0x80000, "no extents flag"
        out: list[tuple[int, int, int]] = []
        self._walk(node.i_block, out)
        return out

    def _walk(self, raw: bytes, out: list[tuple[int, int, int]]) -> None:
        magic, entries, _max, depth = struct.unpack_from("<HHHH", raw, 0)
        assert magic == 0xF30A
        for i in range(entries):
            off = 12 + 12 * i
            if depth == 0:
                logical, length, hi, lo = struct.unpack_from("<IHHI", raw, off)
                out.append((logical, length, hi << 32 | lo))
            else:
                _logical, lo, hi, _ = struct.unpack_from("<IIHH", raw, off)
                self._walk(self.block(hi << 32 | lo), out)

    def read_content(self, node: Inode) -> bytes:
        if node.size == 0 and not node.flags & 0x80000:
            return b""
        buf = bytearray(node.size)
        for logical, length, physical in self.extents(node):
            start = logical * self.block_size
            chunk = self.block(physical, length)[:max(0, node.size - start)]
            buf[start:start + len(chunk)] = chunk
        return bytes(buf)

    def symlink_target(self, node: Inode) -> bytes:
        if node.size < 60 and not node.flags & 0x80000:
            return node.i_block[:node.size]
        return self.read_content(node)

    def device(self, node: Inode) -> tuple[int, int]:
        old, new = struct.unpack_from("<II", node.i_block, 0)
        if old:
            return (old >> 8) & 0xFF, old & 0xFF
        return (new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00)

    def listdir(self, node: Inode) -> list[tuple[bytes, int, int]]:
        """(name, inode, file_type) in on-disk order, '.' and '..' included."""
        raw = self.read_content(node)
        out = []
        pos = 0
        while pos < len(raw):
            ino, rec_len, name_len, ftype = struct.unpack_from("<IHBB", raw, pos)
            assert rec_len >= 8 and (pos % self.block_size) + rec_len <= self.block_size
            if ino:
                out.append((raw[pos + 8:pos + 8 + name_len], ino, ftype))
            pos += rec_len
        return out


@dataclass(frozen=True)
class Item:
    """What tests compare: one path's metadata and content digest."""

    type: str
    perm: int
    uid: int
    gid: int
    mtime: int
    size: int
    digest: str | None = None          # sha256 of file content
    target: bytes | None = None        # symlink target
    device: tuple[int, int] | None = None
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    ino: int = 0


def walk(img: Ext4Image, root: int = 2) -> dict[bytes, Item]:
    """Every path below the root (b"a/b"), with its metadata."""
    out: dict[bytes, Item] = {}

    def visit(ino: int, prefix: bytes) -> None:
        node = img.inode(ino)
        for name, child_ino, _ftype in img.listdir(node):
            if name in (b".", b".."):
                continue
            path = prefix + name
            child = img.inode(child_ino)
            digest = hashlib.sha256(img.read_content(child)).hexdigest() if child.type == "file" else None
            target = img.symlink_target(child) if child.type == "symlink" else None
            device = img.device(child) if child.type in ("char", "block") else None
            out[path] = Item(type=child.type, perm=child.perm, uid=child.uid, gid=child.gid, mtime=child.mtime[0],
                             size=child.size if child.type != "directory" else 0, digest=digest, target=target,
                             device=device, xattrs=tuple(sorted(child.xattrs.items())), ino=child_ino)
            if child.type == "directory":
                visit(child_ino, path + b"/")

    visit(root, b"")
    return out
