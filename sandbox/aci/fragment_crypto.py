"""Signatures of policy fragments: verify and make COSE_Sign1 envelopes with a did:x509 issuer.

Parsing (COSE, CBOR, did:x509) is in the shared zone; this module adds what needs an X.509 and
signature library: the facts did:x509 reads from each certificate, the chain's signatures, and the
envelope's signature with the leaf's key (as hcsshim's cosesign1go checks them: each certificate
signed by the next, the last taken as the root, times judged at the leaf's notAfter). It uses only
APIs that Debian bookworm's python3-cryptography (38.0) has, so that the guest agent can use the same
code (phase 2 moves it under sandbox/guest once that package is in the UVM).

It also makes a local test issuer (a root CA and a signing certificate with an EKU) so that users and
the tests can sign their own fragments: `parma-sandbox policy fragment sign`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sandbox.shared import cose
from sandbox.shared.didx509 import CertificateFacts, DidError, check_did, did_for
from sandbox.shared.errors import CheckFailed, InputError

# The EKU of ACI's infrastructure fragments' signer; a test issuer uses its own private-arc OID.
TEST_FRAGMENT_EKU = "1.3.6.1.4.1.57264.99.1"

_SUBJECT = {NameOID.COUNTRY_NAME: "C", NameOID.ORGANIZATION_NAME: "O", NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
            NameOID.LOCALITY_NAME: "L", NameOID.STATE_OR_PROVINCE_NAME: "S", NameOID.STREET_ADDRESS: "STREET",
            NameOID.POSTAL_CODE: "POSTALCODE", NameOID.SERIAL_NUMBER: "SERIALNUMBER", NameOID.COMMON_NAME: "CN"}
_HASH = {"ES256": hashes.SHA256, "ES384": hashes.SHA384, "ES512": hashes.SHA512,
         "PS256": hashes.SHA256, "PS384": hashes.SHA384, "PS512": hashes.SHA512}
_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


# What cryptography raises for malformed certificates, keys and extensions.
_UNREADABLE = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion, x509.DuplicateExtension,
               x509.UnsupportedGeneralNameType)


class SignatureError(CheckFailed):
    """A fragment envelope whose certificates or signature do not verify (a failed check)."""


def certificate_facts(der: bytes) -> CertificateFacts:
    cert = x509.load_der_x509_certificate(der)
    subject = tuple((_SUBJECT[a.oid], str(a.value)) for a in cert.subject if a.oid in _SUBJECT)
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


def _verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate, at: datetime.datetime, index: int) -> None:
    key = issuer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            raise SignatureError(f"certificate {index + 1} of the chain has an unsupported key type")
    except InvalidSignature:
        raise SignatureError(f"certificate {index} of the chain is not signed by certificate {index + 1}") from None
    try:
        ca = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise SignatureError(f"certificate {index + 1} of the chain signs certificates but is not a CA")
    not_before, not_after = _validity(issuer)
    if not not_before <= at <= not_after:
        raise SignatureError(f"certificate {index + 1} of the chain is not valid at the signing certificate's "
                             "notAfter")


def _validity(cert: x509.Certificate) -> tuple[datetime.datetime, datetime.datetime]:
    # cryptography >= 42 has the *_utc properties; Debian bookworm's 38 only the naive ones.
    if hasattr(cert, "not_valid_after_utc"):
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    return (cert.not_valid_before.replace(tzinfo=datetime.UTC),
            cert.not_valid_after.replace(tzinfo=datetime.UTC))


def verify_chain(chain: tuple[bytes, ...]) -> list[x509.Certificate]:
    """Check each certificate is signed by the next (the last is taken as the root, as cosesign1go does)."""
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except _UNREADABLE as e:
        raise SignatureError(f"x5chain holds a certificate that does not parse: {e}") from None
    at = _validity(certs[0])[1]
    for i in range(len(certs) - 1):
        _verify_issued_by(certs[i], certs[i + 1], at, i)
    return certs


def verify_envelope_signature(envelope: cose.Sign1, leaf: x509.Certificate) -> None:
    name = cose.ALGORITHMS[envelope.algorithm]
    key = leaf.public_key()
    data = envelope.to_be_signed()
    try:
        if name.startswith("ES") and isinstance(key, ec.EllipticCurvePublicKey):
            half = len(envelope.signature) // 2
            der = encode_dss_signature(int.from_bytes(envelope.signature[:half], "big"),
                                       int.from_bytes(envelope.signature[half:], "big"))
            key.verify(der, data, ec.ECDSA(_HASH[name]()))
        elif name.startswith("PS") and isinstance(key, rsa.RSAPublicKey):
            key.verify(envelope.signature, data, padding.PSS(padding.MGF1(_HASH[name]()), _HASH[name].digest_size),
                       _HASH[name]())
        elif name == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(envelope.signature, data)
        else:
            raise SignatureError(f"the envelope's alg {name} does not fit the signing certificate's key")
    except InvalidSignature:
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
    """Verify a COSE_Sign1 fragment as hcsshim's InjectFragment does; raise with the first failed check."""
    envelope = cose.parse_sign1(data)
    if not envelope.issuer or not envelope.feed:
        raise cose.CoseError("the protected header must carry both the issuer and the feed")
    try:
        certs = verify_chain(envelope.chain)
        verify_envelope_signature(envelope, certs[0])
        facts = tuple(certificate_facts(der) for der in envelope.chain)
    except _UNREADABLE as e:
        # malformed keys, extensions or algorithms in host-supplied certificates: a refusal, never a crash
        raise SignatureError(f"the certificate chain cannot be used: {e}") from None
    try:
        check_did(envelope.issuer, list(facts))
    except DidError as e:
        raise DidError(f"issuer {envelope.issuer} does not match the signing chain: {e}") from None
    return VerifiedFragment(envelope.issuer, envelope.feed, envelope.header_svn, envelope.payload,
                            envelope.content_type, facts)


