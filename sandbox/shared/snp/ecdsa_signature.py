"""The ECDSA signature format of the SEV-SNP firmware (SNP ABI 56860, "ECDSA Signature Format").

0x200 bytes: R at 0x000 and S at 0x048, each a 0x48-byte little-endian integer (P-384 values use
the low 48 bytes), then 0x170 reserved bytes that must be zero. The attestation report's signature
(report bytes 0x2A0..0x49F), ID_BLOCK_SIG and ID_KEY_SIG all use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.shared.errors import InputError

SIZE = 0x200
FIELD = 0x48
OFF_R, OFF_S, OFF_RESERVED = 0x000, 0x048, 0x090


@dataclass(frozen=True)
class EcdsaSignature:
    r: int
    s: int

    def to_bytes(self) -> bytes:
        if not (0 <= self.r < 1 << 8 * FIELD and 0 <= self.s < 1 << 8 * FIELD):
            raise ValueError("signature component out of range")
        return (self.r.to_bytes(FIELD, "little") + self.s.to_bytes(FIELD, "little")).ljust(SIZE, b"\0")

    @classmethod
    def from_bytes(cls, data: bytes, *, what: str = "ECDSA signature") -> EcdsaSignature:
        if len(data) != SIZE:
            raise InputError(f"{what}: expected {SIZE} bytes, got {len(data)}")
        if any(data[OFF_RESERVED:]):
            raise InputError(f"{what}: reserved bytes 0x{OFF_RESERVED:x}..0x{SIZE - 1:x} are not zero")
        return cls(int.from_bytes(data[OFF_R:OFF_R + FIELD], "little"),
                   int.from_bytes(data[OFF_S:OFF_S + FIELD], "little"))

    def is_zero(self) -> bool:
        return self.r == 0 and self.s == 0
