"""The emulated PSP: what it is given at launch, and how it signs reports.

In emulation mode the launcher writes one JSON document per launch (`<state dir>/psp.json`, mode 0600). It
holds everything a real PSP would put in a report (launch measurement, HOST_DATA, policy, TCB, CHIP_ID...),
the emulated VCEK's private key and the emulated certificate chain. The emulated PSP's host service
(sandbox/attest/psp_service.py) reads it and builds ATTESTATION_REPORTs in the exact AMD format, signed with
ECDSA P-384/SHA-384 like the PSP does with the VCEK; the guest asks for them through its port
org.parma.psp (sandbox/shared/snp/psp_port.py) and never sees the key. The format is documented in
docs/attestation.md ("The emulated PSP"). This stdlib-only zone takes the signing function as a parameter.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sandbox.shared.errors import InputError
from sandbox.shared.snp.cert_table import CertKind, build_cert_table, entry
from sandbox.shared.snp.key_info import KeyInfo, SigningKey
from sandbox.shared.snp.platform_info import PlatformInfo
from sandbox.shared.snp.policy import GuestPolicy
from sandbox.shared.snp.product import Cpuid, Product, layout_of
from sandbox.shared.snp.report import (
    SIG_ALGO_ECDSA_P384_SHA384,
    AttestationReport,
    FirmwareVersion,
    parse_report,
)
from sandbox.shared.snp.tcb import TcbVersion

FORMAT = "parma-sandbox/emulated-psp/v1"
CERT_ORDER = (CertKind.VCEK, CertKind.ASK, CertKind.ARK)

# JSON key -> byte length, for the fixed-size hex fields.
HEX_FIELDS = {
    "family_id": 16, "image_id": 16, "host_data": 32, "measurement": 48, "id_key_digest": 48,
    "author_key_digest": 48, "report_id": 32, "report_id_ma": 32, "chip_id": 64, "tcb": 8,
    "vcek_private_key": 48,
}
INT_FIELDS = ("report_version", "guest_svn", "policy", "platform_info", "mit_vector")


@dataclass(frozen=True)
class PspMaterial:
    product: Product
    report_version: int
    cpuid: Cpuid
    policy: int
    guest_svn: int
    family_id: bytes
    image_id: bytes
    host_data: bytes
    measurement: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    chip_id: bytes
    platform_info: int
    tcb: bytes  # raw TCB_VERSION used as CURRENT, REPORTED, COMMITTED and LAUNCH TCB
    firmware: FirmwareVersion
    mit_vector: int
    vcek_private_key: bytes = field(repr=False)
    certificates: dict[CertKind, bytes] = field(repr=False)  # DER: vcek, ask, ark

    def to_bytes(self) -> bytes:
        doc: dict[str, object] = {"format": FORMAT, "product": self.product.value}
        doc.update({k: getattr(self, k) for k in INT_FIELDS})
        doc["cpuid"] = {"family": self.cpuid.family, "model": self.cpuid.model, "stepping": self.cpuid.stepping}
        doc["firmware"] = str(self.firmware)
        doc.update({k: getattr(self, k).hex() for k in HEX_FIELDS})
        doc["certificates"] = {k.value: base64.b64encode(self.certificates[k]).decode() for k in CERT_ORDER}
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "emulated PSP material") -> PspMaterial:
        try:
            doc = json.loads(data.rstrip(b"\0").decode())
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise InputError(f"{source}: emulated PSP material is not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise InputError(f"{source}: not emulated PSP material (format must be {FORMAT!r})")
        expected = {"format", "product", "cpuid", "firmware", "certificates", *INT_FIELDS, *HEX_FIELDS}
        if set(doc) != expected:
            extra, missing = sorted(set(doc) - expected), sorted(expected - set(doc))
            raise InputError(f"{source}: unexpected keys {extra} / missing keys {missing}")
        try:
            values: dict[str, Any] = {k: bytes.fromhex(doc[k]) for k in HEX_FIELDS}
            for k, size in HEX_FIELDS.items():
                if len(values[k]) != size:
                    raise ValueError(f"{k} must be {size} bytes")
            for k in INT_FIELDS:
                if not isinstance(doc[k], int) or doc[k] < 0:
                    raise ValueError(f"{k} must be a non-negative integer")
                values[k] = doc[k]
            cpuid = Cpuid(int(doc["cpuid"]["family"]), int(doc["cpuid"]["model"]), int(doc["cpuid"]["stepping"]))
            major, minor, build = (int(x) for x in doc["firmware"].split("."))
            certs = {CertKind(k): base64.b64decode(v, validate=True) for k, v in doc["certificates"].items()}
            if set(certs) != set(CERT_ORDER):
                raise ValueError("certificates must be exactly vcek, ask and ark")
            product = Product(doc["product"])
        except (ValueError, TypeError, KeyError, binascii.Error) as e:
            raise InputError(f"{source}: invalid emulated PSP material: {e}") from e
        return cls(product=product, cpuid=cpuid, firmware=FirmwareVersion(major, minor, build),
                   certificates=certs, **values)


Sign = Callable[[bytes], tuple[int, int]]  # ECDSA-P384-SHA384 under the VCEK key: data -> (r, s)


class EmulatedPsp:
    """Signs reports the way the PSP does, from launch-time material; `sign` holds its VCEK key."""

    def __init__(self, material: PspMaterial, sign: Sign) -> None:
        self.material = material
        self._sign = sign

    def report(self, report_data: bytes, vmpl: int = 0) -> bytes:
        """MSG_REPORT_REQ semantics: REPORT_DATA is the caller's 64 bytes, VMPL the requested level."""
        if len(report_data) != 64:
            raise InputError(f"REPORT_DATA must be 64 bytes, got {len(report_data)}")
        if not 0 <= vmpl <= 3:
            raise InputError(f"VMPL must be 0..3, got {vmpl}")
        m = self.material
        tcb = TcbVersion(m.tcb, layout_of(m.product))
        version = m.report_version
        unsigned = AttestationReport(
            version=version, guest_svn=m.guest_svn, policy=GuestPolicy(m.policy), family_id=m.family_id,
            image_id=m.image_id, vmpl=vmpl, signature_algo=SIG_ALGO_ECDSA_P384_SHA384, current_tcb=tcb,
            platform_info=PlatformInfo(m.platform_info),
            key_info=KeyInfo.build(SigningKey.VCEK, author_key_en=any(m.author_key_digest)),
            report_data=report_data, measurement=m.measurement, host_data=m.host_data,
            id_key_digest=m.id_key_digest, author_key_digest=m.author_key_digest, report_id=m.report_id,
            report_id_ma=m.report_id_ma, reported_tcb=tcb, cpuid=m.cpuid if version >= 3 else None,
            chip_id=m.chip_id, committed_tcb=tcb, current_version=m.firmware, committed_version=m.firmware,
            launch_tcb=tcb, launch_mit_vector=m.mit_vector if version >= 5 else None,
            current_mit_vector=m.mit_vector if version >= 5 else None, signature_r=0, signature_s=0,
            product=m.product)
        r, s = self._sign(unsigned.signed_bytes())
        signed = unsigned.with_signature(r, s).to_bytes()
        parse_report(signed, product=m.product)  # never hand out bytes our own parser would refuse
        return signed

    def cert_table(self) -> bytes:
        """The certificate table a host with certificates configured would return."""
        return build_cert_table([entry(k, self.material.certificates[k]) for k in CERT_ORDER])
