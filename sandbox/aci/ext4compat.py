"""`--compat aci`: layer images byte-identical to hcsshim's tar2ext4, hence ACI's layer root hashes.

ACI (`az confcom`, `dmverity-vhd roothash`) hashes a layer as tar2ext4.ConvertAndComputeRootDigest
does: whiteout conversion, descriptors reserved for a 128 GiB disk, dm-verity with a 32-byte zero
salt. The layers writer (sandbox/layers) already lays ext4 out the way tar2ext4's compactext4 does;
this mode adds what differs, each learned from tar2ext4's output (docs/aci.md):

- `lost+found` (inode 11) always exists; no `trusted.overlay.origin` on directories holding whiteouts;
- inode-bitmap padding bits stay clear (e2fsck: "Padding at end of inode bitmap is not set") and
  s_max_mnt_count is 0 (ACI_DIALECT, which the ext4 writer follows);
- an empty xattr value's e_value_offs is the current value offset, not 0;
- the xattr block header hash is 0, and the block's entries are ordered by Go's sort.Slice with
  compactext4's comparator, which is not a strict order: `a.index < b.index || len(a.name) <
  len(b.name) || a.name < b.name`. sort.Slice sorts 12 or fewer elements by insertion sort, which is
  reproduced here; a larger block whose order that comparator leaves ambiguous is refused;
- timestamps: seconds below -2^31 become (0x80000000, extra 0), above 0x37fffffff become
  (0x7fffffff, extra 3); otherwise the extra field is the *unmasked* high 32 bits of the signed
  seconds OR nanoseconds << 2, so times after 2038 wrap to 1901 and times before 1970 get an all-ones
  extra field;
- tar2ext4 copies a directory's times by reading them back and storing them again (to the missing
  parents it creates, and when it marks a directory opaque), which changes times before 1970;
- replacing names follows tar2ext4's rules instead of "last entry wins": a non-directory with one
  link is reused in place, and that fails if it has data blocks ("a regular file that appears twice
  is an error"); a directory and a non-directory never replace each other; a hard link may not
  replace a name whose inode has one link; a whiteout replaces an entry of its own layer by the
  same rules (a char device 0/0, mode 0, owner 0, times 0).

Paths that the default mode refuses (absolute, `..`, through a symlink) are refused here too,
although tar2ext4 cleans some of them: no hash is better than a hash of a traversal.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from sandbox.layers import ext4_format as F
from sandbox.layers.convert import (
    CONVERTER_VERSION,
    ConvertResult,
    Ext4Result,
    convert_layer,
    convert_tar_to_ext4,
)
from sandbox.layers.ext4_writer import Ext4Dialect, Ext4LimitError
from sandbox.layers.tar2ext4 import (
    AUFS_META,
    DEFAULT_OPTIONS,
    OPAQUE,
    WHITEOUT,
    Ext4Options,
    LayerBuilder,
    LayerEntryError,
    show_path,
)
from sandbox.layers.tarstream import EntryType, TarEntry, TarReader, TarTime
from sandbox.shared.errors import InputError

ACI_CONVERTER = f"{CONVERTER_VERSION}-aci1"     # cache key of --compat aci conversions
COMPAT_MODES = ("aci",)

GO_INSERTION_SORT_MAX = 12      # Go sort.Slice (pdqsort) sorts this many elements or fewer by insertion sort
TIME_MIN = -(1 << 31)
TIME_MAX = (3 << 32) | 0x7FFFFFFF


GO_ZERO_TIME = -62135596800    # Go's zero time.Time (year 1), which tar2ext4 stores as 0


def _encode(seconds: int, nanoseconds: int) -> tuple[int, int]:
    if seconds == GO_ZERO_TIME and nanoseconds == 0:
        return 0, 0
    if seconds < TIME_MIN:
        return 0x80000000, 0
    if seconds > TIME_MAX:
        return 0x7FFFFFFF, 3
    return seconds & 0xFFFFFFFF, ((seconds >> 32) | (nanoseconds << 2)) & 0xFFFFFFFF


def encode_time_aci(t: TarTime | None) -> tuple[int, int]:
    """(i_*time, i_*time_extra) as compactext4 writes them (see the module docstring)."""
    return (0, 0) if t is None else _encode(t.seconds, t.nanoseconds)


def reencode_time_aci(encoded: tuple[int, int]) -> tuple[int, int]:
    """A stored time read back the way compactext4 reads it, then stored again.

    tar2ext4 does this when it copies a directory's attributes: to the missing parents it creates,
    and to a directory it marks opaque. It reads 34 bits of seconds (those between 2^31 and 2^32 as
    negative 32-bit values) and the bits above as nanoseconds, which Go then normalises; so the
    all-ones extra field of a time before 1970 reads back as a time after 2446, stored clamped.
    """
    low, extra = encoded
    if low == 0 and extra == 0:
        return 0, 0
    raw = low | extra << 32
    seconds, nanoseconds = raw & 0x3FFFFFFFF, raw >> 34
    if 0x7FFFFFFF < seconds < 0x100000000:
        seconds -= 1 << 32
    seconds, nanoseconds = seconds + nanoseconds // 1_000_000_000, nanoseconds % 1_000_000_000
    return _encode(seconds, nanoseconds)


def _reencode_times(builder: LayerBuilder, ino: int) -> None:
    w = builder.w
    w.set_times(ino, *(reencode_time_aci(t) for t in w.get_times(ino)))


def _less(a: F.Xattr, b: F.Xattr) -> bool:
    return a.index < b.index or len(a.name) < len(b.name) or a.name < b.name


def _insertion_sort(items: list[F.Xattr], less: Callable[[F.Xattr, F.Xattr], bool]) -> list[F.Xattr]:
    out = list(items)
    for i in range(1, len(out)):
        j = i
        while j > 0 and less(out[j], out[j - 1]):
            out[j], out[j - 1] = out[j - 1], out[j]
            j -= 1
    return out


def xattr_block_order(block: list[F.Xattr]) -> list[F.Xattr]:
    """The order compactext4 leaves the block's xattrs in (input: sorted by full name, as it gets them)."""
    if len(block) <= GO_INSERTION_SORT_MAX:
        return _insertion_sort(block, _less)
    if any(_less(a, b) and _less(b, a) for i, a in enumerate(block) for b in block[i + 1:]):
        raise Ext4LimitError(f"{len(block)} xattrs in one xattr block whose order under tar2ext4's sort "
                             "comparator depends on Go's sort algorithm",
                             hint="--compat aci reproduces that order for 12 or fewer block xattrs only")
    return sorted(block, key=F.Xattr.sort_key)        # the comparator is a total order on this block


