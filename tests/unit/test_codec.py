"""The typed JSON codec (sandbox/shared/codec.py): the features the protocol's classes rely on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated

import pytest

from sandbox.shared import codec
from sandbox.shared.codec import FieldError, Match, MaxLen, Message, Range, Sentinel, encode, field_names


class Mode(Sentinel):
    KEEP = "keep"


@dataclass(frozen=True)
class Inner(Message):
    name: Annotated[str, Match(r"[a-z]+", "a lower-case word")]


@dataclass(frozen=True)
class Outer(Message):
    inner: Inner
    many: Annotated[tuple[Inner, ...], MaxLen(2)] = ()
    mode: int | Mode = Mode.KEEP
    table: dict[str, int] | None = None


def test_codec_features_beyond_the_protocol() -> None:
    o = Outer.from_json({"inner": {"name": "a"}, "many": [{"name": "b"}], "table": {"x": 1}})
    assert o == Outer(Inner("a"), (Inner("b"),), Mode.KEEP, {"x": 1})
    assert encode(o) == {"inner": {"name": "a"}, "many": [{"name": "b"}], "table": {"x": 1}}   # no "mode"
    assert Outer.from_json({"inner": {"name": "a"}, "mode": 3}).mode == 3
    assert field_names(Outer) == (["inner"], ["many", "mode", "table"])
    for raw, message in (({"inner": {"name": "A"}}, "inner.name: 'A' is not a lower-case word"),
                         ({"inner": {"name": "a"}, "many": [{"name": "b"}] * 3}, "many: more than 2 items"),
                         ({"inner": {"name": "a"}, "many": [{"name": "b"}, {}]}, "many[1].name: required"),
                         ({"inner": {"name": "a"}, "table": {"x": "1"}}, "table.x: expected an integer"),
                         ({"inner": {"name": "a"}, "mode": None}, "mode: expected an integer, got null")):
        with pytest.raises(FieldError) as exc:
            Outer.from_json(raw)
        assert message in str(exc.value)
    assert dataclasses.is_dataclass(o)


@dataclass(frozen=True)
class Numbers(Message):
    seconds: float = 0.0
    count: Annotated[int, Range(1, 10)] = 1


def test_numbers_beyond_a_double_are_field_errors_not_overflows() -> None:
    """Where no frame limit applies (a trace file), an int too large for float() or for a message."""
    with pytest.raises(FieldError, match="seconds: number 1000.* is out of range"):
        Numbers.from_json({"seconds": 10**400})
    with pytest.raises(FieldError, match="count: must be between 1 and 10, got 1000"):
        Numbers.from_json({"count": 10**400})
    assert Numbers.from_json({"seconds": 3}) == Numbers(3.0)



@dataclass(frozen=True)
class Leaf(Message):
    n: int


@dataclass(frozen=True)
class Middle(Message):
    leaves: tuple[Leaf, ...] = ()


@dataclass(frozen=True)
class Top(Message):
    middle: Annotated[Middle | None, MaxLen(4)] = None
    other: Leaf | Mode = Mode.KEEP


def test_prepare_compiles_a_class_and_every_message_class_it_holds() -> None:
    codec.prepare(Top)
    assert {Top, Middle, Leaf} <= set(codec._CODECS)
    # Encoding is unchanged: None and sentinel values are left out, everything else is encoded.
    assert Top(Middle((Leaf(1), Leaf(2))), Leaf(3)).to_json() == {"middle": {"leaves": [{"n": 1}, {"n": 2}]},
                                                                   "other": {"n": 3}}
    assert Top().to_json() == {}
