"""Typed JSON for frozen dataclasses: the class is the schema (stdlib only; host and guest).

A message class is a frozen dataclass deriving from `Message`. Its field annotations say what the JSON
holds: `str`, `int`, `float`, `bool`, `bytes` (with a `Base64` or `Hex` encoding), a `StrEnum`,
`tuple[T, ...]`, `dict[str, T]`, `T | None`, or another message class. `typing.Annotated` adds checks
(`Match`, `MaxLen`, `Range`, `NonEmpty`) or replaces the decoder (`Convert`). Fields with a default are
optional.

Decoding is strict, because the guest decodes what an attacker (the host) sends: unknown fields,
missing required fields, wrong types (a bool is never a number, an int is never a bool) and strings
with NUL characters (which no C program downstream would see whole) are `FieldError`s that name the
field's path. JSON null for a field whose type has no None means its default. A field whose default is
a `Sentinel` (e.g. "inherit") takes the default only when absent. Encoding leaves out a field that
holds such a default, or None when None is its default.

Decoders and encoders are compiled once per class, on first use.
"""

from __future__ import annotations

import binascii
import dataclasses
import enum
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, TypeVar

from sandbox.shared.jsoncheck import suggestion, type_name

if TYPE_CHECKING:
    from sandbox.shared.jsonstrict import JsonObject

M = TypeVar("M", bound="Message")
_MISSING: Any = dataclasses.MISSING
MAX_SHOWN = 80   # characters of a bad value quoted in an error


