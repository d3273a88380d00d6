"""The emulated test CA: ARK -> ASK -> VCEK with AMD's certificate profile, made once per installation.

Same profile as AMD's KDS certificates (snp.md §2.1-2.2): RSA-4096 ARK and ASK, RSASSA-PSS
SHA-384/MGF1-SHA-384/salt 48 on every certificate, an EC P-384 VCEK carrying the AMD extensions
(structVersion, productName, SPLs, 64-byte raw hwID). Every subject says EMULATED. Differences
that cannot be avoided: the VCEK serial is 1 (cryptography refuses serial 0) and there is no CRL
distribution point. Verifiers accept this root only with --allow-emulated.

Stored under <cache>/attest/emulated-ca-v1 (private keys 0600), created under a lock and renamed
into place as a whole, so concurrent first uses see either nothing or the complete CA.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from sandbox.attest import der
from sandbox.attest.amd_certs import (
    OID_HWID,
    OID_PRODUCT_NAME,
    OID_SPL,
    OID_STRUCT_VERSION,
    load_certificate_file,
    to_der,
)
from sandbox.attest.roots import fingerprint
from sandbox.fsutil import atomic_dir, file_lock
from sandbox.paths import cache_dir
from sandbox.shared.errors import StateError
from sandbox.shared.snp.product import Cpuid, Product, layout_of
from sandbox.shared.snp.report import FirmwareVersion
from sandbox.shared.snp.tcb import TcbVersion

CA_DIR_NAME = "emulated-ca-v1"
EMULATED_ORG = "parma-sandbox EMULATED PSP (not AMD)"
EMULATED_MARK = "(EMULATED)"

# What the emulated platform claims to be: a Genoa part (CPUID 0x19/0x11 stepping 1), v5 reports.
PRODUCT = Product.GENOA
CPUID = Cpuid(0x19, 0x11, 1)
FIRMWARE = FirmwareVersion(1, 55, 40)
REPORT_VERSION = 5
TCB_PARTS = {"bl": 9, "tee": 0, "snp": 23, "ucode": 72}
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Emulation"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, EMULATED_ORG),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


@dataclass(frozen=True)
class EmulatedCa:
    directory: Path
    ark: x509.Certificate
    ask: x509.Certificate
    vcek: x509.Certificate
    vcek_private_key: bytes  # P-384 scalar, 48 bytes big-endian
    chip_id: bytes
    tcb: TcbVersion
    product: Product = PRODUCT
    cpuid: Cpuid = CPUID
    firmware: FirmwareVersion = FIRMWARE
    report_version: int = REPORT_VERSION

    @property
    def ark_fingerprint(self) -> str:
        return fingerprint(to_der(self.ark))


def ca_directory(base: Path | None = None) -> Path:
    return (base or cache_dir()) / "attest" / CA_DIR_NAME


def _sign(builder: x509.CertificateBuilder, key: rsa.RSAPrivateKey) -> x509.Certificate:
    return builder.sign(key, hashes.SHA384(), rsa_padding=PSS)


def _ca_builder(subject: x509.Name, issuer: x509.Name, public_key: rsa.RSAPublicKey, serial: int,
                now: dt.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(serial).not_valid_before(now).not_valid_after(now + dt.timedelta(days=25 * 365))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _create(stage: Path) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=1)
    product = PRODUCT.value
    ark_key = rsa.generate_private_key(65537, 4096)
    ask_key = rsa.generate_private_key(65537, 4096)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    ark_name = _name(f"ARK-{product} {EMULATED_MARK}")
    ask_name = _name(f"SEV-{product} {EMULATED_MARK}")
    ca_usage = dict(digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False)
    ark = _sign(_ca_builder(ark_name, ark_name, ark_key.public_key(), 0x10000, now)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(key_cert_sign=True, crl_sign=True, **ca_usage), critical=True), ark_key)
    ask = _sign(_ca_builder(ask_name, ark_name, ask_key.public_key(), 0x10001, now)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ark_key.public_key()),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(key_cert_sign=True, crl_sign=False, **ca_usage), critical=True), ark_key)
    chip_id = secrets.token_bytes(64)
    tcb = TcbVersion.from_parts(layout_of(PRODUCT), **TCB_PARTS)
    vcek_builder = (x509.CertificateBuilder().subject_name(_name(f"SEV-VCEK {EMULATED_MARK}")).issuer_name(ask_name)
                    .public_key(vcek_key.public_key()).serial_number(1).not_valid_before(now)
                    .not_valid_after(now + dt.timedelta(days=7 * 365)))
    amd_exts = {OID_STRUCT_VERSION: der.integer(0), OID_PRODUCT_NAME: der.tlv(der.IA5_STRING, product.encode())}
    spls = {**TCB_PARTS, "spl_4": 0, "spl_5": 0, "spl_6": 0, "spl_7": 0}
    amd_exts.update({OID_SPL[name]: der.integer(value) for name, value in spls.items()})
    amd_exts[OID_HWID] = chip_id
    for oid, value in amd_exts.items():
        vcek_builder = vcek_builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    vcek = _sign(vcek_builder, ask_key)

    pem = serialization.Encoding.PEM
    for name, cert in (("ark", ark), ("ask", ask), ("vcek", vcek)):
        (stage / f"{name}.pem").write_bytes(cert.public_bytes(pem))
    for name, key in (("ark", ark_key), ("ask", ask_key), ("vcek", vcek_key)):
        path = stage / f"{name}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    meta = {"product": product, "chip_id": chip_id.hex(), "tcb": tcb.raw.hex(), "created": now.isoformat()}
    (stage / "ca.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_emulated_ca(base: Path | None = None) -> EmulatedCa | None:
    """This installation's emulated CA, or None when it was never created."""
    directory = ca_directory(base)
    if not (directory / "ca.json").is_file():
        return None
    try:
        meta = json.loads((directory / "ca.json").read_text())
        ark, ask, vcek = (load_certificate_file(directory / f"{name}.pem")[0] for name in ("ark", "ask", "vcek"))
        key = serialization.load_pem_private_key((directory / "vcek.key").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        scalar = key.private_numbers().private_value.to_bytes(48, "big")
        product = Product(meta["product"])
        return EmulatedCa(directory=directory, vcek_private_key=scalar, chip_id=bytes.fromhex(meta["chip_id"]),
                          tcb=TcbVersion(bytes.fromhex(meta["tcb"]), layout_of(product)), product=product,
                          ark=ark, ask=ask, vcek=vcek)
    except (OSError, ValueError, KeyError, AssertionError) as e:
        raise StateError(f"the emulated CA in {directory} is damaged: {e}",
                         hint=f"remove {directory} to create a new one (evidence signed by the old one "
                              "will no longer verify)") from e


def ensure_emulated_ca(base: Path | None = None) -> EmulatedCa:
    """Load this installation's emulated CA, creating it on first use."""
    if (ca := load_emulated_ca(base)) is not None:
        return ca
    directory = ca_directory(base)
    with file_lock(directory.with_name(directory.name + ".lock")):
        if (ca := load_emulated_ca(base)) is not None:
            return ca  # another process made it while we waited
        with atomic_dir(directory) as stage:
            os.chmod(stage, 0o700)
            _create(stage)
    ca = load_emulated_ca(base)
    assert ca is not None
    return ca
