"""`parma-sandbox attest ...`: display, fetch and verify SEV-SNP evidence (modelled on snpguest)."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sandbox.attest.amd_certs import load_certificate_file
from sandbox.attest.emulated_ca import load_emulated_ca
from sandbox.attest.evidence import (
    certificates_from_dir,
    complete_from_kds,
    evidence_document,
    product_hint,
    read_report_file,
    write_certs_dir,
)
from sandbox.attest.id_keys import parse_digest
from sandbox.attest.kds import KdsClient
from sandbox.attest.roots import CertRole
from sandbox.attest.verify import Expectations, Verdict, verify_report
from sandbox.cli.common import emit, format_option, info, render_table
from sandbox.fsutil import atomic_write
from sandbox.progress import step
from sandbox.shared.errors import CheckFailed, GuestError, InputError
from sandbox.shared.snp.binding import MAX_NONCE, MIN_NONCE, report_data_for
from sandbox.shared.snp.cert_table import parse_cert_table
from sandbox.shared.snp.evidence import ReportEvidence
from sandbox.shared.snp.key_info import SigningKey
from sandbox.shared.snp.product import Product, parse_product
from sandbox.shared.snp.report import AttestationReport, ReportFormatError, parse_report

PathArg = click.Path(path_type=Path, dir_okay=False)
DirArg = click.Path(path_type=Path, file_okay=False)


def parse_hex(value: str | None, option: str, size: int, *, pad: bool = False) -> bytes | None:
    """Hex of exactly `size` bytes (or at most `size`, zero-padded, when `pad`)."""
    if value is None:
        return None
    text = value.strip().removeprefix("0x")
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise InputError(f"{option}: {value!r} is not hex") from None
    if len(data) == size or (pad and 0 < len(data) < size):
        return data.ljust(size, b"\0")
    want = f"at most {size}" if pad else f"exactly {size}"
    raise InputError(f"{option}: expected {want} bytes ({2 * size} hex digits), got {len(data)}")


def parse_timestamp(value: str | None) -> dt.datetime | None:
    """ISO 8601 (2025-06-01, 2025-06-01T12:00:00Z) or Unix seconds; naive times are UTC."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        try:
            return dt.datetime.fromtimestamp(int(text), dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise InputError(f"--at: {value!r} is out of range") from None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"--at: {value!r} is not a timestamp",
                         hint="use ISO 8601 (2025-06-01 or 2025-06-01T12:00:00Z) or Unix seconds") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _product_opt(value: str | None) -> Product | None:
    return parse_product(value)[0] if value else None


def load_report(path: Path, product: str | None = None) -> AttestationReport:
    """A user's report file, to decode (not to verify): bytes that are not a report are bad input here,
    where `attest verify` counts them as a failed check."""
    try:
        return parse_report(read_report_file(path).report, product=_product_opt(product), source=str(path))
    except ReportFormatError as e:
        raise InputError(e.message, hint=e.hint) from None


def kds_client(kds_url: str | None, offline: Path | None) -> KdsClient:
    if offline is not None and not offline.is_dir():
        raise InputError(f"--offline: {offline} is not a directory")
    return KdsClient(base_url=kds_url, offline_dir=offline)


product_option = click.option("--product", help="Milan, Genoa or Turin (needed for v2 reports when the "
                                                "certificates don't tell; a stepping like Milan-B0 is checked too).")
kds_options = [
    click.option("--kds-url", help="KDS base URL (default: $PARMA_SANDBOX_KDS_URL, else https://kdsintf.amd.com)."),
    click.option("--offline", type=DirArg, help="Read certificates from this bundle directory only (KDS cache layout)."),
]


def with_kds_options(f: Any) -> Any:
    for option in reversed(kds_options):
        f = option(f)
    return f


@click.group("attest")
def attest() -> None:
    """SEV-SNP attestation: display, fetch certificates, verify, get a report from a sandbox."""


# --- display ------------------------------------------------------------------------------------

def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in d.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


@attest.command("display")
@click.argument("report_file", type=PathArg)
@product_option
@format_option
def display(report_file: Path, product: str | None, fmt: str | None) -> None:
    """Decode every field of an ATTESTATION_REPORT (binary or hex)."""
    report = load_report(report_file, product)
    emit(report.to_dict(), fmt, lambda d: render_table(["field", "value"], _flatten(d)))


# --- fetch --------------------------------------------------------------------------------------

