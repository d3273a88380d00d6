"""AMD SEV-SNP certificates: loading, telling their roles apart, and the VCEK/VLEK extensions.

Extensions live under OID arc 1.3.6.1.4.1.3704.1 (AMD "Versioned Chip Endorsement Key (VCEK)
Certificate and KDS Interface Specification" 57230, Table "VCEK Certificate Extensions"; snp.md §2.2).
hwID appears raw (64 bytes; Turin 8 bytes) or DER-wrapped as an OCTET STRING; SPLs are INTEGERs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from sandbox.attest import der
from sandbox.attest.roots import CertRole
from sandbox.shared.errors import InputError

AMD_ARC = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = f"{AMD_ARC}.1"
OID_PRODUCT_NAME = f"{AMD_ARC}.2"
OID_HWID = f"{AMD_ARC}.4"
OID_CSP_ID = f"{AMD_ARC}.5"
# SPL extensions by KDS name; spl_4..spl_7 are the legacy layout's reserved bytes (absent on Turin).
OID_SPL = {"bl": f"{AMD_ARC}.3.1", "tee": f"{AMD_ARC}.3.2", "snp": f"{AMD_ARC}.3.3",
           "spl_4": f"{AMD_ARC}.3.4", "spl_5": f"{AMD_ARC}.3.5", "spl_6": f"{AMD_ARC}.3.6",
           "spl_7": f"{AMD_ARC}.3.7", "ucode": f"{AMD_ARC}.3.8", "fmc": f"{AMD_ARC}.3.9"}
OID_RSASSA_PSS = "1.2.840.113549.1.1.10"


def load_der_certificate(data: bytes, *, source: str) -> x509.Certificate:
    with warnings.catch_warnings():
        # AMD VCEKs/VLEKs have serial number 0, which cryptography warns about but accepts.
        warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
        try:
            return x509.load_der_x509_certificate(data)
        except ValueError as e:
            raise InputError(f"{source}: not a valid DER X.509 certificate ({e})") from e


def load_certificates(data: bytes, *, source: str) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle or a single DER certificate."""
    if b"-----BEGIN CERTIFICATE-----" in data:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
            try:
                return x509.load_pem_x509_certificates(data)
            except ValueError as e:
                raise InputError(f"{source}: a PEM certificate in it does not parse ({e})",
                                 hint="pass PEM or DER X.509 certificates as served by AMD's KDS") from e
    if data[:1] == b"\x30":
        return [load_der_certificate(data, source=source)]
    raise InputError(f"{source}: neither a PEM nor a DER certificate",
                     hint="pass PEM or DER X.509 certificates as served by AMD's KDS")


