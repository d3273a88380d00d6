"""Walk a parsed JSON document and collect every problem with its path (stdlib; host and guest).

Validators of user documents (group.json, policies) use one Checker: each accessor type-checks a field,
records `path: message` on failure and returns a default, so a single pass reports every problem at
once and the model is built only when the list stays empty.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from sandbox.shared.jsonstrict import JsonObject

MISSING: Any = object()
T = TypeVar("T")

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object", type(None): "null"}


def type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _expected(kind: type) -> str:
    return "true or false" if kind is bool else _TYPE_NAMES[kind]


def suggestion(key: str, allowed: Collection[str]) -> str:
    """' (did you mean 'x'?)' for a near-miss of an allowed key (case, underscores, small typos)."""
    def norm(s: str) -> str:
        return s.replace("_", "").lower()

    close = [a for a in sorted(allowed) if norm(a) == norm(key)]
    if not close:
        import difflib  # only for a bad key: the guest agent's start-up does without it

        close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}" if path else message)

    def obj(self, value: Any, path: str, allowed: Collection[str],
            required: Collection[str] = ()) -> JsonObject | None:
        """An object with only `allowed` keys and all `required` ones; None (problem noted) otherwise."""
        if not isinstance(value, dict):
            self.problem(path, f"expected an object, got {type_name(value)}")
            return None
        for key in value:
            if key not in allowed:
                self.problem(join(path, key), f"unknown field{suggestion(key, allowed)}")
        for key in sorted(required):
            if key not in value:
                self.problem(join(path, key), "required field is missing")
        return value

    def get(self, d: JsonObject, key: str, path: str, kind: type, default: Any = MISSING) -> Any:
        """d[key] if present and of `kind` (bool is not an int); `default` when absent or wrong."""
        v = d.get(key, MISSING)
        if v is MISSING:
            return default
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            self.problem(join(path, key), f"expected {_expected(kind)}, got {type_name(v)}")
            return default
        return v

    def string(self, d: JsonObject, key: str, path: str, default: Any = MISSING, *,
               nonempty: bool = False, pattern: re.Pattern[str] | None = None, what: str = "") -> Any:
        v = self.get(d, key, path, str, default)
        if not isinstance(v, str) or v is default:
            return v
        p = join(path, key)
        if nonempty and not v:
            self.problem(p, "must not be empty")
        elif "\x00" in v:
            self.problem(p, "must not contain NUL characters")
        elif pattern is not None and not pattern.fullmatch(v):
            self.problem(p, f"{v!r} is not {what}")
        else:
            return v
        return default

    def integer(self, d: JsonObject, key: str, path: str, lo: int, hi: int,
                default: Any = MISSING) -> Any:
        v = self.get(d, key, path, int, default)
        if isinstance(v, int) and v is not default and not lo <= v <= hi:
            self.problem(join(path, key), f"must be between {lo} and {hi}, got {v}")
            return default
        return v

    def strings(self, d: JsonObject, key: str, path: str, *, nonempty: bool = False,
                unique: bool = False, pattern: re.Pattern[str] | None = None,
                what: str = "") -> tuple[str, ...] | None:
        """A list of strings (None when absent or not a list); bad items are reported and left out."""
        items = self.get(d, key, path, list, None)
        if items is None:
            return None
        p = join(path, key)
        if nonempty and not items:
            self.problem(p, "must not be an empty array")
        out: list[str] = []
        for i, item in enumerate(items):
            if not isinstance(item, str):
                self.problem(f"{p}[{i}]", f"expected a string, got {type_name(item)}")
            elif "\x00" in item:
                self.problem(f"{p}[{i}]", "must not contain NUL characters")
            elif pattern is not None and not pattern.fullmatch(item):
                self.problem(f"{p}[{i}]", f"{item!r} is not {what}")
            elif unique and item in out:
                self.problem(f"{p}[{i}]", f"{item!r} is listed twice")
            else:
                out.append(item)
        return tuple(out)

    def items(self, d: JsonObject, key: str, path: str,
              check: Callable[[Any, str], T | None]) -> tuple[T, ...] | None:
        """Apply `check(item, item_path)` to each element; None when absent or when any check failed."""
        raw = self.get(d, key, path, list, None)
        if raw is None:
            return None
        out: list[T] = []
        failed = False
        for i, item in enumerate(raw):      # every item is checked, so that every problem is reported
            checked = check(item, f"{join(path, key)}[{i}]")
            if checked is None:
                failed = True
            else:
                out.append(checked)
        return None if failed else tuple(out)
