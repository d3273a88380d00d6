"""The signer-info word at report offset 0x048 (SNP ABI 56860 ATTESTATION_REPORT, u32; snp.md §1.1).

bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY, bits 4:2 SIGNING_KEY (0 VCEK, 1 VLEK, 7 none; 2..6
reserved), bits 31:5 must be zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class SigningKey(IntEnum):
    VCEK = 0
    VLEK = 1
    NONE = 7


@dataclass(frozen=True)
class KeyInfo:
    raw: int

    @classmethod
    def build(cls, signing_key: SigningKey = SigningKey.VCEK, *, author_key_en: bool = False,
              mask_chip_key: bool = False) -> KeyInfo:
        return cls(int(author_key_en) | int(mask_chip_key) << 1 | int(signing_key) << 2)

    @property
    def author_key_en(self) -> bool:
        return bool(self.raw & 1)

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.raw >> 1 & 1)

    @property
    def signing_key_code(self) -> int:
        return self.raw >> 2 & 0x7

    @property
    def signing_key(self) -> SigningKey | None:
        """None for the reserved codes 2..6."""
        try:
            return SigningKey(self.signing_key_code)
        except ValueError:
            return None

    def reserved_problems(self) -> list[str]:
        problems = []
        if self.raw >> 5:
            problems.append(f"KEY_INFO bits 31:5 (reserved, must be zero) are 0x{self.raw >> 5:x}")
        if self.signing_key is None:
            problems.append(f"KEY_INFO SIGNING_KEY={self.signing_key_code} is a reserved value")
        return problems

    def to_dict(self) -> dict[str, int | str]:
        return {"raw": hex(self.raw), "author_key_en": int(self.author_key_en),
                "mask_chip_key": int(self.mask_chip_key), "signing_key": self.signing_key_code}
