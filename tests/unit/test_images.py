"""Image references, manifests and resolution from local sources (OCI layouts, docker-archive)."""

from __future__ import annotations

import io
import json
import multiprocessing
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox.images.manifest import ManifestError, parse_config, parse_manifest, parse_platform
from sandbox.images.reference import Transport, parse_reference
from sandbox.images.resolve import pull_image, resolve_image
from sandbox.images.store import DigestMismatch, LayerCache
from sandbox.layers.convert import DiffIdMismatch
from sandbox.shared.errors import InputError, NotFoundError
from sandbox.shared.verity import file_reader, read_verity_layout
from tests.ext4read import Ext4Image, walk
from tests.imagefixtures import docker_archive, oci_image


@pytest.mark.parametrize(("text", "domain", "path", "tag", "digest"), [
    ("busybox", "docker.io", "library/busybox", "latest", None),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("user/app", "docker.io", "user/app", "latest", None),
    ("docker://ghcr.io/org/app:v1", "ghcr.io", "org/app", "v1", None),
    ("localhost:5000/a/b/c", "localhost:5000", "a/b/c", "latest", None),
    ("127.0.0.1:5000/x:t", "127.0.0.1:5000", "x", "t", None),
    ("mcr.microsoft.com/a@sha256:" + "a" * 64, "mcr.microsoft.com", "a", None, "sha256:" + "a" * 64),
    ("r.io/a:t@sha256:" + "b" * 64, "r.io", "a", "t", "sha256:" + "b" * 64),
])
def test_registry_references(text: str, domain: str, path: str, tag: str | None, digest: str | None) -> None:
    ref = parse_reference(text)
    assert (ref.transport, ref.domain, ref.path, ref.tag, ref.digest) == (Transport.registry, domain, path, tag,
                                                                          digest)
    assert ref.reference == (digest or tag)
    assert ref.api_host == ("registry-1.docker.io" if domain == "docker.io" else domain)


@pytest.mark.parametrize("text", ["", "Busybox", "a b", "x@sha256:12", "a:b:c", "-a", "a//b", "x:" + "t" * 200])
def test_bad_references(text: str) -> None:
    with pytest.raises(InputError):
        parse_reference(text)


def test_local_references(tmp_path: Path) -> None:
    ref = parse_reference("oci:../../build/images/busybox:latest", base_dir=tmp_path / "a" / "b")
    assert ref.transport == Transport.oci and ref.tag == "latest"
    assert ref.location == (tmp_path / "build" / "images" / "busybox").resolve()
    assert parse_reference("oci:/abs/dir").tag is None
    ref = parse_reference("docker-archive:img.tar:test/app:1", base_dir=tmp_path)
    assert (ref.transport, ref.location, ref.tag) == (Transport.docker_archive, tmp_path / "img.tar", "test/app:1")


def test_manifest_validation() -> None:
    cfg = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "1" * 64, "size": 10}
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "2" * 64, "size": 5}
    ok = {"schemaVersion": 2, "config": cfg, "layers": [layer]}
    m = parse_manifest(ok, "application/vnd.oci.image.manifest.v1+json", "m")
    assert m.layers[0].size == 5
    with pytest.raises(ManifestError, match="unsupported media type 'application/x-foo'"):
        parse_manifest({**ok, "layers": [{**layer, "mediaType": "application/x-foo"}]},
                       "application/vnd.oci.image.manifest.v1+json", "m")
    with pytest.raises(ManifestError, match="schema-1"):
        parse_manifest({"schemaVersion": 1}, "application/vnd.docker.distribution.manifest.v1+prettyjws", "m")
    with pytest.raises(ManifestError, match="not an image config"):
        parse_manifest({**ok, "config": {**cfg, "mediaType": "application/vnd.cncf.helm.config.v1+json"}},
                       "application/vnd.oci.image.manifest.v1+json", "m")
    with pytest.raises(ManifestError, match="descriptor"):
        parse_manifest({**ok, "layers": [{**layer, "digest": "md5:x"}]}, "application/vnd.oci.image.manifest.v1+json",
                       "m")


