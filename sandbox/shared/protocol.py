"""The host<->agent wire protocol, version 1: JSON lines over virtio-serial ports (docs/protocol.md).

Each frame is one UTF-8 JSON object followed by "\\n", at most MAX_FRAME_BYTES long including the
newline. Requests are {v, id, op, payload}; responses are {v, id, ok: true, result} or
{v, id, ok: false, error: {code, message, details}}, either with `policy` when the agent asked its
execution policy while serving the request (PolicyCheck). A request's payload is one of the typed
requests of sandbox/shared/messages.py, chosen by its op. This module is stdlib-only: the host client
and the guest agent both import it, so a frame is checked identically on both sides.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sandbox.shared.codec import FieldError, label, shown
from sandbox.shared.errors import GuestError
from sandbox.shared.jsoncheck import type_name
from sandbox.shared.jsonstrict import JsonObject, finite_float, int64, no_duplicate_keys, reject_constant
from sandbox.shared.messages import REQUEST_TYPES, AgentRequest
from sandbox.shared.messages import Op as Op  # re-exported: the op names are part of the protocol

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_FRAME_BYTES = 1 << 20
# The agent serves every virtio-serial port whose name starts with this prefix; the host opens
# PORT_COUNT of them so that `logs -f`, `exec` and `down` can talk to one guest at the same time.
PORT_PREFIX = "org.parma.agent."
# Eight: an attached `up` holds two (output, and the restart supervisor), `logs -f` one, an interactive
# `exec` two (input, output), and `down` stops containers in parallel on the rest.
PORT_COUNT = 8
READY_LINE = "parma-agent: ready"
ID_MAX_LEN = 64

RequestId = int | str | None

# Where things live in the guest. The agent refuses mount targets elsewhere, and policy generation
# uses the same paths for volume mount sources.
GUEST_RUN_DIR = "/run/parma"
LAYERS_DIR = f"{GUEST_RUN_DIR}/layers"          # mount_device targets for image layers: LAYERS_DIR/<name>
VOLUMES_DIR = f"{GUEST_RUN_DIR}/volumes"        # group volumes: VOLUMES_DIR/<volume name>
CONTAINERS_DIR = f"{GUEST_RUN_DIR}/containers"  # CONTAINERS_DIR/<id>/{rootfs,scratch,etc,config.json}
GROUP_SCRATCH_DIR = f"{GUEST_RUN_DIR}/scratch"  # the group's encrypted scratch filesystem (setup_scratch)
LAYER_TARGET_RE = LAYERS_DIR + r"/[a-z0-9][a-z0-9-]{0,63}"
VOLUME_TARGET_RE = r"/run/parma/volumes/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"


def container_dir(container_id: str) -> str:
    return f"{CONTAINERS_DIR}/{container_id}"


def volume_path(volume: str) -> str:
    return f"{VOLUMES_DIR}/{volume}"


class ErrorCode(StrEnum):
    malformed_frame = "malformed_frame"          # not a JSON object / not UTF-8 / missing fields
    frame_too_large = "frame_too_large"          # longer than MAX_FRAME_BYTES
    unsupported_version = "unsupported_version"  # "v" is not one we speak
    unknown_op = "unknown_op"
    invalid_request = "invalid_request"          # payload does not match the op's schema
    policy_denied = "policy_denied"              # the execution policy refused; message = engine's reason
    policy_already_set = "policy_already_set"
    policy_mismatch = "policy_mismatch"          # SHA-256(policy) != HOST_DATA
    not_found = "not_found"                      # no such container, device, mount, process
    conflict = "conflict"                        # already exists / wrong state for this op
    failed = "failed"                            # the operation itself failed in the guest
    unavailable = "unavailable"                  # the guest lacks what the op needs (e.g. no PSP)
    internal = "internal"                        # a bug in the agent; it keeps serving


@dataclass(frozen=True)
class PolicyCheck:
    """One question the agent asked its policy while serving a request, as it reports it back: the
    enforcement point, the input exactly as the engine saw it (the request plus what the guest found out
    itself, e.g. a device's root hash), the decision, and whether the action behind an allowed request
    failed (its state changes were rolled back). `input` is None when it was too large to echo.
    Host tools write these as `policy check` trace lines (docs/policy-trace.md)."""

    ep: str
    input: JsonObject | None
    allowed: bool
    action_failed: bool = False

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"ep": self.ep, "input": self.input, "allowed": self.allowed}
        return {**out, "action": "fail"} if self.action_failed else out

    @classmethod
    def from_json(cls, raw: Any) -> PolicyCheck:
        if not (isinstance(raw, dict) and type(raw.get("ep")) is str and type(raw.get("allowed")) is bool
                and (raw.get("input") is None or isinstance(raw.get("input"), dict))
                and raw.get("action", "ok") in ("ok", "fail")):
            raise ProtocolError(ErrorCode.malformed_frame, "a response's 'policy' entries are "
                                                           "{ep, input, allowed[, action]} objects")
        return cls(raw["ep"], raw.get("input"), raw["allowed"], raw.get("action") == "fail")

    def without_input(self) -> PolicyCheck:
        return PolicyCheck(self.ep, None, self.allowed, self.action_failed)


class ProtocolError(GuestError):
    """A request that cannot be served; becomes an error response with this code (and with the policy
    checks the request went through before it failed, when there were any). (On the host, a frame
    from the guest that does not parse.)"""

    def __init__(self, code: ErrorCode, message: str, *, details: JsonObject | None = None,
                 request_id: RequestId = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}
        self.request_id = request_id
        self.policy: tuple[PolicyCheck, ...] = ()


@dataclass(frozen=True)
class CheckedResult:
    """A handler's result together with the policy checks that allowed it (sent beside the result)."""

    result: Any
    policy: tuple[PolicyCheck, ...] = ()


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class Envelope:
    """One request frame: its id and its typed payload."""

    id: RequestId
    request: AgentRequest

    def to_json(self) -> dict[str, object]:
        return {"v": PROTOCOL_VERSION, "id": self.id, "op": self.request.op.value,
                "payload": self.request.to_json()}


@dataclass(frozen=True)
class ErrorInfo:
    code: ErrorCode | str   # a str when a newer peer sends a code we do not know
    message: str
    details: JsonObject = field(default_factory=dict)


@dataclass(frozen=True)
class Response:
    id: RequestId
    ok: bool
    result: JsonObject = field(default_factory=dict)
    error: ErrorInfo | None = None
    policy: tuple[PolicyCheck, ...] = ()    # what the agent asked its policy while serving the request

    def to_json(self) -> dict[str, object]:
        extra = {"policy": [c.to_json() for c in self.policy]} if self.policy else {}
        if self.ok:
            return {"v": PROTOCOL_VERSION, "id": self.id, "ok": True, "result": self.result, **extra}
        assert self.error is not None
        code = self.error.code.value if isinstance(self.error.code, ErrorCode) else self.error.code
        return {"v": PROTOCOL_VERSION, "id": self.id, "ok": False,
                "error": {"code": code, "message": self.error.message, "details": self.error.details}, **extra}

    @classmethod
    def success(cls, request_id: RequestId, result: JsonObject | None = None,
                policy: tuple[PolicyCheck, ...] = ()) -> Response:
        return cls(request_id, True, result or {}, policy=policy)

    @classmethod
    def failure(cls, err: ProtocolError) -> Response:
        return cls(err.request_id, False, error=ErrorInfo(err.code, err.message, err.details), policy=err.policy)


def encode_frame(message: Mapping[str, object]) -> bytes:
    """Serialise one frame. Raises ValueError when it would exceed MAX_FRAME_BYTES."""
    data = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"
    if len(data) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(data)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return data


def _valid_id(value: Any) -> bool:
    if type(value) is int:
        return -(2**53) < value < 2**53
    return type(value) is str and 0 < len(value) <= ID_MAX_LEN


def _supported_version(value: Any) -> bool:
    # `true == 1` and `1.0 == 1` in Python: only the integer 1 is version 1.
    return type(value) is int and value in SUPPORTED_VERSIONS


_ID_GUESS = re.compile(rb'"id"\s*:\s*(-?\d{1,15}(?![\d.eE])|"[^"\\]{1,64}")')   # whole ints only


def guess_request_id(frame_prefix: bytes) -> RequestId:
    """Best effort: find the id in the start of a frame we cannot parse, so the error reply carries it."""
    m = _ID_GUESS.search(frame_prefix[:4096])
    if m is None:
        return None
    raw = m.group(1)
    return raw[1:-1].decode("utf-8", "replace") if raw.startswith(b'"') else int(raw)


# A \uD800-\uDFFF escape: the only way a JSON text in UTF-8 can spell a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _load_object(line: bytes) -> JsonObject:
    """Parse one frame strictly: UTF-8, one JSON object, no duplicate keys, numbers a double or a
    64-bit integer can hold, nesting the parser can follow, and strings that are valid Unicode."""
    try:
        obj = json.loads(line.decode("utf-8"), object_pairs_hook=no_duplicate_keys,
                         parse_constant=reject_constant, parse_float=finite_float, parse_int=int64)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(ErrorCode.malformed_frame, f"not a JSON object: {e}",
                            request_id=guess_request_id(line)) from e
    except RecursionError:
        raise ProtocolError(ErrorCode.malformed_frame, "not a JSON object: arrays or objects are nested too deeply",
                            request_id=guess_request_id(line)) from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.malformed_frame, f"a frame must be a JSON object, got {type_name(obj)}")
    if _SURROGATE_ESCAPE.search(line) is not None and not _round_trips(obj):
        # Its id may be the bad string: an error reply that echoed it could not be encoded either.
        raise ProtocolError(ErrorCode.malformed_frame, "a string in the frame is not valid Unicode "
                                                       "(it escapes a lone UTF-16 surrogate)")
    return obj


