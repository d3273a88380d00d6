"""Small test images: OCI layouts (single- and multi-platform) and `docker save` style tarballs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from sandbox.images.layout import LAYER_GZIP, LAYER_TAR, LAYER_ZSTD, LayoutWriter, write_layout
from sandbox.images.manifest import Descriptor
from sandbox.run import run
from tests.layertars import Layer


def layer_tars() -> list[bytes]:
    base = (Layer().add("bin", tarfile.DIRTYPE, mode=0o755).add("bin/tool", data=b"#!/bin/true\n" * 50, mode=0o755)
            .add("etc", tarfile.DIRTYPE, mode=0o755).add("etc/os-release", data=b"ID=test\n"))
    top = (Layer().add("etc", tarfile.DIRTYPE, mode=0o755).add("etc/.wh.os-release").add("app", tarfile.DIRTYPE)
           .add("app/run.sh", data=b"echo hi\n", mode=0o755))
    third = Layer().add("data", tarfile.DIRTYPE).add("data/blob", data=bytes(range(256)) * 64)
    return [base.tar_bytes(), top.tar_bytes(), third.tar_bytes()]


@dataclass(frozen=True)
class BuiltImage:
    path: Path
    diff_ids: list[str]
    manifest_digest: str


def _compress(raw: bytes, kind: str, tmp: Path) -> tuple[bytes, str]:
    if kind == "gzip":
        return gzip.compress(raw, mtime=0), LAYER_GZIP
    if kind == "zstd":
        src = tmp / "z.tar"
        src.write_bytes(raw)
        run(["zstd", "-q", "-f", src, "-o", tmp / "z.tar.zst"])
        return (tmp / "z.tar.zst").read_bytes(), LAYER_ZSTD
    return raw, LAYER_TAR


def oci_image(dest: Path, *, compressions: tuple[str, ...] = ("gzip", "none", "gzip"), tag: str = "latest",
              platforms: tuple[str, ...] = ()) -> BuiltImage:
    """An OCI layout with the three test layers; with `platforms`, a multi-platform index whose entries
    differ in their last layer (so each platform resolves to different root hashes)."""
    tars = layer_tars()
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    digests: list[str] = []

    def build(w: LayoutWriter) -> None:
        layers = []
        for raw, kind in zip(tars, compressions, strict=True):
            data, mt = _compress(raw, kind, dest.parent)
            layers.append(w.add_bytes(data, mt))
        config = {"Entrypoint": ["/app/run.sh"], "Cmd": ["--flag"], "Env": ["A=1", "PATH=/bin"],
                  "WorkingDir": "/app", "User": "1000:1000", "StopSignal": "SIGINT"}
        if not platforms:
            digests.append(w.add_image(layers, diff_ids, tag=tag, config=config).digest)
            return
        entries: list[Descriptor] = []
        for plat in platforms:
            os_, arch, *variant = plat.split("/")
            extra = Layer().add("platform", data=plat.encode()).tar_bytes()
            d = w.add_bytes(extra, LAYER_TAR)
            entries.append(w.add_image([*layers, d], [*diff_ids, "sha256:" + hashlib.sha256(extra).hexdigest()],
                                       os=os_, architecture=arch, variant=variant[0] if variant else "",
                                       config=config, index_entry=False))
        digests.append(w.add_index(entries, tag=tag).digest)

    write_layout(dest, build)
    return BuiltImage(dest, diff_ids, digests[0])


def docker_archive(dest: Path, *, tags: tuple[str, ...] = ("test/app:1",)) -> BuiltImage:
    """A tarball shaped like `docker save` output (Docker < 25): <id>/layer.tar, <config>.json, manifest.json."""
    tars = layer_tars()
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    members: list[tuple[str, bytes]] = [(config_name, config)]
    names = []
    for i, raw in enumerate(tars):
        name = f"{i:064x}/layer.tar"
        names.append(name)
        members.append((name, raw))
    manifest = [{"Config": config_name, "RepoTags": list(tags), "Layers": names}]
    members.append(("manifest.json", json.dumps(manifest).encode()))
    with tarfile.open(dest, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return BuiltImage(dest, diff_ids, "sha256:" + hashlib.sha256(config).hexdigest())
