"""Policy fragment envelopes, verified in the guest: the certificate chain, the signature, the did:x509 issuer.

A fragment reaches the agent as a COSE_Sign1 envelope (sandbox/shared/cose.py) from the host, which
must not be able to make up an issuer, a feed or an SVN: the agent checks here, as hcsshim's guest
(cosesign1go, didx509go) does, that each certificate of the x5chain is signed by the next (the last
taken as the root; each issuer a CA, valid at the leaf's notAfter, so no clock is needed), that the
envelope's signature verifies with the leaf's key, and that the header's issuer names this chain
(sandbox/shared/didx509.py). Only then does the load_fragment enforcement point see the issuer, the
feed, the header SVN and the Rego payload.

The X.509 parsing and signature checks are OpenSSL's, through Debian's python3-cryptography (38, in
the UVM rootfs), imported on first use: the agent boots without it. `parma-sandbox policy fragment
verify` on the host runs this same code.
"""

from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sandbox.guest.keys import make_cryptography_importable
from sandbox.shared import cose
from sandbox.shared.didx509 import CertificateFacts, DidError, check_did
from sandbox.shared.errors import CheckFailed

if TYPE_CHECKING:  # annotations only: the real imports are lazy
    from cryptography.x509 import Certificate

# x509 name attributes (by dotted OID) as did:x509 subject policies spell them.
_SUBJECT = {"2.5.4.6": "C", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.7": "L", "2.5.4.8": "S", "2.5.4.9": "STREET",
            "2.5.4.17": "POSTALCODE", "2.5.4.5": "SERIALNUMBER", "2.5.4.3": "CN"}


class SignatureError(CheckFailed):
    """A fragment envelope whose certificates or signature do not verify (a failed check)."""


@functools.cache
def _crypto() -> Any:
    """cryptography's modules, loaded with the first fragment."""
    make_cryptography_importable()
    from cryptography import exceptions, x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

    # What cryptography raises for malformed certificates, keys and extensions.
    unreadable = (ValueError, TypeError, exceptions.UnsupportedAlgorithm, x509.InvalidVersion,
                  x509.DuplicateExtension, x509.UnsupportedGeneralNameType)
    return SimpleNamespace(x509=x509, InvalidSignature=exceptions.InvalidSignature, hashes=hashes, ec=ec,
                           ed25519=ed25519, padding=padding, rsa=rsa, utils=utils, unreadable=unreadable,
                           digests={"ES256": hashes.SHA256, "ES384": hashes.SHA384, "ES512": hashes.SHA512,
                                    "PS256": hashes.SHA256, "PS384": hashes.SHA384, "PS512": hashes.SHA512})


def certificate_facts(der: bytes) -> CertificateFacts:
    """What did:x509 policies read from a DER certificate."""
    m = _crypto()
    x509 = m.x509
    cert = x509.load_der_x509_certificate(der)
    subject = tuple((_SUBJECT[a.oid.dotted_string], str(a.value)) for a in cert.subject
                    if a.oid.dotted_string in _SUBJECT)
    san: list[tuple[str, str]] = []
    eku: tuple[str, ...] = ()
    extensions: dict[str, bytes] = {}
    for ext in cert.extensions:
        if isinstance(ext.value, x509.SubjectAlternativeName):
            san += [("dns", n) for n in ext.value.get_values_for_type(x509.DNSName)]
            san += [("email", n) for n in ext.value.get_values_for_type(x509.RFC822Name)]
            san += [("uri", n) for n in ext.value.get_values_for_type(x509.UniformResourceIdentifier)]
            san += [("ipaddress", str(n)) for n in ext.value.get_values_for_type(x509.IPAddress)]
        elif isinstance(ext.value, x509.ExtendedKeyUsage):
            eku = tuple(o.dotted_string for o in ext.value)
        elif isinstance(ext.value, x509.UnrecognizedExtension):
            extensions[ext.oid.dotted_string] = ext.value.value
    return CertificateFacts(der=der, subject=subject, san=tuple(san), eku=eku, extensions=extensions)


