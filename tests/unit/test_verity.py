"""dm-verity trees: golden root hashes, on-disk layout, and the guest-side layout reader."""

from __future__ import annotations

import hashlib
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.shared import verity as V
from sandbox.shared.errors import InputError

# Inputs and root hashes from the research notes (verity-formats.md §1.5), produced there with
# `veritysetup format` (cryptsetup 2.6.1). Inputs come from random.Random(42), drawn in this order.
_R = random.Random(42)
B1 = _R.randbytes(4096)
B2 = _R.randbytes(8192)
B129 = _R.randbytes(129 * 4096)
B4097 = _R.randbytes(4097 * 4096)
M1 = _R.randbytes(1 << 20)
Z3 = bytes(3 * 4096)

GOLDEN = [
    # name, data, salt, root hash, hash device size without / with superblock
    ("b1", B1, b"", "27ea8434ddf3eecb73c26ab1eeba9d9abf457ce153c909c2dbe45fbcd1592b9c", 0, 4096),
    ("b2", B2, b"", "1c6d9a33de240bbc13b67349f2b95f6fc349f256380809474900fe4da67cb981", 4096, 8192),
    ("b2z", B2, bytes(32), "8b3e9d41c656734bde2a847b975855668d9bfbb902324c0b3f91c6bc06111c7a", 4096, 8192),
    ("b129", B129, b"", "4b776ef59d56689eaa5505985dc4d52c6f96ddad41259a070e054018074ae530", 12288, 16384),
    ("b129z", B129, bytes(32), "5d4d1a88697ed022c209b96dd5d50111b8d2c8848ad9bda72b892b33af8b9842", 12288, 16384),
    ("m1", M1, b"", "3403dc42bb9ee8b9e78933c1b3e470aa77c86720f5c1d874c6a8b71a396fe571", 12288, 16384),
    ("m1z", M1, bytes(32), "b235ac78e6d487a9e95b53dad06d5cc122a5289f79e051a9d606d6c58d88c670", 12288, 16384),
    ("z3", Z3, b"", "9dd6d9e9c181361c2e00fc975937f0f30751eca75fe058d888e80a11dc765ffe", 4096, 8192),
    ("z3z", Z3, bytes(32), "1968466989318432697957034c7d8817d539c4c4d9926784cc13f3cf08172c49", 4096, 8192),
    ("b4097", B4097, b"", "42b47791d5e6b7d7eae06885948c5ae1f3de958c35dc41bac3195de1975ebc81", 139264, 143360),
]


@pytest.mark.parametrize(("name", "data", "salt", "root", "nosb_size", "sb_size"), GOLDEN,
                         ids=[g[0] for g in GOLDEN])
@pytest.mark.parametrize("superblock", [False, True], ids=["nosb", "sb"])
def test_golden_root_hashes(tmp_path: Path, name: str, data: bytes, salt: bytes, root: str, nosb_size: int,
                            sb_size: int, superblock: bool) -> None:
    src = tmp_path / name
    src.write_bytes(data)
    info = V.format_verity(src, salt=salt, superblock=superblock, hash_file=tmp_path / "hash")
    assert info.root_hash == root
    assert (tmp_path / "hash").stat().st_size == (sb_size if superblock else nosb_size)
    assert info.data_blocks == len(data) // 4096
    assert src.read_bytes() == data


def test_b2_tree_bytes_spelled_out(tmp_path: Path) -> None:
    """Two data blocks: one hash block with both digests, zero-padded; the root hashes that block."""
    src = tmp_path / "b2"
    src.write_bytes(B2)
    V.format_verity(src, salt=b"", superblock=False, hash_file=tmp_path / "h")
    tree = (tmp_path / "h").read_bytes()
    want = hashlib.sha256(B2[:4096]).digest() + hashlib.sha256(B2[4096:]).digest()
    assert tree == want + bytes(4096 - 64)


