"""The AMD certificate authorities parma-sandbox trusts, pinned by the SHA-256 of their DER.

A root (ARK) or intermediate (ASK, ASVK) is accepted only if its DER hashes to one of these values;
certificates that arrive with evidence are never trusted on their own. Values: AMD KDS cert_chain
for each product, identical in go-sev-guest, virtee/sev and trustee (snp.md §2.6).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from sandbox.shared.snp.product import Product


class CertRole(StrEnum):
    ARK = "ARK"  # AMD root key
    ASK = "ASK"  # AMD SEV key: issues VCEKs
    ASVK = "ASVK"  # AMD SEV VLEK key: issues VLEKs
    VCEK = "VCEK"  # versioned chip endorsement key
    VLEK = "VLEK"  # versioned loaded endorsement key (per cloud provider)


@dataclass(frozen=True)
class Pin:
    product: Product
    role: CertRole
    common_name: str


PINNED: dict[str, Pin] = {
    "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd": Pin(Product.MILAN, CertRole.ARK, "ARK-Milan"),
    "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b": Pin(Product.MILAN, CertRole.ASK, "SEV-Milan"),
    "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5":
        Pin(Product.MILAN, CertRole.ASVK, "SEV-VLEK-Milan"),
    "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1": Pin(Product.GENOA, CertRole.ARK, "ARK-Genoa"),
    "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521": Pin(Product.GENOA, CertRole.ASK, "SEV-Genoa"),
    "197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372":
        Pin(Product.GENOA, CertRole.ASVK, "SEV-VLEK-Genoa"),
    "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a": Pin(Product.TURIN, CertRole.ARK, "ARK-Turin"),
    "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185": Pin(Product.TURIN, CertRole.ASK, "SEV-Turin"),
    "104e10a8bd060a3c20a434261a57d0588fd65a88915b4f65b08bdecaf8df1a3c":
        Pin(Product.TURIN, CertRole.ASVK, "SEV-VLEK-Turin"),
}


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def pin_of(der: bytes) -> Pin | None:
    return PINNED.get(fingerprint(der))
