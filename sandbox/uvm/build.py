"""`ensure_uvm()`: everything a launch needs (kernel, rootfs, command line, firmware, manifest), cached.

Each part is cached by the hash of its inputs, so this is cheap when nothing changed: the first call
on a clean machine builds the kernel (about 5 minutes on 2 cores), the Debian base (about 1 minute),
the agent overlay and the verity image (seconds) and the AmdSev OVMF; later calls only hash a few
small files. A change to the agent source rebuilds only the overlay and the image.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.fsutil import atomic_write, file_lock
from sandbox.paths import cache_dir
from sandbox.uvm.base import build_base
from sandbox.uvm.firmware import FirmwareArtifact, build_firmware
from sandbox.uvm.image import ROOT_DEVICE, build_rootfs_image, kernel_cmdline
from sandbox.uvm.kernel import build_kernel
from sandbox.uvm.manifest import DEFAULT_CPU_TYPE, build_manifest, manifest_bytes
from sandbox.uvm.measure import QEMU_SNP_GUEST_FEATURES, MeasureRequest, Mode, launch_digest
from sandbox.uvm.overlay import build_rootfs_tar
from sandbox.uvm.source_tree import BUILD_DIR


@dataclass(frozen=True)
class UvmArtifacts:
    kernel: Path                    # bzImage (EFI stub; boots directly or through OVMF)
    rootfs: Path                    # ext4 + dm-verity tree (no superblock); attach first, read-only
    cmdline: str                    # pins the rootfs root hash and salt (dm-mod.create=)
    manifest_path: Path             # manifest.json in the cache (the complete UVM's is copied to build/uvm/)
    root_hash: str
    salt: str
    firmware: Path | None           # AmdSevX64 OVMF for SEV-SNP launches (None if not built)
    root_device: str = ROOT_DEVICE
    initrd: Path | None = None      # no initramfs: the root is opened by the kernel (DM_INIT)
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def expected_measurement(self, vcpus: int, cpu_type: str = DEFAULT_CPU_TYPE) -> str | None:
        """SNP launch digest for this UVM with `vcpus` vCPUs of QEMU model `cpu_type` (None without firmware)."""
        if self.firmware is None:
            return None
        for m in (self.manifest.get("snp") or {}).get("measurements", []):
            if m["vcpus"] == vcpus and m["cpu_type"] == cpu_type:
                return str(m["measurement"])
        req = MeasureRequest(mode=Mode.snp, ovmf=self.firmware, vcpus=vcpus, vcpu_type=cpu_type, kernel=self.kernel,
                             append=self.cmdline, guest_features=QEMU_SNP_GUEST_FEATURES)
        return launch_digest(req).hex()


def uvm_key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def ensure_uvm(*, firmware: bool = True) -> UvmArtifacts:
    """Build (or find in the cache) the UVM and write its manifest; see the module docstring."""
    kernel = build_kernel()
    tar = build_rootfs_tar(build_base())
    rootfs = build_rootfs_image(tar)
    fw: FirmwareArtifact | None = build_firmware() if firmware else None
    cmdline = kernel_cmdline(rootfs)
    key = uvm_key(kernel.key, rootfs.key, fw.key if fw else "no-firmware", cmdline)
    out = cache_dir() / "uvm" / "manifests" / key / "manifest.json"
    if not out.is_file():
        with file_lock(out.with_name(".lock")):
            if not out.is_file():
                atomic_write(out, manifest_bytes(build_manifest(kernel, tar, rootfs, cmdline, fw)))
    data = out.read_bytes()
    local = BUILD_DIR / "uvm" / "manifest.json"
    if fw is not None and (not local.is_file() or local.read_bytes() != data):
        atomic_write(local, data)   # the complete UVM's manifest only (a firmware-less one lacks the measurement)
    return UvmArtifacts(kernel=kernel.bzimage, rootfs=rootfs.path, cmdline=cmdline, manifest_path=out,
                        root_hash=rootfs.root_hash, salt=rootfs.salt.hex(), firmware=fw.path if fw else None,
                        manifest=json.loads(data))
