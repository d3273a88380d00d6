"""ID_AUTH_INFO (SNP ABI 56860, "ID Authentication Information Structure"): who vouches for the ID block.

0x1000 bytes, little-endian:

| offset | size  | field         |
|--------|-------|---------------|
| 0x000  | 4     | ID_KEY_ALGO   | 1 = ECDSA P-384 with SHA-384
| 0x004  | 4     | AUTH_KEY_ALGO | 1 with an author key; ignored (here 0) without one
| 0x008  | 0x38  | reserved      |
| 0x040  | 0x200 | ID_BLOCK_SIG  | by the ID key over the 0x60-byte ID block (ecdsa_signature.py)
| 0x240  | 0x404 | ID_KEY        | ecdsa_public_key.py
| 0x644  | 0x3C  | reserved      |
| 0x680  | 0x200 | ID_KEY_SIG    | by the author key over the 0x404-byte ID_KEY
| 0x880  | 0x404 | AUTHOR_KEY    |
| 0xC84  | 0x37C | reserved      |

The author key fields are used only when the launch sets AUTHOR_KEY_EN (QEMU author-key-enabled).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sandbox.shared.errors import InputError
from sandbox.shared.snp import ecdsa_public_key, ecdsa_signature
from sandbox.shared.snp.ecdsa_public_key import EcdsaPublicKey
from sandbox.shared.snp.ecdsa_signature import EcdsaSignature

SIZE = 0x1000
ALGO_ECDSA_P384_SHA384 = 1
OFF_ID_KEY_ALGO, OFF_AUTH_KEY_ALGO = 0x000, 0x004
OFF_ID_BLOCK_SIG, OFF_ID_KEY, OFF_ID_KEY_SIG, OFF_AUTHOR_KEY = 0x040, 0x240, 0x680, 0x880
RESERVED = ((0x008, 0x040), (0x644, 0x680), (0xC84, 0x1000))


@dataclass(frozen=True)
class IdAuth:
    id_block_sig: EcdsaSignature
    id_key: EcdsaPublicKey
    id_key_sig: EcdsaSignature | None = None      # both None without an author key
    author_key: EcdsaPublicKey | None = None
    id_key_algo: int = ALGO_ECDSA_P384_SHA384
    auth_key_algo: int = -1                       # default: 1 with an author key, else 0

    def __post_init__(self) -> None:
        if (self.id_key_sig is None) != (self.author_key is None):
            raise InputError("ID auth: an author key needs its signature over the ID key, and only it")
        if self.auth_key_algo == -1:
            object.__setattr__(self, "auth_key_algo", ALGO_ECDSA_P384_SHA384 if self.author_key else 0)

    @property
    def has_author_key(self) -> bool:
        return self.author_key is not None

    def to_bytes(self) -> bytes:
        out = bytearray(SIZE)
        struct.pack_into("<II", out, OFF_ID_KEY_ALGO, self.id_key_algo, self.auth_key_algo)
        out[OFF_ID_BLOCK_SIG:OFF_ID_BLOCK_SIG + ecdsa_signature.SIZE] = self.id_block_sig.to_bytes()
        out[OFF_ID_KEY:OFF_ID_KEY + ecdsa_public_key.SIZE] = self.id_key.to_bytes()
        if self.id_key_sig is not None and self.author_key is not None:
            out[OFF_ID_KEY_SIG:OFF_ID_KEY_SIG + ecdsa_signature.SIZE] = self.id_key_sig.to_bytes()
            out[OFF_AUTHOR_KEY:OFF_AUTHOR_KEY + ecdsa_public_key.SIZE] = self.author_key.to_bytes()
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "ID auth", author_key_enabled: bool | None = None) -> IdAuth:
        """Parse; the author key part is read when AUTH_KEY_ALGO says so (or `author_key_enabled` forces it)."""
        if len(data) != SIZE:
            raise InputError(f"{source}: an ID auth structure is {SIZE} bytes, got {len(data)}")
        for start, end in RESERVED:
            if any(data[start:end]):
                raise InputError(f"{source}: reserved bytes 0x{start:x}..0x{end - 1:x} are not zero")
        id_algo, auth_algo = struct.unpack_from("<II", data, OFF_ID_KEY_ALGO)
        if id_algo != ALGO_ECDSA_P384_SHA384:
            raise InputError(f"{source}: ID_KEY_ALGO {id_algo} is not ECDSA P-384/SHA-384")
        if author_key_enabled and auth_algo != ALGO_ECDSA_P384_SHA384:
            raise InputError(f"{source}: AUTH_KEY_ALGO {auth_algo} is not ECDSA P-384/SHA-384")
        # Tools that always fill the author part (sev-snp-measure) are fine: without AUTHOR_KEY_EN the
        # firmware ignores it, so it is read whenever it is there.
        with_author = bool(author_key_enabled or auth_algo or any(
            data[OFF_ID_KEY_SIG:OFF_AUTHOR_KEY + ecdsa_public_key.SIZE]))

        def sig(off: int, what: str) -> EcdsaSignature:
            return EcdsaSignature.from_bytes(data[off:off + ecdsa_signature.SIZE], what=f"{source} {what}")

        def key(off: int, what: str) -> EcdsaPublicKey:
            return EcdsaPublicKey.from_bytes(data[off:off + ecdsa_public_key.SIZE], what=f"{source} {what}")

        author_sig = sig(OFF_ID_KEY_SIG, "ID_KEY_SIG") if with_author else None
        author = key(OFF_AUTHOR_KEY, "AUTHOR_KEY") if with_author else None
        return cls(sig(OFF_ID_BLOCK_SIG, "ID_BLOCK_SIG"), key(OFF_ID_KEY, "ID_KEY"), author_sig, author, id_algo,
                   auth_algo)
