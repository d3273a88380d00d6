"""HKDF (RFC 5869) over the stdlib's HMAC, for deriving the key-release AES key from an ECDH secret."""

from __future__ import annotations

import hashlib
import hmac

from sandbox.shared.errors import InputError


def hkdf(ikm: bytes, *, salt: bytes, info: bytes, length: int, hash_name: str = "sha384") -> bytes:
    """HKDF-Extract then HKDF-Expand (RFC 5869 §2.2, §2.3)."""
    size = hashlib.new(hash_name).digest_size
    if not 0 < length <= 255 * size:
        raise InputError(f"HKDF output length must be 1..{255 * size} bytes, got {length}")
    prk = hmac.new(salt or bytes(size), ikm, hash_name).digest()
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hash_name).digest()
        out += block
        counter += 1
    return out[:length]