def test_config_parsing() -> None:
    raw = json.dumps({"os": "linux", "architecture": "arm64", "variant": "v8",
                      "config": {"Entrypoint": ["/e"], "Cmd": None, "Env": ["A=1"], "User": "1:2"},
                      "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "3" * 64]}}).encode()
    cfg = parse_config(raw, "c")
    assert (cfg.image.entrypoint, cfg.image.cmd, cfg.image.env, cfg.image.user) == (("/e",), (), ("A=1",), "1:2")
    assert parse_platform("linux/arm64/v8").matches(cfg.os, cfg.architecture, cfg.variant)
    assert parse_platform("linux/arm64").matches("linux", "arm64", "")
    assert parse_platform("linux/arm64/v8").matches("linux", "arm64", "")       # v8 is arm64's default
    assert not parse_platform("linux/arm/v7").matches("linux", "arm", "v6")
    with pytest.raises(ManifestError, match="not a list of strings"):
        parse_config(json.dumps({"config": {"Env": "A=1"}, "rootfs": {"type": "layers", "diff_ids": []}}).encode(), "c")
    with pytest.raises(InputError, match="invalid platform"):
        parse_platform("amd64")


def test_resolve_oci_layout(tmp_path: Path, isolated_dirs: Path) -> None:
    built = oci_image(tmp_path / "img", compressions=("gzip", "none", "gzip"))
    image = resolve_image("oci:img:latest", base_dir=tmp_path)
    assert image.digest == built.manifest_digest
    assert [layer.diff_id for layer in image.layers] == built.diff_ids
    assert image.config.entrypoint == ("/app/run.sh",) and image.config.stop_signal == "SIGINT"
    for layer in image.layers:
        assert read_verity_layout(file_reader(layer.device_path)).root_hash == layer.root_hash
    top = walk(Ext4Image(image.layers[1].device_path))
    assert top[b"etc/os-release"].type == "char"        # a whiteout
    again = pull_image("oci:img", base_dir=tmp_path)
    assert again.converted == 0 and again.image.layers == image.layers and again.image.digest == image.digest


def test_resolve_multi_platform_index(tmp_path: Path, isolated_dirs: Path) -> None:
    built = oci_image(tmp_path / "multi", platforms=("linux/arm64/v8", "linux/amd64", "linux/arm/v7"))
    amd = resolve_image("oci:multi", base_dir=tmp_path)
    arm = resolve_image("oci:multi", base_dir=tmp_path, platform="linux/arm64")
    assert amd.digest != arm.digest != built.manifest_digest
    assert amd.layer_hashes[:3] == arm.layer_hashes[:3] and amd.layer_hashes[3] != arm.layer_hashes[3]
    with pytest.raises(ManifestError, match="no image for platform linux/s390x") as exc:
        resolve_image("oci:multi", base_dir=tmp_path, platform="linux/s390x")
    assert "linux/amd64" in exc.value.hint


def test_same_layers_same_hashes_whatever_the_compression(tmp_path: Path, isolated_dirs: Path) -> None:
    a = resolve_image("oci:a", base_dir=tmp_path) if oci_image(tmp_path / "a", compressions=("gzip",) * 3) else None
    b = resolve_image("oci:b", base_dir=tmp_path) if oci_image(tmp_path / "b", compressions=("none",) * 3) else None
    assert a is not None and b is not None
    assert a.layer_hashes == b.layer_hashes and a.digest != b.digest


def test_resolve_docker_archive(tmp_path: Path, isolated_dirs: Path) -> None:
    built = docker_archive(tmp_path / "save.tar", tags=("test/app:1", "test/app:latest"))
    image = resolve_image("docker-archive:save.tar", base_dir=tmp_path)
    assert image.digest == built.manifest_digest
    assert [layer.diff_id for layer in image.layers] == built.diff_ids
    oci = resolve_image("oci:o", base_dir=tmp_path) if oci_image(tmp_path / "o") else None
    assert oci is not None and image.layer_hashes == oci.layer_hashes
    assert not list((isolated_dirs / "cache" / "tmp").iterdir())          # extracted layers are removed


def test_docker_archive_with_several_images(tmp_path: Path, isolated_dirs: Path) -> None:
    docker_archive(tmp_path / "two.tar")

    def second_image(name: str, data: bytes) -> bytes:
        if name != "manifest.json":
            return data
        doc = json.loads(data)
        return json.dumps([*doc, {**doc[0], "RepoTags": ["other:2"]}]).encode()

    rewrite_archive(tmp_path / "two.tar", second_image)
    with pytest.raises(InputError, match="holds 2 images"):
        resolve_image("docker-archive:two.tar", base_dir=tmp_path)
    assert resolve_image("docker-archive:two.tar:other:2", base_dir=tmp_path).layers


def rewrite_archive(path: Path, edit: Callable[[str, bytes], bytes]) -> None:
    """Rewrite a tarball member by member through `edit(name, data)`."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w") as tf:
        for m, data in members:
            data = edit(m.name, data)
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


def test_tampered_blob_is_refused(tmp_path: Path, isolated_dirs: Path) -> None:
    built = oci_image(tmp_path / "img")
    blobs = sorted((built.path / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    biggest = blobs[-1]
    data = bytearray(biggest.read_bytes())
    data[-100] ^= 1
    biggest.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match="hashes to"):
        resolve_image("oci:img", base_dir=tmp_path)
    cache = LayerCache()
    assert all(cache.get(d) is not None for d in built.diff_ids if cache.image_path(d).exists())


def test_diff_id_mismatch_is_refused(tmp_path: Path, isolated_dirs: Path) -> None:
    """A config whose diff_id does not match the layer: nothing is cached for it."""
    built = docker_archive(tmp_path / "save.tar")

    def wrong_diff_id(name: str, data: bytes) -> bytes:
        if not name.endswith(".json") or name == "manifest.json":
            return data
        doc = json.loads(data)
        doc["rootfs"]["diff_ids"][2] = "sha256:" + "0" * 64
        return json.dumps(doc).encode()

    rewrite_archive(tmp_path / "save.tar", wrong_diff_id)
    with pytest.raises(DiffIdMismatch, match="not the expected sha256:0000"):
        resolve_image("docker-archive:save.tar", base_dir=tmp_path)
    cache = LayerCache()
    assert cache.get(built.diff_ids[0]) is not None                      # earlier layers are fine and kept
    assert not cache.image_path("sha256:" + "0" * 64).exists()
    assert not [p for p in cache.dir.iterdir() if p.name.startswith(".")]   # no temporary files left


def test_missing_layout_and_tag(tmp_path: Path, isolated_dirs: Path) -> None:
    with pytest.raises(NotFoundError, match="is not a directory"):
        resolve_image("oci:nothing", base_dir=tmp_path)
    oci_image(tmp_path / "img")
    with pytest.raises(NotFoundError, match="no image tagged 'v9'"):
        resolve_image("oci:img:v9", base_dir=tmp_path)
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not an OCI image layout"):
        resolve_image("oci:plain", base_dir=tmp_path)


def test_damaged_cache_entry_is_rebuilt(tmp_path: Path, isolated_dirs: Path) -> None:
    oci_image(tmp_path / "img")
    image = resolve_image("oci:img", base_dir=tmp_path)
    dev = image.layers[0].device_path
    raw = bytearray(dev.read_bytes())
    raw[-1] ^= 1                                      # the stored tree no longer gives the recorded root
    dev.write_bytes(bytes(raw))
    again = pull_image("oci:img", base_dir=tmp_path)
    assert again.converted == 1 and again.image.layer_hashes == image.layer_hashes


def _pull(args: tuple[str, str, str]) -> tuple[str, ...]:
    import os
    ref, base, cache = args
    os.environ["PARMA_SANDBOX_CACHE"] = cache
    return resolve_image(ref, base_dir=Path(base)).layer_hashes


def test_concurrent_pulls_share_one_cache(tmp_path: Path, isolated_dirs: Path) -> None:
    oci_image(tmp_path / "img")
    cache = str(isolated_dirs / "cache")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_pull, [("oci:img", str(tmp_path), cache)] * 3)
    assert len(set(results)) == 1
    assert len(list(LayerCache().dir.glob("*.img"))) == 3
    shutil.rmtree(tmp_path / "img")
