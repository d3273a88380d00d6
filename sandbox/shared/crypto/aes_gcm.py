"""AES (FIPS 197) and AES-GCM (NIST SP 800-38D) in pure Python, for the guest's key release.

The guest has no `cryptography` package; the key broker seals secrets with AES-256-GCM and the
agent opens them with this module. Only what GCM needs is here: the forward cipher, 96-bit IVs
and 128-bit tags. The S-box is computed from its definition (FIPS 197 §5.1.1: the multiplicative
inverse in GF(2^8) followed by the affine map), and encryption uses the usual four 32-bit
"T-tables" that fold SubBytes, ShiftRows and MixColumns into lookups (FIPS 197 §5.1, the
table-driven form in Daemen & Rijmen, "The Design of Rijndael" §4.2).

GHASH multiplies by H with sixteen 256-entry tables (one per byte position of the operand), built
once per key from the 128 values e_i·H; this is linear algebra over GF(2), so the tables are exact.

Not constant-time (Python cannot be): it opens secrets inside the guest, where the host cannot
observe timing beyond what SEV-SNP allows; the broker side uses `cryptography`.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Sequence

from sandbox.shared.errors import CheckFailed, InputError

BLOCK = 16
IV_SIZE = 12
TAG_SIZE = 16
KEY_SIZES = {16: 10, 24: 12, 32: 14}  # key bytes -> rounds (FIPS 197 Figure 4)
MAX_MESSAGE = (2**32 - 2) * BLOCK     # SP 800-38D §5.2.1.1: len(P) <= 2^39 - 256 bits
GCM_R = 0xE1 << 120                   # SP 800-38D §6.3: R = 11100001 || 0^120


class AuthenticationError(CheckFailed):
    """A GCM tag did not verify: the ciphertext, AAD, key or IV is not the one that was sealed (a
    failed check)."""


def _xtime(a: int) -> int:
    a <<= 1
    return (a ^ 0x11B) if a & 0x100 else a


def _gmul(a: int, b: int) -> int:
    """Multiplication in GF(2^8) modulo x^8 + x^4 + x^3 + x + 1 (FIPS 197 §4.2)."""
    out = 0
    while b:
        if b & 1:
            out ^= a
        a = _xtime(a)
        b >>= 1
    return out


def _build_tables() -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    # Multiplicative inverses via exp/log tables with generator 3.
    exp = [0] * 510
    log = [0] * 256
    x = 1
    for i in range(255):
        exp[i] = exp[i + 255] = x
        log[x] = i
        x = _gmul(x, 3)
    sbox = []
    for a in range(256):
        inv = 0 if a == 0 else exp[255 - log[a]]
        # Affine transformation (FIPS 197 eq. 5.1): b_i ^= b_{i+4} ^ b_{i+5} ^ b_{i+6} ^ b_{i+7} ^ c_i.
        s = inv
        for shift in range(1, 5):
            s ^= ((inv << shift) | (inv >> (8 - shift))) & 0xFF
        sbox.append(s ^ 0x63)
    t0 = []
    for a in range(256):
        s = sbox[a]
        # MixColumns column (2s, s, s, 3s), big-endian word: row 0 in the top byte.
        t0.append((_gmul(s, 2) << 24) | (s << 16) | (s << 8) | _gmul(s, 3))
    rot = lambda w, n: ((w >> n) | (w << (32 - n))) & 0xFFFFFFFF  # noqa: E731
    tables = (tuple(t0), tuple(rot(w, 8) for w in t0), tuple(rot(w, 16) for w in t0),
              tuple(rot(w, 24) for w in t0))
    return tuple(sbox), tables


SBOX, (T0, T1, T2, T3) = _build_tables()


def expand_key(key: bytes) -> tuple[int, ...]:
    """The key schedule (FIPS 197 §5.2) as 4*(Nr+1) big-endian words."""
    rounds = KEY_SIZES.get(len(key))
    if rounds is None:
        raise InputError(f"AES key must be 16, 24 or 32 bytes, got {len(key)}")
    nk = len(key) // 4
    words = list(struct.unpack(f">{nk}I", key))
    rcon = 1
    s = SBOX
    for i in range(nk, 4 * (rounds + 1)):
        t = words[i - 1]
        if i % nk == 0:
            t = ((t << 8) | (t >> 24)) & 0xFFFFFFFF  # RotWord
            t = (s[t >> 24] << 24) | (s[(t >> 16) & 255] << 16) | (s[(t >> 8) & 255] << 8) | s[t & 255]
            t ^= rcon << 24
            rcon = _xtime(rcon)
        elif nk > 6 and i % nk == 4:
            t = (s[t >> 24] << 24) | (s[(t >> 16) & 255] << 16) | (s[(t >> 8) & 255] << 8) | s[t & 255]
        words.append(words[i - nk] ^ t)
    return tuple(words)


def encrypt_block(round_keys: Sequence[int], block: bytes) -> bytes:
    """The forward cipher on one 16-byte block."""
    s0, s1, s2, s3 = struct.unpack(">4I", block)
    return struct.pack(">4I", *_encrypt_words(round_keys, s0, s1, s2, s3))


def _encrypt_words(rk: Sequence[int], s0: int, s1: int, s2: int, s3: int) -> tuple[int, int, int, int]:
    s0 ^= rk[0]
    s1 ^= rk[1]
    s2 ^= rk[2]
    s3 ^= rk[3]
    rounds = len(rk) // 4 - 1
    t0_, t1_, t2_, t3_ = T0, T1, T2, T3
    k = 4
    for _ in range(rounds - 1):
        # Column c takes row r from column c+r (ShiftRows), then T-tables apply SubBytes+MixColumns.
        n0 = t0_[s0 >> 24] ^ t1_[(s1 >> 16) & 255] ^ t2_[(s2 >> 8) & 255] ^ t3_[s3 & 255] ^ rk[k]
        n1 = t0_[s1 >> 24] ^ t1_[(s2 >> 16) & 255] ^ t2_[(s3 >> 8) & 255] ^ t3_[s0 & 255] ^ rk[k + 1]
        n2 = t0_[s2 >> 24] ^ t1_[(s3 >> 16) & 255] ^ t2_[(s0 >> 8) & 255] ^ t3_[s1 & 255] ^ rk[k + 2]
        n3 = t0_[s3 >> 24] ^ t1_[(s0 >> 16) & 255] ^ t2_[(s1 >> 8) & 255] ^ t3_[s2 & 255] ^ rk[k + 3]
        s0, s1, s2, s3 = n0, n1, n2, n3
        k += 4
    sb = SBOX
    # Final round: SubBytes, ShiftRows, AddRoundKey (no MixColumns).
    o0 = ((sb[s0 >> 24] << 24) | (sb[(s1 >> 16) & 255] << 16) | (sb[(s2 >> 8) & 255] << 8) | sb[s3 & 255]) ^ rk[k]
    o1 = ((sb[s1 >> 24] << 24) | (sb[(s2 >> 16) & 255] << 16) | (sb[(s3 >> 8) & 255] << 8) | sb[s0 & 255]) ^ rk[k + 1]
    o2 = ((sb[s2 >> 24] << 24) | (sb[(s3 >> 16) & 255] << 16) | (sb[(s0 >> 8) & 255] << 8) | sb[s1 & 255]) ^ rk[k + 2]
    o3 = ((sb[s3 >> 24] << 24) | (sb[(s0 >> 16) & 255] << 16) | (sb[(s1 >> 8) & 255] << 8) | sb[s2 & 255]) ^ rk[k + 3]
    return o0, o1, o2, o3


class _Ghash:
    """GHASH_H (SP 800-38D §6.4) with per-byte-position multiplication tables."""

    def __init__(self, h: int) -> None:
        # powers[i] = e_i · H, where e_i is the block with only bit i (counted from the left) set;
        # multiplying by x is a right shift with reduction (SP 800-38D Algorithm 1).
        powers = [h]
        for _ in range(127):
            v = powers[-1]
            powers.append((v >> 1) ^ GCM_R if v & 1 else v >> 1)
        tables = []
        for j in range(BLOCK):
            table = [0] * 256
            for b in range(1, 256):
                low = b & -b
                bit = 7 - (low.bit_length() - 1)  # bit 7 of a byte is its leftmost bit
                table[b] = table[b ^ low] ^ powers[8 * j + bit]
            tables.append(tuple(table))
        self.tables = tuple(tables)

    def multiply(self, x: int) -> int:
        t = self.tables
        out = 0
        for j in range(BLOCK):
            out ^= t[j][(x >> (8 * (15 - j))) & 255]
        return out

    def digest(self, aad: bytes, ciphertext: bytes) -> int:
        y = 0
        for data in (aad, ciphertext):
            padded = data + bytes(-len(data) % BLOCK)
            for i in range(0, len(padded), BLOCK):
                y = self.multiply(y ^ int.from_bytes(padded[i:i + BLOCK], "big"))
        lengths = ((len(aad) * 8) << 64) | (len(ciphertext) * 8)
        return self.multiply(y ^ lengths)


class AesGcm:
    """AES-GCM with a 96-bit IV and a 128-bit tag, the interface of cryptography's AESGCM."""

    def __init__(self, key: bytes) -> None:
        self._rk = expand_key(bytes(key))
        self._ghash = _Ghash(int.from_bytes(encrypt_block(self._rk, bytes(BLOCK)), "big"))

    def _keystream_xor(self, j0: int, data: bytes) -> bytes:
        """GCTR (SP 800-38D §6.5) starting at inc32(J0)."""
        if not data:
            return b""
        rk = self._rk
        prefix = j0 >> 32
        counter = j0 & 0xFFFFFFFF
        blocks = []
        for _ in range(-(-len(data) // BLOCK)):
            counter = (counter + 1) & 0xFFFFFFFF
            cb = (prefix << 32) | counter
            blocks.append(struct.pack(">4I", *_encrypt_words(rk, cb >> 96, (cb >> 64) & 0xFFFFFFFF,
                                                             (cb >> 32) & 0xFFFFFFFF, counter)))
        stream = b"".join(blocks)[:len(data)]
        return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(data), "big")

    def _tag(self, j0: int, aad: bytes, ciphertext: bytes) -> bytes:
        s = self._ghash.digest(aad, ciphertext)
        ek = int.from_bytes(encrypt_block(self._rk, j0.to_bytes(BLOCK, "big")), "big")
        return (s ^ ek).to_bytes(BLOCK, "big")

    @staticmethod
    def _j0(iv: bytes) -> int:
        if len(iv) != IV_SIZE:
            raise InputError(f"AES-GCM IV must be {IV_SIZE} bytes, got {len(iv)}")
        return (int.from_bytes(iv, "big") << 32) | 1  # SP 800-38D §7.1 step 2, 96-bit IV

    def encrypt(self, iv: bytes, plaintext: bytes, aad: bytes | None) -> bytes:
        """ciphertext || 16-byte tag."""
        if len(plaintext) > MAX_MESSAGE:
            raise InputError("AES-GCM plaintext too long")
        j0 = self._j0(iv)
        aad = aad or b""
        ciphertext = self._keystream_xor(j0, plaintext)
        return ciphertext + self._tag(j0, aad, ciphertext)

    def decrypt(self, iv: bytes, data: bytes, aad: bytes | None) -> bytes:
        """Check the tag first; raise AuthenticationError without releasing any plaintext."""
        j0 = self._j0(iv)
        if len(data) < TAG_SIZE:
            raise AuthenticationError("AES-GCM ciphertext is shorter than its tag")
        ciphertext, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
        if not hmac.compare_digest(self._tag(j0, aad or b"", ciphertext), tag):
            raise AuthenticationError("AES-GCM tag mismatch: the data was not sealed with this key, IV and AAD")
        return self._keystream_xor(j0, ciphertext)