def test_top_level_first_and_salt_prefix(tmp_path: Path) -> None:
    src = tmp_path / "d"
    src.write_bytes(B129)
    salt = bytes(range(7))
    info = V.format_verity(src, salt=salt, superblock=False, hash_file=tmp_path / "h")
    tree = (tmp_path / "h").read_bytes()
    leaves = [hashlib.sha256(salt + B129[i:i + 4096]).digest() for i in range(0, len(B129), 4096)]
    level0 = b"".join(leaves).ljust(2 * 4096, b"\0")
    top = (hashlib.sha256(salt + level0[:4096]).digest() + hashlib.sha256(salt + level0[4096:]).digest())
    assert tree == top.ljust(4096, b"\0") + level0
    assert info.root_hash == hashlib.sha256(salt + tree[:4096]).hexdigest()
    assert (info.hash_start_block, info.hash_blocks) == (0, 3)


def test_level_sizes_and_tree_size() -> None:
    assert V.level_sizes(1, 128) == []
    assert V.level_sizes(2, 128) == [1]
    assert V.level_sizes(128, 128) == [1]
    assert V.level_sizes(129, 128) == [2, 1]
    assert V.level_sizes(16384, 128) == [128, 1]
    assert V.level_sizes(16385, 128) == [129, 2, 1]
    assert V.tree_size(131072) == 1033 * 4096          # 512 MiB: 1024 + 8 + 1 hash blocks
    assert V.digests_per_block(4096, 20) == 128         # sha1 rounds down to a power of two
    assert V.digests_per_block(4096, 64) == 64


def test_appended_with_superblock_layout(tmp_path: Path) -> None:
    src = tmp_path / "img"
    src.write_bytes(B129 + b"old tail that gets replaced")
    info = V.format_verity(src, data_blocks=129)
    raw = src.read_bytes()
    assert raw[:len(B129)] == B129
    assert info.hash_offset == len(B129) and info.hash_start_block == 130
    assert info.root_hash == "5d4d1a88697ed022c209b96dd5d50111b8d2c8848ad9bda72b892b33af8b9842"
    sb = raw[len(B129):len(B129) + 4096]
    assert sb[:8] == b"verity\0\0" and sb[512:] == bytes(3584)
    uuid, hash_type, salt, alg, dbs, hbs, blocks = V.parse_superblock(sb)
    assert (hash_type, salt, alg, dbs, hbs, blocks) == (1, bytes(32), "sha256", 4096, 4096, 129)
    assert uuid == info.uuid == V.derived_uuid(bytes.fromhex(info.root_hash))
    assert len(raw) == info.hash_end == (130 + 3) * 4096


def test_appended_requires_whole_blocks(tmp_path: Path) -> None:
    src = tmp_path / "odd"
    src.write_bytes(bytes(4096 * 3 + 100))
    with pytest.raises(InputError, match="whole number"):
        V.format_verity(src, superblock=False)
    # A separate hash file ignores the partial block, as veritysetup does.
    info = V.format_verity(src, superblock=False, hash_file=tmp_path / "h")
    assert info.data_blocks == 3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"salt": bytes(257)}, "at most 256"),
    ({"data_block_size": 3000}, "power of two"),
    ({"algorithm": "nope"}, "unknown hash algorithm"),
    ({"uuid": b"short"}, "16 bytes"),
    ({"data_blocks": 10}, "fewer than"),
])
def test_bad_parameters(tmp_path: Path, kwargs: dict, message: str) -> None:
    src = tmp_path / "d"
    src.write_bytes(B2)
    with pytest.raises(InputError, match=message):
        V.format_verity(src, hash_file=tmp_path / "h", **kwargs)


