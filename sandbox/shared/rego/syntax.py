"""A parser for the subset of Rego that ACI policy and fragment modules use (docs/aci.md).

Accepted: `package` (one or more: confcom writes one module per container group into one file),
`import`, and assignments `NAME := TERM`, `NAME = TERM` and `default NAME := TERM`, where TERM is
a constant (strings, raw strings, integers, true/false/null, arrays, objects with string keys;
trailing commas and `#` comments as Rego allows them) or a plain reference such as
`data.framework.mount_device`. Anything else (rule bodies, `if`, comprehensions, sets, functions,
operators, floats) is refused with the line and column where it starts, because its meaning would
need a Rego evaluator. Errors are RegoSyntaxError (an InputError), never a crash: the guest parses
host-supplied bytes with this code.

Large array and object terms (confcom writes all containers on one line) take a fast path through
the stdlib JSON decoder, with floats and duplicate keys refused as on the slow path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sandbox.shared.errors import InputError

if TYPE_CHECKING:
    from sandbox.shared.jsonstrict import JsonObject


class RegoSyntaxError(InputError):
    """Text outside the accepted Rego subset, with its position."""


@dataclass(frozen=True)
class Ref:
    """A dotted reference term, e.g. data.framework.mount_device."""

    parts: tuple[str, ...]

    def __str__(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True)
class Statement:
    kind: str                    # "import", "assign" or "default"
    line: int
    name: str                    # import path, or the assigned name
    value: Any = None            # the constant (dict, list, str, int, bool, None) or a Ref


@dataclass(frozen=True)
class Module:
    """One `package` and the statements up to the next one."""

    package: str
    line: int                    # line of the package statement (1-based, in the whole text)
    start: int                   # character offsets of the module in the whole text: text[start:end]
    end: int
    statements: tuple[Statement, ...] = field(default=())

    def assignments(self) -> dict[str, Statement]:
        return {s.name: s for s in self.statements if s.kind == "assign"}


_SPACE = re.compile(r"(?:[ \t\r\n]+|#[^\n]*)*")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_RAW = re.compile(r"`[^`]*`")
_NUMBER = re.compile(r"-?[0-9][0-9A-Za-z_.+-]*")
_INT = re.compile(r"-?(0|[1-9][0-9]{0,999})")     # bounded: int() refuses over 4300 digits
_LINE_END = re.compile(r"[ \t\r]*(#[^\n]*)?(\n|$)")
_ALIAS = re.compile(r"[ \t]+as\b")
# Nesting bound: the guest parses host-supplied bytes, and must answer with an error, never a crash.
MAX_DEPTH = 64
_KEYWORDS = frozenset({"true", "false", "null"})
_HINT = "only constant data assignments and framework delegations are accepted (docs/aci.md, 'ccePolicy import')"


class _NoFast(Exception):
    pass


def _refuse_pairs(pairs: list[tuple[str, Any]]) -> JsonObject:
    out: JsonObject = {}
    for k, v in pairs:
        if k in out:
            raise _NoFast
        out[k] = v
    return out


def _refuse_float(_text: str) -> Any:
    raise _NoFast


def _refuse_constant(_text: str) -> Any:
    raise _NoFast


_JSON = json.JSONDecoder(object_pairs_hook=_refuse_pairs, parse_float=_refuse_float,
                         parse_constant=_refuse_constant, strict=True)


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.pos = 0
        # Line starts, for turning offsets into line:column only when needed (errors, statement lines).
        self._lines = [0] + [m.end() for m in re.finditer("\n", text)]

    # -- positions and errors ----------------------------------------------------------------------

    def where(self, pos: int) -> tuple[int, int]:
        lo, hi = 0, len(self._lines) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._lines[mid] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1, pos - self._lines[lo] + 1

    def fail(self, pos: int, message: str, hint: str = _HINT) -> RegoSyntaxError:
        line, col = self.where(pos)
        return RegoSyntaxError(f"{self.source}:{line}:{col}: {message}", hint=hint)

    def skip(self) -> None:
        m = _SPACE.match(self.text, self.pos)
        if m is not None:   # always: the pattern matches the empty string too
            self.pos = m.end()

    def at_line_end(self, since: int) -> bool:
        """No token between `since` and the next newline (comments allowed)."""
        return _LINE_END.match(self.text, since) is not None

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos:self.pos + 1]

    def describe(self, pos: int) -> str:
        m = _IDENT.match(self.text, pos)
        if m:
            return repr(m.group())
        return repr(self.text[pos]) if pos < len(self.text) else "end of file"

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.fail(self.pos, f"expected {char!r}, found {self.describe(self.pos)}")
        self.pos += 1

    def ident(self) -> str:
        self.skip()
        m = _IDENT.match(self.text, self.pos)
        if not m:
            raise self.fail(self.pos, f"expected a name, found {self.describe(self.pos)}")
        self.pos = m.end()
        return m.group()

    def path(self) -> tuple[str, ...]:
        parts = [self.ident()]
        while self.text.startswith(".", self.pos):
            self.pos += 1
            m = _IDENT.match(self.text, self.pos)
            if not m:
                raise self.fail(self.pos, f"expected a name after '.', found {self.describe(self.pos)}")
            parts.append(m.group())
            self.pos = m.end()
        return tuple(parts)

    # -- terms -------------------------------------------------------------------------------------

    def term(self, depth: int = 0) -> Any:
        c = self.peek()
        start = self.pos
        if depth > MAX_DEPTH:
            raise self.fail(start, f"values nested deeper than {MAX_DEPTH}")
        if c and c in "[{":
            try:
                value, end = _JSON.raw_decode(self.text, start)
            except (_NoFast, ValueError, RecursionError):
                return self.array(depth) if c == "[" else self.object(depth)
            self.pos = end
            return value
        if c == '"':
            m = _STRING.match(self.text, start)
            if not m:
                raise self.fail(start, "unterminated string")
            try:
                value = json.loads(m.group())
            except json.JSONDecodeError:
                raise self.fail(start, f"invalid string escape in {m.group()[:40]}") from None
            self.pos = m.end()
            return value
        if c == "`":
            m = _RAW.match(self.text, start)
            if not m:
                raise self.fail(start, "unterminated raw string")
            self.pos = m.end()
            return m.group()[1:-1]
        if c and (c.isdigit() or c == "-"):
            m = _NUMBER.match(self.text, start)
            tok = m.group() if m else c
            if not m or not _INT.fullmatch(tok):
                raise self.fail(start, f"{tok!r} is not an integer",
                                hint="policy data holds integers only; a version must be a string such as \"0.2.3\"")
            self.pos = m.end()
            return int(tok)
        ident = _IDENT.match(self.text, start)
        if ident:
            word = ident.group()
            if word in _KEYWORDS:
                self.pos = start + len(word)
                return {"true": True, "false": False, "null": None}[word]
            ref = Ref(self.path())
            nxt = self.text[self.pos:self.pos + 1]
            if nxt in ("[", "("):
                raise self.fail(self.pos, f"{ref} is followed by {nxt!r}: only plain references are accepted")
            return ref
        raise self.fail(start, f"expected a value, found {self.describe(start)}")

    def _comma_or(self, close: str) -> bool:
        c = self.peek()
        if c == ",":
            self.pos += 1
            return True
        if c == close:
            return False
        raise self.fail(self.pos, f"expected ',' or {close!r}, found {self.describe(self.pos)}")

    def array(self, depth: int) -> list[Any]:
        self.expect("[")
        items: list[Any] = []
        while self.peek() != "]":
            items.append(self.term(depth + 1))
            if not self._comma_or("]"):
                break
        self.expect("]")
        return items

    def object(self, depth: int) -> JsonObject:
        self.expect("{")
        out: JsonObject = {}
        while self.peek() != "}":
            key_pos = self.pos
            key = self.term(depth + 1)
            if self.peek() != ":":
                raise self.fail(self.pos, "sets are not accepted (expected ':' after an object key)")
            self.pos += 1
            if not isinstance(key, str):
                raise self.fail(key_pos, f"object keys must be strings, found {self.describe(key_pos)}")
            if key in out:
                raise self.fail(key_pos, f"duplicate key {key!r}")
            out[key] = self.term(depth + 1)
            if not self._comma_or("}"):
                break
        self.expect("}")
        return out

    # -- statements --------------------------------------------------------------------------------

    def statement(self) -> Statement | tuple[str, int, int]:
        self.skip()
        start = self.pos
        line, _ = self.where(start)
        word = self.ident()
        if word == "package":
            return ("package", line, start)
        if word == "import":
            name = ".".join(self.path())
            alias = _ALIAS.match(self.text, self.pos)
            if alias:
                raise self.fail(alias.end() - 2, "import aliases are not accepted")
            return self._end(Statement("import", line, name), start)
        kind = "assign"
        if word == "default":
            kind = "default"
            word = self.ident()
        self.skip()
        op_pos = self.pos
        if self.text.startswith(":=", op_pos):
            self.pos += 2
        elif self.text.startswith("=", op_pos) and not self.text.startswith("==", op_pos):
            self.pos += 1
        else:
            raise self.fail(op_pos, f"expected ':=' after {word!r}, found {self.describe(op_pos)} "
                                    "(rules with bodies, functions and partial rules are not accepted)")
        value = self.term()
        return self._end(Statement(kind, line, word, value), start)

    def _end(self, stmt: Statement, start: int) -> Statement:
        if not self.at_line_end(self.pos):
            self.skip()
            raise self.fail(self.pos, f"unexpected {self.describe(self.pos)} after the statement that starts "
                                      f"on line {stmt.line}")
        return stmt

    def modules(self) -> list[Module]:
        out: list[Module] = []
        current: tuple[str, int, int] | None = None
        stmts: list[Statement] = []

        def close(end: int) -> None:
            if current is not None:
                out.append(Module(current[0], current[1], current[2], end, tuple(stmts)))

        while True:
            self.skip()
            if self.pos >= len(self.text):
                break
            item = self.statement()
            if isinstance(item, tuple):       # a package statement starts a new module
                close(item[2])
                name = ".".join(self.path())
                if not self.at_line_end(self.pos):
                    self.skip()
                    raise self.fail(self.pos, f"unexpected {self.describe(self.pos)} after 'package {name}'")
                current, stmts = (name, item[1], item[2]), []
                continue
            if current is None:
                raise self.fail(0, "a module starts with a 'package' statement",
                                hint="is this an ACI ccePolicy (Rego text, or its base64)?")
            stmts.append(item)
        if current is None:
            raise RegoSyntaxError(f"{self.source}: no 'package' statement",
                                  hint="is this an ACI ccePolicy (Rego text, or its base64)?")
        close(len(self.text))
        return out


def parse_modules(text: str, source: str = "policy.rego") -> list[Module]:
    """Parse Rego text of the accepted subset into its modules (one per `package`), in order."""
    return _Parser(text, source).modules()
