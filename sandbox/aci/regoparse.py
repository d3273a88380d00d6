"""A parser for the subset of Rego that ACI policy modules use for their data (docs/aci.md).

Accepted: `package`, `import`, and single-line-headed assignments `NAME := TERM` (or `NAME = TERM`)
whose TERM is a constant (strings, raw strings, integers, true/false/null, arrays, objects with
string keys; trailing commas and `#` comments allowed, as Rego allows them) or a reference such as
`data.framework.mount_device`. Anything else (rule bodies, `if`, comprehensions, sets, functions,
operators, floats) is rejected with the line and column where it starts, because its meaning
would need a Rego evaluator.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sandbox.shared.errors import InputError


@dataclass(frozen=True)
class Ref:
    """A dotted reference term, e.g. data.framework.mount_device."""

    parts: tuple[str, ...]

    def __str__(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True)
class Statement:
    kind: str                    # "package", "import" or "assign"
    line: int
    name: str = ""               # package/import path, or the assigned name
    value: Any = None            # the constant (dicts, lists, str, int, bool, None) or a Ref


@dataclass(frozen=True)
class _Token:
    kind: str        # ident, str, int, punct, assign, eof
    text: str
    value: Any
    line: int
    col: int


_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+)
  | (?P<nl>\n)
  | (?P<comment>\#[^\n]*)
  | (?P<assign>:=)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<num>-?[0-9][0-9A-Za-z_.+-]*)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[\[\]{}(),:.=])
""", re.VERBOSE)

_INT = re.compile(r"-?(0|[1-9][0-9]*)")


class RegoSyntaxError(InputError):
    pass


def _tokens(text: str, source: str) -> list[_Token]:
    out: list[_Token] = []
    pos, line, line_start = 0, 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        col = pos - line_start + 1
        if m is None:
            raise RegoSyntaxError(f"{source}:{line}:{col}: unexpected character {text[pos]!r}",
                                  hint="only constant data assignments are accepted (see docs/aci.md)")
        kind = m.lastgroup
        tok = m.group()
        if kind == "nl":
            line += 1
            line_start = m.end()
        elif kind == "str":
            try:
                out.append(_Token("str", tok, json.loads(tok), line, col))
            except json.JSONDecodeError:
                raise RegoSyntaxError(f"{source}:{line}:{col}: invalid string escape in {tok}") from None
        elif kind == "raw":
            out.append(_Token("str", tok, tok[1:-1], line, col))
            newlines = tok.count("\n")
            if newlines:
                line += newlines
                line_start = m.start() + tok.rfind("\n") + 1
        elif kind == "num":
            if not _INT.fullmatch(tok):
                raise RegoSyntaxError(f"{source}:{line}:{col}: {tok!r} is not an integer",
                                      hint="policy data holds integers only (signals); floats are not accepted")
            out.append(_Token("int", tok, int(tok), line, col))
        elif kind in ("ident", "punct", "assign"):
            out.append(_Token(kind, tok, tok, line, col))
        pos = m.end()
    out.append(_Token("eof", "end of file", None, line, pos - line_start + 1))
    return out


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.toks = _tokens(text, source)
        self.i = 0

    def peek(self) -> _Token:
        return self.toks[self.i]

    def take(self) -> _Token:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, tok: _Token, message: str) -> RegoSyntaxError:
        return RegoSyntaxError(f"{self.source}:{tok.line}:{tok.col}: {message}",
                               hint="only constant data assignments and framework delegations are accepted "
                                    "(see docs/aci.md, 'ccePolicy import')")

    def expect(self, text: str) -> _Token:
        tok = self.take()
        if tok.text != text or tok.kind == "str":
            raise self.fail(tok, f"expected {text!r}, found {tok.text!r}")
        return tok

    def path(self) -> tuple[str, ...]:
        tok = self.take()
        if tok.kind != "ident":
            raise self.fail(tok, f"expected a name, found {tok.text!r}")
        parts = [tok.text]
        while self.peek().text == "." and self.peek().kind == "punct":
            self.take()
            tok = self.take()
            if tok.kind != "ident":
                raise self.fail(tok, f"expected a name after '.', found {tok.text!r}")
            parts.append(tok.text)
        return tuple(parts)

    def term(self) -> Any:
        tok = self.peek()
        if tok.kind in ("str", "int"):
            self.take()
            return tok.value
        if tok.kind == "ident":
            if tok.text in ("true", "false", "null"):
                self.take()
                return {"true": True, "false": False, "null": None}[tok.text]
            ref = Ref(self.path())
            nxt = self.peek()
            if nxt.kind == "punct" and nxt.text in "[(":
                raise self.fail(nxt, f"{ref} is followed by {nxt.text!r}: only plain references are accepted")
            return ref
        if tok.text == "[" and tok.kind == "punct":
            return self.array()
        if tok.text == "{" and tok.kind == "punct":
            return self.object()
        raise self.fail(tok, f"expected a value, found {tok.text!r}")

    def array(self) -> list:
        self.expect("[")
        items = []
        while self.peek().text != "]" or self.peek().kind != "punct":
            items.append(self.term())
            if not self._comma_or("]"):
                break
        self.expect("]")
        return items

    def object(self) -> dict:
        self.expect("{")
        out: dict[str, Any] = {}
        while self.peek().text != "}" or self.peek().kind != "punct":
            key_tok = self.peek()
            key = self.term()
            if self.peek().text != ":":
                raise self.fail(self.peek(), "sets are not accepted (expected ':' after an object key)")
            self.take()
            if not isinstance(key, str):
                raise self.fail(key_tok, f"object keys must be strings, found {key_tok.text!r}")
            if key in out:
                raise self.fail(key_tok, f"duplicate key {key!r}")
            out[key] = self.term()
            if not self._comma_or("}"):
                break
        self.expect("}")
        return out

    def _comma_or(self, close: str) -> bool:
        tok = self.peek()
        if tok.kind == "punct" and tok.text == ",":
            self.take()
            return True
        if tok.kind == "punct" and tok.text == close:
            return False
        raise self.fail(tok, f"expected ',' or {close!r}, found {tok.text!r}")

    def statement(self) -> Statement:
        tok = self.peek()
        if tok.kind != "ident":
            raise self.fail(tok, f"expected a statement, found {tok.text!r}")
        if tok.text in ("package", "import"):
            self.take()
            path = self.path()
            if tok.text == "import" and self.peek().text == "as":
                raise self.fail(self.peek(), "import aliases are not accepted")
            return self._end(Statement(tok.text, tok.line, ".".join(path)))
        self.take()
        op = self.take()
        if op.kind not in ("assign", "punct") or op.text not in (":=", "="):
            raise self.fail(op, f"expected ':=' after {tok.text!r}, found {op.text!r} "
                                "(rules with bodies, functions and partial rules are not accepted)")
        value = self.term()
        return self._end(Statement("assign", tok.line, tok.text, value))

    def _end(self, stmt: Statement) -> Statement:
        tok = self.peek()
        prev = self.toks[self.i - 1]
        if tok.kind != "eof" and tok.line == prev.line:
            raise self.fail(tok, f"unexpected {tok.text!r} after the statement that starts on line {stmt.line}")
        return stmt

    def module(self) -> list[Statement]:
        out = []
        while self.peek().kind != "eof":
            out.append(self.statement())
        return out


def parse_module(text: str, source: str = "policy.rego") -> list[Statement]:
    """Parse a Rego module of the accepted subset into its statements, in order."""
    return _Parser(text, source).module()