# -- signing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    """A signing key and its certificate chain (leaf first), e.g. a local test issuer."""

    key: ec.EllipticCurvePrivateKey
    chain: tuple[bytes, ...]

    def did(self, eku: str = TEST_FRAGMENT_EKU) -> str:
        return did_for([certificate_facts(der) for der in self.chain], eku)


def sign_fragment(issuer: Issuer, payload: bytes, *, feed: str, did: str | None = None, svn: int | None = None,
                  algorithm: str = "ES384") -> bytes:
    """A COSE_Sign1 fragment envelope over `payload` (the Rego module), signed by `issuer`."""
    alg_id = next(k for k, v in cose.ALGORITHMS.items() if v == algorithm)
    curve = _CURVES.get(algorithm)
    if curve is None or not isinstance(issuer.key.curve, curve):
        raise InputError(f"{algorithm} needs a {curve.name if curve else 'matching'} key",
                         hint="test issuers have P-384 keys: use ES384")
    protected, to_sign = cose.build_sign1(payload=payload, algorithm=alg_id, chain=list(issuer.chain),
                                          issuer=did or issuer.did(), feed=feed, svn=svn)
    r, s = decode_dss_signature(issuer.key.sign(to_sign, ec.ECDSA(_HASH[algorithm]())))
    size = (issuer.key.curve.key_size + 7) // 8
    return cose.assemble_sign1(protected, payload, r.to_bytes(size, "big") + s.to_bytes(size, "big"))


def make_test_issuer(name: str = "parma-sandbox test fragment issuer", eku: str = TEST_FRAGMENT_EKU) -> Issuer:
    """A fresh root CA and a signing certificate under it with `eku` (P-384 keys)."""
    now = datetime.datetime.now(datetime.UTC)
    root_key, leaf_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root")])
    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(root_key, hashes.SHA384()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(root_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING, x509.ObjectIdentifier(eku)]),
                           critical=False)
            .sign(root_key, hashes.SHA384()))
    return Issuer(leaf_key, (leaf.public_bytes(serialization.Encoding.DER), root.public_bytes(serialization.Encoding.DER)))


def save_issuer(issuer: Issuer, directory: Path) -> None:
    """key.pem (the signing key, mode 0600) and chain.pem (leaf first) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / "key.pem"
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.write_bytes(issuer.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    (directory / "chain.pem").write_bytes(b"".join(
        x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM) for der in issuer.chain))


def load_issuer(key_pem: Path, chain_pem: Path) -> Issuer:
    try:
        key = serialization.load_pem_private_key(key_pem.read_bytes(), password=None)
        certs = x509.load_pem_x509_certificates(chain_pem.read_bytes())
    except (ValueError, TypeError) as e:
        raise InputError(f"{key_pem} / {chain_pem}: not a PEM key and certificate chain ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(f"{key_pem}: fragment signing supports EC keys (ES256/ES384/ES512)")
    return Issuer(key, tuple(c.public_bytes(serialization.Encoding.DER) for c in certs))


__all__ = ["Issuer", "SignatureError", "VerifiedFragment", "certificate_facts", "load_issuer",
           "make_test_issuer", "save_issuer", "sign_fragment", "verify_fragment"]
