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

import functools
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sandbox.layers import ext4_format as F
from sandbox.layers.dirindex import DirIndex
from sandbox.layers.ext4_writer import (
    DEFAULT_DIALECT,
    DEFAULT_MAX_DISK_SIZE,
    Ext4Dialect,
    Ext4LimitError,
    Ext4Stats,
    Ext4Writer,
    WriteWatcher,
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
DIRECTORY = F.FileType.directory
SYMLINK = F.FileType.symlink

_FTYPE = {
    EntryType.file: F.FileType.regular, EntryType.symlink: F.FileType.symlink, EntryType.char: F.FileType.char,
    EntryType.block: F.FileType.block, EntryType.directory: F.FileType.directory, EntryType.fifo: F.FileType.fifo,
}


class LayerEntryError(InputError):
    """A layer entry that cannot be converted (bad path, dangling hard link, impossible attribute...)."""


@dataclass(frozen=True)
class TarStats:
    entries: int                    # tar entries read (extended headers not counted)
    tar_bytes: int                  # length of the tar stream, trailing bytes included
    ext4: Ext4Stats


def encode_time(t: TarTime | None) -> tuple[int, int]:
    """(i_*time, i_*time_extra) of a tar time; a time the tar does not give is 0."""
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


def show_path(path: bytes) -> str:
    """A layer path as error messages show it."""
    return repr(path.decode(errors="replace"))


class LayerBuilder:
    """Feeds tar entries into an Ext4Writer following the rules in the module docstring.

    Subclasses change the rules (sandbox/aci/ext4compat.py: tar2ext4's); Ext4Options.builder picks one.
    """

    def __init__(self, writer: Ext4Writer, options: Ext4Options) -> None:
        self.w = writer
        self.opt = options
        self.whiteout_inodes: set[int] = set()     # inode numbers of whiteouts we created
        self.opaque: set[int] = set()              # directories to mark opaque
        self.has_whiteouts: set[int] = set()       # directories where we created whiteouts
        self.tar_xattrs: dict[int, dict[bytes, bytes]] = {}   # directory xattrs as the tar gave them
        self._dirs: dict[tuple[bytes, ...], int] = {}         # directory path -> inode, as walked before
        self._encode_time = functools.lru_cache(maxsize=1024)(self.encode_time)

    # --- paths ---------------------------------------------------------------------------------------

    @staticmethod
    def split(path: bytes, entry: TarEntry, what: str = "path") -> list[bytes]:
        if path.startswith(b"/"):
            raise LayerEntryError(f"{entry.describe()}: absolute {what} {show_path(path)}",
                                  hint="layer paths must be relative to the layer root (path traversal)")
        parts = path.split(b"/")
        if b"" in parts or b"." in parts:
            parts = [p for p in parts if p and p != b"."]
        if b".." in parts:
            raise LayerEntryError(f"{entry.describe()}: {what} {show_path(path)} contains '..'",
                                  hint="a layer may not refer outside its root (path traversal)")
        if len(path) > F.MAX_NAME:
            for p in parts:
                if len(p) > F.MAX_NAME:
                    raise LayerEntryError(f"{entry.describe()}: name component of {len(p)} bytes in "
                                          f"{show_path(path)}", hint="ext4 allows at most 255 bytes per name")
        return parts

    def walk(self, parts: list[bytes], entry: TarEntry, *, create: bool) -> int:
        """The directory named by `parts`, creating missing ones (with their parent's attributes) if asked."""
        key = tuple(parts)
        ino = self._dirs.get(key)
        if ino is not None:
            return ino
        w = self.w
        ino = w.root
        for i, name in enumerate(parts):
            child = w.dirs.get(ino, name)
            if child and child in self.whiteout_inodes and create:
                self.unlink(ino, name)              # a real directory of this layer replaces a whiteout
                child = self._implicit_dir(ino, name)
                self.opaque.add(child)
            elif not child:
                if not create:
                    raise LayerEntryError(f"{entry.describe()}: {show_path(b'/'.join(parts[:i + 1]))} does not exist")
                child = self._implicit_dir(ino, name)
            elif w.ftype[child] == SYMLINK:
                raise LayerEntryError(f"{entry.describe()}: path goes through the symlink "
                                      f"{show_path(b'/'.join(parts[:i + 1]))}",
                                      hint="a layer may not write through a symlink (path traversal)")
            elif w.ftype[child] != DIRECTORY:
                raise LayerEntryError(f"{entry.describe()}: {show_path(b'/'.join(parts[:i + 1]))} is not a directory")
            ino = child
        self._dirs[key] = ino
        return ino

    def unlink(self, parent: int, name: bytes) -> int:
        """Remove a name (and, for a directory, everything below it)."""
        if self.w.is_dir(self.w.dirs.get(parent, name)):
            self._dirs.clear()                      # walked paths may go through it
        return self.w.unlink(parent, name)

    def _implicit_dir(self, parent: int, name: bytes) -> int:
        w = self.w
        d = w.new_inode(DIRECTORY, w.perm[parent], w.uid[parent], w.gid[parent])
        w.set_times(d, *w.get_times(parent))
        w.link(parent, name, d)
        return d

    # --- entries -------------------------------------------------------------------------------------

    def add(self, entry: TarEntry, reader: TarReader) -> None:
        self.add_parts(entry, self.split(entry.name, entry), reader)

    def add_parts(self, entry: TarEntry, parts: list[bytes], reader: TarReader) -> None:
        """add() for an entry whose path split() has already checked and split."""
        w = self.w
        if not parts:
            if entry.type != EntryType.directory:
                raise LayerEntryError(f"{entry.describe()}: the layer root must be a directory")
            self._set_attrs(w.root, entry)
            self._set_dir_xattrs(w.root, entry)
            return
        base = parts[-1]
        if self.opt.whiteouts and base.startswith(WHITEOUT):
            self._whiteout(parts, entry)
            return
        parent = self.walk(parts[:-1], entry, create=True)
        existing = w.dirs.get(parent, base)
        if entry.type == EntryType.hardlink:
            self._hardlink(parent, base, existing, entry)
            return
        ftype = _FTYPE[entry.type]
        was_whiteout = existing in self.whiteout_inodes
        if existing and w.is_dir(existing) and ftype == DIRECTORY:
            ino = existing
        elif existing and not w.is_dir(existing) and w.links[existing] == 1 and not was_whiteout \
                and ftype != DIRECTORY:
            ino = existing                          # the same inode number, fresh content
            w.release_blocks(ino, xattr_block=False)
            w.ftype[ino] = ftype
        else:
            if existing:
                self.unlink(parent, base)
                self.whiteout_inodes.discard(existing)
            ino = w.new_inode(ftype)
            w.link(parent, base, ino)
        if was_whiteout and ftype == DIRECTORY:
            self.opaque.add(ino)
        self._set_attrs(ino, entry)
        if ftype == DIRECTORY:
            self._set_dir_xattrs(ino, entry)
        elif entry.xattrs or ino in w.xattrs or ino in w.xattr_block:
            w.set_xattrs(ino, self._xattrs(entry))
        if entry.type == EntryType.file:
            if entry.sparse is None:
                w.write_file(ino, reader.contents(entry), entry.size)
            else:
                w.write_data(ino, reader.data(entry), entry.size)
        elif entry.type == EntryType.symlink:
            if len(entry.linkname) >= F.BLOCK_SIZE:
                raise LayerEntryError(f"{entry.describe()}: symlink target of {len(entry.linkname)} bytes",
                                      hint="ext4 symlink targets must be shorter than 4096 bytes")
            if not entry.linkname:
                raise LayerEntryError(f"{entry.describe()}: symlink with an empty target")
            w.set_symlink(ino, entry.linkname)
        elif entry.type in (EntryType.char, EntryType.block):
            if entry.devmajor >= 1 << 12 or entry.devminor >= 1 << 20 or entry.devmajor < 0 or entry.devminor < 0:
                raise LayerEntryError(f"{entry.describe()}: device number {entry.devmajor}:{entry.devminor} "
                                      "does not fit a 32-bit dev_t")
            w.set_device(ino, entry.devmajor, entry.devminor)

    def _set_attrs(self, ino: int, entry: TarEntry) -> None:
        if not 0 <= entry.uid <= MAX_ID:
            raise LayerEntryError(f"{entry.describe()}: uid {entry.uid} is out of range")
        if not 0 <= entry.gid <= MAX_ID:
            raise LayerEntryError(f"{entry.describe()}: gid {entry.gid} is out of range")
        w = self.w
        w.perm[ino] = entry.mode | (0o777 if w.ftype[ino] == SYMLINK else 0)
        w.uid[ino], w.gid[ino] = entry.uid, entry.gid
        encode = self._encode_time
        mtime = encode(entry.mtime)
        w.set_times(ino, encode(entry.atime), encode(entry.ctime), mtime, mtime)

    # How a tar time is stored; layers repeat the same few times, so the results are cached.
    encode_time = staticmethod(encode_time)

    def _set_dir_xattrs(self, ino: int, entry: TarEntry) -> None:
        xattrs = self._xattrs(entry) if entry.xattrs else {}
        if xattrs:
            self.tar_xattrs[ino] = xattrs
        else:
            self.tar_xattrs.pop(ino, None)
        self.w.set_xattrs(ino, xattrs)

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

    def _hardlink(self, parent: int, base: bytes, existing: int, entry: TarEntry) -> None:
        target_parts = self.split(entry.linkname, entry, "hard link target")
        if not target_parts:
            raise LayerEntryError(f"{entry.describe()}: hard link to the layer root")
        w = self.w
        tdir = self.walk(target_parts[:-1], entry, create=False) if target_parts[:-1] else w.root
        target = w.dirs.get(tdir, target_parts[-1])
        if not target:
            raise LayerEntryError(f"{entry.describe()}: hard link to {show_path(entry.linkname)}, which is not in "
                                  "the layer (at this point)", hint="hard links must refer to an earlier entry")
        if w.is_dir(target):
            raise LayerEntryError(f"{entry.describe()}: hard link to the directory {show_path(entry.linkname)}")
        if existing == target:
            return
        if existing:
            self.unlink(parent, base)
        w.link(parent, base, target)

    def _whiteout(self, parts: list[bytes], entry: TarEntry) -> None:
        base = parts[-1]
        parent = self.walk(parts[:-1], entry, create=True)
        if base == OPAQUE:
            self.opaque.add(parent)
            return
        if base.startswith(AUFS_META):
            log.debug("%s: skipping aufs metadata", entry.describe())
            return
        name = base[len(WHITEOUT):]
        if name in (b"", b".", b".."):
            raise LayerEntryError(f"{entry.describe()}: whiteout of an invalid name")
        w = self.w
        if existing := w.dirs.get(parent, name):
            if w.is_dir(existing):
                self.opaque.add(existing)           # the lower directory is gone; this layer's one stays
            return                                  # never hide an entry of the same layer
        ino = w.new_inode(F.FileType.char)
        w.link(parent, name, ino)
        self.whiteout_inodes.add(ino)
        self.has_whiteouts.add(parent)

    def finish(self) -> None:
        """Apply the overlay xattrs that depend on the whole layer (opaque and origin markers)."""
        w = self.w
        marked = set(self.opaque)
        if self.opt.origin_xattr:
            marked |= self.has_whiteouts
        for ino in sorted(marked):
            if not w.is_dir(ino):
                continue
            extra = {}
            if ino in self.opaque:
                extra[OPAQUE_XATTR] = b"y"
            if self.opt.origin_xattr and ino in self.has_whiteouts and any(
                    child in self.whiteout_inodes for _, child in w.dirs.children(ino)):
                extra[ORIGIN_XATTR] = b""
            if extra:
                xattrs = {**self.tar_xattrs.get(ino, {}), **extra}
                try:
                    w.set_xattrs(ino, xattrs)
                except Ext4LimitError as e:
                    raise LayerEntryError(f"directory inode {ino}: {e.message}") from e


@dataclass(frozen=True)
class Ext4Options:
    whiteouts: bool = True          # convert OCI whiteouts to overlay ones
    origin_xattr: bool = True       # mark directories holding whiteouts with an empty trusted.overlay.origin
    lost_and_found: bool = False
    max_disk_size: int = DEFAULT_MAX_DISK_SIZE
    uuid: bytes = bytes(16)
    dialect: Ext4Dialect = DEFAULT_DIALECT      # byte-level habits of the ext4 writer
    builder: type[LayerBuilder] = LayerBuilder  # the rules that turn entries into inodes
    spill_at: int | None = None                 # directory entries kept in memory (None: DirIndex's default)


DEFAULT_OPTIONS = Ext4Options()


def convert_tar_stream(chunks: Iterable[bytes | memoryview], fd: int, options: Ext4Options = DEFAULT_OPTIONS,
                       on_entry: Callable[[TarEntry], None] | None = None,
                       watcher: WriteWatcher | None = None) -> TarStats:
    """Read a tar stream (as chunks of bytes) and write an ext4 image to `fd`; the stream is read to its end."""
    dirs = DirIndex() if options.spill_at is None else DirIndex(options.spill_at)
    writer = Ext4Writer(fd, max_disk_size=options.max_disk_size, lost_and_found=options.lost_and_found,
                        uuid=options.uuid, dialect=options.dialect, dirs=dirs, watcher=watcher)
    try:
        builder = options.builder(writer, options)
        reader = TarReader(chunks)
        count = 0
        for entry in reader:
            count += 1
            try:
                builder.add(entry, reader)
            except Ext4LimitError as e:             # the writer does not know entry names
                raise LayerEntryError(f"{entry.describe()}: {e.message}", hint=e.hint) from e
            if on_entry is not None:
                on_entry(entry)
        reader.drain()
        builder.finish()
        stats = writer.close()
    finally:
        dirs.close()
    return TarStats(entries=count, tar_bytes=reader.input.pos, ext4=stats)
