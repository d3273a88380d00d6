"""Strict JSON parsing shared by host and guest: duplicate keys and NaN/Infinity are errors."""

from __future__ import annotations

import json
from typing import Any

from sandbox.shared.errors import InputError


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(text: str, source: str) -> Any:
    """Parse JSON, rejecting duplicate keys and NaN/Infinity; errors cite line and column."""
    if not text.strip():
        raise InputError(f"{source} is empty", hint="it must contain a JSON object")
    try:
        return json.loads(text, object_pairs_hook=no_duplicate_keys, parse_constant=reject_constant)
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                         hint="check for a missing comma, quote or bracket near that position") from None
    except ValueError as e:
        raise InputError(f"{source}: not valid JSON: {e}") from None


def decode_utf8(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{source}: not UTF-8 text (bad byte at offset {e.start})") from None
