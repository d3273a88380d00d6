"""Resolve an image reference into verified, converted layer devices: `resolve_image()`.

Chain of verification: the manifest's digest (checked against a pinned @digest), the config's and each
layer blob's digest from their descriptors, and each layer's uncompressed content against the config's
diff_id while it is converted. Conversion results are cached by diff_id, so a layer already converted is
neither downloaded nor converted again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sandbox.images import DEFAULT_PLATFORM
from sandbox.images.local import DOCKER_LAYER, DockerArchive, OciLayout, is_index
from sandbox.images.manifest import (
    CONFIG_TYPES,
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    Descriptor,
    Manifest,
    ManifestError,
    Platform,
    load_json,
    media_type_of,
    parse_config,
    parse_index,
    parse_manifest,
    parse_platform,
    select_platform,
)
from sandbox.images.model import LayerInfo, ResolvedImage
from sandbox.images.parallel import Workers, usable_cpus
from sandbox.images.reference import ImageRef, Transport, parse_reference
from sandbox.images.store import BlobStore, LayerCache, LayerRecord, verify_bytes
from sandbox.log import log
from sandbox.paths import cache_dir
from sandbox.progress import step

if TYPE_CHECKING:
    from sandbox.layers.convert import ConvertResult
    from sandbox.layers.tar2ext4 import Ext4Options

_DOWNLOAD_ATTEMPTS = 3


def _sha256(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


class Source(Protocol):
    what: str

    def resolve(self, platform: Platform) -> tuple[str, Manifest, bytes]:
        """(manifest digest, manifest, verified config bytes) for the platform."""

    def layer_blob(self, desc: Descriptor, what: str) -> contextlib.AbstractContextManager[Path]:
        """A verified file holding the layer blob, for the duration of the context."""

    def close(self) -> None: ...


def _pick_manifest(raw: bytes, media_type: str | None, platform: Platform, what: str,
                   fetch_child: Callable[[Descriptor], bytes]) -> tuple[str, Manifest]:
    """From a root document (index or manifest) to the platform's manifest; follows nested indexes."""
    digest = _sha256(raw)
    for _ in range(4):
        doc = load_json(raw, what)
        mt = media_type_of(doc, media_type)
        if not is_index(raw, media_type, what):
            return digest, parse_manifest(doc, mt, what)
        child = select_platform(parse_index(doc, what), platform, what)
        what = f"{what} [{platform}]"
        raw, media_type = fetch_child(child), child.media_type
        digest = child.digest
    raise ManifestError(f"{what}: indexes nested too deep")


class RegistrySource:
    def __init__(self, ref: ImageRef, store: BlobStore) -> None:
        self.ref = ref
        self.store = store
        self.what = str(ref)
        from sandbox.images.registry import RegistryClient  # requests: only registry images need it

        self.client = RegistryClient(ref.domain, ref.api_host)

    def resolve(self, platform: Platform) -> tuple[str, Manifest, bytes]:
        raw, ctype = self.client.get_manifest(self.ref.path, self.ref.reference)
        if self.ref.digest:
            verify_bytes(raw, self.ref.digest, f"manifest of {self.what}")
        self.store.put(_sha256(raw), raw, f"manifest of {self.what}")

        def child(d: Descriptor) -> bytes:
            data, _ = self.client.get_manifest(self.ref.path, d.digest)
            return self.store.put(d.digest, data, f"manifest {d.digest} of {self.what}").read_bytes()

        digest, manifest = _pick_manifest(raw, ctype, platform, f"image {self.what}", child)
        cfg = manifest.config
        path = self.store.ensure(cfg.digest, cfg.size, lambda: self.client.blob_chunks(self.ref.path, cfg.digest),
                                 f"config of {self.what}")
        return digest, manifest, path.read_bytes()

    @contextlib.contextmanager
    def layer_blob(self, desc: Descriptor, what: str) -> Iterator[Path]:
        from sandbox.images.registry import TransferInterrupted

        for attempt in range(_DOWNLOAD_ATTEMPTS):
            try:
                with step(f"Pulling {what}", total=desc.size, unit="B") as task:
                    def chunks() -> Iterator[bytes]:
                        for chunk in self.client.blob_chunks(self.ref.path, desc.digest):
                            task.advance(len(chunk))
                            yield chunk
                    path = self.store.ensure(desc.digest, desc.size, chunks, what)
                break
            except TransferInterrupted as e:
                if attempt + 1 == _DOWNLOAD_ATTEMPTS:
                    raise
                log.warning("%s; retrying", e.message)
        yield path

    def close(self) -> None:
        self.client.session.close()