class FieldError(ValueError):
    """A JSON value does not fit its field; `at` is the path below the decoded object (".a[2].b")."""

    def __init__(self, message: str, at: str = "", hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.at, self.hint = message, at, hint

    def under(self, prefix: str) -> FieldError:
        self.at = prefix + self.at
        return self

    def __str__(self) -> str:
        return f"{self.at.lstrip('.')}: {self.message}" if self.at else self.message


def shown(value: Any) -> str:
    """A bad value as an error quotes it: repr, cut short (the host may send a megabyte)."""
    text = repr(value[:MAX_SHOWN + 1] if isinstance(value, str | bytes) else value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def label(key: str) -> str:
    """A JSON key as a path component: as is when short and printable, else quoted and cut short."""
    return key if len(key) <= 64 and key.isprintable() else shown(key)


# ---------------------------------------------------------------------------------------------------------
# Annotations


@dataclasses.dataclass(frozen=True)
class Match:
    """A str must match `pattern` in full; `what` names the expectation in errors."""

    pattern: str
    what: str = ""

    def check(self) -> Callable[[Any], Any]:
        fullmatch = re.compile(self.pattern).fullmatch
        what = self.what or f"a string matching {self.pattern}"
        # Requests repeat the same values (capability names, ids): remember a bounded set of good ones.
        good: set[str] = set()

        def check(value: str) -> str:
            if value in good:
                return value
            if fullmatch(value) is None:
                raise FieldError(f"{shown(value)} is not {what}")
            if len(good) < 4096 and len(value) <= 256:
                good.add(value)
            return value
        return check


@dataclasses.dataclass(frozen=True)
class MaxLen:
    """At most `limit` characters (str), bytes (bytes, after decoding) or items (tuples, maps)."""

    limit: int

    def check(self) -> Callable[[Any], Any]:
        limit = self.limit

        def check(value: Any) -> Any:
            if len(value) > limit:
                unit = "characters" if isinstance(value, str) else "bytes" if isinstance(value, bytes) else "items"
                raise FieldError(f"more than {limit} {unit}")
            return value
        return check


@dataclasses.dataclass(frozen=True)
class NonEmpty:
    def check(self) -> Callable[[Any], Any]:
        def check(value: Any) -> Any:
            if not value:
                raise FieldError("must not be empty")
            return value
        return check


@dataclasses.dataclass(frozen=True)
class Range:
    """lo <= value <= hi for an int or float."""

    lo: float
    hi: float

    def check(self) -> Callable[[Any], Any]:
        lo, hi = self.lo, self.hi

        def check(value: float) -> float:
            if not lo <= value <= hi:
                raise FieldError(f"must be between {lo:g} and {hi:g}, got {shown(value)}")
            return value
        return check


@dataclasses.dataclass(frozen=True)
class Base64:
    """bytes travel as standard base64 text."""


@dataclasses.dataclass(frozen=True)
class Hex:
    """bytes travel as hex text (either case; written lower case)."""


@dataclasses.dataclass(frozen=True)
class Convert:
    """Decode with `decode(json_value) -> value` (raising FieldError) instead of by the annotated type."""

    decode: Callable[[Any], Any]


class Sentinel(enum.Enum):
    """Base of defaults that JSON cannot spell (e.g. "inherit from the container"): absent-only."""


# ---------------------------------------------------------------------------------------------------------
# Messages


class Message:
    """Mixin for frozen dataclasses that travel as JSON objects (see the module docstring)."""

    __slots__ = ()
    # JSON names a reader may know from elsewhere (e.g. ACI's Rego inputs), mapped to ours: used for
    # "did you mean" hints only.
    json_aliases: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def from_json(cls: type[M], raw: Any) -> M:
        """Decode a parsed JSON value; raises FieldError."""
        return decode(cls, raw)

    def to_json(self) -> JsonObject:
        return encode(self)


def decode(cls: type[M], raw: Any, *, ignore_unknown: bool = False) -> M:
    """Check `raw` (parsed JSON) against message class `cls` and build it. Raises FieldError."""
    return _codec(cls).decode(raw, ignore_unknown)


def encode(message: Message) -> JsonObject:
    """The JSON object of a message (the inverse of decode)."""
    return _codec(type(message)).encode(message)


def prepare(cls: type[Message]) -> None:
    """Compile the codecs of message class `cls` and of every message class its fields hold, now (each is
    compiled on its first use otherwise)."""
    todo, seen = [cls], set()
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.add(c)
            todo.extend(m for tp in _codec(c).field_types for m in _message_classes(tp))


def _message_classes(tp: Any) -> Iterator[type[Message]]:
    """The message classes a field type names (itself, or inside Annotated, unions and tuples)."""
    if isinstance(tp, type) and issubclass(tp, Message):
        yield tp
    for arg in typing.get_args(tp):
        yield from _message_classes(arg)


def field_names(cls: type[Message]) -> tuple[list[str], list[str]]:
    """(required, optional) JSON field names of a message class, for hints."""
    codec = _codec(cls)
    return ([f.name for f in codec.fields if f.default is _MISSING],
            [f.name for f in codec.fields if f.default is not _MISSING])


# ---------------------------------------------------------------------------------------------------------
# Compilation

Decoder = Callable[[Any], Any]
Encoder = Callable[[Any], Any]


def _expected(what: str, value: Any) -> FieldError:
    return FieldError(f"expected {what}, got {type_name(value)}")


def _str(value: Any) -> str:
    if type(value) is not str:
        raise _expected("a string", value)
    if "\x00" in value:
        raise FieldError("must not contain NUL characters")
    return value


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise _expected("true or false", value)
    return value


def _int(value: Any) -> int:
    if type(value) is not int:
        raise _expected("an integer", value)
    return value


def _float(value: Any) -> float:
    # JSON parsers here refuse non-finite floats (jsonstrict.finite_float); an int may still be too
    # large for a double where no frame limit applies (a trace file). A bool is not a number.
    if type(value) is float:
        return value
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            raise FieldError(f"number {shown(value)} is out of range") from None
    raise _expected("a number", value)


def _b64(value: Any) -> bytes:
    import base64  # with the first bytes field: off the agent's boot path

    try:
        return base64.b64decode(_str(value), validate=True)
    except (binascii.Error, ValueError):
        raise FieldError("not valid base64") from None


_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


def _hex(value: Any) -> bytes:
    if _HEX.fullmatch(_str(value)) is None:
        raise FieldError("not a hex string")
    return bytes.fromhex(value)


def _enum(cls: type[enum.Enum]) -> Decoder:
    members = {m.value: m for m in cls}
    what = "one of " + ", ".join(repr(v) for v in members)

    def dec(value: Any) -> enum.Enum:
        if type(value) is str and value in members:
            return members[value]
        raise FieldError(f"expected {what}, got {shown(value)}")
    return dec


def _too_many(value: Any, limit: int | None) -> None:
    if limit is not None and len(value) > limit:
        raise FieldError(f"more than {limit} items")


def _tuple_of(item: Decoder, what: str, limit: int | None, str_checks: list[Decoder] | None = None) -> Decoder:
    """tuple[T, ...] from a JSON array (`what` describes it) of at most `limit` items. `str_checks`: T
    is a str with these checks (a faster path)."""
    def dec(value: Any) -> tuple[Any, ...]:
        if type(value) is not list and type(value) is not tuple:
            raise _expected(what, value)
        _too_many(value, limit)
        out = []
        for i, x in enumerate(value):
            try:
                out.append(item(x))
            except FieldError as e:
                raise e.under(f"[{i}]") from None
        return tuple(out)
    if str_checks is None:
        return dec

    def strings(value: Any) -> tuple[str, ...]:
        # The common case at C speed: every item is a str without NUL; then each check over all items.
        if type(value) is not list and type(value) is not tuple:
            raise _expected(what, value)
        _too_many(value, limit)
        try:
            if "\x00" in "".join(value):    # join raises TypeError unless every item is a str
                return dec(value)
            for check in str_checks:
                for x in value:
                    check(x)
        except (TypeError, FieldError):
            return dec(value)   # again, item by item, to name the bad one
        return tuple(value)
    return strings


def _map_of(item: Decoder, limit: int | None) -> Decoder:
    def dec(value: Any) -> JsonObject:
        if type(value) is not dict:
            raise _expected("an object", value)
        _too_many(value, limit)
        out = {}
        for k, x in value.items():
            try:
                out[_str(k)] = item(x)
            except FieldError as e:
                raise e.under("." + label(k)) from None
        return out
    return dec


def _optional(inner: Decoder) -> Decoder:
    def dec(value: Any) -> Any:
        return None if value is None else inner(value)
    return dec


def _chain(first: Decoder, checks: list[Decoder]) -> Decoder:
    if not checks:
        return first

    def dec(value: Any) -> Any:
        value = first(value)
        for check in checks:
            value = check(value)
        return value
    return dec


def _unwrap(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        inner, more = _unwrap(base)
        return inner, (*more, *extras)
    return tp, ()


def _members(tp: Any) -> tuple[Any, ...] | None:
    """The members of a union type, or None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _compile(tp: Any) -> tuple[Decoder, Encoder]:
    dec: Decoder
    enc: Encoder
    tp, extras = _unwrap(tp)
    members = _members(tp)
    if members is not None:
        real = [m for m in members if m is not type(None) and not _is_sentinel(m)]
        if len(real) != 1:
            raise TypeError(f"codec: unsupported union {tp}")
        dec, enc = _compile(Annotated[(real[0], *extras)] if extras else real[0])
        if type(None) in members:
            return _optional(dec), lambda v: None if v is None else enc(v)
        return dec, enc
    convert = next((x for x in extras if isinstance(x, Convert)), None)
    origin = typing.get_origin(tp)
    # A container's size is checked before its items are decoded; other checks run on the value.
    container = origin in (tuple, dict, Mapping) or tp is dict
    limit = next((x.limit for x in extras if isinstance(x, MaxLen)), None) if container else None
    checks = [x.check() for x in extras if hasattr(x, "check") and not (container and isinstance(x, MaxLen))]
    enc = _same
    if convert is not None:
        dec = convert.decode
    elif tp is str:
        dec = _str
    elif tp is bool:
        dec = _bool
    elif tp is int:
        dec = _int
    elif tp is float:
        dec = _float
    elif tp is bytes:
        if any(isinstance(x, Hex) for x in extras):
            dec, enc = _hex, bytes.hex
        elif any(isinstance(x, Base64) for x in extras):
            dec, enc = _b64, _b64encode
        else:
            raise TypeError("codec: bytes need Base64() or Hex()")
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        dec, enc = _enum(tp), _enum_value
    elif origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"codec: only tuple[T, ...] is supported, not {tp}")
        item_dec, item_enc = _compile(args[0])
        item_type, item_extras = _unwrap(args[0])
        plain_str = item_type is str and not any(isinstance(x, Convert) for x in item_extras)
        what = ("an array of strings" if item_type is str else
                "an array of objects" if isinstance(item_type, type) and issubclass(item_type, Message) else
                "an array")
        dec = _tuple_of(item_dec, what, limit,
                        [x.check() for x in item_extras if hasattr(x, "check")] if plain_str else None)
        if item_enc is _same:
            enc = _list
        else:
            def enc(value: tuple[Any, ...], item: Encoder = item_enc) -> list[Any]:
                return [item(x) for x in value]
    elif origin in (dict, Mapping) or tp is dict:
        args = typing.get_args(tp)
        item_dec, item_enc = _compile(args[1]) if args else (_same, _same)
        dec = _map_of(item_dec, limit)

        def enc(value: Mapping[str, Any], item: Encoder = item_enc) -> JsonObject:
            return {k: item(x) for k, x in value.items()}
    elif isinstance(tp, type) and issubclass(tp, Message):
        dec, enc = _message_decoder(tp), encode
    else:
        raise TypeError(f"codec: unsupported field type {tp!r}")
    return _chain(dec, checks), enc


def _message_decoder(cls: type[Message]) -> Decoder:
    codec: _ClassCodec[Message] | None = None

    def dec(value: Any) -> Any:
        nonlocal codec
        if codec is None:       # resolved on first use: a class may refer to one defined later
            codec = _codec(cls)
        return codec.decode(value, False)
    return dec


def _same(value: Any) -> Any:
    return value


def _list(value: tuple[Any, ...]) -> list[Any]:
    return list(value)


def _b64encode(value: bytes) -> str:
    import base64  # as in _b64decode

    return base64.b64encode(value).decode("ascii")


def _enum_value(value: enum.Enum) -> Any:
    return value.value


def _is_sentinel(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Sentinel)


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    decode: Decoder
    encode: Encoder
    default: Any
    nullable: bool      # the type allows None: JSON null is the value None, not the default


class _ClassCodec(Generic[M]):
    def __init__(self, cls: type[M]) -> None:
        self.cls = cls
        hints = typing.get_type_hints(cls, include_extras=True)
        fields, field_types = [], []
        for f in dataclasses.fields(cls):   # type: ignore[arg-type]
            if f.default is not _MISSING:
                default = f.default
            elif callable(f.default_factory):     # it is _MISSING otherwise
                default = f.default_factory()
            else:
                default = _MISSING
            dec, enc = _compile(hints[f.name])
            members = _members(_unwrap(hints[f.name])[0]) or ()
            fields.append(_Field(f.name, dec, enc, default, type(None) in members))
            field_types.append(hints[f.name])
        self.fields = tuple(fields)
        self.field_types = tuple(field_types)
        self.names = frozenset(f.name for f in fields)
        self._plan = tuple((f.name, f.decode) for f in fields)
        # encode()'s plan: name, encoder (None for a value that is its own JSON), whether None is the default.
        self._encode_plan = tuple((f.name, None if f.encode is _same else f.encode, f.default is None)
                                  for f in fields)
        self._by_name = {f.name: f for f in fields}
        # A decoded message is built like pickle builds one: the fields are checked already, and a
        # frozen dataclass's __init__ costs a setattr call per field.
        self._direct = not hasattr(cls, "__post_init__") and hasattr(cls, "__dict__")

    def decode(self, raw: Any, ignore_unknown: bool) -> M:
        if type(raw) is not dict:
            raise _expected("an object", raw)
        if not ignore_unknown and not self.names.issuperset(raw):
            raise self._unknown(next(k for k in raw if k not in self.names))
        values = {}
        get = raw.get
        for name, dec in self._plan:
            value = get(name)
            if value is None:
                values[name] = self._absent(name, name in raw)
                continue
            try:
                values[name] = dec(value)
            except FieldError as e:
                raise e.under("." + name) from None
        if not self._direct:
            return self.cls(**values)
        message = object.__new__(self.cls)
        message.__dict__.update(values)
        return message

    def _absent(self, name: str, null: bool) -> Any:
        """The value of a field that is absent (null=False) or JSON null."""
        f = self._by_name[name]
        if null and f.nullable:
            return None
        if null and (f.default is _MISSING or isinstance(f.default, Sentinel)):
            try:
                return f.decode(None)       # raises the type's own error ("expected a string, got null")
            except FieldError as e:
                raise e.under("." + name) from None
        if f.default is _MISSING:
            raise FieldError("required field is missing", "." + name)
        return f.default

    def _unknown(self, key: Any) -> FieldError:
        name = str(key)
        alias = self.cls.json_aliases.get(name)
        if alias in self.names:
            extra = f" (did you mean {alias!r}?)"
        else:
            extra = suggestion(name, self.names) if len(name) <= 64 else ""
        return FieldError(f"unknown field{extra}", "." + label(name),
                          hint="known fields: " + (", ".join(f.name for f in self.fields) or "none"))

    def encode(self, message: M) -> JsonObject:
        out = {}
        for name, enc, none_is_default in self._encode_plan:
            value = getattr(message, name)
            if value is None:
                if none_is_default:
                    continue    # what an absent field means anyway
            elif isinstance(value, Sentinel):
                continue        # likewise
            out[name] = value if enc is None else enc(value)
        return out


_CODECS: dict[type[Message], _ClassCodec[Any]] = {}


def _codec(cls: type[M]) -> _ClassCodec[M]:
    codec = _CODECS.get(cls)
    if codec is None:
        codec = _CODECS[cls] = _ClassCodec(cls)
    return codec
