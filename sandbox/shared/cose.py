"""COSE_Sign1 envelopes (RFC 9052 §4.2) as ACI's policy fragments use them (stdlib only).

A fragment is a Rego module signed into a COSE_Sign1 (tag 18): the protected header carries `alg`
(1), `cty` (3, `application/unknown+rego`), `x5chain` (33: the DER certificates, leaf first), and the
fragment's issuer and feed either as the text labels `iss` and `feed` (what confcom's sign1util
writes) or as CWT claims (15: iss = 1, sub = 2) with an optional `svn`; hcsshim's cosesign1go reads
both. This module parses and builds envelopes and the Sig_structure that is signed; verifying a
signature needs a crypto library and lives with the code that has one (sandbox/guest/fragments.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sandbox.shared import cbor
from sandbox.shared.errors import InputError

SIGN1_TAG = 18
ALG, CTY, CWT_CLAIMS, X5CHAIN = 1, 3, 15, 33
CWT_ISS, CWT_SUB = 1, 2
REGO_CONTENT_TYPE = "application/unknown+rego"
# The media type of a fragment on hcsshim's PolicyFragment channel, and the artifact type under which
# confcom attaches fragments to images in a registry (ORAS).
FRAGMENT_MEDIA_TYPE = "application/cose-x509+rego"
FRAGMENT_ARTIFACT_TYPE = "application/x-ms-ccepolicy-frag"

# COSE algorithm ids (IANA "COSE Algorithms") that fragments use.
ALGORITHMS = {-7: "ES256", -35: "ES384", -36: "ES512", -37: "PS256", -38: "PS384", -39: "PS512", -8: "EdDSA"}


class CoseError(InputError):
    """An envelope that is not a well-formed COSE_Sign1 fragment envelope; the message says what."""


@dataclass(frozen=True)
class Sign1:
    """A parsed COSE_Sign1 and the header fields fragments use."""

    protected_bytes: bytes
    protected: dict[Any, Any]
    unprotected: dict[Any, Any]
    payload: bytes
    signature: bytes

    @property
    def algorithm(self) -> int:
        alg: int = self.protected[ALG]     # parse_sign1 checked it is one of ALGORITHMS
        return alg

    @property
    def chain(self) -> tuple[bytes, ...]:
        """x5chain: the DER certificates, leaf first."""
        value = self.protected.get(X5CHAIN, self.unprotected.get(X5CHAIN))
        return (value,) if isinstance(value, bytes) else tuple(value or ())

    def _claims(self) -> dict[Any, Any]:
        claims = self.protected.get(CWT_CLAIMS)
        return claims if isinstance(claims, dict) else {}

    @property
    def issuer(self) -> str:
        return str(self._claims().get(CWT_ISS) if CWT_CLAIMS in self.protected else self.protected.get("iss") or "")

    @property
    def feed(self) -> str:
        return str(self._claims().get(CWT_SUB) if CWT_CLAIMS in self.protected else self.protected.get("feed") or "")

    @property
    def header_svn(self) -> int | None:
        """The SVN of the CWT claims (an integer), or None when the header has none."""
        svn = self._claims().get("svn")
        return svn if isinstance(svn, int) and not isinstance(svn, bool) else None

    @property
    def content_type(self) -> str:
        cty = self.protected.get(CTY)
        return cty if isinstance(cty, str) else ""

    def to_be_signed(self, external_aad: bytes = b"") -> bytes:
        """The Sig_structure (RFC 9052 §4.4) the signature covers."""
        return sig_structure(self.protected_bytes, self.payload, external_aad)


def sig_structure(protected_bytes: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    return cbor.encode(["Signature1", protected_bytes, external_aad, payload])


def parse_sign1(data: bytes) -> Sign1:
    """Parse a (tagged or untagged) COSE_Sign1; raise CoseError saying what is wrong."""
    try:
        item = cbor.decode(data)
    except cbor.CborError as e:
        raise CoseError(f"not a COSE_Sign1 envelope: {e}") from None
    if isinstance(item, cbor.Tag):
        if item.number != SIGN1_TAG:
            raise CoseError(f"CBOR tag {item.number} is not COSE_Sign1 ({SIGN1_TAG})")
        item = item.value
    if not isinstance(item, list) or len(item) != 4:
        raise CoseError("a COSE_Sign1 is an array of 4 items (protected, unprotected, payload, signature)")
    protected_bytes, unprotected, payload, signature = item
    if not isinstance(protected_bytes, bytes) or not isinstance(unprotected, dict):
        raise CoseError("COSE_Sign1 headers: protected must be a byte string, unprotected a map")
    if not isinstance(payload, bytes):
        raise CoseError("the fragment's payload is missing (detached payloads are not accepted)")
    if not isinstance(signature, bytes):
        raise CoseError("the signature is not a byte string")
    try:
        protected = cbor.decode(protected_bytes) if protected_bytes else {}
    except cbor.CborError as e:
        raise CoseError(f"protected header: {e}") from None
    if not isinstance(protected, dict):
        raise CoseError("the protected header is not a map")
    envelope = Sign1(protected_bytes, protected, unprotected, payload, signature)
    alg = protected.get(ALG)
    if alg not in ALGORITHMS:
        raise CoseError(f"protected header alg {alg!r} is not one of {', '.join(ALGORITHMS.values())}")
    chain = protected.get(X5CHAIN)
    if not (isinstance(chain, bytes) or (isinstance(chain, list) and chain and all(isinstance(c, bytes)
                                                                                   for c in chain))):
        raise CoseError("the protected header has no x5chain (the signer's certificate chain, leaf first)")
    claims = protected.get(CWT_CLAIMS)
    if claims is not None and not isinstance(claims, dict):
        raise CoseError("the CWT claims header is not a map")
    return envelope


def build_sign1(*, payload: bytes, algorithm: int, chain: list[bytes], issuer: str, feed: str,
                svn: int | None = None, content_type: str = REGO_CONTENT_TYPE) -> tuple[bytes, bytes]:
    """The protected header bytes and the Sig_structure to sign, for a fragment envelope.

    Issuer and feed go in the `iss`/`feed` labels as confcom writes them; an SVN, when given, in the
    CWT claims header (where hcsshim reads the header SVN), with iss and sub repeated there."""
    protected: dict[Any, Any] = {ALG: algorithm, CTY: content_type, X5CHAIN: chain if len(chain) > 1 else chain[0],
                                 "iss": issuer, "feed": feed}
    if svn is not None:
        protected[CWT_CLAIMS] = {CWT_ISS: issuer, CWT_SUB: feed, "svn": svn}
    protected_bytes = cbor.encode(protected)
    return protected_bytes, sig_structure(protected_bytes, payload)


def assemble_sign1(protected_bytes: bytes, payload: bytes, signature: bytes) -> bytes:
    return cbor.encode(cbor.Tag(SIGN1_TAG, [protected_bytes, {}, payload, signature]))