class OciSource:
    def __init__(self, ref: ImageRef) -> None:
        assert ref.location is not None
        self.what = str(ref)
        self.ref = ref
        self.layout = OciLayout(ref.location, f"image {ref}")

    def resolve(self, platform: Platform) -> tuple[str, Manifest, bytes]:
        top = self.layout.find(self.ref.tag)
        raw = self.layout.read_doc(top, f"manifest {top.digest} of {self.what}")

        def child(d: Descriptor) -> bytes:
            return self.layout.read_doc(d, f"manifest {d.digest} of {self.what}")

        digest, manifest = _pick_manifest(raw, top.media_type, platform, f"image {self.what}", child)
        config = self.layout.read_doc(manifest.config, f"config of {self.what}")
        return digest, manifest, config

    @contextlib.contextmanager
    def layer_blob(self, desc: Descriptor, what: str) -> Iterator[Path]:
        yield self.layout.verified_blob(desc, what)

    def close(self) -> None:
        pass


class DockerArchiveSource:
    def __init__(self, ref: ImageRef, tmp_dir: Path) -> None:
        assert ref.location is not None
        self.what = str(ref)
        self.archive = DockerArchive(ref.location, f"image {ref}")
        self.tag = ref.tag
        self.tmp_dir = tmp_dir
        self.paths: dict[str, str] = {}

    def resolve(self, platform: Platform) -> tuple[str, Manifest, bytes]:
        entry = self.archive.image(self.tag)
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list) \
                or not all(isinstance(n, str) for n in layer_names):
            raise ManifestError(f"image {self.what}: manifest.json entry lacks Config or Layers")
        config = self.archive.member_bytes(config_name)
        layers = []
        for name in layer_names:
            try:
                member = self.archive.tar.getmember(name)
            except KeyError:
                raise ManifestError(f"image {self.what}: layer {name} is missing from the archive") from None
            # These layers have no blob digest of their own: the descriptor is keyed by the member name, and
            # the diff_id check during conversion verifies the content.
            pseudo = f"sha256:{hashlib.sha256(name.encode()).hexdigest()}"
            self.paths[pseudo] = name
            layers.append(Descriptor(DOCKER_LAYER, pseudo, member.size))
        digest = _sha256(config)          # Docker's image ID: there is no manifest to name the image by
        return digest, Manifest(DOCKER_MANIFEST, Descriptor(DOCKER_CONFIG, digest, len(config)), tuple(layers)), config

    @contextlib.contextmanager
    def layer_blob(self, desc: Descriptor, what: str) -> Iterator[Path]:
        with self.archive.extracted(self.paths[desc.digest], self.tmp_dir) as path:
            yield path

    def close(self) -> None:
        self.archive.close()


def open_source(ref: ImageRef) -> Source:
    if ref.transport == Transport.oci:
        return OciSource(ref)
    if ref.transport == Transport.docker_archive:
        return DockerArchiveSource(ref, cache_dir() / "tmp")
    return RegistrySource(ref, BlobStore())


@dataclass(frozen=True)
class PullResult:
    image: ResolvedImage
    platform: str
    converted: int              # layers converted in this call (the others came from the cache)


def _convert_cached(cache: LayerCache, blob: Path, diff_id: str, what: str,
                    options: Ext4Options) -> tuple[LayerRecord, bool]:
    """The cache's record of a layer, converting it from `blob` unless another process has meanwhile;
    runs in a worker process (sandbox/images/parallel.py). Also says whether it converted."""
    from sandbox.layers.convert import convert_layer

    converted = False

    def convert(out: Path) -> ConvertResult:
        nonlocal converted
        result = convert_layer(blob, out, expected_diff_id=diff_id, name=what, options=options)
        converted = True
        return result

    return cache.ensure(diff_id, convert), converted


