"""Download pinned files into a content-addressed cache, verifying size and SHA-256.

Files live under <cache>/downloads/<sha256>/<name>; a file is only ever visible there once its hash
matched. Concurrent builds wait on a per-file lock instead of downloading twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import requests

from sandbox.fsutil import atomic_output, file_lock
from sandbox.paths import cache_dir
from sandbox.progress import step
from sandbox.shared.errors import CheckFailed, NetworkError
from sandbox.uvm.pins import PinnedFile

CHUNK = 1 << 20


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch_pinned(pin: PinnedFile, *, what: str, bump_hint: str) -> Path:
    """Return the local path of `pin`, downloading it once. `bump_hint` says how to move the pin."""
    target = downloads_dir() / pin.sha256 / pin.name
    if target.is_file():
        return target
    with file_lock(target.parent / ".lock"):
        if target.is_file():
            return target
        with step(f"Downloading {what}", total=pin.size, unit="B") as task, atomic_output(target) as tmp:
            h = hashlib.sha256()
            try:
                with requests.get(pin.url, stream=True, timeout=60) as resp:
                    if resp.status_code == 404:
                        raise NetworkError(f"{what} is no longer available at {pin.url}",
                                           hint=f"the mirror dropped this pinned version; {bump_hint}")
                    resp.raise_for_status()
                    with open(tmp, "wb") as out:
                        for chunk in resp.iter_content(CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            task.advance(len(chunk))
            except requests.RequestException as e:
                raise NetworkError(f"cannot download {what} from {pin.url}: {e}",
                                   hint="check the network connection (and any proxy settings), then retry") from e
            got = h.hexdigest()
            if got != pin.sha256:
                raise CheckFailed(f"{what} from {pin.url} has SHA-256 {got}, expected the pinned {pin.sha256}",
                                  hint="the mirror served different content; do not use it. Retry later or "
                                       f"check the pin ({bump_hint})")
    return target