def load_certificate_file(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read certificate file {path}: {e.strerror}") from e
    return load_certificates(data, source=str(path))


def to_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def dedupe(certs: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """The certificates with byte-identical duplicates removed, first occurrence kept."""
    seen: dict[bytes, x509.Certificate] = {}
    for cert in certs:
        seen.setdefault(to_der(cert), cert)
    return list(seen.values())


def common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _extension_values(cert: x509.Certificate) -> dict[str, bytes]:
    out = {}
    for ext in cert.extensions:
        if isinstance(ext.value, x509.UnrecognizedExtension):
            out[ext.oid.dotted_string] = ext.value.value
    return out


def role_of(cert: x509.Certificate) -> CertRole | None:
    """Structural role: EC keys are VCEK/VLEK (VLEKs carry cspID), self-signed RSA is an ARK,
    other RSA CAs are ASK or ASVK (the ASVK's CN says VLEK). None for anything else."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        exts = _extension_values(cert)
        if OID_CSP_ID in exts or "VLEK" in common_name(cert.subject).upper():
            return CertRole.VLEK
        return CertRole.VCEK
    if isinstance(key, rsa.RSAPublicKey):
        if cert.subject == cert.issuer:
            return CertRole.ARK
        return CertRole.ASVK if "VLEK" in common_name(cert.subject).upper() else CertRole.ASK
    return None


@dataclass(frozen=True)
class VekExtensions:
    struct_version: int | None
    product_name: str | None
    spls: dict[str, int]  # by KDS name, only those present
    hwid: bytes | None
    hwid_encoding: str | None  # "raw" or "der-octet-string"
    csp_id: str | None


def _integer(value: bytes, what: str) -> int:
    return der.parse_integer(der.read_single(value, der.INTEGER, what=what), what=what)


def _ia5(value: bytes, what: str) -> str:
    try:
        return der.read_single(value, der.IA5_STRING, what=what).decode("ascii")
    except UnicodeDecodeError as e:
        raise InputError(f"{what}: not ASCII") from e


def _hwid(value: bytes) -> tuple[bytes, str]:
    """Raw 64 (or Turin 8) bytes, or an OCTET STRING wrapping them."""
    if len(value) in (66, 10) and value[0] == der.OCTET_STRING and value[1] == len(value) - 2:
        return value[2:], "der-octet-string"
    return value, "raw"


def vek_extensions(cert: x509.Certificate, *, source: str = "VCEK/VLEK") -> VekExtensions:
    exts = _extension_values(cert)
    spls = {name: _integer(exts[oid], f"{source}: {name}SPL extension")
            for name, oid in OID_SPL.items() if oid in exts}
    hwid, encoding = _hwid(exts[OID_HWID]) if OID_HWID in exts else (None, None)
    return VekExtensions(
        struct_version=_integer(exts[OID_STRUCT_VERSION], f"{source}: structVersion")
        if OID_STRUCT_VERSION in exts else None,
        product_name=_ia5(exts[OID_PRODUCT_NAME], f"{source}: productName") if OID_PRODUCT_NAME in exts else None,
        spls=spls, hwid=hwid, hwid_encoding=encoding,
        csp_id=_ia5(exts[OID_CSP_ID], f"{source}: cspID") if OID_CSP_ID in exts else None,
    )


OID_SHA384 = "2.16.840.1.101.3.4.2.2"
OID_MGF1 = "1.2.840.113549.1.1.8"


def pss_parameters(cert: x509.Certificate) -> tuple[str, str, int] | None:
    """(hash OID, MGF1 hash OID, salt length) of an RSASSA-PSS signed certificate, else None.

    Read from TBSCertificate.signature (RFC 5280 §4.1.2.3) with RSASSA-PSS-params (RFC 4055 §3.1),
    because cryptography verifies with whatever parameters a certificate names and AMD's profile
    fixes them: SHA-384, MGF1-SHA-384, salt 48.
    """
    if cert.signature_algorithm_oid.dotted_string != OID_RSASSA_PSS:
        return None
    tbs = der.children(der.read_single(cert.tbs_certificate_bytes, der.SEQUENCE, what="TBSCertificate"))
    index = 1 if tbs[0].tag == 0xA0 else 0  # skip the explicit [0] version
    alg = der.children(tbs[index + 1].value)
    if len(alg) != 2 or der.parse_oid(alg[0].value) != OID_RSASSA_PSS or alg[1].tag != der.SEQUENCE:
        return None
    hash_oid, mgf_hash_oid, salt = "1.3.14.3.2.26", "1.3.14.3.2.26", 20  # RFC 4055 defaults: SHA-1, salt 20
    for param in der.children(alg[1].value):
        inner = der.children(param.value)
        if param.tag == 0xA0:
            hash_oid = der.parse_oid(der.children(inner[0].value)[0].value)
        elif param.tag == 0xA1:
            mgf = der.children(inner[0].value)
            if der.parse_oid(mgf[0].value) != OID_MGF1:
                return None
            mgf_hash_oid = der.parse_oid(der.children(mgf[1].value)[0].value)
        elif param.tag == 0xA2:
            salt = der.parse_integer(inner[0].value)
    return hash_oid, mgf_hash_oid, salt


def has_amd_signature_profile(cert: x509.Certificate) -> bool:
    return pss_parameters(cert) == (OID_SHA384, OID_SHA384, 48)
