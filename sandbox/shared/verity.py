"""dm-verity hash trees (format 1), byte for byte as `veritysetup format` writes them.

Two users: the host formats layer images and the UVM rootfs (`format_verity`), and the guest derives
the root hash of an attached layer device from the device itself (`read_verity_layout`), so that it
never has to trust a hash the host sends.

Sources for the byte layout: cryptsetup lib/verity/verity_hash.c (tree) and lib/verity/verity.c
(`struct verity_sb`), the kernel's Documentation/admin-guide/device-mapper/verity.rst (table line);
summarised in the project's research notes, verity-formats.md §1.
Stdlib only: this module is in the shared zone.
"""

from __future__ import annotations

import functools
import os
import signal
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox.shared import sha2
from sandbox.shared.errors import InputError

if TYPE_CHECKING:
    from hashlib import _Hash

BLOCK_SIZE = 4096
ZERO_SALT = bytes(32)
ALGORITHM = "sha256"
HASH_TYPE = 1                       # "normal" format: H(salt || block), digest slots padded to 2^k
MAX_SALT = 256                      # the superblock's salt field
SUPERBLOCK_SIZE = 512               # struct verity_sb; the rest of its hash block is zero
SIGNATURE = b"verity\0\0"
SB_VERSION = 1

# struct verity_sb (lib/verity/verity.c), little-endian:
#   signature[8] version:u32 hash_type:u32 uuid[16] algorithm[32] data_block_size:u32
#   hash_block_size:u32 data_blocks:u64 salt_size:u16 _pad1[6] salt[256] _pad2[168]
_SB = struct.Struct("<8sII16s32sIIQH6s256s168s")
assert _SB.size == SUPERBLOCK_SIZE

_READ_CHUNK = 1 << 20               # bytes copied per system call when the first level comes ready-made
_CHUNK_BLOCKS = 256                 # blocks read per system call while hashing (preadv takes <= 1024 buffers)
_DIGEST_FLUSH = 1 << 20             # bytes of digests buffered before they are written out
PARALLEL_MIN = 32 << 20             # data from which more processes hash the tree's first level
MAX_WORKERS = 8                     # processes hashing the first level at most


@dataclass(frozen=True)
class VerityInfo:
    """What `format_verity` wrote, and what a dm-verity table needs."""

    root_hash: str                  # hex
    salt: bytes
    data_blocks: int
    data_block_size: int
    hash_block_size: int
    hash_offset: int                # byte offset on the hash device of the superblock (or of the tree)
    hash_start_block: int           # hash-block index of the top tree block (the table's <hash_start>)
    hash_blocks: int                # tree size in hash blocks (superblock not included)
    superblock: bool
    uuid: bytes | None              # superblock UUID, raw 16 bytes (None without a superblock)
    algorithm: str = ALGORITHM
    hash_type: int = HASH_TYPE

    @property
    def data_size(self) -> int:
        return self.data_blocks * self.data_block_size

    @property
    def hash_end(self) -> int:
        """Byte offset on the hash device just after the last tree block."""
        return (self.hash_start_block + self.hash_blocks) * self.hash_block_size

    def dm_table(self, data_dev: str, hash_dev: str) -> str:
        return _table_of(self, data_dev, hash_dev)


def dm_table_line(data_dev: str, hash_dev: str, *, data_blocks: int, hash_start_block: int, root_hash: str,
                  salt: bytes, data_block_size: int = BLOCK_SIZE, hash_block_size: int = BLOCK_SIZE,
                  algorithm: str = ALGORITHM, hash_type: int = HASH_TYPE) -> str:
    """`<start> <sectors> verity <version> <data> <hash> <dbs> <hbs> <blocks> <hash_start> <alg> <root> <salt>`.

    verity.rst: the version is the hash type, hash_start counts hash blocks up to the top tree block, and
    an empty salt is written as '-'.
    """
    sectors = data_blocks * data_block_size // 512
    return (f"0 {sectors} verity {hash_type} {data_dev} {hash_dev} {data_block_size} {hash_block_size} "
            f"{data_blocks} {hash_start_block} {algorithm} {root_hash} {salt.hex() or '-'}")


def _table_of(p: VerityInfo | VerityLayout, data_dev: str, hash_dev: str) -> str:
    return dm_table_line(data_dev, hash_dev, data_blocks=p.data_blocks, hash_start_block=p.hash_start_block,
                         root_hash=p.root_hash, salt=p.salt, data_block_size=p.data_block_size,
                         hash_block_size=p.hash_block_size, algorithm=p.algorithm, hash_type=p.hash_type)


