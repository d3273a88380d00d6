"""OCI image-spec documents (index, manifest, config) and their Docker schema-2 equivalents.

Sources: OCI image-spec v1.1 (image-index.md, manifest.md, config.md, descriptor.md, media-types.md) and
Docker's "Image Manifest V2, Schema 2". Parsing is strict about what we rely on and ignores the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sandbox.images.model import ImageConfig
from sandbox.images.reference import DIGEST
from sandbox.shared.errors import InputError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

# Layer media types we can convert, and the compression each implies (the converter also sniffs it).
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "none",     # what `docker save` layers are
}


class ManifestError(InputError):
    """A manifest, index or config that is malformed or of a kind we cannot run."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None = None
    annotations: dict[str, str] | None = None

    @property
    def platform_string(self) -> str:
        p = self.platform or {}
        parts = [str(p.get("os", "?")), str(p.get("architecture", "?"))]
        if p.get("variant"):
            parts.append(str(p["variant"]))
        return "/".join(parts)


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Config:
    image: ImageConfig
    diff_ids: tuple[str, ...]
    os: str
    architecture: str
    variant: str


def load_json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{what} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{what} is not a JSON object")
    return doc


def descriptor(d: Any, what: str) -> Descriptor:
    if not isinstance(d, dict):
        raise ManifestError(f"{what}: a descriptor is not an object")
    media_type, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str) or not DIGEST.match(digest) \
            or not isinstance(size, int) or size < 0:
        raise ManifestError(f"{what}: a descriptor lacks a valid mediaType, sha256 digest or size")
    platform = d.get("platform")
    annotations = d.get("annotations")
    return Descriptor(media_type, digest, size, platform if isinstance(platform, dict) else None,
                      annotations if isinstance(annotations, dict) else None)


def media_type_of(doc: dict[str, Any], fallback: str | None) -> str:
    """The document's own mediaType, else the one it was served or described with."""
    mt = doc.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if fallback:
        return fallback.split(";")[0].strip()
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc:
        return OCI_MANIFEST
    return ""


def parse_index(doc: dict[str, Any], what: str) -> list[Descriptor]:
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise ManifestError(f"{what}: an index without a 'manifests' list")
    return [descriptor(m, what) for m in manifests]


def parse_manifest(doc: dict[str, Any], media_type: str, what: str) -> Manifest:
    if media_type in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise ManifestError(f"{what} is a Docker schema-1 manifest, which is not supported",
                            hint="push the image again with a current tool (schema 2 or OCI)")
    if media_type not in MANIFEST_TYPES:
        raise ManifestError(f"{what} has unsupported media type {media_type!r}",
                            hint="only OCI and Docker schema-2 image manifests can be run")
    config = descriptor(doc.get("config"), what)
    if config.media_type not in CONFIG_TYPES:
        raise ManifestError(f"{what}: config media type {config.media_type!r} is not an image config",
                            hint="this artifact is not a container image")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ManifestError(f"{what}: manifest without a 'layers' list")
    out = tuple(descriptor(layer, what) for layer in layers)
    for i, layer in enumerate(out):
        if layer.media_type not in LAYER_TYPES:
            raise ManifestError(f"{what}: layer {i} ({layer.digest}) has unsupported media type "
                                f"{layer.media_type!r}", hint="only tar, tar+gzip and tar+zstd layers are supported")
    return Manifest(media_type, config, out)


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{what} is not a list of strings")
    return tuple(value)


def parse_config(raw: bytes, what: str) -> Config:
    doc = load_json(raw, what)
    cfg = doc.get("config") or {}
    if not isinstance(cfg, dict):
        raise ManifestError(f"{what}: 'config' is not an object")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ManifestError(f"{what}: missing rootfs of type 'layers'")
    diff_ids = _strings(rootfs.get("diff_ids"), f"{what}: rootfs.diff_ids")
    for d in diff_ids:
        if not DIGEST.match(d):
            raise ManifestError(f"{what}: diff_id {d!r} is not a sha256 digest")

    def text(key: str) -> str:
        v = cfg.get(key) or ""
        if not isinstance(v, str):
            raise ManifestError(f"{what}: config.{key} is not a string")
        return v

    image = ImageConfig(entrypoint=_strings(cfg.get("Entrypoint"), f"{what}: Entrypoint"),
                        cmd=_strings(cfg.get("Cmd"), f"{what}: Cmd"), env=_strings(cfg.get("Env"), f"{what}: Env"),
                        working_dir=text("WorkingDir"), user=text("User"), stop_signal=text("StopSignal"))
    return Config(image=image, diff_ids=diff_ids, os=str(doc.get("os", "")),
                  architecture=str(doc.get("architecture", "")), variant=str(doc.get("variant", "")))


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, os: str, architecture: str, variant: str) -> bool:
        if (os, architecture) != (self.os, self.architecture):
            return False
        if self.variant:
            return (variant or _DEFAULT_VARIANT.get(architecture, "")) == self.variant
        return True


_DEFAULT_VARIANT = {"arm64": "v8"}


def parse_platform(text: str) -> Platform:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InputError(f"invalid platform {text!r}", hint="use os/arch[/variant], e.g. linux/amd64")
    return Platform(*parts)


def select_platform(entries: list[Descriptor], platform: Platform, what: str) -> Descriptor:
    """The index entry for `platform` (the first match, as registries order them)."""
    for d in entries:
        p = d.platform or {}
        if d.media_type in (*MANIFEST_TYPES, *INDEX_TYPES) and platform.matches(
                str(p.get("os", "")), str(p.get("architecture", "")), str(p.get("variant", ""))):
            return d
    available = sorted({d.platform_string for d in entries if d.platform})
    raise ManifestError(f"{what} has no image for platform {platform}",
                        hint=f"available: {', '.join(available) or 'none listed'}")