def test_empty_and_missing_input(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(InputError, match="no whole"):
        V.format_verity(tmp_path / "empty", hash_file=tmp_path / "h")
    with pytest.raises(InputError, match="cannot read"):
        V.format_verity(tmp_path / "missing", hash_file=tmp_path / "h")


def test_dm_table_line() -> None:
    info = V.VerityInfo(root_hash="ab" * 32, salt=bytes(32), data_blocks=81, data_block_size=4096,
                        hash_block_size=4096, hash_offset=81 * 4096, hash_start_block=82, hash_blocks=1,
                        superblock=True, uuid=bytes(16))
    assert info.dm_table("/dev/vda", "/dev/vda") == (
        f"0 648 verity 1 /dev/vda /dev/vda 4096 4096 81 82 sha256 {'ab' * 32} {'00' * 32}")
    assert V.dm_table_line("a", "b", data_blocks=1, hash_start_block=0, root_hash="cd", salt=b"") \
        == "0 8 verity 1 a b 4096 4096 1 0 sha256 cd -"


# --- the guest-side reader ------------------------------------------------------------------------------

def fake_ext4(blocks: int, *, log_block: int = 2, magic: int = 0xEF53, incompat: int = 0,
              blocks_hi: int = 0) -> bytearray:
    """Just enough of an ext4 image for the reader: a superblock with a size, then pattern blocks."""
    size = blocks * (1024 << log_block)
    img = bytearray(random.Random(blocks).randbytes(size))
    img[1024:2048] = bytes(1024)
    struct.pack_into("<I", img, 1024 + 0x4, blocks)
    struct.pack_into("<I", img, 1024 + 0x18, log_block)
    struct.pack_into("<H", img, 1024 + 0x38, magic)
    struct.pack_into("<I", img, 1024 + 0x60, incompat)
    struct.pack_into("<I", img, 1024 + 0x150, blocks_hi)
    return img


def layer_device(tmp_path: Path, blocks: int, **kwargs) -> tuple[Path, V.VerityInfo]:
    dev = tmp_path / "layer.img"
    dev.write_bytes(fake_ext4(blocks))
    return dev, V.format_verity(dev, **kwargs)


@pytest.mark.parametrize("blocks", [1, 2, 129, 300])
def test_read_layout_matches_format(tmp_path: Path, blocks: int) -> None:
    dev, info = layer_device(tmp_path, blocks)
    layout = V.read_verity_layout(V.file_reader(dev))
    assert layout.root_hash == info.root_hash
    assert (layout.data_blocks, layout.hash_start_block, layout.salt) == (blocks, blocks + 1, bytes(32))
    assert layout.device_size == dev.stat().st_size
    assert layout.dm_table("/dev/vdb") == info.dm_table("/dev/vdb", "/dev/vdb")


def _mutated(tmp_path: Path, offset_in_sb: int, data: bytes, blocks: int = 20) -> Path:
    dev, _ = layer_device(tmp_path, blocks)
    raw = bytearray(dev.read_bytes())
    raw[blocks * 4096 + offset_in_sb: blocks * 4096 + offset_in_sb + len(data)] = data
    dev.write_bytes(raw)
    return dev


@pytest.mark.parametrize(("offset", "data", "message"), [
    (0, b"verify\0\0", "bad signature"),
    (8, struct.pack("<I", 2), "superblock version"),
    (12, struct.pack("<I", 0), "hash type 0"),
    (32, b"sha1\0\0", "algorithm 'sha1'"),
    (64, struct.pack("<I", 512), "block sizes"),
    (72, struct.pack("<Q", 19), "covers 19 blocks"),
    (80, struct.pack("<H", 300), "salt size"),
    (84, b"\1", "padding"),
    (88 + 32, b"\1", "padding"),
    (400, b"\1", "padding"),
    (32, b"s" * 32, "NUL-terminated"),
    (32 + 8, b"x", "NUL-terminated"),
])
def test_read_layout_rejects_odd_superblocks(tmp_path: Path, offset: int, data: bytes, message: str) -> None:
    dev = _mutated(tmp_path, offset, data)
    with pytest.raises(V.VerityLayoutError, match=message):
        V.read_verity_layout(V.file_reader(dev))


def test_read_layout_rejects_bad_ext4_and_truncation(tmp_path: Path) -> None:
    dev = tmp_path / "d"
    dev.write_bytes(fake_ext4(4, magic=0x1234))
    with pytest.raises(V.VerityLayoutError, match="no ext4 superblock"):
        V.read_verity_layout(V.file_reader(dev))
    dev.write_bytes(fake_ext4(4))        # no verity data after the filesystem
    with pytest.raises(V.VerityLayoutError, match="device too short"):
        V.read_verity_layout(V.file_reader(dev))
    dev, _ = layer_device(tmp_path, 300)
    raw = dev.read_bytes()
    dev.write_bytes(raw[:-1])            # the last tree block is cut short
    with pytest.raises(V.VerityLayoutError, match="end of the dm-verity tree"):
        V.read_verity_layout(V.file_reader(dev))
    dev.write_bytes(fake_ext4(8, log_block=0))   # 1 KiB blocks: 8 KiB, fine size-wise, but
    with pytest.raises(V.VerityLayoutError):     # no superblock follows
        V.read_verity_layout(V.file_reader(dev))


def test_read_layout_never_trusts_the_stored_tree(tmp_path: Path) -> None:
    """Editing the data changes nothing the reader reports; editing the top block changes the root."""
    dev, info = layer_device(tmp_path, 200)
    raw = bytearray(dev.read_bytes())
    raw[(200 + 1) * 4096 + 5] ^= 1
    dev.write_bytes(raw)
    assert V.read_verity_layout(V.file_reader(dev)).root_hash != info.root_hash


def test_64bit_block_count(tmp_path: Path) -> None:
    img = fake_ext4(4, incompat=0x80, blocks_hi=1)
    dev = tmp_path / "d"
    dev.write_bytes(img)
    with pytest.raises(V.VerityLayoutError, match="device too short"):   # 2^32 + 4 blocks claimed
        V.read_verity_layout(V.file_reader(dev))


@pytest.mark.parametrize(("blocks", "cpus"), [(2, 2), (3, 3), (129, 2), (1000, 3), (16385, 2), (16385, 5)])
def test_several_processes_write_the_same_tree(tmp_path: Path, blocks: int, cpus: int) -> None:
    """Past PARALLEL_MIN forked children hash stretches of the first level, one process per CPU; the tree
    must not show it.

    Run in a fresh interpreter: threads that other tests left in this one would (rightly) prevent the fork.
    """
    data = tmp_path / "data"
    with open(data, "wb") as f:
        f.write(random.Random(blocks).randbytes(blocks * V.BLOCK_SIZE))
    serial = V.format_verity(data, superblock=True, hash_file=tmp_path / "serial")
    code = ("import os, sys; from pathlib import Path; from sandbox.shared import verity as V\n"
            "V.PARALLEL_MIN = V.BLOCK_SIZE\n"
            f"os.sched_getaffinity = lambda pid: set(range({cpus}))\n"
            "forks = []; real_fork = os.fork; os.fork = lambda: forks.append(1) or real_fork()\n"
            "info = V.format_verity(Path(sys.argv[1]), superblock=True, hash_file=Path(sys.argv[2]))\n"
            "print(len(forks), info.root_hash)\n")
    out = subprocess.run([sys.executable, "-c", code, str(data), str(tmp_path / "parallel")], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.split() == [str(min(cpus, blocks) - 1), serial.root_hash]
    assert (tmp_path / "parallel").read_bytes() == (tmp_path / "serial").read_bytes()


def test_no_fork_while_other_threads_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    data = tmp_path / "data"
    data.write_bytes(bytes(64 * V.BLOCK_SIZE))
    monkeypatch.setattr(V, "PARALLEL_MIN", V.BLOCK_SIZE)
    monkeypatch.setattr(V.os, "fork", lambda: pytest.fail("forked with another thread running"))
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        info = V.format_verity(data, superblock=False, hash_file=tmp_path / "tree")
    finally:
        release.set()
        other.join()
    assert info.data_blocks == 64
