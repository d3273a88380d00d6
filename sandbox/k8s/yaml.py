"""A small YAML writer for manifests: block mappings and sequences, every string double-quoted.

Double-quoted YAML scalars use JSON's escapes, so each string is written with json.dumps and reads back
exactly (no "no"/"on"/"1.0" surprises). Keys are written plain when they are simple names.
"""

from __future__ import annotations

import json
import re
from typing import Any

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")


def _key(k: str) -> str:
    return k if _PLAIN_KEY.fullmatch(k) and k.lower() not in ("y", "n", "yes", "no", "on", "off", "true",
                                                               "false", "null") else json.dumps(k)


def _scalar(v: Any) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, int | float):
        return json.dumps(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    raise TypeError(f"cannot write {type(v).__name__} as YAML")


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        out = []
        for k, v in value.items():
            if isinstance(v, dict | list) and v:
                out.append(f"{pad}{_key(k)}:")
                out.extend(_lines(v, indent + 2 if isinstance(v, dict) else indent))
            else:
                out.append(f"{pad}{_key(k)}: {_scalar(v) if not isinstance(v, dict | list) else ('{}' if isinstance(v, dict) else '[]')}")
        return out
    if isinstance(value, list):
        if not value:
            return [pad + "[]"]
        out = []
        for item in value:
            sub = _lines(item, indent + 2)
            out.append(f"{pad}- {sub[0].lstrip()}")
            out.extend(sub[1:])
        return out
    return [pad + _scalar(value)]


def dump_all(documents: list[dict[str, Any]]) -> str:
    """Documents separated by '---', each ending with a newline."""
    return "".join(("---\n" if i else "") + "\n".join(_lines(doc, 0)) + "\n" for i, doc in enumerate(documents))
