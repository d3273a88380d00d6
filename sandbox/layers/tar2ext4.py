"""Apply the entries of a layer tarball to an ext4 image: OCI layer semantics on top of Ext4Writer.

Rules (documented for users in docs/layers.md):
- Paths: a leading "./" and empty or "." components are dropped. Absolute paths, ".." components, names over
  255 bytes and paths that pass through a symlink (or a non-directory) of the same layer are errors.
- Missing parent directories are created with their parent's mode, owner and times.
- Duplicates: the last entry for a path wins, as with tar extraction. A directory over a directory replaces
  its attributes and xattrs and keeps its contents; anything else replaces the earlier entry (a directory
  with everything below it). A hard link refers to the entry its target names at that point.
- Whiteouts (OCI image-spec layer.md): ".wh.NAME" becomes an overlay whiteout, a 0/0 character device NAME
  with mode 0000, owner 0 and zero times; ".wh..wh..opq" sets trusted.overlay.opaque="y" on its directory,
  wherever it appears. Directories that hold whiteouts get an empty trusted.overlay.origin so overlayfs
  hides the whiteouts even where the directory is not merged with a lower one. A whiteout never hides an
  entry of its own layer: a whiteout and a real entry for the same name leave the real entry, made opaque if
  it is a directory (the lower one is gone). Other ".wh..wh.*" names (aufs metadata) are skipped.
- Xattrs: user., trusted., security. and POSIX ACLs (converted to ext4's on-disk ACL format) are kept;
  other namespaces cannot be stored by ext4 and are skipped with a warning.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from sandbox.layers import ext4_format as F
from sandbox.layers.ext4_writer import (
    DEFAULT_MAX_DISK_SIZE,
    Ext4LimitError,
    Ext4Stats,
    Ext4Writer,
    Node,
    split_xattrs,
)
from sandbox.layers.tarstream import EntryType, TarEntry, TarReader, TarTime
from sandbox.log import log
from sandbox.shared.errors import InputError

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
AUFS_META = b".wh..wh."
OPAQUE_XATTR = b"trusted.overlay.opaque"
ORIGIN_XATTR = b"trusted.overlay.origin"
MAX_ID = (1 << 32) - 1

_FTYPE = {
    EntryType.file: F.FileType.regular, EntryType.symlink: F.FileType.symlink, EntryType.char: F.FileType.char,
    EntryType.block: F.FileType.block, EntryType.directory: F.FileType.directory, EntryType.fifo: F.FileType.fifo,
}


class LayerEntryError(InputError):
    """A layer entry that cannot be converted (bad path, dangling hard link, impossible attribute...)."""


@dataclass(frozen=True)
class Ext4Options:
    whiteouts: bool = True          # convert OCI whiteouts to overlay ones
    origin_xattr: bool = True       # mark directories holding whiteouts with an empty trusted.overlay.origin
    lost_and_found: bool = False
    max_disk_size: int = DEFAULT_MAX_DISK_SIZE
    uuid: bytes = bytes(16)
    compat_aci: bool = False        # byte-identical to hcsshim tar2ext4 (sandbox/aci/ext4compat.py sets the rest)


DEFAULT_OPTIONS = Ext4Options()


@dataclass(frozen=True)
class TarStats:
    entries: int                    # tar entries read (extended headers not counted)
    tar_bytes: int                  # length of the tar stream, trailing bytes included
    ext4: Ext4Stats


def _encode(t: TarTime | None) -> tuple[int, int]:
    return (0, 0) if t is None else F.encode_time(t.seconds, t.nanoseconds)


# posix_acl_xattr (include/uapi/linux/posix_acl_xattr.h): u32 version 2, then {u16 tag, u16 perm, u32 id}.
# ext4 on disk (fs/ext4/acl.h): u32 version 1, then short {u16 tag, u16 perm} entries for USER_OBJ (1),
# GROUP_OBJ (4), MASK (0x10), OTHER (0x20) and full {u16 tag, u16 perm, u32 id} for USER (2), GROUP (8).
_ACL_SHORT = {0x01, 0x04, 0x10, 0x20}
_ACL_FULL = {0x02, 0x08}


def acl_to_ext4(value: bytes) -> bytes:
    if len(value) < 4 or (len(value) - 4) % 8 or struct.unpack_from("<I", value)[0] != 2:
        raise ValueError("not a version-2 POSIX ACL xattr")
    out = [struct.pack("<I", 1)]
    for tag, perm, ident in struct.iter_unpack("<HHI", value[4:]):
        if tag in _ACL_SHORT:
            out.append(struct.pack("<HH", tag, perm))
        elif tag in _ACL_FULL:
            out.append(struct.pack("<HHI", tag, perm, ident))
        else:
            raise ValueError(f"unknown ACL tag {tag:#x}")
    return b"".join(out)


_STORABLE = (b"user.", b"trusted.", b"security.")
_ACLS = (b"system.posix_acl_access", b"system.posix_acl_default")


class LayerBuilder:
    """Feeds tar entries into an Ext4Writer following the rules in the module docstring."""

    def __init__(self, writer: Ext4Writer, options: Ext4Options) -> None:
        self.w = writer
        self.opt = options
        self.whiteout_nodes: set[int] = set()      # inode numbers of whiteouts we created
        self.opaque: set[int] = set()              # directories to mark opaque
        self.tar_xattrs: dict[int, dict[bytes, bytes]] = {}   # directory xattrs as the tar gave them
        self.shared: dict[object, object] = {}                # interned attribute values

    # --- paths ---------------------------------------------------------------------------------------

    @staticmethod
    def split(path: bytes, entry: TarEntry, what: str = "path") -> list[bytes]:
        if path.startswith(b"/"):
            raise LayerEntryError(f"{entry.describe()}: absolute {what} {_show(path)}",
                                  hint="layer paths must be relative to the layer root (path traversal)")
        parts = [p for p in path.split(b"/") if p not in (b"", b".")]
        for p in parts:
            if p == b"..":
                raise LayerEntryError(f"{entry.describe()}: {what} {_show(path)} contains '..'",
                                      hint="a layer may not refer outside its root (path traversal)")
            if len(p) > F.MAX_NAME:
                raise LayerEntryError(f"{entry.describe()}: name component of {len(p)} bytes in {_show(path)}",
                                      hint="ext4 allows at most 255 bytes per name")
        return parts

    def walk(self, parts: list[bytes], entry: TarEntry, *, create: bool) -> Node:
        """The directory named by `parts`, creating missing ones (with their parent's attributes) if asked."""
        node = self.w.root
        for i, name in enumerate(parts):
            assert node.children is not None
            child = node.children.get(name)
            if child is not None and child.ino in self.whiteout_nodes and create:
                self.w.unlink(node, name)           # a real directory of this layer replaces a whiteout
                child = self._implicit_dir(node, name)
                self.opaque.add(child.ino)
            elif child is None:
                if not create:
                    raise LayerEntryError(f"{entry.describe()}: {_show(b'/'.join(parts[:i + 1]))} does not exist")
                child = self._implicit_dir(node, name)
            elif child.ftype == F.FileType.symlink:
                raise LayerEntryError(f"{entry.describe()}: path goes through the symlink "
                                      f"{_show(b'/'.join(parts[:i + 1]))}",
                                      hint="a layer may not write through a symlink (path traversal)")
            elif not child.is_dir:
                raise LayerEntryError(f"{entry.describe()}: {_show(b'/'.join(parts[:i + 1]))} is not a directory")
            node = child
        return node

    def _implicit_dir(self, parent: Node, name: bytes) -> Node:
        d = self.w.new_node(F.FileType.directory, parent.perm, parent.uid, parent.gid)
        d.atime, d.ctime, d.mtime, d.crtime = parent.atime, parent.ctime, parent.mtime, parent.crtime
        self.w.link(parent, name, d)
        return d

    # --- entries -------------------------------------------------------------------------------------

    def add(self, entry: TarEntry, reader: TarReader) -> None:
        parts = self.split(entry.name, entry)
        if not parts:
            if entry.type != EntryType.directory:
                raise LayerEntryError(f"{entry.describe()}: the layer root must be a directory")
            self._set_attrs(self.w.root, entry)
            self._set_dir_xattrs(self.w.root, entry)
            return
        base = parts[-1]
        if self.opt.whiteouts and base.startswith(WHITEOUT):
            self._whiteout(parts, entry)
            return
        parent = self.walk(parts[:-1], entry, create=True)
        assert parent.children is not None
        existing = parent.children.get(base)
        if entry.type == EntryType.hardlink:
            self._hardlink(parent, base, existing, entry)
            return
        ftype = _FTYPE[entry.type]
        was_whiteout = existing is not None and existing.ino in self.whiteout_nodes
        if existing is not None and existing.is_dir and ftype == F.FileType.directory:
            node = existing
        elif existing is not None and not existing.is_dir and existing.links == 1 and not was_whiteout \
                and ftype != F.FileType.directory:
            node = existing                         # the same inode number, fresh content
            self.w.release_blocks(node, xattr_block=False)
            node.ftype = ftype
        else:
            if existing is not None:
                self.w.unlink(parent, base)
                self.whiteout_nodes.discard(existing.ino)
            node = self.w.new_node(ftype)
            self.w.link(parent, base, node)
        if was_whiteout and node.is_dir:
            self.opaque.add(node.ino)
        self._set_attrs(node, entry)
        if node.is_dir:
            self._set_dir_xattrs(node, entry)
        else:
            self.w.set_xattrs(node, self._xattrs(entry))
        if entry.type == EntryType.file:
            self.w.write_data(node, reader.data(entry), entry.size)
        elif entry.type == EntryType.symlink:
            if len(entry.linkname) >= F.BLOCK_SIZE:
                raise LayerEntryError(f"{entry.describe()}: symlink target of {len(entry.linkname)} bytes",
                                      hint="ext4 symlink targets must be shorter than 4096 bytes")
            if not entry.linkname:
                raise LayerEntryError(f"{entry.describe()}: symlink with an empty target")
            self.w.set_symlink(node, entry.linkname)
        elif entry.type in (EntryType.char, EntryType.block):
            if entry.devmajor >= 1 << 12 or entry.devminor >= 1 << 20 or entry.devmajor < 0 or entry.devminor < 0:
                raise LayerEntryError(f"{entry.describe()}: device number {entry.devmajor}:{entry.devminor} "
                                      "does not fit a 32-bit dev_t")
            self.w.set_device(node, entry.devmajor, entry.devminor)

    def _set_attrs(self, node: Node, entry: TarEntry) -> None:
        for what, value in (("uid", entry.uid), ("gid", entry.gid)):
            if not 0 <= value <= MAX_ID:
                raise LayerEntryError(f"{entry.describe()}: {what} {value} is out of range")
        # Interned: layers repeat the same modes, owners and times; one object each saves memory per inode.
        shared = self.shared
        perm = entry.mode | (0o777 if node.ftype == F.FileType.symlink else 0)
        node.perm = shared.setdefault(perm, perm)
        node.uid, node.gid = shared.setdefault(entry.uid, entry.uid), shared.setdefault(entry.gid, entry.gid)
        mtime = _encode(entry.mtime)
        node.mtime = node.crtime = shared.setdefault(mtime, mtime)
        atime, ctime = _encode(entry.atime), _encode(entry.ctime)
        node.atime, node.ctime = shared.setdefault(atime, atime), shared.setdefault(ctime, ctime)

    def _set_dir_xattrs(self, node: Node, entry: TarEntry) -> None:
        self.tar_xattrs[node.ino] = self._xattrs(entry)
        self.w.set_xattrs(node, self.tar_xattrs[node.ino])

    def _xattrs(self, entry: TarEntry) -> dict[bytes, bytes]:
        out = {}
        for name, value in entry.xattrs.items():
            if name in _ACLS:
                try:
                    out[name] = acl_to_ext4(value)
                except ValueError as e:
                    raise LayerEntryError(f"{entry.describe()}: bad {name.decode()} xattr: {e}") from e
            elif name.startswith(_STORABLE) and len(name) > len(name.split(b".", 1)[0]) + 1:
                out[name] = value
            else:
                log.warning("%s: skipping xattr %r: ext4 cannot store this namespace", entry.describe(),
                            name.decode(errors="replace"))
        try:                                        # fail now, naming the entry
            split_xattrs(out)
        except Ext4LimitError as e:
            raise LayerEntryError(f"{entry.describe()}: {e.message}") from e
        return out

    def _hardlink(self, parent: Node, base: bytes, existing: Node | None, entry: TarEntry) -> None:
        target_parts = self.split(entry.linkname, entry, "hard link target")
        if not target_parts:
            raise LayerEntryError(f"{entry.describe()}: hard link to the layer root")
        tdir = self.walk(target_parts[:-1], entry, create=False) if target_parts[:-1] else self.w.root
        assert tdir.children is not None
        target = tdir.children.get(target_parts[-1])
        if target is None:
            raise LayerEntryError(f"{entry.describe()}: hard link to {_show(entry.linkname)}, which is not in the "
                                  "layer (at this point)", hint="hard links must refer to an earlier entry")
        if target.is_dir:
            raise LayerEntryError(f"{entry.describe()}: hard link to the directory {_show(entry.linkname)}")
        if existing is target:
            return
        if existing is not None:
            self.w.unlink(parent, base)
        self.w.link(parent, base, target)

    def _whiteout(self, parts: list[bytes], entry: TarEntry) -> None:
        base = parts[-1]
        parent = self.walk(parts[:-1], entry, create=True)
        assert parent.children is not None
        if base == OPAQUE:
            self.opaque.add(parent.ino)
            return
        if base.startswith(AUFS_META):
            log.debug("%s: skipping aufs metadata", entry.describe())
            return
        name = base[len(WHITEOUT):]
        if name in (b"", b".", b".."):
            raise LayerEntryError(f"{entry.describe()}: whiteout of an invalid name")
        existing = parent.children.get(name)
        if existing is not None:
            if existing.is_dir:
                self.opaque.add(existing.ino)       # the lower directory is gone; this layer's one stays
            return                                  # never hide an entry of the same layer
        node = self.w.new_node(F.FileType.char)
        self.w.link(parent, name, node)
        self.whiteout_nodes.add(node.ino)
        parent.has_whiteouts = True

    def finish(self) -> None:
        """Apply the overlay xattrs that depend on the whole layer (opaque and origin markers)."""
        for node in self.w.nodes:
            if node is None or not node.is_dir:
                continue
            extra = {}
            if node.ino in self.opaque:
                extra[OPAQUE_XATTR] = b"y"
            if self.opt.origin_xattr and node.has_whiteouts and any(
                    c.ino in self.whiteout_nodes for c in node.children.values()):
                extra[ORIGIN_XATTR] = b""
            if extra:
                xattrs = {**self.tar_xattrs.get(node.ino, {}), **extra}
                try:
                    self.w.set_xattrs(node, xattrs)
                except Ext4LimitError as e:
                    raise LayerEntryError(f"directory inode {node.ino}: {e.message}") from e


def _show(path: bytes) -> str:
    return repr(path.decode(errors="replace"))


def convert_tar_stream(stream: BinaryIO, fd: int, options: Ext4Options = DEFAULT_OPTIONS,
                       on_entry: Callable[[TarEntry], None] | None = None) -> TarStats:
    """Read a tar stream and write an ext4 image to `fd`; the stream is read to its end."""
    writer = Ext4Writer(fd, max_disk_size=options.max_disk_size, lost_and_found=options.lost_and_found,
                        uuid=options.uuid, compat_aci=options.compat_aci)
    if options.compat_aci:
        from sandbox.aci.ext4compat import AciLayerBuilder  # tar2ext4's rules (docs/aci.md)
        builder: LayerBuilder = AciLayerBuilder(writer, options)
    else:
        builder = LayerBuilder(writer, options)
    reader = TarReader(stream)
    count = 0
    for entry in reader:
        count += 1
        try:
            builder.add(entry, reader)
        except Ext4LimitError as e:                 # the writer does not know entry names
            raise LayerEntryError(f"{entry.describe()}: {e.message}", hint=e.hint) from e
        if on_entry is not None:
            on_entry(entry)
    reader.drain()
    builder.finish()
    stats = writer.close()
    return TarStats(entries=count, tar_bytes=reader.input.pos, ext4=stats)