@attest.command("fetch")
@click.argument("what", type=click.Choice(["vcek", "ca"]))
@click.argument("report_file", type=PathArg)
@click.option("--out", "out_dir", type=DirArg, default=Path("."), show_default=True,
              help="Directory to write vcek.pem / ask.pem (asvk.pem) and ark.pem into.")
@product_option
@with_kds_options
def fetch(what: str, report_file: Path, out_dir: Path, product: str | None, kds_url: str | None,
          offline: Path | None) -> None:
    """Get the VCEK for REPORT_FILE's chip and TCB, or its product's CA chain, from AMD's KDS."""
    report = load_report(report_file, product)
    prod = report.product or _product_opt(product)
    if prod is None:
        raise InputError(f"{report_file}: a v{report.version} report does not say which product it is from",
                         hint="add --product Milan|Genoa|Turin")
    report = report.with_product(prod)
    client = kds_client(kds_url, offline)
    signer = CertRole.VLEK if report.signing_key == SigningKey.VLEK else CertRole.VCEK
    if what == "vcek":
        if signer == CertRole.VLEK:
            raise InputError("this report is signed by a VLEK; AMD's KDS serves VLEKs only to cloud providers",
                             hint="take the VLEK from the host's certificate table (the evidence)")
        certs = [client.vcek(prod, report.chip_id, report.reported_tcb)]
    else:
        certs = client.cert_chain(prod, signer)  # type: ignore[assignment]
    for path in write_certs_dir(out_dir, certs):  # type: ignore[arg-type]
        click.echo(str(path))


# --- verify -------------------------------------------------------------------------------------

def _render_result(d: dict[str, Any]) -> str:
    rows = [(c["status"].upper(), c["name"], c["detail"]) for c in d["checks"]]
    lines = [render_table(["result", "check", "detail"], rows), ""]
    if d["verified"]:
        what = f"{d['product'] or 'SEV-SNP'} report signed by the {d['signer']}"
        if d["emulated"]:
            what = "EMULATED evidence (this installation's test CA, not AMD hardware), accepted by --allow-emulated"
        lines.append(f"verified: {what}")
    else:
        lines.append("NOT verified: " + ", ".join(d["failed"]) + " failed")
    return "\n".join(lines)


@attest.command("verify")
@click.argument("report_file", type=PathArg)
@click.option("--certs", "certs_dir", type=DirArg, help="Directory with vcek/vlek, ask/asvk and ark (.pem/.der).")
@click.option("--vcek", "vek_file", type=PathArg, help="The VCEK or VLEK certificate (PEM or DER).")
@click.option("--chain", "chain_file", type=PathArg, help="PEM bundle of ASK/ASVK and ARK, in either order.")
@click.option("--measurement", help="Expected MEASUREMENT (96 hex digits).")
@click.option("--host-data", help="Expected HOST_DATA (64 hex digits).")
@click.option("--policy", "policy_file", type=PathArg,
              help="Execution policy file: HOST_DATA must be its SHA-256 (of the Rego text for ACI's ccePolicy, "
                   "also given as base64 or in an ARM template).")
@click.option("--report-data", help="Expected REPORT_DATA (up to 128 hex digits, zero-padded).")
@click.option("--nonce", help="Verifier nonce (hex); with --runtime-key, REPORT_DATA = SHA-512(nonce || key DER).")
@click.option("--runtime-key", "runtime_key", type=PathArg, help="The agent's runtime public key (DER or PEM SPKI).")
@click.option("--id-key-digest", help="Expected ID_KEY_DIGEST: the ID key that signed the launch's ID block "
                                     "(96 hex digits, base64, or the key file itself).")
@click.option("--author-key-digest", help="Expected AUTHOR_KEY_DIGEST (as --id-key-digest); also requires "
                                         "KEY_INFO.AUTHOR_KEY_EN.")
