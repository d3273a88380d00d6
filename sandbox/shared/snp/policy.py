"""Guest POLICY (SNP ABI 56860 "Guest Policy Structure"; report offset 0x008, u64; snp.md §1.2)."""

from __future__ import annotations

from dataclasses import dataclass

# bit -> name; bits 7:0 ABI_MINOR and 15:8 ABI_MAJOR are numbers, not flags.
FLAGS = {
    16: "smt",
    17: "reserved_mbo",  # reserved, must be one
    18: "migrate_ma",
    19: "debug",
    20: "single_socket",
    21: "cxl_allow",
    22: "mem_aes_256_xts",
    23: "rapl_dis",
    24: "ciphertext_hiding",
    25: "page_swap_disable",
}
RESERVED_MBO = 1 << 17
RESERVED_MBZ = ~((1 << 26) - 1) & (2**64 - 1)  # bits 63:26


@dataclass(frozen=True)
class GuestPolicy:
    raw: int

    @classmethod
    def build(cls, *, abi_major: int = 0, abi_minor: int = 0, **flags: bool) -> GuestPolicy:
        value = RESERVED_MBO | (abi_major & 0xFF) << 8 | (abi_minor & 0xFF)
        by_name = {name: bit for bit, name in FLAGS.items()}
        for name, on in flags.items():
            if name not in by_name:
                raise ValueError(f"unknown policy flag {name}")
            if on:
                value |= 1 << by_name[name]
        return cls(value)

    def flag(self, name: str) -> bool:
        bit = next(b for b, n in FLAGS.items() if n == name)
        return bool(self.raw >> bit & 1)

    @property
    def abi_minor(self) -> int:
        return self.raw & 0xFF

    @property
    def abi_major(self) -> int:
        return self.raw >> 8 & 0xFF

    @property
    def smt(self) -> bool:
        return self.flag("smt")

    @property
    def migrate_ma(self) -> bool:
        return self.flag("migrate_ma")

    @property
    def debug(self) -> bool:
        return self.flag("debug")

    @property
    def single_socket(self) -> bool:
        return self.flag("single_socket")

    def reserved_problems(self) -> list[str]:
        problems = []
        if not self.raw & RESERVED_MBO:
            problems.append("POLICY bit 17 (reserved, must be one) is zero")
        if self.raw & RESERVED_MBZ:
            problems.append(f"POLICY bits 63:26 (reserved, must be zero) are 0x{self.raw & RESERVED_MBZ:x}")
        return problems

    def to_dict(self) -> dict[str, int | bool]:
        out: dict[str, int | bool] = {"abi_major": self.abi_major, "abi_minor": self.abi_minor}
        out.update({name: self.flag(name) for name in FLAGS.values() if name != "reserved_mbo"})
        return out

    def __str__(self) -> str:
        on = [n for n in FLAGS.values() if n != "reserved_mbo" and self.flag(n)]
        return f"0x{self.raw:x} (abi>={self.abi_major}.{self.abi_minor}; {', '.join(on) or 'no flags'})"
