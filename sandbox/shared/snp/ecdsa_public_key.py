"""The ECDSA public key format of the SEV-SNP firmware (SNP ABI 56860, "ECDSA Public Key Format").

0x404 bytes: CURVE (u32, 2 = P-384) at 0x000, QX at 0x004 and QY at 0x04C, each a 0x48-byte
little-endian integer, then 0x370 reserved bytes that must be zero. The ID key and the author key
of an ID auth structure use it, and the report's ID_KEY_DIGEST / AUTHOR_KEY_DIGEST are the SHA-384
of these exact 0x404 bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sandbox.shared import sha2
from sandbox.shared.errors import InputError

SIZE = 0x404
FIELD = 0x48
CURVE_P384 = 2
OFF_CURVE, OFF_QX, OFF_QY, OFF_RESERVED = 0x000, 0x004, 0x04C, 0x094


@dataclass(frozen=True)
class EcdsaPublicKey:
    x: int
    y: int
    curve: int = CURVE_P384

    def to_bytes(self) -> bytes:
        if not (0 <= self.x < 1 << 8 * FIELD and 0 <= self.y < 1 << 8 * FIELD):
            raise ValueError("public key coordinate out of range")
        head = struct.pack("<I", self.curve) + self.x.to_bytes(FIELD, "little") + self.y.to_bytes(FIELD, "little")
        return head.ljust(SIZE, b"\0")

    @classmethod
    def from_bytes(cls, data: bytes, *, what: str = "ECDSA public key") -> EcdsaPublicKey:
        if len(data) != SIZE:
            raise InputError(f"{what}: expected {SIZE} bytes, got {len(data)}")
        if any(data[OFF_RESERVED:]):
            raise InputError(f"{what}: reserved bytes 0x{OFF_RESERVED:x}..0x{SIZE - 1:x} are not zero")
        (curve,) = struct.unpack_from("<I", data, OFF_CURVE)
        if curve != CURVE_P384:
            raise InputError(f"{what}: curve {curve} is not P-384 ({CURVE_P384})")
        return cls(int.from_bytes(data[OFF_QX:OFF_QX + FIELD], "little"),
                   int.from_bytes(data[OFF_QY:OFF_QY + FIELD], "little"), curve)

    def digest(self) -> bytes:
        """SHA-384 of the 0x404-byte structure: what a report's ID_KEY_DIGEST / AUTHOR_KEY_DIGEST holds."""
        return sha2.sha384(self.to_bytes()).digest()
