"""Strict JSON parsing shared by host and guest: duplicate keys, NaN/Infinity and numbers no float
can hold (1e400) are errors, and so is nesting deeper than the parser can follow."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from sandbox.shared.errors import InputError

# A parsed JSON object whose members have no static type: what a reader checks value by value (wire
# frames, documents), or passes on unread.
JsonObject = dict[str, Any]


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> JsonObject:
    out: JsonObject = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def finite_float(text: str) -> float:
    """json's parse_float: a number that overflows a double (1e400) is an error, not infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def int64(text: str) -> int:
    """json's parse_int for frames: an integer outside the signed 64-bit range is an error (no field
    of the protocol holds more, and no C program downstream could)."""
    if len(text) > 20:
        raise ValueError(f"integer {text[:40]}... is out of range")
    value = int(text)
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"integer {text} is out of range")
    return value


def loads_strict(text: str, source: str) -> Any:
    """Parse JSON, rejecting duplicate keys and NaN/Infinity; errors cite line and column."""
    if not text.strip():
        raise InputError(f"{source} is empty", hint="it must contain a JSON object")
    try:
        return json.loads(text, object_pairs_hook=no_duplicate_keys, parse_constant=reject_constant,
                          parse_float=finite_float)
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                         hint="check for a missing comma, quote or bracket near that position") from None
    except ValueError as e:
        raise InputError(f"{source}: not valid JSON: {e}") from None
    except RecursionError:
        raise InputError(f"{source}: not valid JSON: arrays or objects are nested too deeply") from None


def decode_utf8(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{source}: not UTF-8 text (bad byte at offset {e.start})") from None


# --- JSON from a peer that may be hostile ----------------------------------------------------------

MAX_PEER_NESTING = 32
_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


def nesting_exceeds(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects in `raw` nest deeper than `limit` (strings and escapes skipped).
    A linear scan, done before json.loads so that depth is a refusal, never a RecursionError."""
    depth = 0
    in_string = False
    escaped_until = -1
    for match in _STRUCTURE.finditer(raw):
        pos = match.start()
        if pos < escaped_until:
            continue
        c = raw[pos]
        if in_string:
            if c == 0x5C:            # backslash: the next byte is escaped
                escaped_until = pos + 2
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif c in (0x5D, 0x7D):
            depth -= 1
    return False


def loads_bounded(raw: bytes, source: str, *, max_nesting: int = MAX_PEER_NESTING) -> Any:
    """Parse JSON sent by a peer that may be hostile (a key broker's answer, a request body): UTF-8,
    at most `max_nesting` levels, no duplicate keys, no NaN/Infinity, finite numbers, integers within
    Python's digit limit. Every failure is an InputError naming `source`."""
    if nesting_exceeds(raw, max_nesting):
        raise InputError(f"{source}: JSON nested deeper than {max_nesting} levels")
    text = decode_utf8(raw, source)
    try:
        return json.loads(text, object_pairs_hook=no_duplicate_keys, parse_constant=reject_constant,
                          parse_float=finite_float)
    except RecursionError:
        raise InputError(f"{source}: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:  # duplicate keys, NaN, 1e400, integers over the digit limit
        raise InputError(f"{source}: not valid JSON: {str(e)[:200]}") from None
