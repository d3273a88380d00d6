"""`parma-sandbox check`: what this host can do, and which TEE mode `up` will use.

Besides the TEE verdict it reports the libvirt side (sandbox/vmm/libvirt_probe.py): version, whether
its domain capabilities offer sev-snp, who runs QEMU and whether that user can use /dev/kvm.
"""

from __future__ import annotations

import click

from sandbox.cli.common import emit, format_option, render_table
from sandbox.hostcheck import Availability, CheckReport, check_host
from sandbox.progress import step
from sandbox.vmm.libvirt_probe import with_libvirt

MARK = {Availability.ok: "ok", Availability.missing: "MISSING", Availability.unusable: "UNUSABLE",
        Availability.info: "-"}


def _table(report: CheckReport) -> str:
    rows = []
    for item in report.items:
        rows.append((item.name, MARK[item.status], item.detail))
    out = [render_table(("check", "status", "detail"), rows), ""]
    out.append(f"tee: {report.tee.value}   accel: {report.accel.value}")
    for reason in report.reasons:
        out.append(f"  - {reason}")
    hints = [(i.name, i.hint) for i in report.items
             if i.hint and i.status in (Availability.missing, Availability.unusable)]
    if hints:
        out.append("")
        out.append("hints:")
        out.extend(f"  {name}: {hint}" for name, hint in hints)
    return "\n".join(out)


@click.command("check")
@format_option
def check(fmt: str | None) -> None:
    """Probe the host: QEMU, KVM, SEV-SNP, firmware, libvirt, vsock and tools."""
    with step("Probing host capabilities"):
        report = with_libvirt(check_host())
    emit(report.to_json(), fmt, lambda _: _table(report))


commands = [check]
