"""Pulling from a real registry (Debian's docker-registry on 127.0.0.1), images pushed with skopeo."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from sandbox.cli.main import cli
from sandbox.images.resolve import pull_image, resolve_image
from sandbox.shared.errors import NetworkError, NotFoundError
from tests.imagefixtures import oci_image
from tests.registry import PASSWORD, USER, Registry, free_port, serve

ALL = ("linux/amd64", "linux/arm64/v8")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from serve(tmp_path_factory, token_auth=False)


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from serve(tmp_path_factory, token_auth=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    oci_image(root / "mixed", compressions=("gzip", "none", "zstd"))
    oci_image(root / "multi", platforms=ALL)
    oci_image(root / "gz", compressions=("gzip", "gzip", "gzip"))
    return root


def test_mixed_compressions(registry: Registry, images: Path, isolated_dirs: Path) -> None:
    ref = registry.push(f"oci:{images / 'mixed'}:latest", "mixed:1")
    remote = resolve_image(ref, base_dir=images)
    local = resolve_image("oci:mixed", base_dir=images)
    assert remote.layer_hashes == local.layer_hashes
    assert [layer.media_type.rsplit(".", 1)[-1] for layer in remote.layers] == ["tar+gzip", "tar", "tar+zstd"]
    assert remote.config == local.config
    # A second pull converts nothing and downloads no layer.
    blobs = isolated_dirs / "cache" / "blobs" / "sha256"
    before = sorted(p.name for p in blobs.iterdir())
    again = pull_image(ref, base_dir=images)
    assert again.converted == 0 and sorted(p.name for p in blobs.iterdir()) == before


def test_multi_platform_index(registry: Registry, images: Path, isolated_dirs: Path) -> None:
    ref = registry.push(f"oci:{images / 'multi'}:latest", "multi:latest", all_platforms=True)
    amd = resolve_image(ref, base_dir=images)
    arm = resolve_image(ref, base_dir=images, platform="linux/arm64/v8")
    assert amd.layer_hashes[:3] == arm.layer_hashes[:3] and amd.layer_hashes[3] != arm.layer_hashes[3]
    assert amd.layer_hashes == resolve_image("oci:multi", base_dir=images).layer_hashes
    pinned = resolve_image(f"{registry.host}/multi@{amd.digest}", base_dir=images)
    assert pinned.layer_hashes == amd.layer_hashes


def test_docker_schema2_and_manifest_list(registry: Registry, images: Path, isolated_dirs: Path) -> None:
    ref = registry.push(f"oci:{images / 'gz'}:latest", "docker-v2:1", docker_format=True)
    img = resolve_image(ref, base_dir=images)
    assert {layer.media_type for layer in img.layers} == {"application/vnd.docker.image.rootfs.diff.tar.gzip"}
    assert img.layer_hashes == resolve_image("oci:gz", base_dir=images).layer_hashes
    ref = registry.push(f"oci:{images / 'multi'}:latest", "docker-list:1", all_platforms=True, docker_format=True)
    arm = resolve_image(ref, base_dir=images, platform="linux/arm64")
    assert arm.layer_hashes == resolve_image("oci:multi", base_dir=images, platform="linux/arm64").layer_hashes


def test_token_auth_with_docker_config(token_registry: Registry, images: Path, isolated_dirs: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ref = token_registry.push(f"oci:{images / 'gz'}:latest", "private/app:1")
    monkeypatch.setenv("DOCKER_CONFIG", str(isolated_dirs / "docker"))
    with pytest.raises(NetworkError, match="requires a login") as exc:
        resolve_image(ref, base_dir=images)
    assert "docker login" in exc.value.hint
    (isolated_dirs / "docker").mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (isolated_dirs / "docker" / "config.json").write_text(json.dumps({"auths": {token_registry.host: {"auth": auth}}}))
    token_registry.token.requests.clear()
    img = resolve_image(ref, base_dir=images)
    assert img.layer_hashes == resolve_image("oci:gz", base_dir=images).layer_hashes
    seen = token_registry.token.requests
    assert seen and all(r["user"] == USER and r["scope"] == "repository:private/app:pull" for r in seen)
    wrong = base64.b64encode(f"{USER}:nope".encode()).decode()
    (isolated_dirs / "docker" / "config.json").write_text(json.dumps({"auths": {token_registry.host: {"auth": wrong}}}))
    with pytest.raises(NetworkError, match="refused our credentials"):
        resolve_image(f"{token_registry.host}/private/app:1", base_dir=images)


def test_not_found_and_unreachable(registry: Registry, images: Path, isolated_dirs: Path) -> None:
    registry.push(f"oci:{images / 'gz'}:latest", "exists:1")
    with pytest.raises(NotFoundError, match="not found in registry"):
        resolve_image(f"{registry.host}/exists:2", base_dir=images)
    with pytest.raises(NotFoundError):
        resolve_image(f"{registry.host}/nothing-here:1", base_dir=images)
    port = free_port()
    with pytest.raises(NetworkError, match="unreachable"):
        pull_image(f"127.0.0.1:{port}/x:1", base_dir=images)


def test_cli_pull_and_layers(registry: Registry, images: Path, isolated_dirs: Path) -> None:
    ref = registry.push(f"oci:{images / 'gz'}:latest", "cli:1")
    runner = CliRunner()
    res = runner.invoke(cli, ["--progress", "quiet", "image", "pull", ref, "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["converted"] == 3 and len(doc["layers"]) == 3
    res = runner.invoke(cli, ["--progress", "quiet", "image", "layers", ref, "--format", "json"])
    layers = json.loads(res.stdout)
    assert [layer["root_hash"] for layer in layers] == [layer["root_hash"] for layer in doc["layers"]]
    assert all(Path(layer["device_path"]).is_file() for layer in layers)
