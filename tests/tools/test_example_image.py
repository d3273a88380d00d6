"""The example busybox image: built from Debian's busybox-static, deterministic, Docker-busybox layout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sandbox.images.resolve import resolve_image
from sandbox.shared.errors import ToolError
from tests.ext4read import Ext4Image, walk

RECIPE = Path(__file__).resolve().parents[2] / "images" / "examples" / "busybox.py"


def recipe():  # the recipe module
    spec = importlib.util.spec_from_file_location("busybox_recipe", RECIPE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_busybox_image_is_deterministic_and_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built twice (the .deb comes from the shared download cache, as for `make example-images`)."""
    bb = recipe()
    try:
        first = bb.build(tmp_path / "a")
    except ToolError as e:
        pytest.skip(f"cannot fetch busybox-static here: {e.message}")
    second = bb.build(tmp_path / "b")
    assert first == second
    assert sorted(p.name for p in (tmp_path / "a" / "blobs" / "sha256").iterdir()) == \
        sorted(p.name for p in (tmp_path / "b" / "blobs" / "sha256").iterdir())
    monkeypatch.setenv("PARMA_SANDBOX_CACHE", str(tmp_path / "cache"))
    image = resolve_image("oci:a:latest", base_dir=tmp_path)
    assert image.config.cmd == ("/bin/sh",) and len(image.layers) == 1
    img = Ext4Image(image.layers[0].device_path)
    tree = walk(img)
    for applet in ("sh", "httpd", "echo", "cat", "wget", "head"):
        assert tree[f"bin/{applet}".encode()].target == b"/bin/busybox"
    assert tree[b"bin/busybox"].perm == 0o755 and tree[b"bin/busybox"].size > 1_000_000
    assert b"nobody:x:65534:65534:" in img.read_content(img.inode(tree[b"etc/passwd"].ino))
    assert b"nobody:x:65534:" in img.read_content(img.inode(tree[b"etc/group"].ino))
    assert tree[b"tmp"].perm == 0o1777 and tree[b"root"].perm == 0o700
    assert all(item.uid == 0 and item.gid == 0 and item.mtime == 0 for item in tree.values())
