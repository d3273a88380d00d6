"""Our dm-verity trees against `veritysetup format` itself: root hashes and every byte of the hash area.

20 data sizes (1 block up to 256 MiB + 1 block) x superblock on/off x zero/random salt x tree appended to the
data or in a separate file. Data files are sparse with a pattern written into a few blocks, so that the large
ones cost no disk and little time; the small sizes get the full 8-way matrix, the 8 large ones one combination each.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import uuid as uuidlib
from pathlib import Path

import pytest

from sandbox.run import find_tool, run
from sandbox.shared.verity import format_verity, read_verity_layout

SIZES = [1, 2, 3, 127, 128, 129, 130, 255, 256, 257, 1000, 4096, 16383, 16384, 16385, 16513, 20000, 32769,
         65536, 65537]
LARGE = 16383
COMBOS = list(itertools.product([True, False], ["zero", "random"], ["appended", "separate"]))


def cases() -> list[tuple[int, bool, str, str]]:
    out = []
    for i, blocks in enumerate(SIZES):
        if blocks < LARGE:
            out += [(blocks, *c) for c in COMBOS]
        else:
            out.append((blocks, *COMBOS[i % len(COMBOS)]))
    return out


CASES = cases()


def test_matrix_covers_every_option_on_large_sizes() -> None:
    assert len(SIZES) >= 20 and max(SIZES) * 4096 >= 256 << 20
    assert {c[1:] for c in CASES if c[0] >= LARGE} == set(COMBOS)


@pytest.fixture(scope="module")
def veritysetup() -> Path:
    return find_tool("veritysetup")


def make_data(path: Path, blocks: int, seed: int) -> None:
    """A sparse file of `blocks` blocks with random bytes in the first, last and a few middle blocks."""
    r = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(blocks * 4096)
        for b in {0, blocks - 1, blocks // 2, blocks // 3, r.randrange(blocks)}:
            f.seek(b * 4096 + r.randrange(4000))
            f.write(r.randbytes(96))


def reference(veritysetup: Path, data: Path, hash_dev: Path, *, blocks: int, superblock: bool, salt: bytes,
              uuid: uuidlib.UUID, appended: bool) -> str:
    argv = [veritysetup, "format", f"--salt={salt.hex()}", f"--data-blocks={blocks}"]
    argv += [f"--uuid={uuid}"] if superblock else ["--no-superblock"]
    if appended:
        argv.append(f"--hash-offset={blocks * 4096}")
    proc = run([*argv, data, hash_dev])
    m = re.search(rb"Root hash:\s+([0-9a-f]+)", proc.stdout)
    assert m, proc.stdout
    return m.group(1).decode()


@pytest.mark.parametrize(("blocks", "superblock", "salt_kind", "placement"), CASES,
                         ids=[f"{b}-{'sb' if s else 'nosb'}-{k}-{p}" for b, s, k, p in CASES])
def test_same_bytes_as_veritysetup(tmp_path: Path, veritysetup: Path, blocks: int, superblock: bool,
                                   salt_kind: str, placement: str) -> None:
    seed = blocks * 31 + superblock * 7 + len(salt_kind) + len(placement)
    r = random.Random(seed)
    salt = bytes(32) if salt_kind == "zero" else r.randbytes(r.choice([32, 17, 64]))
    uuid = uuidlib.UUID(bytes=r.randbytes(16))
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    make_data(ours, blocks, seed)
    make_data(theirs, blocks, seed)
    appended = placement == "appended"
    if appended:
        info = format_verity(ours, salt=salt, superblock=superblock, uuid=uuid.bytes)
        root = reference(veritysetup, theirs, theirs, blocks=blocks, superblock=superblock, salt=salt, uuid=uuid,
                         appended=True)
        ours_hash, theirs_hash = ours, theirs
    else:
        ours_hash, theirs_hash = tmp_path / "ours.hash", tmp_path / "theirs.hash"
        info = format_verity(ours, salt=salt, superblock=superblock, uuid=uuid.bytes, hash_file=ours_hash)
        root = reference(veritysetup, theirs, theirs_hash, blocks=blocks, superblock=superblock, salt=salt,
                         uuid=uuid, appended=False)
    assert info.root_hash == root
    assert ours_hash.stat().st_size == theirs_hash.stat().st_size
    assert files_equal(ours_hash, theirs_hash)


def files_equal(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def test_veritysetup_verifies_our_appended_tree(tmp_path: Path, veritysetup: Path) -> None:
    """The reverse direction: veritysetup reads our superblock and checks our tree against the data."""
    img = tmp_path / "img"
    make_data(img, 300, 1)
    info = format_verity(img, superblock=True)
    run([veritysetup, "verify", f"--hash-offset={info.hash_offset}", img, img, info.root_hash])
    raw = bytearray(img.read_bytes())
    raw[4096 * 150] ^= 0xFF
    img.write_bytes(raw)
    proc = run([veritysetup, "verify", f"--hash-offset={info.hash_offset}", img, img, info.root_hash],
               check=False)
    assert proc.returncode != 0


def test_guest_reader_on_a_veritysetup_image(tmp_path: Path, veritysetup: Path) -> None:
    """read_verity_layout derives veritysetup's root hash from a real ext4 + veritysetup-formatted device."""
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    run(["mkfs.ext4", "-q", "-b", "4096", "-O", "^has_journal", "-E", "root_owner=0:0", img])
    blocks = img.stat().st_size // 4096
    root = reference(veritysetup, img, img, blocks=blocks, superblock=True, salt=bytes(32),
                     uuid=uuidlib.UUID(int=1), appended=True)

    def read_at(offset: int, size: int) -> bytes:
        with open(img, "rb") as f:
            return os.pread(f.fileno(), size, offset)

    layout = read_verity_layout(read_at)
    assert layout.root_hash == root and layout.data_blocks == blocks
