"""A strict CBOR (RFC 8949) decoder and encoder for COSE envelopes (stdlib only; the guest uses it).

Decoding accepts definite lengths only, integers, byte and text strings, arrays, maps (keys: integers
or text, no duplicates), tags, false/true/null; floats, undefined, simple values, indefinite lengths,
non-minimal heads beyond what RFC 8949 permits and trailing bytes are refused, each with a CborError
naming the offset. Nesting depth is bounded: the bytes come from the host. Encoding writes the
deterministic form (RFC 8949 §4.2.1: shortest heads; map keys in the order given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sandbox.shared.errors import InputError

MAX_DEPTH = 32


class CborError(InputError):
    """Bytes that are not the CBOR this decoder accepts."""


@dataclass(frozen=True)
class Tag:
    number: int
    value: Any


class _Decoder:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def fail(self, message: str, at: int | None = None) -> CborError:
        return CborError(f"CBOR at offset {self.pos if at is None else at}: {message}")

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise self.fail(f"{n} bytes needed, {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def head(self) -> tuple[int, int, int]:
        start = self.pos
        first = self.take(1)[0]
        major, info = first >> 5, first & 0x1F
        if info < 24:
            return major, info, start
        if info > 27:
            if info == 31:
                raise self.fail("indefinite lengths are not accepted", start)
            raise self.fail(f"reserved additional information {info}", start)
        if major == 7:
            if info == 24:
                raise self.fail("simple values are not accepted", start)
            raise self.fail("floating-point values are not accepted", start)
        value = int.from_bytes(self.take(1 << (info - 24)), "big")
        return major, value, start

    def item(self, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH}")
        major, arg, start = self.head()
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2:
            return self.take(arg)
        if major == 3:
            raw = self.take(arg)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail("text string is not UTF-8", start) from None
        if major == 4:
            if arg > len(self.data) - self.pos:
                raise self.fail(f"array of {arg} items cannot fit", start)
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            if arg > len(self.data) - self.pos:
                raise self.fail(f"map of {arg} entries cannot fit", start)
            out: dict[Any, Any] = {}
            for _ in range(arg):
                key_at = self.pos
                key = self.item(depth + 1)
                if not isinstance(key, int | str) or isinstance(key, bool):
                    raise self.fail("map keys must be integers or text", key_at)
                if key in out:
                    raise self.fail(f"duplicate map key {key!r}", key_at)
                out[key] = self.item(depth + 1)
            return out
        if major == 6:
            return Tag(arg, self.item(depth + 1))
        # major 7 with a direct value
        simple = {20: False, 21: True, 22: None}
        if arg not in simple:
            raise self.fail(f"simple value {arg} is not accepted", start)
        return simple[arg]


def decode(data: bytes) -> Any:
    """One CBOR item making up all of `data`."""
    d = _Decoder(bytes(data))
    value = d.item()
    if d.pos != len(d.data):
        raise CborError(f"CBOR: {len(d.data) - d.pos} bytes after the item")
    return value


def _head(major: int, arg: int) -> bytes:
    if arg < 24:
        return bytes([major << 5 | arg])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if arg < 1 << (8 * size):
            return bytes([major << 5 | info]) + arg.to_bytes(size, "big")
    raise ValueError("integer too large for CBOR")


def encode(value: Any) -> bytes:
    """Deterministic CBOR of `value` (int, bytes, str, list/tuple, dict, Tag, bool, None)."""
    if value is False or value is True or value is None:
        return bytes([0xF4 if value is False else 0xF5 if value is True else 0xF6])
    if isinstance(value, int):
        return _head(0, value) if value >= 0 else _head(1, -1 - value)
    if isinstance(value, bytes | bytearray):
        return _head(2, len(value)) + bytes(value)
    if isinstance(value, str):
        raw = value.encode("utf-8")
        return _head(3, len(raw)) + raw
    if isinstance(value, list | tuple):
        return _head(4, len(value)) + b"".join(encode(v) for v in value)
    if isinstance(value, dict):
        return _head(5, len(value)) + b"".join(encode(k) + encode(v) for k, v in value.items())
    if isinstance(value, Tag):
        return _head(6, value.number) + encode(value.value)
    raise TypeError(f"cannot encode {type(value).__name__} as CBOR")
