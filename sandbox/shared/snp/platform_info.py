"""PLATFORM_INFO (SNP ABI 56860 ATTESTATION_REPORT offset 0x040, u64; snp.md §1.3)."""

from __future__ import annotations

from dataclasses import dataclass

FLAGS = {
    0: "smt_en",
    1: "tsme_en",
    2: "ecc_en",
    3: "rapl_dis",
    4: "ciphertext_hiding_en",
    5: "alias_check_complete",
    7: "sev_tio_en",
}


@dataclass(frozen=True)
class PlatformInfo:
    raw: int

    def flag(self, name: str) -> bool:
        bit = next(b for b, n in FLAGS.items() if n == name)
        return bool(self.raw >> bit & 1)

    @property
    def smt_enabled(self) -> bool:
        return self.flag("smt_en")

    def to_dict(self) -> dict[str, bool]:
        return {name: self.flag(name) for name in FLAGS.values()}