def xattr_block_aci(block: list[F.Xattr]) -> bytes:
    """An xattr block as compactext4 writes it: header hash 0, entries in xattr_block_order."""
    body, _ = F.pack_xattrs(xattr_block_order(block), F.BLOCK_SIZE - 32, 32, empty_value_offs=True)
    return struct.pack("<IIII16x", F.XATTR_MAGIC, 1, 1, 0) + body


class AciLayerBuilder(LayerBuilder):
    """LayerBuilder with tar2ext4's rules for timestamps, replaced names and whiteouts."""

    def _lookup(self, parts: list[bytes]) -> tuple[int, int]:
        """(parent directory, existing entry) for a path, 0 where there is none, without creating anything."""
        w = self.w
        ino = self._dirs.get(tuple(parts[:-1]), 0)
        if not ino:
            ino = w.root
            for name in parts[:-1]:
                child = w.dirs.get(ino, name)
                if not child or not w.is_dir(child):
                    return 0, 0
                ino = child
        return ino, w.dirs.get(ino, parts[-1])

    def _check_replace(self, existing: int, new_is_dir: bool, entry: TarEntry) -> None:
        if not existing:
            return
        w = self.w
        where = entry.describe()
        hint = "--compat aci follows tar2ext4 (the default mode lets the last entry win)"
        if w.is_dir(existing) and not new_is_dir:
            raise LayerEntryError(f"{where}: replaces a directory with a non-directory, which tar2ext4 refuses",
                                  hint=hint)
        if not w.is_dir(existing) and new_is_dir:
            raise LayerEntryError(f"{where}: replaces a non-directory with a directory, which tar2ext4 refuses",
                                  hint=hint)
        if not w.is_dir(existing) and w.links[existing] < 2 and w.has_data_blocks(existing):
            raise LayerEntryError(f"{where}: replaces an entry that has data (a regular file or long symlink "
                                  "appearing twice), which tar2ext4 refuses", hint=hint)

    def add(self, entry: TarEntry, reader: TarReader) -> None:
        parts = self.split(entry.name, entry)
        base = parts[-1] if parts else b""
        if parts and not base.startswith(WHITEOUT):
            _, existing = self._lookup(parts)
            if entry.type == EntryType.hardlink:
                target_parts = self.split(entry.linkname, entry, "hard link target")
                _, target = self._lookup(target_parts) if target_parts else (0, 0)
                w = self.w
                if existing and existing != target and (w.is_dir(existing) or w.links[existing] < 2):
                    raise LayerEntryError(f"{entry.describe()}: a hard link over {show_path(entry.name)}, whose "
                                          "inode has no other link, which tar2ext4 refuses")
            else:
                self._check_replace(existing, entry.type == EntryType.directory, entry)
        self.add_parts(entry, parts, reader)

    encode_time = staticmethod(encode_time_aci)

    def _implicit_dir(self, parent: int, name: bytes) -> int:
        ino = super()._implicit_dir(parent, name)
        _reencode_times(self, ino)
        return ino

    def _whiteout(self, parts: list[bytes], entry: TarEntry) -> None:
        base = parts[-1]
        if base == OPAQUE:
            parent = self.walk(parts[:-1], entry, create=True)
            self.opaque.add(parent)
            _reencode_times(self, parent)           # tar2ext4 re-creates the directory from its own stat
            return
        if base.startswith(AUFS_META):
            super()._whiteout(parts, entry)
            return
        name = base[len(WHITEOUT):]
        if name in (b"", b".", b".."):
            raise LayerEntryError(f"{entry.describe()}: whiteout of an invalid name")
        parent = self.walk(parts[:-1], entry, create=True)
        w = self.w
        existing = w.dirs.get(parent, name)
        self._check_replace(existing, False, entry)
        if existing and w.links[existing] < 2:
            ino = existing                          # tar2ext4 reuses a single-link inode in place
            w.release_blocks(ino, xattr_block=False)
            w.ftype[ino] = F.FileType.char
        else:
            if existing:
                self.unlink(parent, name)
            ino = w.new_inode(F.FileType.char)
            w.link(parent, name, ino)
        w.perm[ino] = w.uid[ino] = w.gid[ino] = 0
        w.set_times(ino, (0, 0), (0, 0), (0, 0), (0, 0))
        w.set_xattrs(ino, {})
        w.set_device(ino, 0, 0)


