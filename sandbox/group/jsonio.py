"""Strict JSON loading for user-supplied documents, with errors that name the file, line and column."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sandbox.fsutil import read_input_file
from sandbox.shared.errors import InvalidDocument
from sandbox.shared.jsonstrict import decode_utf8, loads_strict

__all__ = ["ValidationError", "load_json_file", "loads_strict", "read_input_file"]


class ValidationError(InvalidDocument):
    """A group document failed validation; `problems` holds one 'path: message' line per problem."""


def load_json_file(path: Path) -> Any:
    raw = read_input_file(path)
    return loads_strict(decode_utf8(raw, str(path)), str(path))
