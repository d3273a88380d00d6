"""`parma-sandbox build [kernel|rootfs|firmware-snp|uvm]`: build (or find cached) UVM parts."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import click

from sandbox.cli.common import emit, render_table


class BuildTarget(StrEnum):
    kernel = "kernel"
    rootfs = "rootfs"
    firmware_snp = "firmware-snp"
    uvm = "uvm"


def _table(doc: dict[str, Any]) -> str:
    rows = [(k, v) for k, v in doc.items() if not isinstance(v, (dict, list))]
    return render_table(("item", "value"), rows)


def _kernel(force: bool) -> dict[str, Any]:
    from sandbox.uvm.kernel import build_kernel

    k = build_kernel(force=force)
    return {"kernel": str(k.bzimage), "config": str(k.config), "release": k.release,
            "source": f"linux-source-6.12 {k.source_version}", "key": k.key}


def _rootfs(update_lock: bool) -> dict[str, Any]:
    from sandbox.uvm.base import build_base
    from sandbox.uvm.image import build_rootfs_image, kernel_cmdline
    from sandbox.uvm.overlay import build_rootfs_tar

    base = build_base(update_lock=update_lock)
    tar = build_rootfs_tar(base)
    img = build_rootfs_image(tar)
    return {"rootfs": str(img.path), "size": img.size, "sha256": img.sha256, "root_hash": img.root_hash,
            "salt": img.salt.hex(), "packages": len(base.packages),
            "installed_kib": sum(p.installed_kib for p in base.installed), "cmdline": kernel_cmdline(img)}


def _firmware(force: bool) -> dict[str, Any]:
    from sandbox.uvm.firmware import build_firmware, published_path

    fw = build_firmware(force=force)
    return {"firmware": str(fw.path), "published": str(published_path()), "sha256": fw.sha256,
            "source": f"edk2 {fw.source_version}"}


def _uvm(update_lock: bool, firmware: bool) -> dict[str, Any]:
    from sandbox.uvm.base import build_base
    from sandbox.uvm.build import ensure_uvm

    if update_lock:
        build_base(update_lock=True)
    uvm = ensure_uvm(firmware=firmware)
    doc: dict[str, Any] = {"kernel": str(uvm.kernel), "rootfs": str(uvm.rootfs),
                           "firmware": str(uvm.firmware) if uvm.firmware else None,
                           "manifest": str(uvm.manifest_path), "root_hash": uvm.root_hash, "salt": uvm.salt,
                           "cmdline": uvm.cmdline}
    expected = uvm.manifest.get("expected_measurement")
    if expected:
        doc["expected_measurement"] = f"{expected['snp']} ({expected['vcpus']} vCPU, {expected['cpu_type']})"
    return doc


@click.command("build")
@click.argument("target", type=click.Choice([t.value for t in BuildTarget]), default=BuildTarget.uvm.value)
@click.option("--force", is_flag=True, help="Rebuild the kernel or firmware even when cached.")
@click.option("--update-lock", is_flag=True,
              help="Resolve the rootfs packages afresh and rewrite images/uvm/packages.lock.json.")
@click.option("--no-firmware", is_flag=True, help="uvm: skip the AmdSev OVMF (the manifest then has no "
                                                  "expected SNP measurement).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default=None,
              help="Output format (default: the global --format).")
def build(target: str, force: bool, update_lock: bool, no_firmware: bool, fmt: str | None) -> None:
    """Build the UVM or one of its parts (default: uvm). Everything is cached; unchanged parts are reused."""
    t = BuildTarget(target)
    if force and t not in (BuildTarget.kernel, BuildTarget.firmware_snp):
        raise click.UsageError("--force applies to 'kernel' and 'firmware-snp'")
    if update_lock and t not in (BuildTarget.rootfs, BuildTarget.uvm):
        raise click.UsageError("--update-lock applies to 'rootfs' and 'uvm'")
    if t == BuildTarget.kernel:
        doc = _kernel(force)
    elif t == BuildTarget.rootfs:
        doc = _rootfs(update_lock)
    elif t == BuildTarget.firmware_snp:
        doc = _firmware(force)
    else:
        doc = _uvm(update_lock, firmware=not no_firmware)
    emit(doc, fmt, _table)


commands = [build]
