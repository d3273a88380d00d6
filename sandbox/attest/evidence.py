"""Reading and writing evidence files: reports, certificate directories and certificate tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from sandbox.attest.amd_certs import (
    common_name,
    load_certificate_file,
    load_certificates,
    role_of,
    to_pem,
)
from sandbox.attest.kds import KdsClient
from sandbox.attest.roots import CertRole
from sandbox.fsutil import atomic_write
from sandbox.shared.errors import InputError
from sandbox.shared.snp.cert_table import parse_cert_table
from sandbox.shared.snp.evidence import ReportEvidence
from sandbox.shared.snp.key_info import SigningKey
from sandbox.shared.snp.product import Product, parse_product
from sandbox.shared.snp.report import AttestationReport, decode_report_file

CERT_SUFFIXES = {".pem", ".der", ".crt", ".cer"}


EVIDENCE_FORMAT = "parma-sandbox/evidence/v1"


@dataclass(frozen=True)
class EvidenceFile:
    """What a report file holds: the raw report, plus (for `attest report` output) the agent's evidence."""
    report: bytes
    evidence: ReportEvidence | None = None
    sandbox: str | None = None

    def certificates(self) -> list[x509.Certificate]:
        if self.evidence is None or not self.evidence.cert_table:
            return []
        return certificates_from_table(self.evidence.cert_table, source="the evidence's certificate table")


def evidence_document(evidence: ReportEvidence, sandbox: str) -> bytes:
    doc = {"format": EVIDENCE_FORMAT, "sandbox": sandbox, "evidence": evidence.to_payload()}
    return json.dumps(doc, indent=2).encode() + b"\n"


def read_report_file(path: Path) -> EvidenceFile:
    """A raw report (binary or hex text) or an evidence document written by `attest report`."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read report {path}: {e.strerror}") from e
    if raw.lstrip()[:1] == b"{":
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(doc, dict) or doc.get("format") != EVIDENCE_FORMAT or set(doc) != {
                "format", "sandbox", "evidence"}:
            raise InputError(f"{path}: not a parma-sandbox evidence document ({EVIDENCE_FORMAT})")
        evidence = ReportEvidence.from_payload(doc["evidence"], source=str(path))
        return EvidenceFile(evidence.report, evidence, str(doc["sandbox"]))
    return EvidenceFile(decode_report_file(raw, source=str(path)))


def certificates_from_dir(directory: Path) -> list[x509.Certificate]:
    """Every certificate in DIR's *.pem/*.der/*.crt/*.cer files (snpguest's ark/ask/vcek.pem layout works)."""
    if not directory.is_dir():
        raise InputError(f"certificate directory {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in CERT_SUFFIXES)
    if not files:
        raise InputError(f"no certificate files (*.pem, *.der, *.crt, *.cer) in {directory}")
    return [cert for path in files for cert in load_certificate_file(path)]


def certificates_from_table(table: bytes, *, source: str = "certificate table") -> list[x509.Certificate]:
    return [cert for entry in parse_cert_table(table) if entry.kind is not None and entry.kind.value != "crl"
            for cert in load_certificates(entry.data, source=f"{source} ({entry.kind.value})")]


FILE_NAMES = {CertRole.ARK: "ark", CertRole.ASK: "ask", CertRole.ASVK: "asvk", CertRole.VCEK: "vcek",
              CertRole.VLEK: "vlek"}


def write_certs_dir(directory: Path, certs: Sequence[x509.Certificate]) -> list[Path]:
    """Write each certificate as <role>.pem (ark, ask, asvk, vcek, vlek)."""
    written = []
    for cert in certs:
        role = role_of(cert)
        if role is None:
            raise InputError(f"{common_name(cert.subject)!r} is not an SEV-SNP certificate")
        path = directory / f"{FILE_NAMES[role]}.pem"
        atomic_write(path, to_pem(cert))
        written.append(path)
    return written


def product_hint(report: AttestationReport, certs: Sequence[x509.Certificate], product: str | None) -> Product | None:
    """The product a report is from: CPUID, --product, or the name of the CA that issued its VCEK."""
    if report.product:
        return report.product
    if product:
        return parse_product(product)[0]
    for cert in certs:
        if role_of(cert) in (CertRole.VCEK, CertRole.VLEK):
            issuer = common_name(cert.issuer).removeprefix("SEV-").removeprefix("VLEK-").split(" ")[0]
            for p in Product:
                if issuer == p.value:
                    return p
    return None


def complete_from_kds(report: AttestationReport, certs: list[x509.Certificate], product: Product | None,
                      kds: KdsClient, *, fetch: bool) -> list[x509.Certificate]:
    """Add the VCEK and CA chain from the KDS cache (and from KDS itself when `fetch`) if missing."""
    signer = CertRole.VLEK if report.signing_key == SigningKey.VLEK else CertRole.VCEK
    roles = {role_of(c) for c in certs}
    products = [product] if product else [Product.MILAN, Product.GENOA]  # v2 without hints: try the cache
    out = list(certs)
    for candidate in products:
        allowed = fetch and product is not None
        if signer == CertRole.VCEK and signer not in roles and any(report.chip_id):
            tcb = report.with_product(candidate).reported_tcb
            if (vcek := kds.vcek(candidate, report.chip_id, tcb, fetch=allowed)) is not None:
                out.append(vcek)
                roles.add(signer)
        if CertRole.ARK not in roles and roles & {CertRole.VCEK, CertRole.VLEK}:
            if (chain := kds.cert_chain(candidate, signer, fetch=allowed)) is not None:
                out.extend(chain)
                roles.add(CertRole.ARK)
    return out
