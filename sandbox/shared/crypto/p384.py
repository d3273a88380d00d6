"""NIST P-384 in pure Python: keys, ECDSA with SHA-384, ECDH and the usual encodings.

Curve parameters: FIPS 186-4 / SEC 2 v2 §2.5.1 (secp384r1). Arithmetic uses Jacobian coordinates
with a = -3 ("dbl-2001-b", "madd-2007-bl", "add-2007-bl" from the Explicit-Formulas Database).
Fixed-base multiplication uses a precomputed 4-bit window table of G (built once per process);
variable-base multiplication uses a width-5 NAF. Nonces follow RFC 6979 (HMAC-SHA384), optionally
hedged with extra entropy (RFC 6979 §3.6).

This is not constant-time. It is used by the emulated PSP (a test device by definition) and for
the guest agent's ephemeral runtime key; see docs/attestation.md.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from sandbox.shared.crypto import der
from sandbox.shared.errors import InputError

P = 2**384 - 2**128 - 2**96 + 2**32 - 1
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
B = 0xB3312FA7E23EE7E4988E056BE3F82D19181D9C6EFE8141120314088F5013875AC656398D8A2ED19D2A85C8EDD3EC2AEF
GX = 0xAA87CA22BE8B05378EB1C71EF320AD746E1D3B628BA79B9859F741E082542A385502F25DBF55296C3A545E3872760AB7
GY = 0x3617DE4A96262C6F5D9E98BF9292DC29F8F41DBD289A147CE9DA3113B5F0B8C00A60B1CE1D7E819D7A431D7C90EA0E5F
SIZE = 48  # bytes per coordinate / scalar

OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"  # RFC 5480 id-ecPublicKey
OID_SECP384R1 = "1.3.132.0.34"  # RFC 5480 secp384r1

Jacobian = tuple[int, int, int]
Affine = tuple[int, int]
INFINITY: Jacobian = (1, 1, 0)


def _double(pt: Jacobian) -> Jacobian:
    x1, y1, z1 = pt
    if z1 == 0 or y1 == 0:
        return INFINITY
    delta = z1 * z1 % P
    gamma = y1 * y1 % P
    beta = x1 * gamma % P
    alpha = 3 * (x1 - delta) * (x1 + delta) % P
    x3 = (alpha * alpha - 8 * beta) % P
    z3 = ((y1 + z1) ** 2 - gamma - delta) % P
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % P
    return x3, y3, z3


def _add_affine(pt: Jacobian, q: Affine) -> Jacobian:
    """pt + q where q is affine (Z = 1)."""
    x1, y1, z1 = pt
    x2, y2 = q
    if z1 == 0:
        return x2, y2, 1
    z1z1 = z1 * z1 % P
    u2 = x2 * z1z1 % P
    s2 = y2 * z1 * z1z1 % P
    h = (u2 - x1) % P
    r = 2 * (s2 - y1) % P
    if h == 0:
        return _double(pt) if r == 0 else INFINITY
    hh = h * h % P
    i = 4 * hh % P
    j = h * i % P
    v = x1 * i % P
    x3 = (r * r - j - 2 * v) % P
    y3 = (r * (v - x3) - 2 * y1 * j) % P
    z3 = ((z1 + h) ** 2 - z1z1 - hh) % P
    return x3, y3, z3


def _add(p1: Jacobian, p2: Jacobian) -> Jacobian:
    x1, y1, z1 = p1
    x2, y2, z2 = p2
    if z1 == 0:
        return p2
    if z2 == 0:
        return p1
    z1z1 = z1 * z1 % P
    z2z2 = z2 * z2 % P
    u1 = x1 * z2z2 % P
    u2 = x2 * z1z1 % P
    s1 = y1 * z2 * z2z2 % P
    s2 = y2 * z1 * z1z1 % P
    h = (u2 - u1) % P
    r = 2 * (s2 - s1) % P
    if h == 0:
        return _double(p1) if r == 0 else INFINITY
    i = 4 * h * h % P
    j = h * i % P
    v = u1 * i % P
    x3 = (r * r - j - 2 * v) % P
    y3 = (r * (v - x3) - 2 * s1 * j) % P
    z3 = ((z1 + z2) ** 2 - z1z1 - z2z2) * h % P
    return x3, y3, z3


def _to_affine_many(points: list[Jacobian]) -> list[Affine]:
    """Convert finite points with one inversion (Montgomery's trick)."""
    prefix = []
    acc = 1
    for _, _, z in points:
        prefix.append(acc)
        acc = acc * z % P
    inv = pow(acc, -1, P)
    out: list[Affine] = [(0, 0)] * len(points)
    for k in range(len(points) - 1, -1, -1):
        x, y, z = points[k]
        zi = inv * prefix[k] % P
        inv = inv * z % P
        zi2 = zi * zi % P
        out[k] = (x * zi2 % P, y * zi2 * zi % P)
    return out


def _to_affine(pt: Jacobian) -> Affine | None:
    if pt[2] == 0:
        return None
    return _to_affine_many([pt])[0]


@functools.cache
def _g_table() -> tuple[tuple[Affine, ...], ...]:
    """table[i][j] = (j + 1) * 16**i * G for the 96 four-bit windows of a scalar."""
    rows: list[Jacobian] = []
    base: Jacobian = (GX, GY, 1)
    for _ in range(96):
        acc = base
        rows.append(acc)
        for _ in range(14):
            acc = _add(acc, base)
            rows.append(acc)
        for _ in range(4):
            base = _double(base)
    flat = _to_affine_many(rows)
    return tuple(tuple(flat[i * 15:(i + 1) * 15]) for i in range(96))


def _mul_g(k: int) -> Jacobian:
    table = _g_table()
    acc = INFINITY
    i = 0
    while k:
        digit = k & 15
        if digit:
            acc = _add_affine(acc, table[i][digit - 1])
        k >>= 4
        i += 1
    return acc


def _naf(k: int, width: int) -> list[int]:
    """Width-w non-adjacent form, least significant digit first."""
    digits = []
    half = 1 << (width - 1)
    full = 1 << width
    while k:
        if k & 1:
            d = k & (full - 1)
            if d >= half:
                d -= full
            k -= d
        else:
            d = 0
        digits.append(d)
        k >>= 1
    return digits


def _mul(k: int, point: Affine) -> Jacobian:
    width = 5
    odd: list[Jacobian] = [(point[0], point[1], 1)]
    twice = _double(odd[0])
    for _ in range((1 << (width - 2)) - 1):
        odd.append(_add(odd[-1], twice))
    table = _to_affine_many(odd)  # P, 3P, 5P, ..., 15P
    acc = INFINITY
    for d in reversed(_naf(k, width)):
        acc = _double(acc)
        if d > 0:
            acc = _add_affine(acc, table[d >> 1])
        elif d < 0:
            x, y = table[(-d) >> 1]
            acc = _add_affine(acc, (x, P - y))
    return acc


def on_curve(x: int, y: int) -> bool:
    if not (0 <= x < P and 0 <= y < P):
        return False
    return (y * y - (x * x * x - 3 * x + B)) % P == 0


def _hash_to_int(digest: bytes) -> int:
    """bits2int (RFC 6979 §2.3.2) for qlen = 384."""
    e = int.from_bytes(digest, "big")
    excess = len(digest) * 8 - 384
    return e >> excess if excess > 0 else e


@dataclass(frozen=True)
class Signature:
    r: int
    s: int

    def to_der(self) -> bytes:
        """ECDSA-Sig-Value (RFC 3279 §2.2.3)."""
        return der.sequence(der.integer(self.r), der.integer(self.s))

    @classmethod
    def from_der(cls, data: bytes) -> Signature:
        parts = der.children(der.read_single(data, der.SEQUENCE, what="ECDSA signature"), what="ECDSA signature")
        if len(parts) != 2 or any(p.tag != der.INTEGER for p in parts):
            raise der.DerError("ECDSA signature: expected SEQUENCE { INTEGER r, INTEGER s }")
        return cls(der.parse_integer(parts[0].value), der.parse_integer(parts[1].value))


@dataclass(frozen=True)
class PublicKey:
    x: int
    y: int

    def __post_init__(self) -> None:
        if not on_curve(self.x, self.y):
            raise InputError("P-384 public key: the point is not on the curve")

    # Encodings -------------------------------------------------------------------------------
    def to_sec1(self, *, compressed: bool = False) -> bytes:
        """SEC 1 v2 §2.3.3 Elliptic-Curve-Point-to-Octet-String."""
        xb = self.x.to_bytes(SIZE, "big")
        if compressed:
            return bytes([2 | (self.y & 1)]) + xb
        return b"\x04" + xb + self.y.to_bytes(SIZE, "big")

    @classmethod
    def from_sec1(cls, data: bytes) -> PublicKey:
        """SEC 1 v2 §2.3.4, uncompressed or compressed."""
        if len(data) == 1 + 2 * SIZE and data[0] == 4:
            return cls(int.from_bytes(data[1:1 + SIZE], "big"), int.from_bytes(data[1 + SIZE:], "big"))
        if len(data) == 1 + SIZE and data[0] in (2, 3):
            x = int.from_bytes(data[1:], "big")
            if x >= P:
                raise InputError("P-384 public key: x is not a field element")
            rhs = (x * x * x - 3 * x + B) % P
            y = pow(rhs, (P + 1) // 4, P)  # P = 3 (mod 4)
            if y * y % P != rhs:
                raise InputError("P-384 public key: x is not on the curve")
            if y & 1 != data[0] & 1:
                y = P - y
            return cls(x, y)
        raise InputError(f"P-384 public key: not a SEC 1 point ({len(data)} bytes)",
                         hint="expected 97 bytes starting 04, or 49 bytes starting 02/03")

    def to_der(self) -> bytes:
        """SubjectPublicKeyInfo (RFC 5480 §2)."""
        algorithm = der.sequence(der.oid(OID_EC_PUBLIC_KEY), der.oid(OID_SECP384R1))
        return der.sequence(algorithm, der.bit_string(self.to_sec1()))

    @classmethod
    def from_der(cls, data: bytes) -> PublicKey:
        what = "SubjectPublicKeyInfo"
        parts = der.children(der.read_single(data, der.SEQUENCE, what=what), what=what)
        if len(parts) != 2 or parts[0].tag != der.SEQUENCE or parts[1].tag != der.BIT_STRING:
            raise der.DerError(f"{what}: expected SEQUENCE {{ AlgorithmIdentifier, BIT STRING }}")
        alg = der.children(parts[0].value, what=what)
        if (len(alg) != 2 or alg[0].tag != der.OID or alg[1].tag != der.OID
                or der.parse_oid(alg[0].value) != OID_EC_PUBLIC_KEY
                or der.parse_oid(alg[1].value) != OID_SECP384R1):
            raise der.DerError(f"{what}: not an EC P-384 (secp384r1) key")
        bits = parts[1].value
        if not bits or bits[0] != 0:
            raise der.DerError(f"{what}: BIT STRING with unused bits")
        return cls.from_sec1(bits[1:])

    # Operations -------------------------------------------------------------------------------
    def verify_digest(self, digest: bytes, signature: Signature) -> bool:
        """ECDSA verification (FIPS 186-4 §6.4.2) of a precomputed hash."""
        r, s = signature.r, signature.s
        if not (0 < r < N and 0 < s < N):
            return False
        w = pow(s, -1, N)
        e = _hash_to_int(digest)
        point = _add(_mul_g(e * w % N), _mul(r * w % N, (self.x, self.y)))
        affine = _to_affine(point)
        return affine is not None and affine[0] % N == r

    def verify(self, message: bytes, signature: Signature) -> bool:
        return self.verify_digest(hashlib.sha384(message).digest(), signature)


@dataclass(frozen=True)
class PrivateKey:
    d: int = field(repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.d < N:
            raise InputError("P-384 private key: scalar out of range")

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(secrets.randbelow(N - 1) + 1)

    @classmethod
    def from_bytes(cls, data: bytes) -> PrivateKey:
        if len(data) != SIZE:
            raise InputError(f"P-384 private key: expected {SIZE} bytes, got {len(data)}")
        return cls(int.from_bytes(data, "big"))

    def to_bytes(self) -> bytes:
        return self.d.to_bytes(SIZE, "big")

    @functools.cached_property
    def public_key(self) -> PublicKey:
        x, y = _to_affine(_mul_g(self.d))  # type: ignore[misc] - d in [1, N) never gives infinity
        return PublicKey(x, y)

    def _nonces(self, digest: bytes, extra: bytes):  # noqa: ANN202 - generator of candidate k
        """RFC 6979 §3.2 steps b-h with HMAC-SHA384 (§3.6 `extra` appended to the seed)."""
        x = self.to_bytes()
        h = (_hash_to_int(digest) % N).to_bytes(SIZE, "big")
        v = b"\x01" * 48
        k = b"\x00" * 48
        k = hmac.new(k, v + b"\x00" + x + h + extra, "sha384").digest()
        v = hmac.new(k, v, "sha384").digest()
        k = hmac.new(k, v + b"\x01" + x + h + extra, "sha384").digest()
        v = hmac.new(k, v, "sha384").digest()
        while True:
            v = hmac.new(k, v, "sha384").digest()
            candidate = int.from_bytes(v, "big")
            if 0 < candidate < N:
                yield candidate
            k = hmac.new(k, v + b"\x00", "sha384").digest()
            v = hmac.new(k, v, "sha384").digest()

    def sign_digest(self, digest: bytes, *, extra_entropy: bytes = b"") -> Signature:
        """ECDSA signature (FIPS 186-4 §6.4.1) of a precomputed hash; deterministic unless hedged."""
        e = _hash_to_int(digest)
        for k in self._nonces(digest, extra_entropy):
            affine = _to_affine(_mul_g(k))
            if affine is None:
                continue
            r = affine[0] % N
            if r == 0:
                continue
            s = pow(k, -1, N) * (e + r * self.d) % N
            if s:
                return Signature(r, s)
        raise AssertionError("unreachable")

    def sign(self, message: bytes, *, extra_entropy: bytes = b"") -> Signature:
        return self.sign_digest(hashlib.sha384(message).digest(), extra_entropy=extra_entropy)

    def exchange(self, peer: PublicKey) -> bytes:
        """ECDH (SEC 1 v2 §3.3.1): the x-coordinate of d * peer, 48 bytes big-endian."""
        affine = _to_affine(_mul(self.d, (peer.x, peer.y)))
        if affine is None:  # impossible for a validated point on a prime-order curve
            raise InputError("ECDH produced the point at infinity")
        return affine[0].to_bytes(SIZE, "big")
