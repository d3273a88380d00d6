"""Signing policy fragments: COSE_Sign1 envelopes with a did:x509 issuer, and local test issuers.

Verifying an envelope is the guest's job (sandbox/guest/fragments.py, which the host's `policy
fragment verify|show` runs too, so that they answer what the agent will decide). This module makes
envelopes, and a local test issuer (a root CA and a signing certificate with an EKU) so that users and
the tests can sign their own fragments: `parma-sandbox policy fragment sign`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sandbox.guest.fragments import SignatureError, VerifiedFragment, certificate_facts, verify_fragment
from sandbox.shared import cose
from sandbox.shared.didx509 import did_for
from sandbox.shared.errors import InputError

# The EKU of ACI's infrastructure fragments' signer; a test issuer uses its own private-arc OID.
TEST_FRAGMENT_EKU = "1.3.6.1.4.1.57264.99.1"

_HASH: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "ES256": hashes.SHA256, "ES384": hashes.SHA384, "ES512": hashes.SHA512,
    "PS256": hashes.SHA256, "PS384": hashes.SHA384, "PS512": hashes.SHA512}
_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


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
