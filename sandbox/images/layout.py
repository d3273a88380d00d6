"""Write OCI image layouts deterministically (image-spec image-layout.md, manifest.md, config.md).

Used by the example-image recipe and by tests that need images (local layouts, or pushed to a registry with
skopeo). JSON documents are written canonically (sorted keys, no whitespace) so a layout is a pure function
of its inputs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.fsutil import atomic_dir
from sandbox.images.manifest import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Descriptor

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
REF_NAME = "org.opencontainers.image.ref.name"


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def desc_json(d: Descriptor) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": d.media_type, "digest": d.digest, "size": d.size}
    if d.platform:
        out["platform"] = d.platform
    if d.annotations:
        out["annotations"] = d.annotations
    return out


@dataclass
class LayoutWriter:
    """Collects blobs in a staging directory; `write()` adds index.json and oci-layout."""

    root: Path
    manifests: list[Descriptor] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def add_bytes(self, data: bytes, media_type: str) -> Descriptor:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / "sha256" / digest[7:]
        if not path.exists():
            path.write_bytes(data)
        return Descriptor(media_type, digest, len(data))

    def add_image(self, layers: list[Descriptor], diff_ids: list[str], *, tag: str | None = None,
                  architecture: str = "amd64", os: str = "linux", variant: str = "",
                  config: dict[str, Any] | None = None, created: str = "1970-01-01T00:00:00Z",
                  index_entry: bool = True) -> Descriptor:
        """Write config and manifest blobs; list the manifest in index.json (tagged) unless told not to."""
        cfg: dict[str, Any] = {"architecture": architecture, "os": os, "created": created,
                               "config": config or {}, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
        if variant:
            cfg["variant"] = variant
        cfg_desc = self.add_bytes(canonical(cfg), OCI_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": desc_json(cfg_desc),
                    "layers": [desc_json(d) for d in layers]}
        m = self.add_bytes(canonical(manifest), OCI_MANIFEST)
        platform = {"architecture": architecture, "os": os, **({"variant": variant} if variant else {})}
        m = Descriptor(m.media_type, m.digest, m.size, platform=platform,
                       annotations={REF_NAME: tag} if tag else None)
        if index_entry:
            self.manifests.append(m)
        return m

    def add_index(self, manifests: list[Descriptor], *, tag: str | None = None) -> Descriptor:
        """A multi-platform image index over `manifests` (each with its platform), listed in index.json."""
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                 "manifests": [desc_json(Descriptor(d.media_type, d.digest, d.size, platform=d.platform))
                               for d in manifests]}
        d = self.add_bytes(canonical(index), OCI_INDEX)
        d = Descriptor(d.media_type, d.digest, d.size, annotations={REF_NAME: tag} if tag else None)
        self.manifests.append(d)
        return d

    def write(self) -> None:
        (self.root / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc_json(d) for d in self.manifests]}
        (self.root / "index.json").write_bytes(canonical(index))


def write_layout(dest: Path, build: Any) -> None:
    """Build a layout with `build(writer)` in a staging directory and move it to `dest` as a whole."""
    with atomic_dir(dest) as stage:
        stage.chmod(0o755)              # mkdtemp makes it private
        writer = LayoutWriter(stage)
        build(writer)
        writer.write()
