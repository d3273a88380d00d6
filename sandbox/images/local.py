"""Local image sources: OCI image-layout directories and `docker save` tarballs.

OCI image-layout (image-spec image-layout.md): `oci-layout`, `index.json` whose manifests carry the tag in
the `org.opencontainers.image.ref.name` annotation, and `blobs/sha256/<hex>`.
`docker save` (Docker's image tarball, "docker-archive"): `manifest.json`, a list of
{Config, RepoTags, Layers} with paths inside the tarball; layers are tars (uncompressed, or compressed by
newer Docker versions, which also store them as OCI blobs).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sandbox.images.manifest import (
    INDEX_TYPES,
    Descriptor,
    ManifestError,
    load_json,
    media_type_of,
    parse_index,
)
from sandbox.images.reference import Transport, parse_reference
from sandbox.images.store import verify_bytes, verify_file
from sandbox.shared.errors import InputError, NotFoundError, SandboxError

REF_NAME = "org.opencontainers.image.ref.name"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
_MAX_DOC = 4 << 20


class OciLayout:
    def __init__(self, root: Path, what: str) -> None:
        self.root = root
        self.what = what
        marker = root / "oci-layout"
        if not root.is_dir():
            raise NotFoundError(f"{what}: {root} is not a directory",
                                hint="build or copy the OCI image layout there first")
        try:
            version = load_json(marker.read_bytes(), f"{marker}").get("imageLayoutVersion")
        except FileNotFoundError:
            raise InputError(f"{what}: {root} is not an OCI image layout (no oci-layout file)") from None
        if not isinstance(version, str) or not version.startswith("1."):
            raise InputError(f"{what}: unsupported image layout version {version!r}")

    def index(self) -> dict[str, Any]:
        path = self.root / "index.json"
        try:
            return load_json(path.read_bytes(), str(path))
        except FileNotFoundError:
            raise InputError(f"{self.what}: {path} is missing") from None

    def find(self, tag: str | None) -> Descriptor:
        entries = parse_index(self.index(), f"{self.root}/index.json")
        if tag is None:
            if len(entries) == 1:
                return entries[0]
            tag = "latest"
        for d in entries:
            name = (d.annotations or {}).get(REF_NAME, "")
            if name == tag or name.endswith(f":{tag}"):
                return d
        tags = sorted((d.annotations or {}).get(REF_NAME, "") for d in entries)
        raise NotFoundError(f"{self.what}: no image tagged {tag!r} in {self.root}",
                            hint=f"tags there: {', '.join(t for t in tags if t) or 'none'}")

    def blob_path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        path = self.root / "blobs" / algo / hexpart
        if not path.is_file():
            raise NotFoundError(f"{self.what}: blob {digest} is missing from {self.root}")
        return path

    def read_doc(self, d: Descriptor, what: str) -> bytes:
        if d.size > _MAX_DOC:
            raise ManifestError(f"{what} is larger than {_MAX_DOC} bytes")
        raw = self.blob_path(d.digest).read_bytes()
        verify_bytes(raw, d.digest, what)
        return raw

    def verified_blob(self, d: Descriptor, what: str) -> Path:
        path = self.blob_path(d.digest)
        verify_file(path, d.digest, d.size, what)
        return path


class DockerArchive:
    """A `docker save` tarball, read with random access (members are extracted only when needed)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        try:
            self.tar = tarfile.open(path, "r:")
        except FileNotFoundError:
            raise NotFoundError(f"{what}: {path} does not exist") from None
        except (tarfile.TarError, OSError) as e:
            raise InputError(f"{what}: {path} is not a tar archive ({e})") from None

    def close(self) -> None:
        self.tar.close()

    def member_bytes(self, name: str) -> bytes:
        try:
            member = self.tar.getmember(name)
        except KeyError:
            raise InputError(f"{self.what}: {name} is missing from {self.path}") from None
        if not member.isreg() or member.size > _MAX_DOC:
            raise InputError(f"{self.what}: {name} in {self.path} is not a small regular file")
        f = self.tar.extractfile(member)
        assert f is not None
        return f.read()

    def image(self, tag: str | None) -> dict[str, Any]:
        try:
            entries = json.loads(self.member_bytes("manifest.json"))
        except ValueError as e:
            raise ManifestError(f"{self.what}: manifest.json is not valid JSON ({e})") from None
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise ManifestError(f"{self.what}: manifest.json lists no images")
        if tag is None:
            if len(entries) > 1:
                tags = sorted(t for e in entries for t in e.get("RepoTags") or [])
                raise InputError(f"{self.what}: {self.path} holds {len(entries)} images; say which",
                                 hint=f"use docker-archive:FILE:NAME:TAG with one of: {', '.join(tags)}")
            return entries[0]
        for entry in entries:
            tags = entry.get("RepoTags") or []
            if tag in tags or f"docker.io/library/{tag}" in tags or any(t.endswith(f"/{tag}") for t in tags):
                return entry
        raise NotFoundError(f"{self.what}: no image tagged {tag!r} in {self.path}")

    @contextlib.contextmanager
    def extracted(self, name: str, tmp_dir: Path) -> Iterator[Path]:
        """Copy one member to a temporary file (streamed), removed afterwards."""
        try:
            member = self.tar.getmember(name)
        except KeyError:
            raise InputError(f"{self.what}: layer {name} is missing from {self.path}") from None
        if not member.isreg():
            raise InputError(f"{self.what}: layer {name} in {self.path} is not a regular file")
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".docker-layer.", dir=tmp_dir)
        try:
            with open(fd, "wb") as out:
                src = self.tar.extractfile(member)
                assert src is not None
                shutil.copyfileobj(src, out, 1 << 20)
            yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)


def check_local_image(text: str, *, base_dir: Path) -> str | None:
    """Why the local image `text` (oci:DIR[:TAG] or docker-archive:FILE[:NAME:TAG]) cannot be used, or None.

    Reads only what names the image: the layout's oci-layout and index.json (and that the tagged manifest's
    blob is there), or the archive's manifest.json. Registry references are not checked (no network): None.
    """
    try:
        ref = parse_reference(text, base_dir=base_dir)
        if ref.location is None:
            return None
        if ref.transport == Transport.oci:
            layout = OciLayout(ref.location, text)
            layout.blob_path(layout.find(ref.tag).digest)
        else:
            archive = DockerArchive(ref.location, text)
            try:
                archive.image(ref.tag)
            finally:
                archive.close()
    except SandboxError as e:
        return e.message + (f" ({e.hint})" if e.hint else "")
    return None


def is_index(raw: bytes, media_type: str | None, what: str) -> bool:
    return media_type_of(load_json(raw, what), media_type) in INDEX_TYPES
