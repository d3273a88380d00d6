"""Bad layers: a clear InputError naming the layer and the entry, and no output file left behind."""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import pytest

from sandbox.layers.convert import DiffIdMismatch, convert_layer
from sandbox.layers.decompress import CorruptLayer
from sandbox.layers.tar2ext4 import LayerEntryError
from sandbox.layers.tarstream import TarError
from sandbox.shared.errors import InputError
from tests.layertars import Layer


def fails(tmp_path: Path, data: bytes, error: type[InputError], *needles: str) -> InputError:
    src = tmp_path / "bad.tar"
    src.write_bytes(data)
    out = tmp_path / "out" / "bad.img"
    with pytest.raises(error) as exc:
        convert_layer(src, out, name="layer sha256:feed")
    message = exc.value.message
    assert message.startswith("layer sha256:feed: "), message
    for needle in needles:
        assert needle in f"{message}\n{exc.value.hint}", message
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == [] if out.parent.exists() else True
    return exc.value


def good_tar() -> bytes:
    return Layer().add("a", tarfile.DIRTYPE).add("a/file", data=b"x" * 3000).add("b", data=b"y").tar_bytes()


def test_truncated_tar(tmp_path: Path) -> None:
    raw = good_tar()    # headers at 0 (a/), 512 (a/file, data 1024..4024), 4096 (b, data 4608..4609)
    fails(tmp_path, raw[:1500], TarError, "truncated", "'a/file'")     # inside a file's data
    fails(tmp_path, raw[:4096 + 300], TarError, "truncated", "header")  # inside a header
    fails(tmp_path, raw[:5120], TarError, "without an end-of-archive marker")


def test_empty_file_is_not_a_layer(tmp_path: Path) -> None:
    fails(tmp_path, b"", TarError, "empty")


def test_corrupt_header(tmp_path: Path) -> None:
    raw = bytearray(good_tar())
    raw[10] ^= 0x20                                 # inside the first header's name
    err = fails(tmp_path, bytes(raw), TarError, "checksum", "byte 0")
    assert err.hint


def test_not_a_tar(tmp_path: Path) -> None:
    fails(tmp_path, b"hello world\n" * 100, TarError, "checksum")


def test_other_compression_is_named(tmp_path: Path) -> None:
    fails(tmp_path, b"\xfd7zXZ\x00" + bytes(100), InputError, "xz")


def test_truncated_and_corrupt_gzip(tmp_path: Path) -> None:
    gz = gzip.compress(good_tar())
    fails(tmp_path, gz[:len(gz) // 2], CorruptLayer, "gzip", "truncated")
    broken = bytearray(gz)
    broken[len(gz) // 2] ^= 0xFF
    fails(tmp_path, bytes(broken), CorruptLayer, "gzip")
    fails(tmp_path, gz + b"garbage", CorruptLayer, "after the gzip stream")
    out = tmp_path / "ok.img"
    (tmp_path / "padded.tar.gz").write_bytes(gz + bytes(4096))          # zero padding is fine
    convert_layer(tmp_path / "padded.tar.gz", out)


@pytest.mark.parametrize(("name", "needle"), [
    ("../escape", "'..'"),
    ("a/../../x", "'..'"),
    ("/etc/passwd", "absolute"),
])
def test_path_traversal(tmp_path: Path, name: str, needle: str) -> None:
    fails(tmp_path, Layer().add(name, data=b"x").tar_bytes(), LayerEntryError, needle, "path traversal")


def test_traversal_through_a_symlink(tmp_path: Path) -> None:
    raw = Layer().add("etc", tarfile.SYMTYPE, link="/host/etc").add("etc/passwd", data=b"x").tar_bytes()
    fails(tmp_path, raw, LayerEntryError, "symlink 'etc'", "'etc/passwd'")
    raw = Layer().add("lnk", tarfile.SYMTYPE, link="/").add("h", tarfile.LNKTYPE, link="lnk/etc/shadow").tar_bytes()
    fails(tmp_path, raw, LayerEntryError, "symlink 'lnk'")
    raw = Layer().add("f", data=b"").add("f/x", data=b"").tar_bytes()
    fails(tmp_path, raw, LayerEntryError, "not a directory")


def test_hardlink_problems(tmp_path: Path) -> None:
    fails(tmp_path, Layer().add("h", tarfile.LNKTYPE, link="missing").tar_bytes(), LayerEntryError,
          "'missing'", "not in the layer", "entry 'h'")
    fails(tmp_path, Layer().add("d", tarfile.DIRTYPE).add("h", tarfile.LNKTYPE, link="d").tar_bytes(),
          LayerEntryError, "directory")
    fails(tmp_path, Layer().add("h", tarfile.LNKTYPE, link="../x").tar_bytes(), LayerEntryError, "'..'")


def test_name_too_long(tmp_path: Path) -> None:
    fails(tmp_path, Layer().add("d/" + "n" * 256, data=b"").tar_bytes(), LayerEntryError, "256 bytes", "255")


def test_unsupported_entry_type(tmp_path: Path) -> None:
    lay = Layer().add("vol", tarfile.CONTTYPE, data=b"")
    lay.members[0].info.type = b"M"                 # a GNU multi-volume continuation
    fails(tmp_path, lay.tar_bytes(), TarError, "'vol'", "unsupported type 'M'")


def test_symlink_target_too_long(tmp_path: Path) -> None:
    fails(tmp_path, Layer().add("s", tarfile.SYMTYPE, link="x" * 4096).tar_bytes(), LayerEntryError, "4096")


def test_device_number_out_of_range(tmp_path: Path) -> None:
    fails(tmp_path, Layer().add("c", tarfile.CHRTYPE, dev=(5000, 1)).tar_bytes(), LayerEntryError, "5000:1")


def test_xattr_too_large(tmp_path: Path) -> None:
    raw = Layer().add("f", data=b"", xattrs={"user.big": "v" * 5000}).tar_bytes()
    fails(tmp_path, raw, LayerEntryError, "user.big", "does not fit")


def test_diff_id_mismatch(tmp_path: Path) -> None:
    src = tmp_path / "l.tar"
    src.write_bytes(good_tar())
    with pytest.raises(DiffIdMismatch, match="not the expected sha256:0000"):
        convert_layer(src, tmp_path / "l.img", expected_diff_id="sha256:" + "0" * 64)
    assert not (tmp_path / "l.img").exists()


def test_corrupt_pax_record(tmp_path: Path) -> None:
    raw = bytearray(Layer().add("f", data=b"x", pax={"comment": "hello"}).tar_bytes())
    pos = raw.index(b"comment=hello")
    raw[pos - 3:pos - 1] = b"99"                    # the record length now overruns the header
    # Fix the header checksum so that the pax record, not the header, is what is wrong.
    raw[0:512] = _rechecksum(bytes(raw[0:512]))
    fails(tmp_path, bytes(raw), TarError, "pax header")


def _rechecksum(header: bytes) -> bytes:
    blanked = header[:148] + b" " * 8 + header[156:]
    return header[:148] + f"{sum(blanked):06o}\0 ".encode() + header[156:]


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        convert_layer(tmp_path / "nope.tar", tmp_path / "x.img")