@click.option("--vmpl", type=click.IntRange(0, 3), default=0, show_default=True, help="Expected VMPL.")
@click.option("--any-vmpl", is_flag=True, help="Do not check the VMPL.")
@click.option("--min-tcb", help="Minimum REPORTED_TCB: bl=N,tee=N,snp=N,ucode=N[,fmc=N] or a 16-hex-digit TCB.")
@click.option("--allow-debug", is_flag=True, help="Accept reports whose guest policy allows debugging.")
@click.option("--allow-migration-agent", is_flag=True, help="Accept guests that allow a migration agent.")
@click.option("--no-smt", "forbid_smt", is_flag=True, help="Require a guest policy that forbids SMT.")
@click.option("--csp-id", help="Expected cspID of a VLEK (e.g. 'CN=cc-us-east-2.amazonaws.com').")
@click.option("--at", "at_text", help="Check certificate validity at this time (ISO 8601 or Unix seconds).")
@click.option("--allow-emulated", is_flag=True, help="Accept evidence signed by this installation's emulated PSP.")
@click.option("--fetch", "allow_fetch", is_flag=True, help="Fetch missing certificates from AMD's KDS.")
@product_option
@with_kds_options
@format_option
def verify(report_file: Path, certs_dir: Path | None, vek_file: Path | None, chain_file: Path | None,
           measurement: str | None, host_data: str | None, policy_file: Path | None, report_data: str | None,
           nonce: str | None, runtime_key: Path | None, id_key_digest: str | None, author_key_digest: str | None,
           vmpl: int, any_vmpl: bool, min_tcb: str | None,
           allow_debug: bool, allow_migration_agent: bool, forbid_smt: bool, csp_id: str | None,
           at_text: str | None, allow_emulated: bool, allow_fetch: bool, product: str | None,
           kds_url: str | None, offline: Path | None, fmt: str | None) -> None:
    """Verify REPORT_FILE: certificate chain to a pinned AMD root, signature, TCB and expected values.

    Exit status: 0 verified, 1 a check failed (each is named), 2 bad input.
    """
    if certs_dir and (vek_file or chain_file):
        raise InputError("--certs cannot be combined with --vcek/--chain")
    if host_data and policy_file:
        raise InputError("give either --host-data or --policy, not both")
    if report_data and (nonce or runtime_key):
        raise InputError("give either --report-data or --nonce with --runtime-key, not both")
    if runtime_key and not nonce:
        raise InputError("--runtime-key needs --nonce")
    expected_host_data = parse_hex(host_data, "--host-data", 32)
    if policy_file is not None:
        # ACI's Rego as ACI hashes it (also from its base64 or an ARM template's ccePolicy), JSON as it is
        from sandbox.aci.ccepolicy import policy_file_bytes  # ARM and Rego reading, when asked for
        expected_host_data = hashlib.sha256(policy_file_bytes(policy_file)).digest()
    expected_report_data = parse_hex(report_data, "--report-data", 64, pad=True)
    loaded = read_report_file(report_file)
    if nonce and not runtime_key and loaded.evidence is None:
        raise InputError("--nonce needs --runtime-key (or an evidence file from 'attest report', which has the key)")
    if nonce or runtime_key or (loaded.evidence is not None and not report_data):
        # The binding: SHA-512(nonce || runtime key DER); an evidence file supplies what is not given.
        key_der = _runtime_key_der(runtime_key) if runtime_key else loaded.evidence.runtime_public_key  # type: ignore[union-attr]
        nonce_bytes = _nonce_bytes(nonce) if nonce else loaded.evidence.nonce  # type: ignore[union-attr]
        expected_report_data = report_data_for(nonce_bytes, key_der)
        if not nonce:
            info("note: REPORT_DATA is checked against the nonce recorded in the evidence; pass --nonce "
                 "with the nonce you sent to check freshness")
    expect = Expectations(
        measurement=parse_hex(measurement, "--measurement", 48), host_data=expected_host_data,
        report_data=expected_report_data, vmpl=None if any_vmpl else vmpl, min_tcb=min_tcb, product=product,
        allow_debug=allow_debug, allow_migration_agent=allow_migration_agent, forbid_smt=forbid_smt,
        csp_id=csp_id, at=parse_timestamp(at_text), allow_emulated=allow_emulated,
        id_key_digest=parse_digest(id_key_digest, "--id-key-digest") if id_key_digest else None,
        author_key_digest=parse_digest(author_key_digest, "--author-key-digest") if author_key_digest else None)

    raw = loaded.report
    report = parse_report(raw, product=_product_opt(product), source=str(report_file))
    certs = loaded.certificates()
    if certs_dir:
        certs += certificates_from_dir(certs_dir)
    for path in (vek_file, chain_file):
        if path is not None:
            certs += load_certificate_file(path)
    certs = complete_from_kds(report, certs, product_hint(report, certs, product), kds_client(kds_url, offline),
                              fetch=allow_fetch)
    result = verify_report(raw, certs, expect, emulated_ca=load_emulated_ca())
    emit(result.to_dict(), fmt, _render_result)
    if not result.verified:
        first = result.failed()[0]
        raise CheckFailed(f"verification failed: {', '.join(c.name for c in result.failed())}",
                          hint=f"{first.name}: {first.detail}")
    if result.emulated:
        info("note: the evidence is EMULATED (no AMD hardware vouches for it)")
    for check in result.checks:
        if check.status == Verdict.SKIP and check.name in ("report.measurement", "report.host_data"):
            info(f"note: {check.name} not checked (no expected value given)")


