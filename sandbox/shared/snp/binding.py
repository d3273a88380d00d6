"""How a report is bound to a verifier's nonce and to the guest agent's runtime key.

REPORT_DATA (64 bytes) = SHA-512(nonce ‖ DER SubjectPublicKeyInfo of the agent's runtime public key).
A verifier that sent `nonce` and received the public key recomputes this value and compares it with
the signed report: the report is fresh (nonce) and speaks for whoever holds the runtime private key,
so secrets encrypted to that key reach only the attested guest. See docs/attestation.md.
"""

from __future__ import annotations

from sandbox.shared import sha2
from sandbox.shared.errors import InputError

MIN_NONCE = 16
MAX_NONCE = 1024


def report_data_for(nonce: bytes, runtime_public_key_der: bytes) -> bytes:
    """SHA-512(nonce ‖ key). An empty key binds the nonce alone: evidence that names no key (the launch
    self-check's) shows which guest answered, and no secret can be released on it."""
    if not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise InputError(f"nonce must be {MIN_NONCE}..{MAX_NONCE} bytes, got {len(nonce)}")
    return sha2.sha512(nonce + runtime_public_key_der).digest()
