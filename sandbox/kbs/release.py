"""Whether a secret may be released to some evidence, and sealing it to the evidence's runtime key.

The evidence is checked by the attestation verifier (sandbox/attest/verify.py): certificate chain to
a pinned AMD root (or, only when the secret allows it, this installation's emulated CA), report
signature, TCB, debug refused, VMPL 0 and the REPORT_DATA binding SHA-512(nonce || runtime key).
The release policy then decides on the verified claims: HOST_DATA must be one of the secret's
policy hashes and MEASUREMENT one of its UVM measurements. A policy that binds HOST_DATA alone (stored
by an older parma-sandbox, without --any-uvm) releases nothing, and hardware evidence needs the
secret to name a minimum TCB: never HOST_DATA alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sandbox.attest.emulated_ca import EmulatedCa
from sandbox.attest.evidence import certificates_from_table, complete_from_kds, product_hint
from sandbox.attest.kds import KdsClient
from sandbox.attest.verify import Check, Expectations, Verdict, verify_report
from sandbox.kbs.store import ReleasePolicy
from sandbox.shared.errors import CheckFailed, InputError
from sandbox.shared.kbs_protocol import IV_SIZE, KEY_SIZE, Sealed, header, key_info, key_pin, signed_bytes
from sandbox.shared.snp.binding import report_data_for
from sandbox.shared.snp.evidence import ReportEvidence
from sandbox.shared.snp.report import parse_report


@dataclass(frozen=True)
class ReleaseDecision:
    released: bool
    reason: str                         # the first failure, or a one-line summary of what was verified
    failed: tuple[str, ...] = ()        # names of the failed checks
    facts: dict[str, Any] = field(default_factory=dict)  # what the evidence said, for the audit log


def _failure_reason(check: Check, result_emulated: bool, policy: ReleasePolicy) -> str:
    if check.name == "ark.trusted" and result_emulated and not policy.allow_emulated:
        return ("emulated evidence (signed by this installation's emulated PSP, not AMD hardware) is not "
                "accepted for this secret; 'secret put --allow-emulated' allows it")
    return f"{check.name}: {check.detail}"


def evaluate(policy: ReleasePolicy, evidence: ReportEvidence, *, emulated_ca: EmulatedCa | None,
             kds: KdsClient | None = None, fetch_certs: bool = False) -> ReleaseDecision:
    """Verify the evidence and apply the release policy. Never raises for bad evidence: it refuses."""
    try:
        report = parse_report(evidence.report)
        certs = certificates_from_table(evidence.cert_table, source="the evidence's certificate table") \
            if evidence.cert_table else []
        if kds is not None:
            certs = complete_from_kds(report, certs, product_hint(report, certs, None), kds, fetch=fetch_certs)
        expect = Expectations(report_data=report_data_for(evidence.nonce, evidence.runtime_public_key),
                              vmpl=0, min_tcb=policy.min_tcb, allow_debug=False,
                              allow_emulated=policy.allow_emulated)
        result = verify_report(evidence.report, certs, expect, emulated_ca=emulated_ca)
    except (InputError, CheckFailed) as e:   # a malformed report is a CheckFailed
        return ReleaseDecision(False, f"unusable evidence: {e}", ("evidence",))
    checks = list(result.checks)
    host_data = result.report.host_data.hex()
    measurement = result.report.measurement.hex()
    ok = host_data in policy.host_data
    checks.append(Check("release.host_data", Verdict.PASS if ok else Verdict.FAIL,
                        f"HOST_DATA {host_data} is " + ("an" if ok else "not an")
                        + " execution policy hash this secret is released to"))
    if (problem := policy.uvm_problem()) is not None:
        checks.append(Check("release.measurement", Verdict.FAIL,
                            f"this secret is not released: {problem}; it was stored by an older parma-sandbox. "
                            "Store it again with 'secret put NAME --replace' (bound to the UVM manifest's "
                            "measurements by default, or --measurement HEX), or --any-uvm to accept any UVM"))
    elif policy.measurement:
        ok = measurement in policy.measurement
        checks.append(Check("release.measurement", Verdict.PASS if ok else Verdict.FAIL,
                            f"MEASUREMENT {measurement} is " + ("an" if ok else "not an")
                            + " allowed launch measurement for this secret"))
    else:
        checks.append(Check("release.measurement", Verdict.PASS,
                            f"MEASUREMENT {measurement}: any UVM is accepted for this secret (--any-uvm)"))
    if not result.emulated and (problem := policy.hardware_problem()) is not None:
        checks.append(Check("release.min_tcb", Verdict.FAIL,
                            f"SEV-SNP evidence may not have this secret: {problem}; store it again with "
                            "'secret put NAME --replace --min-tcb ...'"))
    facts = {"host_data": host_data, "measurement": measurement, "emulated": result.emulated,
             "product": result.product.value if result.product else None,
             "reported_tcb": str(result.report.reported_tcb), "report_id": result.report.report_id.hex(),
             "runtime_key": key_pin(evidence.runtime_public_key)}
    failed = [c for c in checks if c.status == Verdict.FAIL]
    if failed:
        return ReleaseDecision(False, _failure_reason(failed[0], result.emulated, policy),
                        tuple(c.name for c in failed), facts)
    what = "emulated evidence" if result.emulated else f"{facts['product'] or 'SEV-SNP'} evidence"
    uvm = "any UVM (--any-uvm)" if policy.any_uvm else "MEASUREMENT"
    return ReleaseDecision(True, f"{what} verified; HOST_DATA and {uvm} allowed", (), facts)


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def seal(value: bytes, *, secret: str, nonce: bytes, runtime_public_key: bytes,
         broker_key: ec.EllipticCurvePrivateKey) -> Sealed:
    """Encrypt `value` to the runtime key (ephemeral ECDH P-384, HKDF-SHA384, AES-256-GCM) and sign the
    exchange with the broker key; the format is sandbox/shared/kbs_protocol.py's."""
    runtime = serialization.load_der_public_key(runtime_public_key)
    if not isinstance(runtime, ec.EllipticCurvePublicKey) or runtime.curve.name != "secp384r1":
        raise InputError("the runtime public key is not an EC P-384 key")
    ephemeral = ec.generate_private_key(ec.SECP384R1())
    ephemeral_der = _spki(ephemeral.public_key())
    broker_der = _spki(broker_key.public_key())
    aad = header(secret=secret, nonce=nonce, runtime_public_key=runtime_public_key,
                 ephemeral_public_key=ephemeral_der, broker_public_key=broker_der)
    key = HKDF(algorithm=hashes.SHA384(), length=KEY_SIZE, salt=nonce, info=key_info(aad)).derive(
        ephemeral.exchange(ec.ECDH(), runtime))
    iv = os.urandom(IV_SIZE)
    ciphertext = AESGCM(key).encrypt(iv, value, aad)
    signature = broker_key.sign(signed_bytes(aad, iv, ciphertext), ec.ECDSA(hashes.SHA384()))
    return Sealed(ephemeral_der, broker_der, iv, ciphertext, signature)