def pull_image(ref: str, *, base_dir: Path, platform: str = DEFAULT_PLATFORM, compat: str | None = None) -> PullResult:
    """`compat="aci"` converts layers as ACI does (sandbox/aci/ext4compat.py), cached separately.

    Layers missing from the cache are fetched one after the other and converted in worker processes, as many
    at once as there are CPUs to use (sandbox/images/parallel.py); a layer the image lists twice is
    converted once.
    """
    image_ref = parse_reference(ref, base_dir=base_dir)
    plat = parse_platform(platform)
    # The converter is imported here: reading a local image (validate's layer count) does not need it.
    from sandbox.aci.ext4compat import layer_mode

    options, converter = layer_mode(compat)
    cache = LayerCache(converter=converter)
    src = open_source(image_ref)
    converted = 0
    try:
        digest, manifest, config_raw = src.resolve(plat)
        if manifest.config.media_type not in CONFIG_TYPES:
            raise ManifestError(f"image {ref}: config media type {manifest.config.media_type!r} is not supported")
        config = parse_config(config_raw, f"config of image {ref}")
        if config.os and config.architecture and not plat.matches(config.os, config.architecture, config.variant):
            raise ManifestError(f"image {ref} is for {config.os}/{config.architecture}, not {plat}",
                                hint="choose the image for this platform")
        if len(config.diff_ids) != len(manifest.layers):
            raise ManifestError(f"image {ref}: the config lists {len(config.diff_ids)} diff_ids for "
                                f"{len(manifest.layers)} layers")
        total = len(manifest.layers)
        records: dict[str, LayerRecord] = {}
        pending: list[str] = []                 # diff_ids converted by the workers, in submission order
        with Workers[tuple[LayerRecord, bool]](usable_cpus()) as workers:
            for i, (desc, diff_id) in enumerate(zip(manifest.layers, config.diff_ids, strict=True)):
                if diff_id in records or diff_id in pending:
                    continue                    # the same layer twice: converted once
                if (record := cache.get(diff_id)) is not None:
                    records[diff_id] = record
                    continue
                what = f"layer {i + 1}/{total} of {ref} ({diff_id[:19]})"
                blob_context = contextlib.ExitStack()
                blob = blob_context.enter_context(src.layer_blob(desc, what))   # downloaded here, one at a time
                pending.append(diff_id)
                workers.submit(functools.partial(_convert_cached, cache, blob, diff_id, what, options),
                               on_done=blob_context.close)
            for diff_id, (record, converted_here) in zip(pending, workers.results(), strict=True):
                records[diff_id] = record
                converted += converted_here
        layers = [LayerInfo(diff_id=diff_id, media_type=desc.media_type, size=desc.size,
                            root_hash=records[diff_id].root_hash, device_path=records[diff_id].device_path)
                  for desc, diff_id in zip(manifest.layers, config.diff_ids, strict=True)]
    finally:
        src.close()
    image = ResolvedImage(reference=ref, digest=digest, config=config.image, layers=tuple(layers))
    return PullResult(image=image, platform=str(plat), converted=converted)


def resolve_image(ref: str, *, base_dir: Path, platform: str = DEFAULT_PLATFORM,
                  compat: str | None = None) -> ResolvedImage:
    """Pull or read `ref`, convert every layer (cached by content), and return devices and root hashes.

    `oci:DIR[:TAG]` and `docker-archive:FILE` paths are relative to base_dir (the group file's directory).
    """
    return pull_image(ref, base_dir=base_dir, platform=platform, compat=compat).image


def local_layer_ids(ref: str, *, base_dir: Path, platform: str = DEFAULT_PLATFORM) -> tuple[str, ...] | None:
    """The layer diff_ids of a local image (`oci:`, `docker-archive:`), read without converting anything, or
    None for a registry image (whose layers are known only once it is pulled)."""
    image_ref = parse_reference(ref, base_dir=base_dir)
    if image_ref.transport not in (Transport.oci, Transport.docker_archive):
        return None
    src = open_source(image_ref)
    try:
        _, _, config_raw = src.resolve(parse_platform(platform))
        return parse_config(config_raw, f"config of image {ref}").diff_ids
    finally:
        src.close()
