"""The wire protocol: frames, validation, and the error codes both sides rely on."""

from __future__ import annotations

import json

import pytest

from sandbox.guest.service import AgentService
from sandbox.shared import protocol as P
from sandbox.shared.messages import REQUEST_TYPES, ReadOutputRequest
from sandbox.shared.protocol import ErrorCode, Op, ProtocolError


def frame(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_request_round_trip_fills_defaults() -> None:
    data = P.encode_frame({"v": 1, "id": 7, "op": "read_output", "payload": {"container_id": "web", "offset": 10}})
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    parsed = P.parse_request(data[:-1])
    assert parsed.id == 7 and parsed.request.op == Op.read_output
    assert parsed.request == ReadOutputRequest("web", exec_id=None, offset=10, max_bytes=65536, wait=0)
    assert P.parse_request(P.encode_frame(parsed.to_json())[:-1]) == parsed


@pytest.mark.parametrize(("obj", "code", "needle"), [
    ([1, 2], ErrorCode.malformed_frame, "JSON object"),
    ({"v": 1, "op": "ping"}, ErrorCode.malformed_frame, "'id'"),
    ({"v": 1, "id": True, "op": "ping"}, ErrorCode.malformed_frame, "'id'"),
    ({"v": 1, "id": "x" * 65, "op": "ping"}, ErrorCode.malformed_frame, "'id'"),
    ({"v": 2, "id": 1, "op": "ping"}, ErrorCode.unsupported_version, "version 2"),
    ({"v": 1, "id": 1, "op": "format_disk"}, ErrorCode.unknown_op, "format_disk"),
    ({"v": 1, "id": 1, "op": "ping", "extra": 1}, ErrorCode.malformed_frame, "extra"),
    ({"v": 1, "id": 1, "op": "ping", "payload": []}, ErrorCode.invalid_request, "payload"),
    ({"v": 1, "id": 1, "op": "ping", "payload": {"x": 1}}, ErrorCode.invalid_request, "unknown field"),
    ({"v": 1, "id": 1, "op": "mount_device", "payload": {"target": "/run/parma/layers/a"}},
     ErrorCode.invalid_request, "payload.device: required"),
    ({"v": 1, "id": 1, "op": "mount_device", "payload": {"device": "../../x", "target": "/a"}},
     ErrorCode.invalid_request, "payload.device"),
    ({"v": 1, "id": 1, "op": "signal_process", "payload": {"container_id": "web", "signal": True}},
     ErrorCode.invalid_request, "payload.signal: expected an integer, got a boolean"),
    ({"v": 1, "id": 1, "op": "set_policy", "payload": {"policy": "not base64!"}},
     ErrorCode.invalid_request, "base64"),
    ({"v": 1, "id": 1, "op": "create_container",
      "payload": {"container_id": "Web!", "argv": ["x"], "env": []}}, ErrorCode.invalid_request, "container_id"),
    ({"v": 1, "id": 1, "op": "create_container",
      "payload": {"container_id": "web", "argv": ["x", 3], "env": []}}, ErrorCode.invalid_request, "argv[1]"),
])
def test_bad_requests_get_typed_errors(obj: object, code: ErrorCode, needle: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        P.parse_request(frame(obj))
    assert exc.value.code == code
    assert needle in exc.value.message


def test_error_keeps_request_id_when_known() -> None:
    with pytest.raises(ProtocolError) as exc:
        P.parse_request(frame({"v": 1, "id": "abc", "op": "nope"}))
    assert exc.value.request_id == "abc"


def test_unparseable_frame_guesses_id() -> None:
    with pytest.raises(ProtocolError) as exc:
        P.parse_request(b'{"v":1,"id":42,"op":"ping","payload":{')
    assert exc.value.code == ErrorCode.malformed_frame
    assert exc.value.request_id == 42


def test_non_utf8_and_nan_are_malformed() -> None:
    for raw in (b'{"v":1,"id":1,"op":"\xff"}', b'{"v":1,"id":1,"op":"ping","payload":{"x":NaN}}'):
        with pytest.raises(ProtocolError) as exc:
            P.parse_request(raw)
        assert exc.value.code == ErrorCode.malformed_frame


@pytest.mark.parametrize("raw", [b'{"v":1,"id":1,"op":"ping","op":"set_policy"}',
                                 b'{"v":1,"id":1,"op":"ping","payload":{"a":1,"a":2}}'])
def test_duplicate_keys_are_malformed(raw: bytes) -> None:
    """One frame, one meaning: a host must not smuggle a second value past a first-wins reader."""
    with pytest.raises(ProtocolError) as exc:
        P.parse_request(raw)
    assert exc.value.code == ErrorCode.malformed_frame
    assert "duplicate key" in str(exc.value)


def test_frame_reader_reassembles_and_splits() -> None:
    r = P.FrameReader()
    assert r.feed(b'{"a":') == []
    assert r.feed(b'1}\n{"b":2}\n\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert r.feed(b":3}\n") == [b'{"c":3}']


def test_frame_reader_discards_oversized_and_recovers() -> None:
    r = P.FrameReader(limit=64)
    big = b'{"id":9,"pad":"' + b"x" * 200
    out = r.feed(big)
    assert out == []
    out = r.feed(b'"}\n{"id":10}\n')
    assert isinstance(out[0], P.Oversized) and out[0].size > 64
    assert P.oversized_error(out[0]).request_id == 9
    assert P.oversized_error(out[0]).code == ErrorCode.frame_too_large
    assert out[1] == b'{"id":10}'


def test_frame_reader_reset_drops_partial_frame() -> None:
    r = P.FrameReader()
    r.feed(b'{"half":')
    r.reset()
    assert r.feed(b'{"whole":1}\n') == [b'{"whole":1}']


def test_exact_limit_is_accepted() -> None:
    r = P.FrameReader(limit=16)
    assert r.feed(b"x" * 15 + b"\n") == [b"x" * 15]
    assert isinstance(r.feed(b"y" * 16 + b"\n")[0], P.Oversized)


def test_encode_refuses_oversized_frames() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        P.encode_frame({"data": "x" * P.MAX_FRAME_BYTES})


def test_responses_round_trip() -> None:
    ok = P.Response.success(3, {"a": 1})
    assert P.parse_response(P.encode_frame(ok.to_json())[:-1]) == ok
    err = P.Response.failure(ProtocolError(ErrorCode.policy_denied, "env LD_PRELOAD not allowed",
                                           details={"endpoint": "create_container"}, request_id=4))
    back = P.parse_response(P.encode_frame(err.to_json())[:-1])
    assert back.ok is False and back.id == 4
    assert back.error is not None and back.error.code == ErrorCode.policy_denied
    assert back.error.details == {"endpoint": "create_container"}


def test_unknown_error_code_from_a_newer_peer_is_kept_as_text() -> None:
    raw = frame({"v": 1, "id": 1, "ok": False, "error": {"code": "quota_exceeded", "message": "m"}})
    assert P.parse_response(raw).error.code == "quota_exceeded"


@pytest.mark.parametrize("obj", [
    {"v": 1, "id": 1}, {"v": 1, "id": 1, "ok": True, "result": []},
    {"v": 1, "id": 1, "ok": False, "error": "x"}, {"v": 9, "id": 1, "ok": True},
])
def test_malformed_responses_are_rejected(obj: object) -> None:
    with pytest.raises(ProtocolError):
        P.parse_response(frame(obj))


def test_every_op_has_a_request_class_a_handler_and_a_doc_section() -> None:
    doc = (P.__file__.rsplit("/sandbox/", 1)[0] + "/docs/protocol.md")
    text = open(doc).read()
    assert set(REQUEST_TYPES) == set(Op)
    for op in Op:
        cls = REQUEST_TYPES[op]
        assert cls.op == op and cls.__name__ == "".join(w.title() for w in op.value.split("_")) + "Request"
        assert hasattr(AgentService, f"op_{op.value}"), f"the agent has no handler for {op.value}"
        assert f"### `{op.value}`" in text, f"docs/protocol.md does not document {op.value}"
    for code in ErrorCode:
        assert f"`{code.value}`" in text, f"docs/protocol.md does not document error {code.value}"
