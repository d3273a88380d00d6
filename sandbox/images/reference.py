"""Image references: registry images, OCI image-layout directories and `docker save` tarballs.

Grammar of registry references as in the distribution project's reference package (docker's rules):
`[domain[:port]/]path[:tag][@algorithm:hex]`; the first component is a domain when it contains '.' or ':'
or is `localhost`; Docker Hub names get `library/` when they have one component.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sandbox.images.model import ResolvedImage
from sandbox.shared.errors import InputError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                     r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class Transport(StrEnum):
    registry = "registry"
    oci = "oci"                         # an OCI image-layout directory
    docker_archive = "docker-archive"   # a `docker save` tarball


@dataclass(frozen=True)
class ImageRef:
    transport: Transport
    original: str
    domain: str = ""                    # registry: e.g. docker.io, localhost:5000
    path: str = ""                      # registry: repository path, e.g. library/busybox
    tag: str | None = None
    digest: str | None = None
    location: Path | None = None        # oci / docker-archive: the directory or file (absolute)

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.domain == DOCKER_HUB else self.domain

    @property
    def reference(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return self.original


def check_digest(digest: str, what: str) -> str:
    if not DIGEST.match(digest):
        raise InputError(f"{what}: {digest!r} is not a sha256 digest",
                         hint="digests look like sha256:<64 lowercase hex digits>")
    return digest


def parse_reference(text: str, *, base_dir: Path | None = None) -> ImageRef:
    """Parse an image reference. `oci:` and `docker-archive:` paths are relative to base_dir."""
    if text.startswith("oci:"):
        rest = text[len("oci:"):]
        path, tag = _split_tag(rest)
        return ImageRef(Transport.oci, text, tag=tag, location=_local(path, base_dir, text))
    if text.startswith("docker-archive:"):
        rest = text[len("docker-archive:"):]
        path, tag = rest, None
        if ":" in rest:                 # docker-archive:FILE:name:tag selects one of several images
            path, tag = rest.split(":", 1)
        return ImageRef(Transport.docker_archive, text, tag=tag, location=_local(path, base_dir, text))
    return _parse_registry(text.removeprefix("docker://"), text)


def _split_tag(rest: str) -> tuple[str, str | None]:
    head, sep, tail = rest.rpartition(":")
    if sep and tail and "/" not in tail:
        return head, tail
    return rest, None


def _local(path: str, base_dir: Path | None, text: str) -> Path:
    if not path:
        raise InputError(f"image reference {text!r} names no path")
    p = Path(path)
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return p.resolve()


def _parse_registry(rest: str, text: str) -> ImageRef:
    bad = InputError(f"invalid image reference {text!r}",
                     hint="use [registry/]name[:tag][@sha256:...], oci:DIR[:TAG] or docker-archive:FILE")
    if not rest or rest != rest.strip():
        raise bad
    digest = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        check_digest(digest, f"image reference {text!r}")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG.match(tag):
            raise bad
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, remainder
        if not _DOMAIN.match(domain):
            raise bad
    else:
        domain, path = DOCKER_HUB, rest
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _PATH.match(path):
        raise bad
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(Transport.registry, text, domain=domain, path=path, tag=tag, digest=digest)


def pinned_reference(image: ResolvedImage, registry: str | None = None, *, consumer: str) -> str:
    """The image's reference pinned by its manifest digest (repository@sha256:...), for a runtime that pulls
    from a registry (`consumer`: ACI, a Kubernetes node). A local image (oci:DIR[:TAG],
    docker-archive:FILE) is named under `registry`, where the user pushes it unchanged (same digest)."""
    ref = image.reference
    for prefix in ("oci:", "docker-archive:"):
        if ref.startswith(prefix):
            if registry is None:
                raise InputError(f"image {ref!r} is a local archive: {consumer} pulls images from a registry",
                                 hint="push it unchanged (same digest) and give --registry REGISTRY/PREFIX")
            path = ref[len(prefix):].rsplit(":", 1)[0] if prefix == "oci:" else ref[len(prefix):]
            name = path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar") or "image"
            return f"{registry.rstrip('/')}/{name.lower()}@{image.digest}"
    repo = ref.split("@", 1)[0]
    last = repo.rsplit("/", 1)[-1]
    if ":" in last:
        repo = repo[: len(repo) - len(last)] + last.split(":", 1)[0]
    return f"{repo}@{image.digest}"
