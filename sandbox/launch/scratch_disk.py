"""The group's scratch disk on the host: a sparse file the guest encrypts (sandbox.guest.scratch).

It takes no space until the guest writes, and the guest writes only ciphertext and integrity tags. A new
file per launch: whatever a previous run left is unreadable anyway (its key died with its VM), and the
guest formats the disk afresh. When the host's filesystem cannot hold what the guest writes, the write
fails in the guest (the drive reports errors, sandbox.vmm), so the group sees EIO rather than a paused VM.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sandbox.fsutil import atomic_output
from sandbox.log import log
from sandbox.vmm.config import Disk

SCRATCH_DISK_SERIAL = "parma-scratch"
SCRATCH_DISK_NAME = "scratch.img"
GIB = 1 << 30


def create_scratch_disk(state_dir: Path, size_gib: int) -> Path:
    """A fresh sparse file of `size_gib` GiB in the sandbox's state directory (mode 0600)."""
    path = state_dir / SCRATCH_DISK_NAME
    with atomic_output(path, mode=0o600) as tmp:
        os.truncate(tmp, size_gib * GIB)
    free = shutil.disk_usage(state_dir).free
    if free < size_gib * GIB:
        log.warning("the scratch disk may grow to %d GiB, but %s has %.1f GiB free: writes beyond that fail in "
                    "the containers", size_gib, state_dir, free / GIB)
    return path


def scratch_vm_disk(path: Path) -> Disk:
    """The scratch as the VM gets it: read-write virtio-blk, found in the guest by its serial."""
    return Disk(path, SCRATCH_DISK_SERIAL, readonly=False)
