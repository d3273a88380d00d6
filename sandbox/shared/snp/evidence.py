"""The evidence the guest agent returns for a verifier's nonce (protocol op `get_report`).

{"report": base64 of the 1184-byte ATTESTATION_REPORT,
 "cert_table": base64 of the certificate table ("" when the platform supplied none),
 "runtime_public_key": base64 of the agent's runtime public key, DER SubjectPublicKeyInfo (P-384),
 "nonce": hex of the verifier's nonce, "backend": "configfs-tsm" | "sev-guest" | "emulated"}
with REPORT_DATA = SHA-512(nonce ‖ runtime_public_key) (sandbox/shared/snp/binding.py). The launch self-check
asks for evidence that names no key (runtime_public_key ""): only readers that say so accept it, and the
key broker is not one of them.
Both sides use this module, so the payload is checked identically in the guest and on the host.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from sandbox.shared.errors import InputError
from sandbox.shared.snp.binding import report_data_for
from sandbox.shared.snp.report import REPORT_SIZE, parse_report

KEYS = ("report", "cert_table", "runtime_public_key", "nonce", "backend")
# DER SubjectPublicKeyInfo of an uncompressed P-384 point (RFC 5480): SEQUENCE { SEQUENCE { id-ecPublicKey,
# secp384r1 }, BIT STRING 0x04 || X || Y }. DER is unique, so this prefix and the length identify the form;
# whether the point is on the curve is OpenSSL's check where the key is used (the broker, the verifier).
P384_SPKI_PREFIX = bytes.fromhex("3076301006072a8648ce3d020106052b81040022036200" "04")
P384_SPKI_SIZE = len(P384_SPKI_PREFIX) + 96


@dataclass(frozen=True)
class ReportEvidence:
    report: bytes
    cert_table: bytes
    runtime_public_key: bytes  # DER SubjectPublicKeyInfo
    nonce: bytes
    backend: str

    def to_payload(self) -> dict[str, str]:
        def b64(b: bytes) -> str:
            return base64.b64encode(b).decode()

        return {"report": b64(self.report), "cert_table": b64(self.cert_table),
                "runtime_public_key": b64(self.runtime_public_key), "nonce": self.nonce.hex(),
                "backend": self.backend}

    @classmethod
    def from_payload(cls, payload: Any, *, source: str = "get_report result", keyless: bool = False) -> ReportEvidence:
        """Decode and check the payload; `keyless=True` also accepts evidence that names no runtime key."""
        if not isinstance(payload, dict) or set(payload) != set(KEYS):
            raise InputError(f"{source}: expected an object with exactly the keys {', '.join(KEYS)}")
        try:
            evidence = cls(report=base64.b64decode(payload["report"], validate=True),
                           cert_table=base64.b64decode(payload["cert_table"], validate=True),
                           runtime_public_key=base64.b64decode(payload["runtime_public_key"], validate=True),
                           nonce=bytes.fromhex(payload["nonce"]), backend=str(payload["backend"]))
        except (binascii.Error, ValueError, TypeError) as e:
            raise InputError(f"{source}: bad encoding: {e}") from e
        if len(evidence.report) != REPORT_SIZE:
            raise InputError(f"{source}: the report is {len(evidence.report)} bytes, not {REPORT_SIZE}")
        key = evidence.runtime_public_key
        if keyless and not key:
            return evidence
        if len(key) != P384_SPKI_SIZE or not key.startswith(P384_SPKI_PREFIX):
            raise InputError(f"{source}: runtime_public_key is not a P-384 SubjectPublicKeyInfo "
                             f"(DER, uncompressed point; got {len(key)} bytes)")
        return evidence

    def binding_holds(self) -> bool:
        """REPORT_DATA in the (unverified) report equals SHA-512(nonce ‖ runtime public key)."""
        return parse_report(self.report).report_data == report_data_for(self.nonce, self.runtime_public_key)
