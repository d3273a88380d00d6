"""`--compat aci` on the large recorded layers, and what e2fsck says about its images.

The Debian minbase tar cannot be rebuilt without the network: scripts/aci-reference-minbase.sh
stores it in the cache under its SHA-256, or PARMA_SANDBOX_ACI_MINBASE names a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from acilayers import GENERATED

from sandbox.aci.ext4compat import convert_layer_aci, convert_tar_to_ext4_aci
from sandbox.layers.convert import convert_tar_to_ext4
from sandbox.paths import cache_dir

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "data" / "aci-layer-hashes.json").read_text())
RECORDED = {layer["name"]: layer for layer in VECTORS["layers"]}


def test_big_file_layer(tmp_path: Path) -> None:
    src = tmp_path / "big.tar"
    src.write_bytes(GENERATED["big-file"]())
    assert hashlib.sha256(src.read_bytes()).hexdigest() == RECORDED["big-file"]["tar_sha256"]
    assert convert_layer_aci(src, tmp_path / "big.img").root_hash == RECORDED["big-file"]["root_hash"]


def minbase_tar() -> Path | None:
    want = RECORDED["debian-minbase"]["tar_sha256"]
    candidates = [Path(p) for p in [os.environ.get("PARMA_SANDBOX_ACI_MINBASE")] if p]
    candidates.append(cache_dir() / "aci-reference-layers" / f"{want}.tar")
    return next((p for p in candidates if p.is_file()), None)


def test_debian_minbase_layer(tmp_path: Path) -> None:
    src = minbase_tar()
    if src is None:
        pytest.skip("the Debian minbase tar is not here: run scripts/aci-reference-minbase.sh (needs the Debian "
                    "mirror) or set PARMA_SANDBOX_ACI_MINBASE")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    if digest != RECORDED["debian-minbase"]["tar_sha256"]:
        pytest.skip(f"{src} has SHA-256 {digest}, not the recorded tar's (bookworm's packages changed)")
    assert convert_layer_aci(src, tmp_path / "minbase.img").root_hash == RECORDED["debian-minbase"]["root_hash"]


@pytest.mark.skipif(shutil.which("e2fsck") is None, reason="e2fsck is not installed")
def test_e2fsck_flags_only_tar2ext4s_bitmap_padding(tmp_path: Path) -> None:
    src = tmp_path / "basic.tar"
    src.write_bytes(GENERATED["whiteouts"]())
    convert_tar_to_ext4_aci(src, tmp_path / "aci.ext4")
    convert_tar_to_ext4(src, tmp_path / "default.ext4")
    aci = subprocess.run(["e2fsck", "-fn", str(tmp_path / "aci.ext4")], capture_output=True, text=True)
    default = subprocess.run(["e2fsck", "-fn", str(tmp_path / "default.ext4")], capture_output=True, text=True)
    assert default.returncode == 0, default.stdout
    assert aci.returncode != 0 and "Padding at end of inode bitmap is not set" in aci.stdout
    problems = [line for line in aci.stdout.splitlines()
                if line and not line.startswith(("Pass ", "e2fsck", "Padding at end of inode bitmap",
                                                 "Fix? no", "/", "\n"))]
    assert problems == [], aci.stdout
