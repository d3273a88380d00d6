"""Strict JSON loading for user-supplied documents, with errors that name the file, line and column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sandbox.shared.errors import InputError


class ValidationError(InputError):
    """A document failed validation; `problems` holds one 'path: message' line per problem."""

    def __init__(self, source: str, problems: list[str], hint: str | None = None) -> None:
        n = len(problems)
        super().__init__(f"{source} is invalid ({n} problem{'s' if n != 1 else ''})", hint)
        self.source = source
        self.problems = problems


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads_strict(text: str, source: str) -> Any:
    """Parse JSON, rejecting duplicate keys and NaN/Infinity; errors cite line and column."""
    if not text.strip():
        raise InputError(f"{source} is empty", hint="it must contain a JSON object")

    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=reject_constant)
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                         hint="check for a missing comma, quote or bracket near that position") from None
    except ValueError as e:
        raise InputError(f"{source}: not valid JSON: {e}") from None


def load_json_file(path: Path) -> Any:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a JSON file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    return loads_strict(text, str(path))
