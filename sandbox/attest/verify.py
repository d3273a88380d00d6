"""Verify an SEV-SNP attestation report and its certificate chain; every check is listed.

Chain: VCEK (or VLEK) <- ASK (or ASVK) <- ARK, each RSASSA-PSS SHA-384/MGF1-SHA-384/salt 48,
checked with `verify_directly_issued_by` (snp.md §0: PolicyBuilder rejects VCEKs). The ARK and the
intermediate must hash to pinned AMD values (sandbox/attest/roots.py); this installation's emulated
CA is accepted instead only with `allow_emulated`. Then: VCEK/VLEK extensions (hwID vs CHIP_ID in
every encoding, SPLs == REPORTED_TCB, productName, cspID), the report signature (ECDSA P-384 over
bytes 0x000..0x29F, r/s little-endian), policy bits, VMPL, minimum TCB and the expected values.

Missing or unusable evidence (no VCEK, no chain, garbage certificates, a chain for another product)
raises InputError; a check that runs and fails is recorded and makes `verified` false.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sandbox.attest.amd_certs import (
    common_name,
    dedupe,
    has_amd_signature_profile,
    role_of,
    to_der,
    vek_extensions,
)
from sandbox.attest.emulated_ca import EMULATED_MARK, EmulatedCa
from sandbox.attest.roots import CertRole, fingerprint, pin_of
from sandbox.shared.errors import InputError
from sandbox.shared.snp.key_info import SigningKey
from sandbox.shared.snp.product import Product, layout_of, parse_product
from sandbox.shared.snp.report import SIG_ALGO_ECDSA_P384_SHA384, AttestationReport, parse_report
from sandbox.shared.snp.tcb import parse_tcb_spec


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"  # not applicable, or no expectation given


@dataclass(frozen=True)
class Check:
    name: str
    status: Verdict
    detail: str


@dataclass(frozen=True)
class Expectations:
    measurement: bytes | None = None
    host_data: bytes | None = None
    report_data: bytes | None = None
    vmpl: int | None = 0
    min_tcb: str | None = None  # "bl=..,tee=..,snp=..,ucode=..[,fmc=..]" or a u64 in hex
    product: str | None = None  # "Milan", "Genoa-B1", ...
    allow_debug: bool = False
    allow_migration_agent: bool = False
    forbid_smt: bool = False
    csp_id: str | None = None
    at: dt.datetime | None = None  # certificate validity time (default: now)
    allow_emulated: bool = False
    id_key_digest: bytes | None = None      # SHA-384 of the ID key the launch's ID block was signed with
    author_key_digest: bytes | None = None  # ... and of the author key (implies KEY_INFO.AUTHOR_KEY_EN)


@dataclass(frozen=True)
class Chain:
    vek: x509.Certificate
    intermediate: x509.Certificate
    root: x509.Certificate


@dataclass(frozen=True)
class VerificationResult:
    report: AttestationReport
    checks: tuple[Check, ...]
    product: Product | None
    signer: CertRole | None
    emulated: bool
    certificates: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return all(c.status != Verdict.FAIL for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == Verdict.FAIL]

    def to_dict(self) -> dict[str, Any]:
        return {
            "verified": self.verified,
            "emulated": self.emulated,
            "product": self.product.value if self.product else None,
            "signer": self.signer.value if self.signer else None,
            "measurement": self.report.measurement.hex(),
            "host_data": self.report.host_data.hex(),
            "report_data": self.report.report_data.hex(),
            "id_key_digest": self.report.id_key_digest.hex(),
            "author_key_digest": self.report.author_key_digest.hex(),
            "checks": [{"name": c.name, "status": c.status.value, "detail": c.detail} for c in self.checks],
            "failed": [c.name for c in self.failed()],
            "certificates": self.certificates,
        }


# --- assembling the chain from whatever certificates came with the evidence --------------------------

def _pick_issuer(candidates: list[x509.Certificate], subject: x509.Certificate) -> x509.Certificate | None:
    """The candidate named as `subject`'s issuer; failing that, the only candidate (its checks will
    then fail by name rather than the evidence being rejected as incomplete)."""
    named = [c for c in candidates if c.subject == subject.issuer]
    if named:
        return named[0]
    return candidates[0] if len(candidates) == 1 else None


def assemble_chain(report: AttestationReport, certificates: Sequence[x509.Certificate]) -> Chain:
    pool = dedupe(certificates)
    roles = {to_der(c): role_of(c) for c in pool}
    want = CertRole.VLEK if report.signing_key == SigningKey.VLEK else CertRole.VCEK
    veks = [c for c in pool if roles[to_der(c)] == want]
    if not veks:
        other = [c for c in pool if roles[to_der(c)] in (CertRole.VCEK, CertRole.VLEK)]
        if other:
            raise InputError(f"the report is signed by a {want.value}, but the certificates hold a "
                             f"{roles[to_der(other[0])].value}",  # type: ignore[union-attr]
                             hint=f"pass the {want.value} certificate for this report")
        hint = ("run 'parma-sandbox attest fetch vcek REPORT' (or pass --fetch) to get it from AMD's KDS"
                if want == CertRole.VCEK else "a VLEK comes from the host's certificate table (the evidence)")
        raise InputError(f"no {want.value} certificate for this report", hint=hint)
    if len(veks) > 1:
        raise InputError(f"{len(veks)} different {want.value} certificates given; pass only the one for this report")
    vek = veks[0]
    inter = _pick_issuer([c for c in pool if roles[to_der(c)] in (CertRole.ASK, CertRole.ASVK)], vek)
    if inter is None:
        raise InputError(f"no ASK/ASVK certificate for the {want.value} (issuer {vek.issuer.rfc4514_string()})",
                         hint="pass the cert_chain (--chain, or ask.pem in --certs), or run "
                              "'parma-sandbox attest fetch ca REPORT'")
    root = _pick_issuer([c for c in pool if roles[to_der(c)] == CertRole.ARK], inter)
    if root is None:
        raise InputError(f"no ARK certificate for {inter.subject.rfc4514_string()}",
                         hint="pass the cert_chain (ASK and ARK), or run 'parma-sandbox attest fetch ca REPORT'")
    return Chain(vek, inter, root)


# --- the checks ---------------------------------------------------------------------------------

class _Checks:
    def __init__(self) -> None:
        self.items: list[Check] = []

    def add(self, name: str, ok: bool | None, detail: str) -> bool:
        status = Verdict.SKIP if ok is None else (Verdict.PASS if ok else Verdict.FAIL)
        self.items.append(Check(name, status, detail))
        return bool(ok)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> tuple[bool, str]:
    if not has_amd_signature_profile(cert):
        return False, "not signed with RSASSA-PSS SHA-384, MGF1-SHA-384, salt 48"
    try:
        cert.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return False, "RSA-PSS signature does not verify"
    except (ValueError, TypeError) as e:
        return False, str(e)
    return True, "RSASSA-PSS SHA-384 salt 48 verifies"


def _hex(b: bytes) -> str:
    return b.hex()


def _product_of_root(root: x509.Certificate, emulated_ca: EmulatedCa | None) -> tuple[Product | None, bool]:
    pin = pin_of(to_der(root))
    if pin is not None and pin.role == CertRole.ARK:
        return pin.product, False
    if emulated_ca is not None and to_der(root) == to_der(emulated_ca.ark):
        return emulated_ca.product, True
    return None, False


def _resolve_product(report: AttestationReport, anchor: Product | None, expect: Expectations) -> Product | None:
    wanted = parse_product(expect.product)[0] if expect.product else None
    for source, value in (("the report's CPUID", report.product), ("--product", wanted)):
        if anchor and value and value != anchor:
            raise InputError(f"wrong product: {source} says {value.value} but the certificates chain to the "
                             f"{anchor.value} root",
                             hint=f"use the {value.value} certificate chain (attest fetch ca) or fix --product")
    if report.product and wanted and report.product != wanted:
        raise InputError(f"wrong product: the report comes from a {report.product.value} CPU, not {wanted.value}")
    return anchor or report.product or wanted


def _check_key_digests(checks: _Checks, report: AttestationReport, expect: Expectations) -> None:
    """ID_KEY_DIGEST / AUTHOR_KEY_DIGEST: which keys signed the ID block the PSP enforced at launch."""
    if expect.id_key_digest is None:
        checks.add("report.id_key_digest", None, f"{_hex(report.id_key_digest)} (no expected value given)"
                   if any(report.id_key_digest) else "no ID block at launch (zero; no expected value given)")
    else:
        ok = report.id_key_digest == expect.id_key_digest
        checks.add("report.id_key_digest", ok, _hex(report.id_key_digest) if ok else
                   (f"{_hex(report.id_key_digest)} != expected {_hex(expect.id_key_digest)}"
                    if any(report.id_key_digest) else "zero: the guest was launched without an ID block"))
    if expect.author_key_digest is None:
        checks.add("report.author_key_digest", None, f"{_hex(report.author_key_digest)} (no expected value given)"
                   if any(report.author_key_digest) else "no author key (zero; no expected value given)")
    else:
        ok = report.author_key_digest == expect.author_key_digest and report.key_info.author_key_en
        checks.add("report.author_key_digest", ok, _hex(report.author_key_digest) + " (AUTHOR_KEY_EN set)" if ok else
                   (f"{_hex(report.author_key_digest)} != expected {_hex(expect.author_key_digest)}"
                    if report.author_key_digest != expect.author_key_digest
                    else "KEY_INFO.AUTHOR_KEY_EN is clear: the launch did not use the author key"))


def verify_report(raw_report: bytes, certificates: Sequence[x509.Certificate], expect: Expectations,
                  *, emulated_ca: EmulatedCa | None = None) -> VerificationResult:
    """Run every check. Raises InputError for malformed or missing evidence."""
    report = parse_report(raw_report)
    checks = _Checks()
    if report.key_info.mask_chip_key or report.signing_key in (None, SigningKey.NONE):
        checks.add("report.signing_key", False, "the report is not signed (MASK_CHIP_KEY or SIGNING_KEY=none)")
        return VerificationResult(report, tuple(checks.items), report.product, None, False)
    chain = assemble_chain(report, certificates)
    signer = role_of(chain.vek)
    anchor, emulated = _product_of_root(chain.root, emulated_ca)
    product = _resolve_product(report, anchor, expect)
    if product is not None and report.product != product:
        report = report.with_product(product)  # v2 reports: decode the TCBs with the right layout
    at = expect.at or dt.datetime.now(dt.UTC)

    # The chain --------------------------------------------------------------------------------
    root_fp = fingerprint(to_der(chain.root))
    if emulated:
        checks.add("ark.trusted", expect.allow_emulated,
                   f"the root is this installation's EMULATED test CA ({root_fp[:16]}...): accepted because "
                   "--allow-emulated was given" if expect.allow_emulated else
                   "the root is this installation's EMULATED test CA, not AMD; pass --allow-emulated to "
                   "accept emulated evidence")
    else:
        checks.add("ark.trusted", anchor is not None,
                   f"pinned AMD ARK-{anchor.value} (sha256 {root_fp[:16]}...)" if anchor else
                   f"the root {chain.root.subject.rfc4514_string()} (sha256 {root_fp}) is not a pinned AMD ARK")
    want_inter = CertRole.ASVK if signer == CertRole.VLEK else CertRole.ASK
    inter_der = to_der(chain.intermediate)
    if emulated:
        ok = emulated_ca is not None and inter_der == to_der(emulated_ca.ask) and want_inter == CertRole.ASK
        checks.add("ask.trusted", ok, "the emulated CA's ASK" if ok else "not the emulated CA's ASK")
    else:
        pin = pin_of(inter_der)
        ok = pin is not None and pin.role == want_inter and pin.product == anchor
        checks.add("ask.trusted", ok,
                   f"pinned AMD {pin.role.value} {pin.common_name}" if ok and pin else
                   f"{common_name(chain.intermediate.subject)!r} is not the pinned {want_inter.value} of "
                   f"{anchor.value if anchor else 'a trusted root'}"
                   + (f" (it is the pinned {pin.role.value} {pin.common_name})" if pin else ""))
    checks.add("ark.signature", *_issued_by(chain.root, chain.root))
    checks.add("ask.signature", *_issued_by(chain.intermediate, chain.root))
    checks.add("vek.signature", *_issued_by(chain.vek, chain.intermediate))
    expired = [f"{common_name(c.subject)} valid {c.not_valid_before_utc:%Y-%m-%d}..{c.not_valid_after_utc:%Y-%m-%d}"
               for c in (chain.vek, chain.intermediate, chain.root)
               if not c.not_valid_before_utc <= at <= c.not_valid_after_utc]
    checks.add("certs.validity", not expired,
               f"all valid at {at:%Y-%m-%dT%H:%M:%SZ}" if not expired
               else f"not valid at {at:%Y-%m-%dT%H:%M:%SZ}: " + "; ".join(expired))

    # The VCEK/VLEK ------------------------------------------------------------------------------
    key = chain.vek.public_key()
    key_ok = isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    cn = common_name(chain.vek.subject)
    cn_ok = cn in (f"SEV-{signer.value}", f"SEV-{signer.value} {EMULATED_MARK}") if signer else False
    checks.add("vek.profile", key_ok and cn_ok,
               f"{cn}: EC P-384 key" if key_ok and cn_ok else
               f"{cn!r}: " + ("not an EC P-384 key" if not key_ok else f"subject CN is not SEV-{signer}"))
    exts = vek_extensions(chain.vek, source=cn)
    if exts.product_name is None:
        checks.add("vek.product", False, "no productName extension")
    else:
        name, _, stepping = exts.product_name.partition("-")
        want_step = parse_product(expect.product)[1] if expect.product else None
        ok = product is not None and name.lower() == product.value.lower() and (
            want_step is None or want_step.lower() == stepping.lower())
        checks.add("vek.product", ok, f"productName {exts.product_name!r}" + (
            "" if ok else f", expected {product.value if product else '?'}{'-' + want_step if want_step else ''}"))
    if signer == CertRole.VLEK:
        checks.add("vek.hwid", None, "VLEKs are not chip-specific (no hwID)")
        ok = bool(exts.csp_id) and (expect.csp_id is None or exts.csp_id == expect.csp_id)
        checks.add("vek.csp_id", ok, f"cspID {exts.csp_id!r}" + ("" if ok else f", expected {expect.csp_id!r}"
                                                                  if exts.csp_id else ": missing"))
    else:
        checks.add("vek.csp_id", None, "VCEKs carry no cspID")
        chip = report.chip_id
        if exts.hwid is None:
            checks.add("vek.hwid", False, "the VCEK has no hwID extension")
        elif not any(chip):
            checks.add("vek.hwid", None, "CHIP_ID is masked (all zero): nothing to compare the hwID with")
        elif len(exts.hwid) == 8:  # Turin: 8-byte hwID, CHIP_ID bytes 8..63 zero
            ok = chip[:8] == exts.hwid and not any(chip[8:])
            checks.add("vek.hwid", ok, f"8-byte hwID {_hex(exts.hwid)} " + ("== CHIP_ID" if ok else
                                                                            f"!= CHIP_ID {_hex(chip)}"))
        else:
            ok = exts.hwid == chip
            checks.add("vek.hwid", ok, f"hwID ({exts.hwid_encoding}) " + ("== CHIP_ID" if ok else
                                                                         f"{_hex(exts.hwid)} != CHIP_ID {_hex(chip)}"))
    reported = report.reported_tcb.spls()
    mismatched = [f"{n}SPL {exts.spls.get(n)} != {v}" for n, v in reported.items() if exts.spls.get(n) != v]
    checks.add("vek.tcb", not mismatched, f"certificate SPLs == REPORTED_TCB ({report.reported_tcb})"
               if not mismatched else "certificate vs REPORTED_TCB: " + ", ".join(mismatched))

    # The report ---------------------------------------------------------------------------------
    signer_matches = signer is not None and signer.value == report.signing_key.name  # type: ignore[union-attr]
    checks.add("report.signing_key", signer_matches,
               f"signed by the {report.signing_key.name}" if signer_matches  # type: ignore[union-attr]
               else f"KEY_INFO says {report.signing_key.name}, the certificate is a {signer}")  # type: ignore[union-attr]
    if report.signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
        checks.add("report.signature", False, f"SIGNATURE_ALGO {report.signature_algo} is not ECDSA P-384/SHA-384")
    elif not key_ok:
        checks.add("report.signature", False, "the VCEK/VLEK key is not EC P-384")
    else:
        try:
            assert isinstance(key, ec.EllipticCurvePublicKey)
            key.verify(encode_dss_signature(report.signature_r, report.signature_s), raw_report[:0x2A0],
                       ec.ECDSA(hashes.SHA384()))
            checks.add("report.signature", True, f"ECDSA P-384 SHA-384 by the {signer}")
        except (InvalidSignature, ValueError):
            checks.add("report.signature", False, f"ECDSA P-384 signature does not verify under the {signer}")
    policy = report.policy
    checks.add("report.debug", not policy.debug or expect.allow_debug,
               "POLICY.DEBUG is clear" if not policy.debug else
               ("POLICY.DEBUG is set (allowed by --allow-debug)" if expect.allow_debug
                else "POLICY.DEBUG is set: the host can read and change guest memory (--allow-debug to accept)"))
    checks.add("report.migration_agent", not policy.migrate_ma or expect.allow_migration_agent,
               "POLICY.MIGRATE_MA is clear" if not policy.migrate_ma else
               ("POLICY.MIGRATE_MA is set (allowed)" if expect.allow_migration_agent
                else "POLICY.MIGRATE_MA is set: a migration agent may export the guest"))
    checks.add("report.smt", not (expect.forbid_smt and policy.smt),
               f"POLICY.SMT={int(policy.smt)}, PLATFORM_INFO.SMT_EN={int(report.platform_info.smt_enabled)}"
               + (" (SMT forbidden)" if expect.forbid_smt and policy.smt else ""))
    if expect.vmpl is None:
        checks.add("report.vmpl", None, f"VMPL {report.vmpl} (no expectation)")
    else:
        checks.add("report.vmpl", report.vmpl == expect.vmpl, f"VMPL {report.vmpl}" + (
            "" if report.vmpl == expect.vmpl else f", expected {expect.vmpl}"))
    if expect.min_tcb is None:
        checks.add("report.min_tcb", None, f"REPORTED_TCB {report.reported_tcb} (no minimum given)")
    else:
        minimum = parse_tcb_spec(expect.min_tcb, layout_of(product))
        below = report.reported_tcb.meets(minimum)
        checks.add("report.min_tcb", not below, f"REPORTED_TCB {report.reported_tcb} >= {minimum}" if not below
                   else "REPORTED_TCB below the minimum: " + ", ".join(below))
    for name, actual, wanted in (("measurement", report.measurement, expect.measurement),
                                 ("host_data", report.host_data, expect.host_data),
                                 ("report_data", report.report_data, expect.report_data)):
        if wanted is None:
            checks.add(f"report.{name}", None, f"{_hex(actual)} (no expected value given)")
        else:
            ok = actual == wanted
            checks.add(f"report.{name}", ok, _hex(actual) if ok else f"{_hex(actual)} != expected {_hex(wanted)}")

    _check_key_digests(checks, report, expect)

    certs = {label: {"subject": c.subject.rfc4514_string(), "sha256": fingerprint(to_der(c))}
             for label, c in (("vek", chain.vek), ("ask", chain.intermediate), ("ark", chain.root))}
    return VerificationResult(report, tuple(checks.items), product, signer, emulated, certs)