# --- report -------------------------------------------------------------------------------------

NONCE_SIZES = (MIN_NONCE, MAX_NONCE)  # bytes, as the agent's get_report takes them (sandbox/shared/snp/binding.py)


@attest.command("report")
@click.argument("name")
@click.option("--nonce", help=f"Verifier nonce, {MIN_NONCE}..{MAX_NONCE} bytes of hex (default: 32 random bytes).")
@click.option("-o", "--output", type=PathArg, help="Write the evidence document here (default: stdout).")
@format_option
def report(name: str, nonce: str | None, output: Path | None, fmt: str | None) -> None:
    """Ask sandbox NAME's agent for a fresh report bound to a nonce and to its runtime key.

    The evidence document holds the report, the platform's certificate table, the agent's runtime
    public key and the nonce; 'attest verify FILE --nonce HEX' checks it.
    """
    from sandbox.launch.lifecycle import connect  # the launch stack is only needed here
    from sandbox.launch.pipeline import load_running
    from sandbox.shared.messages import GetReportRequest

    nonce_bytes = _nonce_bytes(nonce) if nonce else secrets.token_bytes(32)
    if not NONCE_SIZES[0] <= len(nonce_bytes) <= NONCE_SIZES[1]:
        raise InputError(f"--nonce must be {NONCE_SIZES[0]}..{NONCE_SIZES[1]} bytes, got {len(nonce_bytes)}")
    record = load_running(name)
    with step(f"Ask {name}'s agent for a report"), connect(record) as client:
        result = client.call(GetReportRequest(nonce_bytes), timeout=120)
    try:
        evidence = ReportEvidence.from_payload(result, source=f"the agent of {name}")
    except InputError as e:   # the guest's answer, not the user's input
        raise GuestError(e.message) from None
    if evidence.nonce != nonce_bytes:
        raise GuestError(f"the agent of {name} answered for another nonce ({evidence.nonce.hex()})")
    if not evidence.binding_holds():
        raise GuestError(f"the report from {name} does not bind the nonce and the runtime key "
                         "(REPORT_DATA != SHA-512(nonce || runtime key))")
    document = evidence_document(evidence, name)
    if output is None:
        click.echo(document.decode(), nl=False)
        return
    atomic_write(output, document)
    parsed = parse_report(evidence.report)
    summary = {"sandbox": name, "evidence": str(output), "backend": evidence.backend, "nonce": nonce_bytes.hex(),
               "runtime_key_sha256": hashlib.sha256(evidence.runtime_public_key).hexdigest(),
               "measurement": parsed.measurement.hex(), "host_data": parsed.host_data.hex(),
               "certificates": len(parse_cert_table(evidence.cert_table)) if evidence.cert_table else 0}
    emit(summary, fmt, lambda d: render_table(["field", "value"], list(d.items())))
    emulated = " --allow-emulated" if evidence.backend == "emulated" else ""
    info(f"verify with: parma-sandbox attest verify {output} --nonce {nonce_bytes.hex()}{emulated} "
         "[--policy POLICY] [--measurement HEX]")


def _nonce_bytes(nonce: str) -> bytes:
    try:
        return bytes.fromhex(nonce.strip().removeprefix("0x"))
    except ValueError:
        raise InputError(f"--nonce: {nonce!r} is not hex") from None


def _runtime_key_der(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read runtime key {path}: {e.strerror}") from e
    pem = b"-----BEGIN PUBLIC KEY-----" in data
    try:
        key = serialization.load_pem_public_key(data) if pem else serialization.load_der_public_key(data)
    except ValueError as e:
        raise InputError(f"{path}: not a {'PEM' if pem else 'DER'} public key ({e})") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise InputError(f"{path}: not an EC P-384 public key", hint="the agent's runtime key is P-384")
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


commands = [attest]
