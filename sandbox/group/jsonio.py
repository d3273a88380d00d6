"""Strict JSON loading for user-supplied documents, with errors that name the file, line and column."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sandbox.shared.errors import InputError, InvalidDocument
from sandbox.shared.jsonstrict import decode_utf8, loads_strict

__all__ = ["ValidationError", "load_json_file", "loads_strict", "read_input_file"]


class ValidationError(InvalidDocument):
    """A group document failed validation; `problems` holds one 'path: message' line per problem."""


def read_input_file(path: Path, expected: str = "a JSON file") -> bytes:
    """The bytes of a user-named input file, with errors that say what was expected there."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected {expected}") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None


def load_json_file(path: Path) -> Any:
    raw = read_input_file(path)
    return loads_strict(decode_utf8(raw, str(path)), str(path))
