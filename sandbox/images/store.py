"""The shared cache: blobs by digest, converted layer devices by diff_id and converter version.

Everything is keyed by content and written through a temporary file that is renamed into place only after
its digest checked out, under a per-key file lock: concurrent pulls and conversions (several processes,
several users of one cache) are safe, and an interrupted download or conversion leaves nothing that could be
mistaken for a complete entry.

    <cache>/blobs/sha256/<hex>                   manifests, configs, compressed layers (verified)
    <cache>/layers/<converter>/<hex>.img         ext4 + dm-verity device for the layer with diff_id sha256:<hex>
    <cache>/layers/<converter>/<hex>.json        its record (root hash, sizes), written after the image
    <cache>/locks/...                            lock files
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox.fsutil import atomic_output, atomic_write, file_lock
from sandbox.layers.version import CONVERTER_VERSION
from sandbox.paths import cache_dir
from sandbox.shared.errors import CheckFailed, InputError
from sandbox.shared.verity import VerityLayoutError, file_reader, read_verity_layout

if TYPE_CHECKING:
    from sandbox.layers.convert import ConvertResult

_CHUNK = 1 << 20


class DigestMismatch(CheckFailed):
    """Content does not hash to the digest that names it (a failed check: exit 1)."""


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64:
        raise InputError(f"unsupported digest {digest!r}", hint="only sha256 digests are supported")
    return hexpart


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return "sha256:" + h.hexdigest()


def verify_file(path: Path, digest: str, size: int | None, what: str) -> None:
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise DigestMismatch(f"{what}: {actual_size} bytes where the descriptor says {size}",
                             hint="the image is corrupt or was tampered with")
    actual = sha256_file(path)
    if actual != digest:
        raise DigestMismatch(f"{what}: content hashes to {actual}, not {digest}",
                             hint="the image is corrupt or was tampered with")


def verify_bytes(data: bytes, digest: str, what: str) -> None:
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise DigestMismatch(f"{what}: content hashes to {actual}, not {digest}",
                             hint="the image is corrupt or was tampered with")


class BlobStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir()
        self.blobs = self.root / "blobs" / "sha256"
        self.locks = self.root / "locks"

    def path(self, digest: str) -> Path:
        return self.blobs / _hex(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def put(self, digest: str, data: bytes, what: str) -> Path:
        verify_bytes(data, digest, what)
        path = self.path(digest)
        if not path.is_file():
            atomic_write(path, data)
        return path

    def ensure(self, digest: str, size: int | None, fetch: Callable[[], Iterable[bytes]], what: str) -> Path:
        """The blob's path, fetching it first if absent; content is verified before it becomes visible."""
        path = self.path(digest)
        if path.is_file():
            return path
        with file_lock(self.locks / f"blob-{_hex(digest)}.lock"):
            if path.is_file():                      # another process fetched it meanwhile
                return path
            h = hashlib.sha256()
            written = 0
            with atomic_output(path) as tmp:
                with open(tmp, "wb") as f:
                    for chunk in fetch():
                        written += len(chunk)
                        if size is not None and written > size:
                            raise DigestMismatch(f"{what}: more than the {size} bytes its descriptor says",
                                                 hint="the registry sent something else than asked for")
                        h.update(chunk)
                        f.write(chunk)
                actual = "sha256:" + h.hexdigest()
                if size is not None and written != size:
                    raise DigestMismatch(f"{what}: got {written} bytes where the descriptor says {size}",
                                         hint="the download was cut short, or the image is corrupt")
                if actual != digest:
                    raise DigestMismatch(f"{what}: content hashes to {actual}, not {digest}",
                                         hint="the image is corrupt or was tampered with")
        return path


@dataclass(frozen=True)
class LayerRecord:
    diff_id: str
    root_hash: str
    ext4_size: int
    image_size: int
    converter: str
    device_path: Path

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["device_path"] = str(self.device_path)
        return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


class LayerCache:
    """Converted layer devices, keyed by diff_id (the uncompressed tar) and converter version."""

    def __init__(self, root: Path | None = None, *, converter: str = CONVERTER_VERSION) -> None:
        base = Path(root) if root is not None else cache_dir()
        self.converter = converter          # another converter (e.g. --compat aci) gets its own entries
        self.dir = base / "layers" / converter
        self.locks = base / "locks"

    def image_path(self, diff_id: str) -> Path:
        return self.dir / f"{_hex(diff_id)}.img"

    def record_path(self, diff_id: str) -> Path:
        return self.dir / f"{_hex(diff_id)}.json"

    def get(self, diff_id: str) -> LayerRecord | None:
        """A complete, consistent entry or None (a damaged entry is treated as absent)."""
        rec_path, image = self.record_path(diff_id), self.image_path(diff_id)
        try:
            doc = json.loads(rec_path.read_bytes())
            record = LayerRecord(diff_id=doc["diff_id"], root_hash=doc["root_hash"], ext4_size=int(doc["ext4_size"]),
                                 image_size=int(doc["image_size"]), converter=doc["converter"], device_path=image)
            if record.diff_id != diff_id or record.converter != self.converter \
                    or image.stat().st_size != record.image_size:
                return None
            if read_verity_layout(file_reader(image)).root_hash != record.root_hash:
                return None
        except (OSError, ValueError, KeyError, TypeError, VerityLayoutError):
            return None
        return record

    def ensure(self, diff_id: str, convert: Callable[[Path], ConvertResult]) -> LayerRecord:
        """The converted layer, running `convert(output_path)` under the key's lock if it is not cached."""
        if (record := self.get(diff_id)) is not None:
            return record
        with file_lock(self.locks / f"layer-{self.converter}-{_hex(diff_id)}.lock"):
            if (record := self.get(diff_id)) is not None:
                return record
            image = self.image_path(diff_id)
            self.record_path(diff_id).unlink(missing_ok=True)
            result = convert(image)
            if result.diff_id != diff_id:
                image.unlink(missing_ok=True)
                raise DigestMismatch(f"layer content is {result.diff_id}, not {diff_id}")
            record = LayerRecord(diff_id=diff_id, root_hash=result.root_hash, ext4_size=result.ext4_size,
                                 image_size=result.image_size, converter=self.converter, device_path=image)
            atomic_write(self.record_path(diff_id), record.to_json())
            return record

