"""A streaming tar reader for layer conversion: one pass, bounded memory, strict about damage.

Formats: POSIX ustar, pax (extended and global headers), GNU (long names 'L'/'K', old sparse 'S' with
extension blocks, atime/ctime fields) and V7. Sparse files in all GNU flavours: old 'S', pax 0.0
(GNU.sparse.offset/numbytes), 0.1 (GNU.sparse.map) and 1.0 (map at the start of the data). Byte layouts
from POSIX.1-2017 "pax" (ustar and pax interchange formats) and the GNU tar manual, "Basic Tar Format" and
"Storing Sparse Files". Names are kept as raw bytes.

Every error is a TarError naming the entry (or header offset) where reading failed.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from sandbox.shared.errors import InputError

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_NO_TIMES = bytes(24)            # GNU atime and ctime fields left empty
_MAX_META = 16 << 20            # cap on pax / long-name payloads held in memory


class TarError(InputError):
    """The tar stream is damaged or uses something we refuse to guess about."""


class EntryType(StrEnum):
    file = "file"
    hardlink = "hardlink"
    symlink = "symlink"
    char = "char"
    block = "block"
    directory = "directory"
    fifo = "fifo"


# POSIX: links, devices and fifos have no data records; directories are treated alike (as GNU tar,
# Go's archive/tar and Python's tarfile do).
_HEADER_ONLY = frozenset((b"1", b"2", b"3", b"4", b"5", b"6"))

_TYPES = {
    b"0": EntryType.file, b"\0": EntryType.file, b"7": EntryType.file, b"S": EntryType.file,
    b"1": EntryType.hardlink, b"2": EntryType.symlink, b"3": EntryType.char, b"4": EntryType.block,
    b"5": EntryType.directory, b"D": EntryType.directory, b"6": EntryType.fifo,
}


class TarTime(NamedTuple):
    seconds: int
    nanoseconds: int = 0


@dataclass(slots=True)
class TarEntry:
    name: bytes                 # the path as stored (after long-name and pax overrides)
    type: EntryType
    mode: int                   # permission bits including setuid/setgid/sticky
    uid: int
    gid: int
    mtime: TarTime
    atime: TarTime | None
    ctime: TarTime | None
    size: int                   # logical size of a regular file (sparse: the expanded size)
    linkname: bytes
    devmajor: int
    devminor: int
    offset: int                 # byte offset of the entry's first header in the (uncompressed) tar
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    sparse: list[tuple[int, int]] | None = None     # (offset, length) data segments of a sparse file
    stored: int = 0             # bytes of data stored in the archive for this entry

    def describe(self) -> str:
        return f"entry {self.name.decode(errors='replace')!r} (at byte {self.offset})"


What = str | Callable[[], str]           # a description, or how to make one if an error needs it


def _text(what: What) -> str:
    return what if isinstance(what, str) else what()


class _Input:
    """Reads exact byte counts from a sequence of chunks (bytes), and counts the position.

    Headers are copied out; file data is handed out as views of the chunks, without a copy.
    """

    def __init__(self, chunks: Iterable[bytes | memoryview]) -> None:
        self._chunks = iter(chunks)
        self._buf = memoryview(b"")     # the current chunk (valid until the next is asked for)
        self._off = 0                   # read position in it
        self._base = 0                  # stream position of its first byte

    @property
    def pos(self) -> int:
        return self._base + self._off

    def _advance(self) -> bool:
        """Move to the next non-empty chunk (the current one must be used up); False at the end."""
        for chunk in self._chunks:
            if chunk:
                self._base += len(self._buf)
                self._buf, self._off = memoryview(chunk), 0
                return True
        return False

    def read(self, n: int) -> bytes:
        """n bytes, or fewer at the end of the stream."""
        off = self._off
        end = off + n
        if end <= len(self._buf):
            self._off = end
            return self._buf[off:end].tobytes()
        parts = [self._buf[off:].tobytes()]
        got = len(parts[0])
        self._off = len(self._buf)
        while got < n and self._advance():
            take = min(n - got, len(self._buf))
            parts.append(self._buf[:take].tobytes())
            self._off = take
            got += take
        return b"".join(parts)

    def exact(self, n: int, what: What) -> bytes:
        data = self.read(n)
        if len(data) < n:
            raise TarError(f"tar stream ends inside {_text(what)} (truncated after {self.pos} bytes)",
                           hint="the layer file is incomplete or corrupt")
        return data

    def chunks(self, n: int, what: What) -> Iterator[memoryview]:
        """Yield exactly n bytes as views into the chunks (consume each before asking for the next)."""
        while n > 0:
            if self._off == len(self._buf) and not self._advance():
                raise TarError(f"tar stream ends inside {_text(what)} (truncated after {self.pos} bytes)",
                               hint="the layer file is incomplete or corrupt")
            off = self._off
            take = min(n, len(self._buf) - off)
            self._off = off + take
            n -= take
            yield self._buf[off:off + take]

    def skip_within(self, n: int) -> bool:
        """Skip n bytes if the current chunk holds them (the usual case); False, having done nothing, if not."""
        off = self._off + n
        if off > len(self._buf):
            return False
        self._off = off
        return True

    def skip(self, n: int, what: What) -> None:
        while n > 0:
            if self._off == len(self._buf) and not self._advance():
                raise TarError(f"tar stream ends inside {_text(what)} (truncated after {self.pos} bytes)",
                               hint="the layer file is incomplete or corrupt")
            take = min(n, len(self._buf) - self._off)
            self._off += take
            n -= take

    def drain(self) -> int:
        """Read to the end; returns how many bytes that was."""
        n = len(self._buf) - self._off
        self._off = len(self._buf)
        while self._advance():
            n += len(self._buf)
            self._off = len(self._buf)
        return n


def _parse_number(field_: bytes, what: str, offset: int) -> int:
    """A numeric header field: octal (NUL/space padded) or GNU base-256 (high bit set)."""
    if field_ and field_[0] & 0x80:
        value = int.from_bytes(field_, "big")
        if field_[0] == 0xFF:                       # negative base-256
            value -= 1 << (8 * len(field_))
        else:
            value &= (1 << (8 * len(field_) - 1)) - 1
        return value
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if text.translate(None, b"01234567"):
        raise TarError(f"corrupt tar header at byte {offset}: {what} field {bytes(field_)!r} is not octal",
                       hint="the layer is not a valid tar archive")
    return int(text, 8)


def _cstr(field_: bytes) -> bytes:
    return field_.split(b"\0", 1)[0]


# mode, uid, gid, size, mtime and checksum as nearly every writer formats them (GNU tar, Go, Python):
# zero-padded octal and a NUL, the checksum in six digits, a NUL and a space. Anything else takes the
# general path (_parse_number), which accepts the same values and more.
_USUAL_NUMBERS = re.compile(rb"([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0([0-7]{6})\0 ")


def _byte_sum(data: bytes) -> int:
    """The sum of the bytes of a header. Adler-32's low half is 1 + that sum modulo 65521, exact while the
    sum stays below 65521, as it does for 256 bytes; zlib computes it faster than sum() iterates."""
    return (zlib.adler32(data[:256]) & 0xFFFF) + (zlib.adler32(data[256:]) & 0xFFFF) - 2


def _checksum_ok(header: bytes, stored: int) -> bool:
    unsigned = _byte_sum(header) - sum(header[148:156]) + 8 * 32      # the field counts as 8 spaces
    if stored == unsigned:
        return True
    high = sum(1 for b in header if b > 127) - sum(1 for b in header[148:156] if b > 127)
    return stored == unsigned - 256 * high                      # some old writers summed signed chars


_PAX_RECORD = re.compile(rb"(\d+) ")


def _parse_pax(data: bytes, offset: int) -> list[tuple[bytes, bytes]]:
    """pax extended header records: "<len> <key>=<value>\\n", in order (keys may repeat)."""
    records = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0:                          # trailing padding some writers leave
            break
        m = _PAX_RECORD.match(data, pos)
        if not m:
            raise TarError(f"corrupt pax header at byte {offset}: bad record length")
        length = int(m.group(1))
        end = pos + length
        if length < len(m.group(0)) + 2 or end > len(data) or data[end - 1] != 0x0A:
            raise TarError(f"corrupt pax header at byte {offset}: a record overruns its header")
        key, eq, value = data[m.end():end - 1].partition(b"=")
        if not eq:
            raise TarError(f"corrupt pax header at byte {offset}: a record has no '='")
        records.append((key, value))
        pos = end
    return records


def _pax_time(value: bytes, offset: int) -> TarTime:
    m = re.fullmatch(rb"(-?)(\d+)(?:\.(\d*))?", value)
    if not m:
        raise TarError(f"corrupt pax header at byte {offset}: bad time {value!r}")
    seconds = int(m.group(2))
    frac = (m.group(3) or b"")[:9].ljust(9, b"0")
    nanos = int(frac)
    if m.group(1):
        seconds, nanos = (-seconds - 1, 1_000_000_000 - nanos) if nanos else (-seconds, 0)
    return TarTime(seconds, nanos)


def _pax_int(value: bytes, key: bytes, offset: int) -> int:
    if not value.isdigit():
        raise TarError(f"corrupt pax header at byte {offset}: {key.decode(errors='replace')} is {value!r}")
    return int(value)


def _libarchive_xattr(key: bytes, value: bytes, offset: int) -> tuple[bytes, bytes]:
    """LIBARCHIVE.xattr.<url-encoded name>=<base64 value> (what bsdtar writes)."""
    import base64
    from urllib.parse import unquote_to_bytes
    name = unquote_to_bytes(key[len(b"LIBARCHIVE.xattr."):])
    try:
        return name, base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
    except ValueError as e:
        raise TarError(f"corrupt pax header at byte {offset}: xattr {name!r} is not base64") from e


class TarReader:
    """Iterate over the entries of a tar stream, given as chunks of bytes; read each regular file's data
    before the next entry."""

    def __init__(self, chunks: Iterable[bytes | memoryview]) -> None:
        self.input = _Input(chunks)
        self.globals: dict[bytes, bytes] = {}
        self._pending = 0               # unread data + padding of the current entry
        self._current: TarEntry | None = None
        self.ended = False

    def __iter__(self) -> Iterator[TarEntry]:
        while True:
            self._skip_pending()
            entry = self._next()
            if entry is None:
                self.ended = True
                return
            self._current = entry
            yield entry

    def _skip_pending(self) -> None:
        if self._pending:
            current = self._current
            if not self.input.skip_within(self._pending):
                self.input.skip(self._pending,
                                lambda: f"the data of {current.describe() if current else 'an entry'}")
            self._pending = 0

    def drain(self) -> int:
        """Read whatever follows the end-of-archive marker (it counts for the diff_id); returns its length."""
        return self.input.drain()

    def _meta(self, size: int, offset: int, what: str) -> bytes:
        if size > _MAX_META:
            raise TarError(f"{what} at byte {offset} is {size} bytes; refusing more than {_MAX_META}")
        data = self.input.exact(size, what)
        self.input.skip(-size % BLOCK, what)
        return data

    def _next(self) -> TarEntry | None:
        pax: list[tuple[bytes, bytes]] = []
        long_name: bytes | None = None
        long_link: bytes | None = None
        start = self.input.pos
        while True:
            offset = self.input.pos
            header = self.input.read(BLOCK)
            if len(header) < BLOCK:
                header += self.input.exact(BLOCK - len(header), "a tar header") if header else b""
            if not header:
                if offset == 0:
                    raise TarError("the tar stream is empty", hint="the layer file is empty or truncated")
                raise TarError(f"tar stream ends at byte {offset} without an end-of-archive marker",
                               hint="the layer file is truncated")
            if header == _ZERO_BLOCK:
                if pax or long_name is not None or long_link is not None:
                    raise TarError(f"tar stream ends at byte {offset} after an extended header with no entry")
                second = self.input.read(BLOCK)     # the marker is two zero blocks; tolerate one
                if second and second != _ZERO_BLOCK:
                    raise TarError(f"corrupt tar stream at byte {offset}: data after a zero block")
                return None
            usual = _USUAL_NUMBERS.match(header, 100)
            if usual is not None:
                mode, uid, gid, size, mtime, stored = [int(digits, 8) for digits in usual.groups()]
                numbers: tuple[int, int, int, int] | None = (mode, uid, gid, mtime)
            else:
                stored = _parse_number(header[148:156], "checksum", 0)
                numbers = None
            if not _checksum_ok(header, stored):
                raise TarError(f"corrupt tar header at byte {offset} (checksum mismatch)",
                               hint="the layer is not a tar archive, or it is damaged")
            typeflag = header[156:157]
            if numbers is None:
                size = _parse_number(header[124:136], "size", offset)
                if size < 0:
                    raise TarError(f"corrupt tar header at byte {offset}: negative size")
            if typeflag == b"x":
                pax += _parse_pax(self._meta(size, offset, "a pax header"), offset)
                continue
            if typeflag == b"g":
                for key, value in _parse_pax(self._meta(size, offset, "a pax global header"), offset):
                    if value:
                        self.globals[key] = value
                    else:
                        self.globals.pop(key, None)
                continue
            if typeflag == b"L":
                long_name = _cstr(self._meta(size, offset, "a GNU long name"))
                continue
            if typeflag == b"K":
                long_link = _cstr(self._meta(size, offset, "a GNU long link name"))
                continue
            if typeflag == b"V":                    # a volume label: not a file
                self.input.skip(size + (-size % BLOCK), "a volume label")
                continue
            return self._entry(header, typeflag, size, start, pax, long_name, long_link, numbers)

    def _entry(self, header: bytes, typeflag: bytes, size: int, start: int, pax: list[tuple[bytes, bytes]],
               long_name: bytes | None, long_link: bytes | None,
               numbers: tuple[int, int, int, int] | None) -> TarEntry:
        magic = header[257:265]
        gnu = magic == b"ustar  \0"
        end = header.find(0, 0, 100)
        name = header[:end if end >= 0 else 100]
        if magic[:6] == b"ustar\0" and header[345]:
            name = _cstr(header[345:500]) + b"/" + name
        end = header.find(0, 157, 257)
        linkname = header[157:end if end >= 0 else 257]
        entry_type = _TYPES.get(typeflag)
        if entry_type is None:
            shown = typeflag.decode("latin-1")
            raise TarError(f"tar entry {name.decode(errors='replace')!r} (at byte {start}) has unsupported type "
                           f"{shown!r}", hint="only files, directories, links, devices and fifos can be converted")
        if numbers is None:
            numbers = (_parse_number(header[100:108], "mode", start), _parse_number(header[108:116], "uid", start),
                       _parse_number(header[116:124], "gid", start), _parse_number(header[136:148], "mtime", start))
        mode, uid, gid, mtime = numbers
        entry = TarEntry(name=name, type=entry_type, mode=mode & 0o7777, uid=uid, gid=gid, mtime=TarTime(mtime),
                         atime=None, ctime=None, size=size, linkname=linkname, devmajor=0, devminor=0, offset=start,
                         stored=size)
        if entry_type is EntryType.char or entry_type is EntryType.block:
            entry.devmajor = _parse_number(header[329:337], "devmajor", start)
            entry.devminor = _parse_number(header[337:345], "devminor", start)
        if gnu and header[345:369] != _NO_TIMES:
            atime, ctime = _parse_number(header[345:357], "atime", start), _parse_number(header[357:369], "ctime", start)
            entry.atime = TarTime(atime) if atime else None
            entry.ctime = TarTime(ctime) if ctime else None
        if typeflag == b"S":
            entry.sparse = self._old_gnu_sparse(header, entry)
            entry.size = _parse_number(header[483:495], "realsize", start)
        if typeflag == b"\0" and name.endswith(b"/"):
            entry.type = EntryType.directory            # old tars marked directories with a trailing slash
            typeflag = b"5"
        if long_name is not None:
            entry.name = long_name
        if long_link is not None:
            entry.linkname = long_link
        map_in_data = self._apply_pax(entry, [*self.globals.items(), *pax]) if pax or self.globals else False
        if typeflag in _HEADER_ONLY:
            entry.size = entry.stored = 0               # no data follows, whatever the size field says
        elif entry.type != EntryType.file:
            entry.size = 0                              # e.g. a GNU dumpdir: its data is skipped
        else:
            if map_in_data:
                entry.sparse = self._sparse_1_0(entry)
            self._check_sparse(entry)
        self._pending = entry.stored + (-entry.stored % BLOCK)
        if not entry.name:
            raise TarError(f"tar entry at byte {start} has an empty name")
        return entry

    def _old_gnu_sparse(self, header: bytes, entry: TarEntry) -> list[tuple[int, int]]:
        """Old GNU sparse: 4 (offset, numbytes) pairs at 386, extension blocks of 21 while isextended."""
        def pairs(raw: bytes, count: int, where: int) -> list[tuple[int, int]]:
            out = []
            for i in range(count):
                o = _parse_number(raw[i * 24:i * 24 + 12], "sparse offset", where)
                n = _parse_number(raw[i * 24 + 12:i * 24 + 24], "sparse length", where)
                if o == 0 and n == 0 and not raw[i * 24:i * 24 + 24].strip(b"\0"):
                    break
                out.append((o, n))
            return out
        segments = pairs(header[386:482], 4, entry.offset)
        extended = header[482]
        while extended:
            where = self.input.pos
            ext = self.input.exact(BLOCK, f"the sparse map of {entry.describe()}")
            segments += pairs(ext[:504], 21, where)
            extended = ext[504]
        return segments

    def _apply_pax(self, entry: TarEntry, records: list[tuple[bytes, bytes]]) -> bool:
        """Apply pax records; True when the entry is pax sparse 1.0 (its map is at the start of the data)."""
        at = entry.offset
        offsets: list[int] = []
        numbytes: list[int] = []
        sparse_map: bytes | None = None
        major = minor = None
        real_size = None
        for key, value in records:
            if key == b"path":
                entry.name = value
            elif key == b"linkpath":
                entry.linkname = value
            elif key == b"size":
                entry.size = entry.stored = _pax_int(value, key, at)
            elif key == b"uid":
                entry.uid = _pax_int(value, key, at)
            elif key == b"gid":
                entry.gid = _pax_int(value, key, at)
            elif key == b"mtime":
                entry.mtime = _pax_time(value, at)
            elif key == b"atime":
                entry.atime = _pax_time(value, at)
            elif key == b"ctime":
                entry.ctime = _pax_time(value, at)
            elif key.startswith(b"SCHILY.xattr."):
                entry.xattrs[key[len(b"SCHILY.xattr."):]] = value
            elif key.startswith(b"LIBARCHIVE.xattr."):
                name, data = _libarchive_xattr(key, value, at)
                entry.xattrs[name] = data
            elif key in (b"SCHILY.devmajor", b"SCHILY.devminor"):
                n = _pax_int(value, key, at)
                if key.endswith(b"major"):
                    entry.devmajor = n
                else:
                    entry.devminor = n
            elif key == b"GNU.sparse.major":
                major = _pax_int(value, key, at)
            elif key == b"GNU.sparse.minor":
                minor = _pax_int(value, key, at)
            elif key == b"GNU.sparse.name":
                entry.name = value
            elif key in (b"GNU.sparse.realsize", b"GNU.sparse.size"):
                real_size = _pax_int(value, key, at)
            elif key == b"GNU.sparse.offset":
                offsets.append(_pax_int(value, key, at))
            elif key == b"GNU.sparse.numbytes":
                numbytes.append(_pax_int(value, key, at))
            elif key == b"GNU.sparse.map":
                sparse_map = value
        map_in_data = major == 1 and minor == 0
        if map_in_data:
            entry.sparse = []
        elif sparse_map is not None:                   # 0.1
            nums = [_pax_int(v, b"GNU.sparse.map", at) for v in sparse_map.split(b",")] if sparse_map else []
            if len(nums) % 2:
                raise TarError(f"corrupt sparse map in {entry.describe()}")
            entry.sparse = list(zip(nums[::2], nums[1::2], strict=True))
        elif offsets or numbytes:                      # 0.0
            if len(offsets) != len(numbytes):
                raise TarError(f"corrupt sparse map in {entry.describe()}")
            entry.sparse = list(zip(offsets, numbytes, strict=True))
        elif major is not None:
            raise TarError(f"{entry.describe()} uses GNU sparse format {major}.{minor}, which is not supported")
        if real_size is not None:
            if entry.sparse is None:
                raise TarError(f"{entry.describe()} has a sparse size but no sparse map")
            entry.size = real_size
        return map_in_data

    def _sparse_1_0(self, entry: TarEntry) -> list[tuple[int, int]]:
        """pax sparse 1.0: decimal numbers, one per line, at the start of the data, padded to 512."""
        what = f"the sparse map of {entry.describe()}"
        consumed = 0
        buf = b""

        def number() -> int:
            nonlocal buf, consumed
            while b"\n" not in buf:
                if consumed >= entry.stored or len(buf) > 64:
                    raise TarError(f"corrupt sparse map in {entry.describe()}")
                block = self.input.exact(BLOCK, what)
                consumed += BLOCK
                buf += block
            line, _, buf = buf.partition(b"\n")
            if not line.isdigit():
                raise TarError(f"corrupt sparse map in {entry.describe()}")
            return int(line)

        count = number()
        segments = [(number(), number()) for _ in range(count)]
        entry.stored -= consumed
        if entry.stored < 0:
            raise TarError(f"corrupt sparse map in {entry.describe()}")
        return segments

    @staticmethod
    def _check_sparse(entry: TarEntry) -> None:
        if entry.sparse is None:
            return
        end = 0
        total = 0
        for off, length in entry.sparse:
            if off < end or length < 0:
                raise TarError(f"{entry.describe()} has overlapping or unordered sparse segments")
            end = off + length
            total += length
        if end > entry.size or total != entry.stored:
            raise TarError(f"{entry.describe()} has a sparse map that does not match its sizes")

    def contents(self, entry: TarEntry) -> Iterator[memoryview]:
        """The data of the current regular, non-sparse file entry, in order; views are reused, copy to keep."""
        assert entry is self._current and entry.type == EntryType.file and entry.sparse is None
        self._pending = -entry.stored % BLOCK       # the padding, skipped before the next entry
        return self.input.chunks(entry.stored, lambda: f"the data of {entry.describe()}")

    def data(self, entry: TarEntry) -> Iterator[tuple[int, memoryview]]:
        """Yield (file offset, bytes) of the current regular-file entry; views are reused, copy to keep."""
        assert entry is self._current and entry.type == EntryType.file
        def what() -> str:
            return f"the data of {entry.describe()}"
        segments = entry.sparse if entry.sparse is not None else [(0, entry.stored)]
        pad = -entry.stored % BLOCK
        self._pending = 0
        for off, length in segments:
            pos = off
            for chunk in self.input.chunks(length, what):
                yield pos, chunk
                pos += len(chunk)
        self.input.skip(pad, what)
