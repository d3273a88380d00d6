"""A files volume is archived reproducibly: same content, same bytes, whatever the mtimes and owners."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from sandbox.launch.volumes import directory_tar
from sandbox.shared.errors import InputError


def make(root: Path, mtime: int) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<h1>hello</h1>\n")
    (root / "sub" / "b.txt").write_text("b")
    (root / "link").symlink_to("index.html")
    for p in (root / "index.html", root / "sub" / "b.txt", root / "sub"):
        os.utime(p, (mtime, mtime))


def test_directory_tar_is_reproducible(tmp_path: Path) -> None:
    make(tmp_path / "a", 1000)
    make(tmp_path / "b", 2000000)
    data = directory_tar(tmp_path / "a")
    assert data == directory_tar(tmp_path / "b")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["sub", "index.html", "link", "sub/b.txt"]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
        assert tar.getmember("link").linkname == "index.html"
        assert tar.extractfile("index.html").read() == b"<h1>hello</h1>\n"


def test_special_files_are_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InputError, match="only files, directories and symlinks"):
        directory_tar(tmp_path)
