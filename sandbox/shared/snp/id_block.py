"""ID_BLOCK (SNP ABI 56860, "ID Block Structure"): what the guest owner says the launch must be.

0x60 bytes, little-endian; SNP_LAUNCH_FINISH refuses the launch unless LD equals the launch digest
and POLICY equals the guest policy, and the report then carries FAMILY_ID, IMAGE_ID and GUEST_SVN.

| offset | size | field     |
|--------|------|-----------|
| 0x00   | 0x30 | LD        | expected launch digest (MEASUREMENT)
| 0x30   | 0x10 | FAMILY_ID |
| 0x40   | 0x10 | IMAGE_ID  |
| 0x50   | 4    | VERSION   | 1
| 0x54   | 4    | GUEST_SVN |
| 0x58   | 8    | POLICY    |
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sandbox.shared.errors import InputError

SIZE = 0x60
VERSION = 1
_LAYOUT = struct.Struct("<48s16s16sIIQ")
assert _LAYOUT.size == SIZE


@dataclass(frozen=True)
class IdBlock:
    launch_digest: bytes
    policy: int
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    guest_svn: int = 0
    version: int = VERSION

    def __post_init__(self) -> None:
        for name, value, size in (("LD", self.launch_digest, 48), ("FAMILY_ID", self.family_id, 16),
                                  ("IMAGE_ID", self.image_id, 16)):
            if len(value) != size:
                raise InputError(f"ID block {name} must be {size} bytes, got {len(value)}")
        if not 0 <= self.guest_svn < 1 << 32:
            raise InputError(f"ID block GUEST_SVN {self.guest_svn} does not fit in 32 bits")
        if not 0 <= self.policy < 1 << 64:
            raise InputError(f"ID block POLICY {self.policy} does not fit in 64 bits")

    def to_bytes(self) -> bytes:
        return _LAYOUT.pack(self.launch_digest, self.family_id, self.image_id, self.version, self.guest_svn,
                            self.policy)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "ID block") -> IdBlock:
        if len(data) != SIZE:
            raise InputError(f"{source}: an ID block is {SIZE} bytes, got {len(data)}")
        ld, family, image, version, svn, policy = _LAYOUT.unpack(data)
        if version != VERSION:
            raise InputError(f"{source}: VERSION is {version}, the firmware accepts only {VERSION}")
        return cls(ld, policy, family, image, svn, version)