def digests_per_block(hash_block_size: int, digest_size: int) -> int:
    """verity_hash.c: hash_per_block = 2^floor(log2(hbs / digest_size))."""
    return 1 << ((hash_block_size // digest_size).bit_length() - 1)


def level_sizes(data_blocks: int, per_block: int) -> list[int]:
    """Hash blocks in each tree level, level 0 (hashing the data) first; [] for a single data block."""
    sizes = []
    n = data_blocks
    while n > 1:
        n = -(-n // per_block)
        sizes.append(n)
    return sizes


def hash_start_block(hash_offset: int, *, superblock: bool, hash_block_size: int = BLOCK_SIZE) -> int:
    """VERITY_hash_offset_block: the tree starts after the superblock, in whole hash blocks."""
    if superblock:
        return -(-(hash_offset + SUPERBLOCK_SIZE) // hash_block_size)
    return hash_offset // hash_block_size


def tree_size(data_blocks: int, *, hash_block_size: int = BLOCK_SIZE, algorithm: str = ALGORITHM) -> int:
    """Bytes of hash tree (no superblock) for `data_blocks` data blocks."""
    per = digests_per_block(hash_block_size, sha2.new(algorithm).digest_size)
    return sum(level_sizes(data_blocks, per)) * hash_block_size


def pack_superblock(*, uuid: bytes, data_blocks: int, salt: bytes, data_block_size: int = BLOCK_SIZE,
                    hash_block_size: int = BLOCK_SIZE, algorithm: str = ALGORITHM,
                    hash_type: int = HASH_TYPE) -> bytes:
    """The 512-byte struct verity_sb."""
    if len(uuid) != 16:
        raise ValueError("a verity superblock UUID is 16 bytes")
    return _SB.pack(SIGNATURE, SB_VERSION, hash_type, uuid, algorithm.encode(), data_block_size,
                    hash_block_size, data_blocks, len(salt), bytes(6), salt, bytes(168))


def _check_params(salt: bytes, data_block_size: int, hash_block_size: int, algorithm: str) -> int:
    if len(salt) > MAX_SALT:
        raise InputError(f"verity salt is {len(salt)} bytes; at most {MAX_SALT} are allowed")
    for what, size in (("data", data_block_size), ("hash", hash_block_size)):
        if size < 512 or size & (size - 1):
            raise InputError(f"verity {what} block size {size} is not a power of two >= 512")
    try:
        digest_size = sha2.new(algorithm).digest_size
    except ValueError as e:
        raise InputError(f"unknown hash algorithm {algorithm!r} for dm-verity") from e
    if digest_size > hash_block_size:
        raise InputError(f"a {algorithm} digest does not fit in a {hash_block_size}-byte hash block")
    return digest_size


class BlockHasher:
    """Hashes runs of blocks of a file into their digest slots: H(salt || block), zero-padded to `slot`.

    The hot loop of the tree. Blocks are read with one preadv into a fixed buffer laid out as
    `salt | block | salt | block ...`, so that each block is hashed by one constructor call on a view of
    `salt || block`, the whole run by map() over views made once: no Python bytecode runs per block.
    """

    def __init__(self, *, salt: bytes, block_size: int, algorithm: str = ALGORITHM, slot: int | None = None) -> None:
        import hashlib  # OpenSSL, for bulk hashing (the host builds trees; the guest never does)

        if algorithm in hashlib.algorithms_guaranteed:
            self._new: Callable[[memoryview], _Hash] = getattr(hashlib, algorithm)
        else:
            self._new = functools.partial(hashlib.new, algorithm)
        probe = self._new(memoryview(b""))
        self._digest: Callable[[_Hash], bytes] = type(probe).digest
        self.block_size = block_size
        self.slot = probe.digest_size if slot is None else slot
        self._pad = bytes(self.slot - probe.digest_size)
        stride = len(salt) + block_size
        self._buf = bytearray((salt + bytes(block_size)) * _CHUNK_BLOCKS)
        view = memoryview(self._buf)
        self._units = [view[i * stride:(i + 1) * stride] for i in range(_CHUNK_BLOCKS)]
        self._iov = [view[i * stride + len(salt):(i + 1) * stride] for i in range(_CHUNK_BLOCKS)]

    def digests(self, fd: int, offset: int, count: int) -> bytes:
        """The slots of `count` (at most _CHUNK_BLOCKS) blocks read from `fd` at byte `offset`."""
        size = count * self.block_size
        if os.preadv(fd, self._iov[:count], offset) != size:
            raise InputError(f"short read while hashing: the file shrank below {offset + size} bytes")
        hashed = map(self._digest, map(self._new, self._units[:count]))
        if self._pad:
            return self._pad.join(hashed) + self._pad
        return b"".join(hashed)

    def hash_into(self, src_fd: int, first_block: int, count: int, dst_fd: int, dst_offset: int) -> int:
        """Write the slots of blocks [first_block, first_block + count) of `src_fd` to `dst_fd` from
        `dst_offset` on; returns the offset after them."""
        pending: list[bytes] = []
        buffered = 0
        block = first_block
        end = first_block + count
        while block < end:
            n = min(_CHUNK_BLOCKS, end - block)
            pending.append(self.digests(src_fd, block * self.block_size, n))
            buffered += n * self.slot
            block += n
            if buffered >= _DIGEST_FLUSH or block == end:
                data = b"".join(pending)
                _pwrite_all(dst_fd, data, dst_offset)
                dst_offset += len(data)
                pending.clear()
                buffered = 0
        return dst_offset


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def single_threaded() -> bool:
    """True when the process runs one thread, counting threads that native libraries started (they do not
    show in threading.active_count(), and a lock one of them holds would stay held in a forked child)."""
    if threading.active_count() != 1:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _workers(blocks: int, block_size: int) -> int:
    """Processes that hash the first level: one per usable CPU, each with at least PARALLEL_MIN / 2 of data."""
    if blocks * block_size < PARALLEL_MIN:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS, blocks, blocks * block_size // (PARALLEL_MIN // 2)))


def _hash_first_level(src_fd: int, blocks: int, hasher: BlockHasher, dst_fd: int, dst_offset: int) -> None:
    """Hash the data blocks into the tree's first level, in several processes when that pays and is safe.

    Hashing a block takes the GIL back and forth, so threads do not help; forked children hash the later
    stretches and write their digests in place. Forking is safe only while this process runs a single
    thread (`single_threaded`).
    """
    workers = _workers(blocks, hasher.block_size)
    if workers == 1 or not single_threaded():
        hasher.hash_into(src_fd, 0, blocks, dst_fd, dst_offset)
        return
    bounds = [blocks * i // workers for i in range(workers + 1)]
    children = []
    try:
        for first, end in zip(bounds[1:-1], bounds[2:], strict=True):
            pid = os.fork()
            if pid == 0:                            # a child: hash its stretch, then leave at once
                code = 1
                try:
                    hasher.hash_into(src_fd, first, end - first, dst_fd, dst_offset + first * hasher.slot)
                    code = 0
                finally:
                    os._exit(code)
            children.append(pid)
        hasher.hash_into(src_fd, 0, bounds[1], dst_fd, dst_offset)
    except BaseException:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    failed = [pid for pid in children if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0]
    if failed:
        raise InputError("hashing the data failed in a helper process (a read error, or the file shrank)")


def first_level_slot(hash_block_size: int = BLOCK_SIZE, algorithm: str = ALGORITHM) -> int:
    """Bytes each data block's digest takes in the tree's first level (the digest, zero-padded)."""
    return hash_block_size // digests_per_block(hash_block_size, sha2.new(algorithm).digest_size)


def first_level_hasher(*, salt: bytes = ZERO_SALT, data_block_size: int = BLOCK_SIZE,
                       hash_block_size: int = BLOCK_SIZE, algorithm: str = ALGORITHM) -> BlockHasher:
    """A hasher writing data blocks' first-level slots as format_verity's `first_level` takes them: block i's
    at byte i * first_level_slot() (BlockHasher.hash_into(src, i, n, dst, i * hasher.slot))."""
    return BlockHasher(salt=salt, block_size=data_block_size, algorithm=algorithm,
                       slot=first_level_slot(hash_block_size, algorithm))


def _zero_tail(fd: int, level_offset: int, written: int, hash_block_size: int) -> None:
    """Zero-pad a level's last hash block after its `written` bytes of slots (the next level hashes it)."""
    tail = -written % hash_block_size
    if tail:
        _pwrite_all(fd, bytes(tail), level_offset + written)


def _copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
    while length > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length, src_offset, dst_offset)
        except OSError:                             # e.g. across file systems on an old kernel
            n = len(chunk := os.pread(src_fd, min(length, _READ_CHUNK), src_offset))
            _pwrite_all(dst_fd, chunk, dst_offset)
        if n <= 0:
            raise InputError(f"the first level of the dm-verity tree is short by {length} bytes")
        src_offset, dst_offset, length = src_offset + n, dst_offset + n, length - n


def format_verity(data: Path, *, salt: bytes = ZERO_SALT, superblock: bool = True, hash_file: Path | None = None,
                  data_blocks: int | None = None, uuid: bytes | None = None, hash_offset: int | None = None,
                  data_block_size: int = BLOCK_SIZE, hash_block_size: int = BLOCK_SIZE,
                  algorithm: str = ALGORITHM, first_level: int | None = None) -> VerityInfo:
    """Write a format-1 dm-verity tree for `data`, as `veritysetup format` does, and return its parameters.

    - hash_file None: the tree is appended to `data` at hash_offset = data size (whatever followed the data
      is replaced). The data size must then be a whole number of data blocks.
    - hash_file given: the tree goes to that file (created or truncated) at `hash_offset` (default 0).
    - data_blocks defaults to floor(size / data_block_size): like veritysetup, a partial last block is ignored.
    - superblock: write `struct verity_sb` at hash_offset, its block zero-padded, the tree in the next hash
      block. The UUID defaults to one derived from the root hash, so the output is a pure function of input.
    - first_level: an open file holding the digests of the data blocks as hash_blocks_into writes them (from
      offset 0), computed while the data was written (sandbox/layers/treehash.py); they are copied into the
      tree instead of hashing the data again. The caller answers for them matching the data.
    Memory stays bounded: data is read in large chunks and each level's digests go straight to disk.
    """
    digest_size = _check_params(salt, data_block_size, hash_block_size, algorithm)
    if uuid is not None and len(uuid) != 16:
        raise InputError(f"a verity UUID is 16 bytes, got {len(uuid)}")
    data = Path(data)
    try:
        size = data.stat().st_size
    except OSError as e:
        raise InputError(f"cannot read {data}: {e.strerror}") from e
    blocks = size // data_block_size if data_blocks is None else data_blocks
    if blocks <= 0:
        raise InputError(f"{data} holds no whole {data_block_size}-byte block ({size} bytes)",
                         hint="dm-verity needs at least one data block")
    if blocks * data_block_size > size:
        raise InputError(f"{data} has {size} bytes, fewer than the {blocks} data blocks requested")
    if hash_file is None:
        if hash_offset is None:
            hash_offset = blocks * data_block_size
            if data_blocks is None and size % data_block_size:
                raise InputError(f"{data} is {size} bytes, not a whole number of {data_block_size}-byte blocks",
                                 hint="pad it with zeros first, or write the tree to a separate --hash-file")
        if hash_offset < blocks * data_block_size:
            raise InputError(f"hash offset {hash_offset} overlaps the {blocks} data blocks")
    elif hash_offset is None:
        hash_offset = 0
    align = SUPERBLOCK_SIZE if superblock else hash_block_size
    if hash_offset % align:
        raise InputError(f"hash offset {hash_offset} is not a multiple of {align}")

    per = digests_per_block(hash_block_size, digest_size)
    slot = hash_block_size // per
    sizes = level_sizes(blocks, per)
    start = hash_start_block(hash_offset, superblock=superblock, hash_block_size=hash_block_size)
    # Top level first on disk: level i sits after all levels above it.
    offsets = []
    pos = start
    for i in range(len(sizes)):
        offsets.append((pos + sum(sizes[i + 1:])) * hash_block_size)
    end = (start + sum(sizes)) * hash_block_size

    data_fd = os.open(data, os.O_RDWR if hash_file is None else os.O_RDONLY)
    try:
        if hash_file is None:
            hash_fd = data_fd
        else:
            hash_fd = os.open(hash_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(hash_fd, max(end, hash_offset + (hash_block_size if superblock else 0)))
            if superblock:
                _pwrite_all(hash_fd, bytes(start * hash_block_size - hash_offset), hash_offset)
            if not sizes and first_level is not None:
                # A single data block: no tree at all, the root is the digest of that block.
                root = os.pread(first_level, digest_size, 0)
                if len(root) != digest_size:
                    raise InputError("the first level of the dm-verity tree is empty")
            elif not sizes:
                root = BlockHasher(salt=salt, block_size=data_block_size, algorithm=algorithm).digests(data_fd, 0, 1)
            else:
                hasher = BlockHasher(salt=salt, block_size=data_block_size, algorithm=algorithm, slot=slot)
                if first_level is not None:
                    _copy_range(first_level, 0, hash_fd, offsets[0], blocks * slot)
                else:
                    _hash_first_level(data_fd, blocks, hasher, hash_fd, offsets[0])
                _zero_tail(hash_fd, offsets[0], blocks * slot, hash_block_size)
                if hash_block_size != data_block_size:
                    hasher = BlockHasher(salt=salt, block_size=hash_block_size, algorithm=algorithm, slot=slot)
                for level in range(1, len(sizes)):
                    hasher.hash_into(hash_fd, offsets[level - 1] // hash_block_size, sizes[level - 1], hash_fd,
                                     offsets[level])
                    _zero_tail(hash_fd, offsets[level], sizes[level - 1] * slot, hash_block_size)
                root = hasher.digests(hash_fd, offsets[-1], 1)[:digest_size]
            if superblock:
                if uuid is None:
                    uuid = derived_uuid(root)
                sb = pack_superblock(uuid=uuid, data_blocks=blocks, salt=salt, data_block_size=data_block_size,
                                     hash_block_size=hash_block_size, algorithm=algorithm)
                _pwrite_all(hash_fd, sb, hash_offset)
        finally:
            if hash_fd != data_fd:
                os.close(hash_fd)
    finally:
        os.close(data_fd)
    return VerityInfo(root_hash=root.hex(), salt=salt, data_blocks=blocks, data_block_size=data_block_size,
                      hash_block_size=hash_block_size, hash_offset=hash_offset, hash_start_block=start,
                      hash_blocks=sum(sizes), superblock=superblock, uuid=uuid if superblock else None,
                      algorithm=algorithm)


def derived_uuid(root: bytes) -> bytes:
    """A superblock UUID that is a function of the tree (cryptsetup would pick a random one)."""
    return sha2.sha256(b"parma-sandbox verity uuid\0" + root).digest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Guest side: find and check the verity parameters of a layer device (ext4 | superblock | tree).

EXT4_SB_OFFSET = 1024
EXT4_MAGIC = 0xEF53
EXT4_INCOMPAT_64BIT = 0x80


class VerityLayoutError(InputError):
    """The device is not an ext4 image followed by a well-formed dm-verity superblock and tree."""


@dataclass(frozen=True)
class VerityLayout:
    """Everything needed to open a layer device with dm-verity, derived from the device's own bytes."""

    root_hash: str
    salt: bytes
    data_blocks: int
    hash_start_block: int
    hash_blocks: int
    uuid: bytes
    data_block_size: int = BLOCK_SIZE
    hash_block_size: int = BLOCK_SIZE
    algorithm: str = ALGORITHM
    hash_type: int = HASH_TYPE

    @property
    def data_size(self) -> int:
        return self.data_blocks * self.data_block_size

    @property
    def device_size(self) -> int:
        """The least device size holding the data, the superblock and the whole tree."""
        return (self.hash_start_block + self.hash_blocks) * self.hash_block_size

    def dm_table(self, device: str) -> str:
        """Data and tree on the same device, as layers are attached."""
        return _table_of(self, device, device)


def _read_exact(read_at: Callable[[int, int], bytes], offset: int, size: int, what: str) -> bytes:
    data = read_at(offset, size)
    if len(data) != size:
        raise VerityLayoutError(f"device too short: cannot read the {what} ({size} bytes at offset {offset})")
    return data


def ext4_size(read_at: Callable[[int, int], bytes]) -> int:
    """Size in bytes of the ext4 filesystem at the start of a device, from its superblock."""
    sb = _read_exact(read_at, EXT4_SB_OFFSET, 1024, "ext4 superblock")
    # struct ext4_super_block: s_blocks_count_lo @0x4, s_log_block_size @0x18, s_magic @0x38,
    # s_feature_incompat @0x60, s_blocks_count_hi @0x150.
    (magic,) = struct.unpack_from("<H", sb, 0x38)
    if magic != EXT4_MAGIC:
        raise VerityLayoutError(f"no ext4 superblock at offset {EXT4_SB_OFFSET} (magic {magic:#06x})")
    (blocks_lo,) = struct.unpack_from("<I", sb, 0x4)
    log_block: int
    (log_block,) = struct.unpack_from("<I", sb, 0x18)
    (incompat,) = struct.unpack_from("<I", sb, 0x60)
    if log_block > 6:
        raise VerityLayoutError(f"ext4 superblock has an invalid block size (log {log_block})")
    blocks: int = blocks_lo
    if incompat & EXT4_INCOMPAT_64BIT:
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
    if blocks == 0:
        raise VerityLayoutError("ext4 superblock says the filesystem has no blocks")
    return blocks * (1024 << log_block)


def parse_superblock(raw: bytes) -> tuple[bytes, int, bytes, str, int, int, int]:
    """Unpack and validate a 512-byte verity superblock: (uuid, hash_type, salt, algorithm, dbs, hbs, blocks)."""
    (sig, version, hash_type, uuid, alg, dbs, hbs, blocks, salt_size, pad1, salt_field,
     pad2) = _SB.unpack(raw[:SUPERBLOCK_SIZE])
    if sig != SIGNATURE:
        raise VerityLayoutError("no dm-verity superblock after the ext4 data (bad signature)")
    if version != SB_VERSION:
        raise VerityLayoutError(f"unsupported dm-verity superblock version {version}")
    if salt_size > MAX_SALT:
        raise VerityLayoutError(f"dm-verity superblock salt size {salt_size} exceeds {MAX_SALT}")
    if any(pad1) or any(pad2) or any(salt_field[salt_size:]):
        raise VerityLayoutError("dm-verity superblock has non-zero padding")
    name, nul, rest = alg.partition(b"\0")
    if not nul or any(rest):
        raise VerityLayoutError("dm-verity superblock algorithm name is not NUL-terminated")
    return uuid, hash_type, salt_field[:salt_size], name.decode("ascii", "replace"), dbs, hbs, blocks


def read_verity_layout(read_at: Callable[[int, int], bytes], *, algorithm: str = ALGORITHM,
                       block_size: int = BLOCK_SIZE) -> VerityLayout:
    """Derive the dm-verity parameters and root hash of a layer device from its bytes.

    `read_at(offset, size)` reads from the device. The layout is: ext4 filesystem (its superblock gives
    the data size), the verity superblock in the next block, then the tree, top level first. Only format 1
    with the given algorithm and block size is accepted; anything else fails closed. The root hash is
    computed from the top tree block: a device whose tree does not match its data then fails to read in
    dm-verity, and a root hash the policy does not list is refused before that.
    """
    data_size = ext4_size(read_at)
    if data_size % block_size:
        raise VerityLayoutError(f"ext4 size {data_size} is not a multiple of {block_size}")
    uuid, hash_type, salt, alg, dbs, hbs, blocks = parse_superblock(
        _read_exact(read_at, data_size, SUPERBLOCK_SIZE, "dm-verity superblock"))
    if hash_type != HASH_TYPE:
        raise VerityLayoutError(f"dm-verity hash type {hash_type} is not supported (need {HASH_TYPE})")
    if alg != algorithm:
        raise VerityLayoutError(f"dm-verity algorithm {alg!r} is not supported (need {algorithm!r})")
    if dbs != block_size or hbs != block_size:
        raise VerityLayoutError(f"dm-verity block sizes {dbs}/{hbs} are not supported (need {block_size})")
    if blocks * dbs != data_size:
        raise VerityLayoutError(f"dm-verity superblock covers {blocks} blocks but the ext4 filesystem has "
                                f"{data_size // block_size}")
    base = sha2.new(algorithm)
    base.update(salt)
    sizes = level_sizes(blocks, digests_per_block(hbs, base.digest_size))
    start = hash_start_block(data_size, superblock=True, hash_block_size=hbs)
    if sizes:
        top = _read_exact(read_at, start * hbs, hbs, "top dm-verity hash block")
        _read_exact(read_at, (start + sum(sizes)) * hbs - 1, 1, "end of the dm-verity tree")
    else:
        top = _read_exact(read_at, 0, dbs, "single data block")
    h = base.copy()
    h.update(top)
    return VerityLayout(root_hash=h.hexdigest(), salt=salt, data_blocks=blocks, hash_start_block=start,
                        hash_blocks=sum(sizes), uuid=uuid, data_block_size=dbs, hash_block_size=hbs,
                        algorithm=alg, hash_type=hash_type)


def file_reader(path: Path) -> Callable[[int, int], bytes]:
    """A `read_at` for a file or block device (the caller keeps the returned function short-lived)."""
    def read_at(offset: int, size: int) -> bytes:
        with open(path, "rb", buffering=0) as f:
            return os.pread(f.fileno(), size, offset)
    return read_at