def _round_trips(obj: Mapping[str, object]) -> bool:
    """Every key and string of a parsed frame can be written back as UTF-8."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


def parse_request(line: bytes) -> Envelope:
    """Decode and validate one request frame (without its newline). Raises ProtocolError."""
    obj = _load_object(line)
    rid = obj.get("id")
    if not _valid_id(rid):
        raise ProtocolError(ErrorCode.malformed_frame,
                            f"'id' must be an integer or a string of 1-{ID_MAX_LEN} characters")
    unknown = [k for k in obj if k not in ("v", "id", "op", "payload")]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ProtocolError(ErrorCode.malformed_frame, f"unknown request field {label(unknown[0])}{more}",
                            request_id=rid)
    if not _supported_version(obj.get("v")):
        raise ProtocolError(ErrorCode.unsupported_version, f"protocol version {shown(obj.get('v'))} is not supported",
                            details={"supported": list(SUPPORTED_VERSIONS)}, request_id=rid)
    op_name = obj.get("op")
    request_type = REQUEST_TYPES.get(op_name) if type(op_name) is str else None
    if request_type is None:
        what = shown(op_name) if type(op_name) is str else f"({type_name(op_name)}, not a string)"
        raise ProtocolError(ErrorCode.unknown_op, f"unknown op {what}", request_id=rid)
    try:
        request = request_type.from_json(obj.get("payload", {}))
    except FieldError as e:
        raise ProtocolError(ErrorCode.invalid_request, f"payload{e.at}: {e.message}", request_id=rid) from None
    return Envelope(rid, request)


def parse_response(line: bytes) -> Response:
    """Decode one response frame (host side). Raises ProtocolError on anything malformed."""
    obj = _load_object(line)
    rid = obj.get("id")
    if rid is not None and not _valid_id(rid):
        raise ProtocolError(ErrorCode.malformed_frame, "response 'id' is invalid")
    if not _supported_version(obj.get("v")):
        raise ProtocolError(ErrorCode.unsupported_version, f"response has protocol version {shown(obj.get('v'))}")
    ok = obj.get("ok")
    raw_policy = obj.get("policy", [])
    if not isinstance(raw_policy, list):
        raise ProtocolError(ErrorCode.malformed_frame, "response 'policy' must be an array")
    policy = tuple(PolicyCheck.from_json(c) for c in raw_policy)
    if ok is True:
        result = obj.get("result", {})
        if not isinstance(result, dict):
            raise ProtocolError(ErrorCode.malformed_frame, "response 'result' must be an object")
        return Response(rid, True, result, policy=policy)
    if ok is False:
        err = obj.get("error")
        if not isinstance(err, dict) or not isinstance(err.get("code"), str) or not isinstance(
                err.get("message"), str):
            raise ProtocolError(ErrorCode.malformed_frame, "error response needs error.code and error.message")
        details = err.get("details") or {}
        if not isinstance(details, dict):
            raise ProtocolError(ErrorCode.malformed_frame, "error.details must be an object")
        try:
            code: ErrorCode | str = ErrorCode(err["code"])
        except ValueError:
            code = err["code"]
        return Response(rid, False, error=ErrorInfo(code, err["message"], details), policy=policy)
    raise ProtocolError(ErrorCode.malformed_frame, "response 'ok' must be true or false")


# ---------------------------------------------------------------------------------------------
# Framing over a byte stream


@dataclass(frozen=True)
class Oversized:
    """A frame that exceeded MAX_FRAME_BYTES; its bytes were discarded up to the next newline."""

    prefix: bytes   # its first bytes, to guess the request id from
    size: int


class FrameReader:
    """Split a byte stream into frames without ever buffering more than MAX_FRAME_BYTES.

    feed() returns complete frames (bytes without the newline) and Oversized markers in stream order.
    reset() drops a partial frame, e.g. when the peer disconnected in the middle of one.
    """

    def __init__(self, limit: int = MAX_FRAME_BYTES) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._skipping: Oversized | None = None

    def reset(self) -> None:
        self._buf.clear()
        self._skipping = None

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | Oversized]:
        out: list[bytes | Oversized] = []
        for piece in _split_keep(data):
            if self._skipping is not None:
                if piece.endswith(b"\n"):
                    out.append(Oversized(self._skipping.prefix, self._skipping.size + len(piece)))
                    self._skipping = None
                else:
                    self._skipping = Oversized(self._skipping.prefix, self._skipping.size + len(piece))
                continue
            self._buf += piece
            if piece.endswith(b"\n"):
                frame = bytes(self._buf[:-1])
                self._buf.clear()
                if len(frame) + 1 > self.limit:
                    out.append(Oversized(frame[:4096], len(frame) + 1))
                elif frame.strip():
                    out.append(frame)
            elif len(self._buf) >= self.limit:
                self._skipping = Oversized(bytes(self._buf[:4096]), len(self._buf))
                self._buf.clear()
        return out


def _split_keep(data: bytes) -> Iterator[bytes]:
    start = 0
    while start < len(data):
        nl = data.find(b"\n", start)
        if nl < 0:
            yield data[start:]
            return
        yield data[start:nl + 1]
        start = nl + 1


def oversized_error(o: Oversized) -> ProtocolError:
    return ProtocolError(ErrorCode.frame_too_large,
                         f"frame of {o.size} bytes exceeds the {MAX_FRAME_BYTES}-byte limit",
                         details={"limit": MAX_FRAME_BYTES}, request_id=guess_request_id(o.prefix))


def b64encode(data: bytes) -> str:
    import base64  # with the first bytes to send: off the agent's boot path

    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    import base64  # as in b64encode

    return base64.b64decode(text, validate=True)