ACI_DIALECT = Ext4Dialect(inode_bitmap_padding=False, max_mount_count=0, empty_xattr_value_offs=True,
                          xattr_block=xattr_block_aci)
ACI_OPTIONS = Ext4Options(whiteouts=True, origin_xattr=False, lost_and_found=True, dialect=ACI_DIALECT,
                          builder=AciLayerBuilder)


def layer_mode(compat: str | None) -> tuple[Ext4Options, str]:
    """Conversion options and cache key for a --compat value (None: the default, e2fsck-clean images)."""
    if compat is None:
        return DEFAULT_OPTIONS, CONVERTER_VERSION
    if compat == "aci":
        return ACI_OPTIONS, ACI_CONVERTER
    raise InputError(f"unknown layer compatibility mode {compat!r}", hint="modes: " + ", ".join(COMPAT_MODES))


def convert_layer_aci(src: Path, out: Path, *, expected_diff_id: str | None = None,
                      name: str | None = None) -> ConvertResult:
    """A layer device image (ext4 + dm-verity) whose root hash is the one ACI computes for the layer."""
    return convert_layer(src, out, expected_diff_id=expected_diff_id, name=name, options=ACI_OPTIONS)


def convert_tar_to_ext4_aci(src: Path, out: Path, *, name: str | None = None) -> Ext4Result:
    """The ext4 image tar2ext4 writes for a layer (without verity)."""
    return convert_tar_to_ext4(src, out, options=ACI_OPTIONS, name=name)
