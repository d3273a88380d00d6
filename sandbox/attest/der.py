"""A minimal, strict DER encoder/decoder (ITU-T X.690) for the AMD certificate extensions (host side).

Decoding accepts only definite, minimally encoded lengths and single-byte tags, which covers
the AMD certificate extension values and the emulated CA's.
"""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.shared.errors import InputError

# Universal tags (X.690 §8).
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
IA5_STRING = 0x16
SEQUENCE = 0x30


class DerError(InputError):
    """Bytes that are not the DER structure the caller expected."""


@dataclass(frozen=True)
class Tlv:
    tag: int
    value: bytes
    end: int  # offset just past this element in the buffer it was read from


def encode_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + encode_length(len(value)) + value


def integer(n: int) -> bytes:
    if n < 0:
        raise ValueError("negative INTEGERs are not needed here")
    raw = n.to_bytes(n.bit_length() // 8 + 1, "big")  # one extra byte keeps the sign bit clear
    if len(raw) > 1 and raw[0] == 0 and raw[1] < 0x80:
        raw = raw[1:]
    return tlv(INTEGER, raw)


def sequence(*items: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(items))


def bit_string(data: bytes) -> bytes:
    return tlv(BIT_STRING, b"\x00" + data)  # no unused bits


def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = [40 * arcs[0] + arcs[1], *arcs[2:]]
    out = bytearray()
    for arc in body:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return tlv(OID, bytes(out))


def read(data: bytes, offset: int = 0, *, what: str = "DER") -> Tlv:
    """Read one element at `offset`."""
    if offset + 2 > len(data):
        raise DerError(f"{what}: truncated at byte {offset}")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise DerError(f"{what}: multi-byte tags are not supported (byte {offset})")
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise DerError(f"{what}: unsupported length encoding at byte {offset + 1}")
        if pos + count > len(data):
            raise DerError(f"{what}: truncated length at byte {offset + 1}")
        length = int.from_bytes(data[pos:pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise DerError(f"{what}: non-minimal length at byte {offset + 1}")
        pos += count
    end = pos + length
    if end > len(data):
        raise DerError(f"{what}: element at byte {offset} runs past the end ({end} > {len(data)})")
    return Tlv(tag, bytes(data[pos:end]), end)


def read_single(data: bytes, tag: int, *, what: str = "DER") -> bytes:
    """Decode a buffer that must hold exactly one element with `tag`; return its value."""
    element = read(data, 0, what=what)
    if element.tag != tag:
        raise DerError(f"{what}: expected tag 0x{tag:02x}, got 0x{element.tag:02x}")
    if element.end != len(data):
        raise DerError(f"{what}: {len(data) - element.end} trailing bytes")
    return element.value


def children(value: bytes, *, what: str = "DER") -> list[Tlv]:
    """Split the contents of a constructed element into its elements."""
    out = []
    pos = 0
    while pos < len(value):
        element = read(value, pos, what=what)
        out.append(element)
        pos = element.end
    return out


def parse_integer(value: bytes, *, what: str = "INTEGER") -> int:
    """The value bytes of a non-negative INTEGER."""
    if not value:
        raise DerError(f"{what}: empty INTEGER")
    if value[0] & 0x80:
        raise DerError(f"{what}: negative INTEGER")
    if len(value) > 1 and value[0] == 0 and value[1] < 0x80:
        raise DerError(f"{what}: non-minimal INTEGER")
    return int.from_bytes(value, "big")


def parse_oid(value: bytes) -> str:
    arcs: list[int] = []
    acc = 0
    for b in value:
        acc = (acc << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(acc)
            acc = 0
    if not arcs or value[-1] & 0x80:
        raise DerError("OID: truncated")
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])
