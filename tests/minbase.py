"""A real Debian rootfs tarball for tests and benchmarks, built once with mmdebstrap and cached.

Cached under the shared cache dir, keyed by the mmdebstrap arguments; built under a lock and renamed into
place, so concurrent test runs and helpers share one copy. It needs the Debian mirror the first time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sandbox.fsutil import atomic_output, file_lock
from sandbox.paths import cache_dir
from sandbox.run import run

ARGS = ("--variant=minbase", "--mode=auto", "bookworm")


def minbase_tar(include: tuple[str, ...] = ()) -> Path:
    """Path of a cached `mmdebstrap --variant=minbase bookworm` tarball (about 170 MB; with
    include=("python3-minimal",) about 200 MB)."""
    args = (*ARGS[:-1], *(f"--include={p}" for p in include), ARGS[-1])
    key = hashlib.sha256("\0".join(args).encode()).hexdigest()[:16]
    out = cache_dir() / "testdata" / f"minbase-bookworm-{key}.tar"
    if out.exists():
        return out
    with file_lock(out.with_suffix(".lock")):
        if out.exists():
            return out
        with atomic_output(out) as tmp:
            made = tmp.with_suffix(".tar")          # mmdebstrap picks the format from the extension
            try:
                run(["mmdebstrap", "--quiet", *args, made], timeout=900)
                made.replace(tmp)
            finally:
                made.unlink(missing_ok=True)
    return out
