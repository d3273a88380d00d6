"""ARM template expressions: the part of the language that container-group templates use.

A JSON string that starts with `[` and ends with `]` is an expression (`[[` at the start escapes a
literal `[`). Supported: string, integer and boolean literals, property access (`.name`) and
indexing (`[0]`, `['key']`), and the functions in FUNCTIONS below, case-insensitively. Parameters
take their value from the parameters file, else their `defaultValue`; variables are evaluated on
first use (cycles are an error). `resourceGroup()` and `subscription()` describe a stand-in local
deployment (location "local"). Anything else is an error naming the template path and the function.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sandbox.shared.errors import InputError

LOCAL_LOCATION = "local"


class ArmError(InputError):
    pass


@dataclass(frozen=True)
class _Tok:
    kind: str     # name, str, int, punct, end
    value: Any
    pos: int


_LEX = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<str>'(?:[^']|'')*')|(?P<int>-?[0-9]+)"
                  r"|(?P<punct>[()\[\].,]))")


def _lex(text: str) -> list[_Tok]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _LEX.match(text, pos)
        if m is None or m.lastgroup is None:      # every alternative is a named group: never None on a match
            raise ValueError(f"unexpected {text[pos:].strip()[:1]!r} at offset {pos}")
        kind = m.lastgroup
        tok = m.group(kind)
        value: Any = tok
        if kind == "str":
            value = tok[1:-1].replace("''", "'")
        elif kind == "int":
            value = int(tok)
        out.append(_Tok(kind, value, m.start(kind)))
        pos = m.end()
    out.append(_Tok("end", None, len(text)))
    return out


def _format(fmt: str, *args: Any) -> str:
    """.NET composite formatting with plain {N} items (ARM format())."""
    def item(m: re.Match) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        index = int(m.group(1))
        if m.group(2):
            raise ValueError(f"format specifier {m.group(0)!r} is not supported")
        if index >= len(args):
            raise ValueError(f"{m.group(0)} has no argument")
        return _text(args[index])
    return re.sub(r"\{\{|\}\}|\{([0-9]+)(:[^}]*)?\}", item, fmt)


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "True" if v else "False"    # ARM string(true) gives "True"
    if isinstance(v, int):
        return str(v)
    return json.dumps(v, separators=(",", ":"))


def _concat(*args: Any) -> Any:
    if args and all(isinstance(a, list) for a in args):
        return [x for a in args for x in a]
    if all(isinstance(a, str | int) and not isinstance(a, bool) for a in args):
        return "".join(_text(a) for a in args)
    raise ValueError("concat() takes all strings or all arrays")


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("int() of a boolean")
    return int(v)


def _bool(v: Any) -> bool:
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    if isinstance(v, bool | int):
        return bool(v)
    raise ValueError(f"bool() of {v!r}")


def _unique_string(*args: Any) -> str:
    # ARM's uniqueString is a 13-character base-32 hash of its arguments. The arguments that make it
    # unique on Azure (subscription and resource group ids) are local stand-ins here, so the value
    # cannot equal Azure's anyway; this one is deterministic for the same arguments.
    digest = hashlib.sha256("-".join(_text(a) for a in args).encode()).digest()
    return base64.b32encode(digest).decode().lower()[:13]


# A fixed namespace for guid(): deterministic per argument list, like ARM's (whose values differ, as
# its inputs are Azure resource ids).
_GUID_NAMESPACE = uuid.UUID("6f3b6a5e-2d7c-4f0e-9a51-7d0c1a5b9e21")


def _guid(*args: Any) -> str:
    if not args:
        raise ValueError("guid() needs at least one argument")
    return str(uuid.uuid5(_GUID_NAMESPACE, "-".join(_text(a) for a in args)))


def _substring(s: str, start: int, length: int | None = None) -> str:
    if start < 0 or start > len(s) or (length is not None and (length < 0 or start + length > len(s))):
        raise ValueError(f"substring({s!r}, {start}, {length}) is out of range")
    return s[start:] if length is None else s[start:start + length]


def _contains(container: Any, item: Any) -> bool:
    if isinstance(container, str):
        return _text(item) in container
    if isinstance(container, dict):
        return any(k.lower() == str(item).lower() for k in container)
    return item in container


def _union(*args: Any) -> Any:
    if all(isinstance(a, dict) for a in args):
        out: dict[str, Any] = {}
        for a in args:
            out.update(a)
        return out
    if all(isinstance(a, list) for a in args):
        keys = dict.fromkeys(json.dumps(x, sort_keys=True) for a in args for x in a)
        return [json.loads(k) for k in keys]
    raise ValueError("union() takes all objects or all arrays")


def _pad_left(value: Any, width: int, pad: str = " ") -> str:
    text = _text(value)
    return text if len(text) >= width else pad[:1] * (width - len(text)) + text


def _coalesce(*args: Any) -> Any:
    return next((a for a in args if a is not None), None)


def _empty(v: Any) -> bool:
    return v is None or len(v) == 0


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "concat": _concat,
    "format": _format,
    "tolower": lambda s: s.lower(),
    "toupper": lambda s: s.upper(),
    "string": _text,
    "int": _int,
    "bool": _bool,
    "if": lambda c, a, b: a if c else b,
    "equals": lambda a, b: a == b,
    "not": lambda a: not a,
    "and": lambda *a: all(a),
    "or": lambda *a: any(a),
    "length": len,
    "empty": _empty,
    "coalesce": _coalesce,
    "replace": lambda s, old, new: s.replace(old, new),
    "trim": lambda s: s.strip(),
    "base64": lambda s: base64.b64encode(s.encode()).decode(),
    "base64tostring": lambda s: base64.b64decode(s).decode(),
    "createarray": lambda *a: list(a),
    "json": lambda s: json.loads(s),
    "uniquestring": _unique_string,
    "guid": _guid,
    "substring": _substring,
    "indexof": lambda s, t: s.lower().find(t.lower()),
    "lastindexof": lambda s, t: s.lower().rfind(t.lower()),
    "startswith": lambda s, t: s.lower().startswith(t.lower()),
    "endswith": lambda s, t: s.lower().endswith(t.lower()),
    "contains": _contains,
    "split": lambda s, d: s.split(d) if isinstance(d, str) else re.split("|".join(map(re.escape, d)), s),
    "join": lambda items, d: d.join(_text(i) for i in items),
    "first": lambda v: v[0] if v else None,
    "last": lambda v: v[-1] if v else None,
    "skip": lambda v, n: v[max(0, n):],
    "take": lambda v, n: v[:max(0, n)],
    "union": _union,
    "intersection": lambda *a: [x for x in a[0] if all(x in o for o in a[1:])] if all(isinstance(o, list) for o in a)
    else {k: v for k, v in a[0].items() if all(o.get(k) == v for o in a[1:])},
    "array": lambda v: v if isinstance(v, list) else [v],
    "createobject": lambda *a: dict(zip(a[::2], a[1::2], strict=True)),
    "min": lambda *a: min(a[0]) if len(a) == 1 and isinstance(a[0], list) else min(a),
    "max": lambda *a: max(a[0]) if len(a) == 1 and isinstance(a[0], list) else max(a),
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: int(a / b),
    "mod": lambda a, b: a - b * int(a / b),
    "less": lambda a, b: a < b,
    "lessorequals": lambda a, b: a <= b,
    "greater": lambda a, b: a > b,
    "greaterorequals": lambda a, b: a >= b,
    "padleft": _pad_left,
    "trimstart": lambda s: s.lstrip(),
    "trimend": lambda s: s.rstrip(),
    "datauri": lambda s: "data:text/plain;charset=utf8;base64," + base64.b64encode(_text(s).encode()).decode(),
    "datauritostring": lambda s: base64.b64decode(s.split(",", 1)[1]).decode(),
    "uricomponent": lambda s: urllib.parse.quote(s, safe=""),
    "uricomponenttostring": lambda s: urllib.parse.unquote(s),
    "range": lambda start, count: list(range(start, start + count)),
    "items": lambda d: [{"key": k, "value": v} for k, v in d.items()],
}


class Resolver:
    """Evaluates expressions of one template, with its parameter values."""

    def __init__(self, template: Mapping[str, Any], parameter_values: Mapping[str, Any], source: str,
                 deployment_name: str = "parma-sandbox") -> None:
        self.source = source
        self.parameters = {k.lower(): (k, v) for k, v in (template.get("parameters") or {}).items()}
        self.values = {k.lower(): v for k, v in parameter_values.items()}
        self.variables = {k.lower(): (k, v) for k, v in (template.get("variables") or {}).items()}
        self._var_cache: dict[str, Any] = {}
        self._param_cache: dict[str, Any] = {}
        self._active: list[str] = []
        # deployment(): a local stand-in with the template's own content (no templateLink).
        self.deployment = {"name": deployment_name, "properties": {
            "template": {"contentVersion": template.get("contentVersion", "1.0.0.0"),
                         "metadata": template.get("metadata", {})},
            "parameters": {k: {"value": v} for k, v in parameter_values.items()}, "mode": "Incremental"}}
        for name in self.values:
            if name not in self.parameters:
                raise ArmError(f"{source}: the parameters file sets {name!r}, which the template does not declare")

    def fail(self, path: str, message: str) -> ArmError:
        return ArmError(f"{self.source}: {path}: {message}",
                        hint="see docs/aci.md for the template functions parma-sandbox evaluates")

    def resolve(self, value: Any, path: str) -> Any:
        """The value with every expression in it evaluated (recursively through objects and arrays)."""
        if isinstance(value, str):
            if value.startswith("[[") :
                return value[1:]
            if value.startswith("[") and value.endswith("]"):
                return self.evaluate(value[1:-1], path)
            return value
        if isinstance(value, list):
            return [self.resolve(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.resolve(v, f"{path}.{k}") for k, v in value.items()}
        return value

    def evaluate(self, text: str, path: str) -> Any:
        try:
            toks = _lex(text)
        except ValueError as e:
            raise self.fail(path, f"cannot parse [{text}]: {e}") from None
        self._toks, self._i, self._path, self._text = toks, 0, path, text
        value = self._expr()
        if self._toks[self._i].kind != "end":
            raise self.fail(path, f"cannot parse [{text}]: unexpected {self._toks[self._i].value!r}")
        return value

    # -- recursive descent over the token list --------------------------------------------------------

    def _take(self) -> _Tok:
        tok = self._toks[self._i]
        self._i += 1
        return tok

    def _expect(self, punct: str) -> None:
        tok = self._take()
        if tok.kind != "punct" or tok.value != punct:
            raise self.fail(self._path, f"cannot parse [{self._text}]: expected {punct!r} at offset {tok.pos}")

    def _expr(self) -> Any:
        tok = self._take()
        if tok.kind in ("str", "int"):
            value = tok.value
        elif tok.kind == "name" and tok.value.lower() in ("true", "false", "null"):
            value = {"true": True, "false": False, "null": None}[tok.value.lower()]
        elif tok.kind == "name":
            self._expect("(")
            args = []
            if not (self._toks[self._i].kind == "punct" and self._toks[self._i].value == ")"):
                args.append(self._expr())
                while self._toks[self._i].kind == "punct" and self._toks[self._i].value == ",":
                    self._take()
                    args.append(self._expr())
            self._expect(")")
            value = self._call(tok.value, args)
        else:
            raise self.fail(self._path, f"cannot parse [{self._text}]: unexpected {tok.value!r}")
        while self._toks[self._i].kind == "punct" and self._toks[self._i].value in (".", "["):
            if self._take().value == ".":
                name = self._take()
                if name.kind != "name":
                    raise self.fail(self._path, f"cannot parse [{self._text}]: expected a property name")
                value = self._member(value, name.value)
            else:
                key = self._expr()
                self._expect("]")
                value = self._member(value, key)
        return value

    def _member(self, value: Any, key: Any) -> Any:
        try:
            if isinstance(value, dict) and isinstance(key, str):
                matches = [k for k in value if k.lower() == key.lower()]
                return value[matches[0]] if matches else value[key]
            return value[key]
        except (KeyError, IndexError, TypeError):
            raise self.fail(self._path, f"[{self._text}]: {_text(value)[:60]} has no member {key!r}") from None

    def _call(self, name: str, args: list[Any]) -> Any:
        lname = name.lower()
        if lname == "parameters":
            return self._parameter(*args)
        if lname == "variables":
            return self._variable(*args)
        if lname == "deployment":
            return self.deployment
        if lname in ("resourcegroup", "subscription"):
            return {"name": "parma-sandbox", "location": LOCAL_LOCATION, "id": f"/local/{lname}",
                    "subscriptionId": "00000000-0000-0000-0000-000000000000"}
        fn = FUNCTIONS.get(lname)
        if fn is None:
            raise self.fail(self._path, f"[{self._text}]: the template function {name}() is not supported")
        try:
            return fn(*args)
        except (ValueError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise self.fail(self._path, f"[{self._text}]: {name}(): {e}") from None

    def _nested(self, value: Any, path: str) -> Any:
        # A parameter default or a variable may itself hold expressions; evaluate them with a fresh parser state.
        saved = (self._toks, self._i, self._path, self._text)
        try:
            return self.resolve(value, path)
        finally:
            self._toks, self._i, self._path, self._text = saved

    def _parameter(self, name: Any = None, *extra: Any) -> Any:
        if not isinstance(name, str) or extra:
            raise self.fail(self._path, f"[{self._text}]: parameters() takes one name")
        key = name.lower()
        if key not in self.parameters:
            raise self.fail(self._path, f"[{self._text}]: the template declares no parameter {name!r}")
        if key in self._param_cache:
            return self._param_cache[key]
        declared_name, decl = self.parameters[key]
        if key in self.values:
            value = self.values[key]
        elif isinstance(decl, dict) and "defaultValue" in decl:
            self._enter(f"parameters('{declared_name}')")
            try:
                value = self._nested(decl["defaultValue"], f"parameters.{declared_name}.defaultValue")
            finally:
                self._active.pop()
        else:
            raise ArmError(f"{self.source}: {self._path}: parameter {declared_name!r} has no value",
                           hint="give it a defaultValue, or a value in the parameters file next to the "
                                "template (docs/aci.md)")
        allowed = decl.get("allowedValues") if isinstance(decl, dict) else None
        if allowed is not None and value not in allowed:
            raise self.fail(f"parameters.{declared_name}", f"{value!r} is not one of the allowedValues {allowed}")
        self._param_cache[key] = value
        return value

    def _variable(self, name: Any = None, *extra: Any) -> Any:
        if not isinstance(name, str) or extra:
            raise self.fail(self._path, f"[{self._text}]: variables() takes one name")
        key = name.lower()
        if key not in self.variables:
            raise self.fail(self._path, f"[{self._text}]: the template declares no variable {name!r}")
        if key not in self._var_cache:
            declared_name, raw = self.variables[key]
            self._enter(f"variables('{declared_name}')")
            try:
                self._var_cache[key] = self._nested(raw, f"variables.{declared_name}")
            finally:
                self._active.pop()
        return self._var_cache[key]

    def _enter(self, what: str) -> None:
        if what in self._active:
            cycle = " -> ".join([*self._active[self._active.index(what):], what])
            raise ArmError(f"{self.source}: {self._path}: circular reference: {cycle}")
        self._active.append(what)
