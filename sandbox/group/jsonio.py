"""Strict JSON loading for user-supplied documents, with errors that name the file, line and column."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sandbox.shared.errors import InputError, InvalidDocument
from sandbox.shared.jsonstrict import decode_utf8, loads_strict

__all__ = ["ValidationError", "load_json_file", "loads_strict"]


class ValidationError(InvalidDocument):
    """A group document failed validation; `problems` holds one 'path: message' line per problem."""


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
    return loads_strict(decode_utf8(raw, str(path)), str(path))
