"""SEV-SNP product lines and how a report reveals which one produced it.

Product from CPUID (ATTESTATION_REPORT v3+, bytes 0x188..0x18A, "CPUID_FAM_ID/CPUID_MOD_ID/
CPUID_STEP"): family 0x19 models 0x00-0x0F are Milan, 0x10-0x1F and 0xA0-0xAF (Bergamo/Siena)
are Genoa (AMD's KDS serves both under "Genoa"); family 0x1A models 0x00-0x11 are Turin.
Fallbacks for v2 reports, which carry no CPUID: a CHIP_ID whose bytes 8..63 are zero but which
is not all zero is Turin (Turin's hwID is 8 bytes); otherwise the product stays unknown (Milan and
Genoa share a TCB layout) and the verifier takes it from the VCEK/VLEK or from the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sandbox.shared.errors import InputError


class Product(StrEnum):
    """Values are the path components of AMD's KDS URLs and the CN suffixes of the AMD CAs."""
    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"


class TcbLayout(StrEnum):
    """TCB_VERSION byte layouts (snp.md §1.5): Milan/Genoa "struct version 0", Turin "version 1"."""
    LEGACY = "legacy"
    TURIN = "turin"


FAMILY_ZEN3_ZEN4 = 0x19
FAMILY_ZEN5 = 0x1A


def layout_of(product: Product | None) -> TcbLayout:
    return TcbLayout.TURIN if product == Product.TURIN else TcbLayout.LEGACY


@dataclass(frozen=True)
class Cpuid:
    """The CPUID identification a v3+ report carries (family is extended + base family)."""
    family: int
    model: int
    stepping: int

    @property
    def eax(self) -> int:
        """CPUID(1).EAX composed from family/model/stepping (the vCPU signature in a VMSA)."""
        base_family = min(self.family, 0xF)
        ext_family = self.family - base_family
        return (ext_family << 20) | ((self.model >> 4) << 16) | (base_family << 8) \
            | ((self.model & 0xF) << 4) | (self.stepping & 0xF)

    def __str__(self) -> str:
        return f"family 0x{self.family:02x} model 0x{self.model:02x} stepping {self.stepping}"


def product_from_cpuid(cpuid: Cpuid) -> Product | None:
    """The product line for a CPUID, or None for CPUs without KDS certificates (e.g. Venice)."""
    if cpuid.family == FAMILY_ZEN3_ZEN4:
        if cpuid.model <= 0x0F:
            return Product.MILAN
        if 0x10 <= cpuid.model <= 0x1F or 0xA0 <= cpuid.model <= 0xAF:
            return Product.GENOA
    if cpuid.family == FAMILY_ZEN5 and cpuid.model <= 0x11:
        return Product.TURIN
    return None


def looks_like_turin_chip_id(chip_id: bytes) -> bool:
    """The v2 heuristic: Turin chips have an 8-byte hwID, so CHIP_ID[8:64] is zero."""
    return any(chip_id[:8]) and not any(chip_id[8:])


def parse_product(text: str) -> tuple[Product, str | None]:
    """'Milan', 'genoa', 'Milan-B0', 'Turin-B1' -> (product, stepping or None)."""
    name, _, stepping = text.strip().partition("-")
    for product in Product:
        if name.lower() == product.value.lower():
            return product, (stepping or None)
    raise InputError(f"unknown SEV-SNP product {text!r}",
                     hint="use one of: " + ", ".join(p.value for p in Product)
                          + " (optionally with a stepping, e.g. Milan-B0)")
