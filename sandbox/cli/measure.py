"""`parma-sandbox measure`: expected SEV/SEV-ES/SEV-SNP launch digests, flag-compatible with sev-snp-measure.

Given the same flags it prints the same hex (or base64) line as `sev-snp-measure`. `--uvm` fills in
this project's UVM: the AmdSev OVMF, the kernel and the measured command line.

With `--id-key KEY` (SNP modes) it also signs an ID block for that digest (SNP ABI ID_BLOCK and
ID_AUTH_INFO, sandbox/attest/id_keys.py), optionally with an author key, and prints them the way
QEMU takes them (id-block=..., id-auth=...) with the key digests a report will carry; `--id-out FILE`
writes them for `parma-sandbox up --id-block FILE`, so the ID key never has to be on the lab host.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from sandbox.attest.id_keys import IdMaterial, load_private_key, make_id_material
from sandbox.cli.common import OutputFormat, echo_json, info, resolve_format
from sandbox.fsutil import atomic_write
from sandbox.shared.errors import InputError
from sandbox.uvm.measure import (
    CPU_TYPES,
    DigestEncoding,
    MeasureRequest,
    Mode,
    VmmType,
    format_digest,
    launch_digest,
)
from sandbox.vmm.snp import SNP_POLICY_DEFAULT


def _int_auto(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 0)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an integer (decimal, or hex with 0x)") from None


@click.command("measure")
@click.option("--mode", type=click.Choice([m.value for m in Mode]), required=True, help="Guest mode.")
@click.option("--vcpus", type=int, metavar="N", help="Number of guest vCPUs.")
@click.option("--vcpu-type", type=click.Choice(CPU_TYPES), metavar="CPUTYPE",
              help=f"Type of guest vCPU ({', '.join(CPU_TYPES)}).")
@click.option("--vcpu-sig", callback=_int_auto, metavar="VALUE", help="Guest vCPU signature value.")
@click.option("--vcpu-family", type=int, metavar="FAMILY", help="Guest vCPU family.")
@click.option("--vcpu-model", type=int, metavar="MODEL", help="Guest vCPU model.")
@click.option("--vcpu-stepping", type=int, metavar="STEPPING", help="Guest vCPU stepping.")
@click.option("--vmm-type", type=click.Choice([v.value for v in VmmType]), default="QEMU", show_default=True,
              help="Type of guest VMM.")
@click.option("--ovmf", type=click.Path(path_type=Path, dir_okay=False), metavar="PATH",
              help="OVMF file to calculate the hash from (default with --uvm: the AmdSev OVMF).")
@click.option("--kernel", type=click.Path(path_type=Path, dir_okay=False), metavar="PATH",
              help="Kernel file to calculate the hash from.")
@click.option("--initrd", type=click.Path(path_type=Path, dir_okay=False), metavar="PATH",
              help="Initrd file to calculate the hash from (use with --kernel).")
@click.option("--append", metavar="CMDLINE", help="Kernel command line to calculate the hash from.")
@click.option("--guest-features", callback=_int_auto, default="0x1", show_default=True, metavar="VALUE",
              help="SEV_FEATURES of the guest (0x1 with QEMU >= 9.1).")
@click.option("--output-format", type=click.Choice([f.value for f in DigestEncoding]), default="hex",
              show_default=True, help="Measurement output format.")
@click.option("--snp-ovmf-hash", metavar="HASH", help="Precalculated hash of the OVMF binary (hex).")
@click.option("--dump-vmsa", is_flag=True, help="Write the measured VMSAs to vmsa<N>.bin in the current directory.")
@click.option("--svsm", type=click.Path(path_type=Path, dir_okay=False), metavar="PATH", help="SVSM binary (snp:svsm).")
@click.option("--vars-size", type=int, metavar="SIZE", help="Size of the OVMF_VARS file in bytes (snp:svsm).")
@click.option("--vars-file", type=click.Path(path_type=Path, dir_okay=False), metavar="PATH",
              help="OVMF_VARS file (snp:svsm).")
@click.option("-v", "--verbose", is_flag=True, help="Print 'Calculated <MODE> guest measurement: ...'.")
@click.option("--id-key", type=click.Path(path_type=Path, dir_okay=False), metavar="PATH",
              help="Sign an SNP ID block for the digest with this EC P-384 key (PEM or DER).")
@click.option("--author-key", type=click.Path(path_type=Path, dir_okay=False), metavar="PATH",
              help="Sign the ID key with this author key (launch with author-key-enabled).")
@click.option("--policy", "guest_policy", callback=_int_auto, default=hex(SNP_POLICY_DEFAULT), show_default=True,
              metavar="VALUE", help="Guest policy in the ID block (must equal the launch's policy).")
@click.option("--family-id", metavar="HEX", help="FAMILY_ID for the ID block (up to 16 bytes of hex).")
@click.option("--image-id", metavar="HEX", help="IMAGE_ID for the ID block (up to 16 bytes of hex).")
@click.option("--guest-svn", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="GUEST_SVN for the ID block.")
@click.option("--id-out", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Write the ID block, ID auth and digests here (JSON; for 'up --id-block FILE').")
@click.option("--uvm", "use_uvm", is_flag=True,
              help="Measure this project's UVM (building it if needed): fills --ovmf, --kernel and --append.")
@click.option("--format", "fmt", type=click.Choice([f.value for f in OutputFormat]), default=None,
              help="table prints the bare digest like sev-snp-measure; json prints a document.")
def measure(mode: str, vcpus: int | None, vcpu_type: str | None, vcpu_sig: int | None, vcpu_family: int | None,
            vcpu_model: int | None, vcpu_stepping: int | None, vmm_type: str, ovmf: Path | None,
            kernel: Path | None, initrd: Path | None, append: str | None, guest_features: int,
            output_format: str, snp_ovmf_hash: str | None, dump_vmsa: bool, svsm: Path | None,
            vars_size: int | None, vars_file: Path | None, id_key: Path | None, author_key: Path | None,
            guest_policy: int, family_id: str | None, image_id: str | None, guest_svn: int, id_out: Path | None,
            verbose: bool, use_uvm: bool, fmt: str | None) -> None:
    """Calculate an AMD SEV / SEV-ES / SEV-SNP guest launch measurement (sev-snp-measure compatible)."""
    if id_key is None and (author_key or id_out or family_id or image_id):
        raise InputError("--author-key, --family-id, --image-id and --id-out need --id-key")
    if id_key is not None and mode not in (Mode.snp, Mode.snp_svsm):
        raise InputError("ID blocks exist only for SEV-SNP: use --mode snp with --id-key")
    if use_uvm:
        from sandbox.uvm.build import ensure_uvm

        uvm = ensure_uvm()
        ovmf = ovmf or uvm.firmware
        kernel = kernel or uvm.kernel
        append = append if append is not None else uvm.cmdline
    if ovmf is None:
        raise InputError("--ovmf is required", hint="or use --uvm to measure this project's UVM")
    req = MeasureRequest(mode=Mode(mode), ovmf=ovmf, vcpus=vcpus, vcpu_type=vcpu_type, vcpu_sig=vcpu_sig,
                         vcpu_family=vcpu_family, vcpu_model=vcpu_model, vcpu_stepping=vcpu_stepping,
                         vmm_type=VmmType(vmm_type), kernel=kernel, initrd=initrd, append=append,
                         guest_features=guest_features, snp_ovmf_hash=snp_ovmf_hash, dump_vmsa=dump_vmsa,
                         svsm=svsm, vars_size=vars_size, vars_file=vars_file)
    digest = launch_digest(req, vmsa_dir=Path.cwd())
    text = format_digest(digest, DigestEncoding(output_format))
    material = None
    if id_key is not None:
        material = make_id_material(measurement=digest, policy=guest_policy, id_key=load_private_key(id_key),
                                    author_key=load_private_key(author_key, "author key") if author_key else None,
                                    family_id=_id16(family_id, "--family-id"), image_id=_id16(image_id, "--image-id"),
                                    guest_svn=guest_svn)
        if id_out is not None:
            atomic_write(id_out, (json.dumps(material.to_json(), indent=2) + "\n").encode())
    if resolve_format(fmt) == OutputFormat.json:
        echo_json({"mode": mode, "measurement": text, "format": output_format, "vcpus": vcpus,
                   "vcpu_type": vcpu_type, "guest_features": hex(guest_features),
                   "id": material.to_json() if material else None})
    elif material is not None:
        click.echo(text)
        _echo_id(material)
    elif verbose:
        names = {Mode.sev: "SEV", Mode.seves: "SEV_ES", Mode.snp: "SEV_SNP", Mode.snp_svsm: "SEV_SNP_SVSM"}
        label = names.get(Mode(mode))
        click.echo(f"Calculated {label} guest measurement: {text}" if label else text)
    else:
        click.echo(text)


commands = [measure]


def _id16(value: str | None, option: str) -> bytes:
    if value is None:
        return bytes(16)
    try:
        raw = bytes.fromhex(value.strip().removeprefix("0x"))
    except ValueError:
        raise InputError(f"{option}: {value!r} is not hex") from None
    if len(raw) > 16:
        raise InputError(f"{option}: at most 16 bytes (32 hex digits), got {len(raw)}")
    return raw.ljust(16, b"\0")


def _echo_id(material: IdMaterial) -> None:
    """QEMU's form (as sev-snp-measure's snp-create-id-block prints it) and the report digests."""
    doc = material.to_json()
    click.echo(f"id-block={doc['id_block']},id-auth={doc['id_auth']}"
               + (",author-key-enabled=on" if material.author_key_enabled else ""))
    click.echo(f"id-key-digest: {doc['id_key_digest']}")
    if doc["author_key_digest"]:
        click.echo(f"author-key-digest: {doc['author_key_digest']}")
    verify = f"--id-key-digest {doc['id_key_digest']}" + (
        f" --author-key-digest {doc['author_key_digest']}" if doc["author_key_digest"] else "")
    info(f"verify reports with: parma-sandbox attest verify REPORT {verify}")
