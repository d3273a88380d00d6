"""The UVM manifest: what the UVM is made of, each part with its SHA-256, and its expected measurement.

A pure function of the build inputs: no paths, no build times, so two builds of the same inputs give
byte-identical manifests (the reproducibility test compares them). The files themselves are named by
role; UvmArtifacts carries where they are on this machine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sandbox.uvm import image as image_mod
from sandbox.uvm.base import SOURCE_DATE_EPOCH
from sandbox.uvm.fetch import sha256_file
from sandbox.uvm.firmware import PLATFORM, FirmwareArtifact
from sandbox.uvm.kernel import KernelArtifact, fragment_files
from sandbox.uvm.measure import (
    MANIFEST_CPU_TYPES,
    MANIFEST_VCPUS,
    QEMU_SNP_GUEST_FEATURES,
    expected_snp_measurements,
)
from sandbox.uvm.overlay import AGENT_PREFIX, RootfsTar, agent_files
from sandbox.uvm.pins import EDK2, KERNEL
from sandbox.vmm.snp import SNP_CPU_MODEL

FORMAT = 1
DEFAULT_VCPUS = 1
DEFAULT_CPU_TYPE = SNP_CPU_MODEL   # the model SEV-SNP launches use (sandbox/vmm/snp.py)


def _file(path: Path, **extra: Any) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size, **extra}


def build_manifest(kernel: KernelArtifact, tar: RootfsTar, rootfs: image_mod.RootfsImage, cmdline: str,
                   firmware: FirmwareArtifact | None) -> dict[str, Any]:
    installed = {(p.name, p.arch): p for p in tar.base.installed}
    packages = []
    for p in tar.base.packages:
        inst = installed.get((p.name, p.arch))
        packages.append({"name": p.name, "version": p.version, "arch": p.arch, "deb_sha256": p.sha256,
                         "deb_size": p.size, "installed_kib": inst.installed_kib if inst else None})
    doc: dict[str, Any] = {
        "format": FORMAT,
        "kernel": _file(kernel.bzimage, release=kernel.release, config_sha256=sha256_file(kernel.config),
                        source={"package": KERNEL.package, "version": KERNEL.version,
                                "deb_sha256": KERNEL.deb.sha256, "tarball_sha256": KERNEL.tarball_sha256},
                        fragments={f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in fragment_files()}),
        "cmdline": cmdline,
        "cmdline_sha256": hashlib.sha256(cmdline.encode()).hexdigest(),
        "rootfs": _file(rootfs.path, root_hash=rootfs.root_hash, salt=rootfs.salt.hex(),
                        data_blocks=rootfs.data_blocks, hash_start_block=rootfs.hash_start_block,
                        verity={"format": 1, "algorithm": "sha256", "data_block_size": 4096,
                                "hash_block_size": 4096, "superblock": False,
                                "options": list(image_mod.VERITY_OPTIONS)},
                        device=image_mod.ROOT_DEVICE, tar_sha256=tar.sha256,
                        source_date_epoch=SOURCE_DATE_EPOCH),
        "agent": {"prefix": "/" + AGENT_PREFIX,
                  "files": {dest: hashlib.sha256(src.read_bytes()).hexdigest() for dest, src in agent_files()}},
        "packages": packages,
        "firmware": None,
        "snp": None,
    }
    if firmware is not None:
        doc["firmware"] = _file(firmware.path, platform=PLATFORM,
                                source={"package": "edk2", "version": EDK2.version, "orig_sha256": EDK2.orig.sha256,
                                        "debian_sha256": EDK2.debian.sha256})
        table = expected_snp_measurements(firmware.path, kernel.bzimage, cmdline)
        default = next(m for m in table if m["vcpus"] == DEFAULT_VCPUS and m["cpu_type"] == DEFAULT_CPU_TYPE)
        doc["snp"] = {
            "launch": {"firmware": "AmdSevX64 OVMF via -bios", "kernel_hashes": True, "initrd": None,
                       "guest_features": hex(QEMU_SNP_GUEST_FEATURES), "vmm": "QEMU"},
            "vcpus": list(MANIFEST_VCPUS), "cpu_types": list(MANIFEST_CPU_TYPES),
            "measurements": table,
        }
        doc["expected_measurement"] = {"snp": default["measurement"], "vcpus": DEFAULT_VCPUS,
                                       "cpu_type": DEFAULT_CPU_TYPE}
    return doc


def manifest_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()

