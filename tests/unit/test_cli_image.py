"""`parma-sandbox verity` and `parma-sandbox image ...`: results on stdout, exit codes, clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.cli.main import main
from sandbox.shared.verity import file_reader, read_verity_layout
from tests.imagefixtures import oci_image
from tests.layertars import edge_case_layer


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["--progress", "quiet", *args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_verity_appended_and_separate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.write_bytes(bytes(range(256)) * 16 * 300)          # 300 blocks
    code, out, _ = cli(capsys, "verity", str(data), "--no-superblock", "--salt", "-", "--hash-file",
                       str(tmp_path / "h"), "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["data_blocks"] == 300 and doc["salt"] == "" and doc["hash_start_block"] == 0
    assert (tmp_path / "h").stat().st_size == doc["hash_blocks"] * 4096
    code, out, _ = cli(capsys, "--format", "json", "verity", str(data), "--salt", "ab" * 32)
    doc = json.loads(out)
    assert code == 0 and doc["superblock"] and doc["hash_offset"] == 300 * 4096 and doc["hash_start_block"] == 301
    assert data.stat().st_size == (301 + doc["hash_blocks"]) * 4096


def test_verity_bad_input_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "odd"
    data.write_bytes(b"x" * 5000)
    code, out, err = cli(capsys, "verity", str(data))
    assert code == 2 and out == "" and "whole number" in err and "Traceback" not in err
    assert data.stat().st_size == 5000                        # left as it was
    code, _, err = cli(capsys, "verity", str(data), "--salt", "zz", "--hash-file", str(tmp_path / "h"))
    assert code == 2 and "--salt 'zz' is not hexadecimal" in err
    assert not (tmp_path / "h").exists()


def test_image_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = edge_case_layer().write(tmp_path / "l.tar")
    code, out, _ = cli(capsys, "image", "convert", str(src), "-o", str(tmp_path / "l.img"))
    assert code == 0
    assert out.strip() == read_verity_layout(file_reader(tmp_path / "l.img")).root_hash
    code, out, _ = cli(capsys, "image", "convert", str(src), "-o", str(tmp_path / "l.ext4"), "--no-verity",
                       "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["ext4_size"] == (tmp_path / "l.ext4").stat().st_size and doc["entries"] > 40


def test_image_convert_bad_layer_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(edge_case_layer().tar_bytes()[:3000])
    code, out, err = cli(capsys, "image", "convert", str(bad), "-o", str(tmp_path / "x.img"))
    assert code == 2 and out == ""
    assert err.startswith(f"error: layer {bad}: tar stream ends inside") and "hint:" in err
    assert not (tmp_path / "x.img").exists()


def test_image_layers_and_pull_local(tmp_path: Path, isolated_dirs: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    oci_image(tmp_path / "img")
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(capsys, "image", "pull", "oci:img")
    assert code == 0 and "3 layer(s): 3 converted, 0 cached" in out
    code, out, _ = cli(capsys, "image", "layers", "oci:img", "--format", "json")
    layers = json.loads(out)
    assert code == 0 and len(layers) == 3 and all(len(x["root_hash"]) == 64 for x in layers)
    code, out, _ = cli(capsys, "image", "layers", "oci:img")
    assert out.splitlines()[0].split()[:3] == ["DIFF_ID", "MEDIA", "TYPE"]
    code, _, err = cli(capsys, "image", "pull", "oci:img:nope")
    assert code == 2 and "no image tagged 'nope'" in err
    code, _, err = cli(capsys, "image", "pull", "UPPER/case")
    assert code == 2 and "invalid image reference" in err
