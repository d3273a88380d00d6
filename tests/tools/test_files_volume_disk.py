"""A files volume becomes a cached ext4 + dm-verity disk whose root hash veritysetup agrees with."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sandbox.layers.volumes import build_files_volume
from sandbox.run import run
from sandbox.shared.verity import file_reader, read_verity_layout

pytestmark = pytest.mark.skipif(shutil.which("veritysetup") is None, reason="veritysetup is not installed")


def package_files_volume(source: Path) -> tuple[str, Path]:
    volume = build_files_volume(source)
    return volume.root_hash, volume.image


def test_files_volume_is_a_verity_disk_cached_by_content(tmp_path: Path, isolated_dirs: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("<h1>hello from parma-sandbox</h1>\n")
    root_hash, image = package_files_volume(www)
    layout = read_verity_layout(file_reader(image))
    assert layout.root_hash == root_hash
    run(["veritysetup", "verify", "--hash-offset", str(layout.data_size), str(image), str(image), root_hash])
    assert run(["debugfs", "-R", "cat /index.html", str(image)]).stdout == b"<h1>hello from parma-sandbox</h1>\n"
    # Same content again: the cached disk, not a new conversion.
    mtime = image.stat().st_mtime_ns
    assert package_files_volume(www) == (root_hash, image)
    assert image.stat().st_mtime_ns == mtime
    (www / "index.html").write_text("changed\n")
    other_hash, other = package_files_volume(www)
    assert other_hash != root_hash and other != image
