"""`files` volumes: a directory becomes a deterministic read-only device, the same one `up` packages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.group import validate_group
from sandbox.layers.volumes import build_files_volume
from sandbox.policy.sources import package_files_volumes
from sandbox.shared.errors import InputError
from tests.ext4read import Ext4Image, walk


def sample(root: Path) -> Path:
    (root / "www" / "css").mkdir(parents=True)
    (root / "www" / "index.html").write_text("<h1>hello</h1>\n")
    (root / "www" / "css" / "site.css").write_text("body {}\n")
    (root / "www" / "run.sh").write_text("#!/bin/sh\n")
    (root / "www" / "run.sh").chmod(0o755)
    os.symlink("index.html", root / "www" / "home.html")
    return root / "www"


def test_files_volume_content_and_determinism(tmp_path: Path, isolated_dirs: Path) -> None:
    src = sample(tmp_path)
    vol = build_files_volume(src)
    tree = walk(Ext4Image(vol.image))
    assert tree[b"index.html"].size == 15 and tree[b"run.sh"].perm == 0o755
    assert tree[b"home.html"].target == b"index.html" and tree[b"css/site.css"].type == "file"
    assert all(item.uid == 0 and item.mtime == 0 for item in tree.values())
    os.utime(src / "index.html", (1, 1))             # times and owners do not matter, content does
    assert build_files_volume(src).root_hash == vol.root_hash
    (src / "index.html").write_text("<h1>changed</h1>\n")
    assert build_files_volume(src).root_hash != vol.root_hash


def test_same_hash_as_up_packaging(tmp_path: Path, isolated_dirs: Path) -> None:
    src = sample(tmp_path)
    spec = validate_group({"name": "g", "volumes": [{"name": "www", "files": {"path": "www"}}],
                           "containers": [{"name": "c", "image": "busybox"}]}, base_dir=tmp_path)
    vol = build_files_volume(src)
    assert package_files_volumes(spec) == {"www": (vol.root_hash, vol.image)}


def test_files_volume_rejects_special_files(tmp_path: Path, isolated_dirs: Path) -> None:
    src = sample(tmp_path)
    os.mkfifo(src / "pipe")
    with pytest.raises(InputError, match="only files, directories and symlinks"):
        build_files_volume(src)
    with pytest.raises(InputError, match="not a directory"):
        build_files_volume(tmp_path / "missing")