def _verify_issued_by(cert: Certificate, issuer: Certificate, at: datetime.datetime, index: int) -> None:
    m = _crypto()
    key = issuer.public_key()
    try:
        if isinstance(key, m.rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, m.padding.PKCS1v15(), cert.signature_hash_algorithm)
        elif isinstance(key, m.ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, m.ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(key, m.ed25519.Ed25519PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            raise SignatureError(f"certificate {index + 1} of the chain has an unsupported key type")
    except m.InvalidSignature:
        raise SignatureError(f"certificate {index} of the chain is not signed by certificate {index + 1}") from None
    try:
        ca = issuer.extensions.get_extension_for_class(m.x509.BasicConstraints).value.ca
    except m.x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise SignatureError(f"certificate {index + 1} of the chain signs certificates but is not a CA")
    not_before, not_after = _validity(issuer)
    if not not_before <= at <= not_after:
        raise SignatureError(f"certificate {index + 1} of the chain is not valid at the signing certificate's "
                             "notAfter")


def _validity(cert: Certificate) -> tuple[datetime.datetime, datetime.datetime]:
    # cryptography >= 42 has the *_utc properties; Debian bookworm's 38 only the naive ones.
    if hasattr(cert, "not_valid_after_utc"):
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    return (cert.not_valid_before.replace(tzinfo=datetime.UTC),
            cert.not_valid_after.replace(tzinfo=datetime.UTC))


def verify_chain(chain: tuple[bytes, ...]) -> list[Certificate]:
    """Check each certificate is signed by the next (the last is taken as the root, as cosesign1go does)."""
    m = _crypto()
    try:
        certs = [m.x509.load_der_x509_certificate(der) for der in chain]
    except m.unreadable as e:
        raise SignatureError(f"x5chain holds a certificate that does not parse: {e}") from None
    at = _validity(certs[0])[1]
    for i in range(len(certs) - 1):
        _verify_issued_by(certs[i], certs[i + 1], at, i)
    return certs


def verify_envelope_signature(envelope: cose.Sign1, leaf: Certificate) -> None:
    m = _crypto()
    name = cose.ALGORITHMS[envelope.algorithm]
    key = leaf.public_key()
    data = envelope.to_be_signed()
    try:
        if name.startswith("ES") and isinstance(key, m.ec.EllipticCurvePublicKey):
            half = len(envelope.signature) // 2
            der = m.utils.encode_dss_signature(int.from_bytes(envelope.signature[:half], "big"),
                                               int.from_bytes(envelope.signature[half:], "big"))
            key.verify(der, data, m.ec.ECDSA(m.digests[name]()))
        elif name.startswith("PS") and isinstance(key, m.rsa.RSAPublicKey):
            digest = m.digests[name]
            key.verify(envelope.signature, data, m.padding.PSS(m.padding.MGF1(digest()), digest.digest_size),
                       digest())
        elif name == "EdDSA" and isinstance(key, m.ed25519.Ed25519PublicKey):
            key.verify(envelope.signature, data)
        else:
            raise SignatureError(f"the envelope's alg {name} does not fit the signing certificate's key")
    except m.InvalidSignature:
        raise SignatureError("the envelope's signature does not verify with the signing certificate's key") from None


@dataclass(frozen=True)
class VerifiedFragment:
    """A fragment envelope whose chain, signature and did:x509 issuer were verified."""

    issuer: str
    feed: str
    header_svn: int | None
    payload: bytes
    content_type: str
    chain: tuple[CertificateFacts, ...]


def verify_fragment(data: bytes) -> VerifiedFragment:
    """Verify a COSE_Sign1 fragment as hcsshim's guest does before load_fragment; raise CoseError or
    DidError (InputErrors: malformed) or SignatureError (CheckFailed) with the first check that failed."""
    envelope = cose.parse_sign1(data)
    if not envelope.issuer or not envelope.feed:
        raise cose.CoseError("the protected header must carry both the issuer and the feed")
    m = _crypto()
    try:
        certs = verify_chain(envelope.chain)
        verify_envelope_signature(envelope, certs[0])
        facts = tuple(certificate_facts(der) for der in envelope.chain)
    except m.unreadable as e:
        # malformed keys, extensions or algorithms in host-supplied certificates: a refusal, never a crash
        raise SignatureError(f"the certificate chain cannot be used: {e}") from None
    try:
        check_did(envelope.issuer, list(facts))
    except DidError as e:
        raise DidError(f"issuer {envelope.issuer} does not match the signing chain: {e}") from None
    return VerifiedFragment(envelope.issuer, envelope.feed, envelope.header_svn, envelope.payload,
                            envelope.content_type, facts)
