"""The host<->agent wire protocol, version 1: JSON lines over virtio-serial ports (docs/protocol.md).

Each frame is one UTF-8 JSON object followed by "\\n", at most MAX_FRAME_BYTES long including the
newline. Requests are {v, id, op, payload}; responses are {v, id, ok: true, result} or
{v, id, ok: false, error: {code, message, details}}. This module is stdlib-only: the host client and
the guest agent both import it, so a payload schema here is checked identically on both sides.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sandbox.shared.jsonstrict import no_duplicate_keys, reject_constant

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_FRAME_BYTES = 1 << 20
# The agent serves every virtio-serial port whose name starts with this prefix; the host opens
# PORT_COUNT of them so that `logs -f`, `exec` and `down` can talk to one guest at the same time.
PORT_PREFIX = "org.parma.agent."
PORT_COUNT = 4
READY_LINE = "parma-agent: ready"
ID_MAX_LEN = 64

RequestId = int | str | None

# Where things live in the guest. The agent refuses mount targets elsewhere, and policy generation
# uses the same paths for volume mount sources.
GUEST_RUN_DIR = "/run/parma"
LAYERS_DIR = f"{GUEST_RUN_DIR}/layers"          # mount_device targets for image layers: LAYERS_DIR/<name>
VOLUMES_DIR = f"{GUEST_RUN_DIR}/volumes"        # group volumes: VOLUMES_DIR/<volume name>
CONTAINERS_DIR = f"{GUEST_RUN_DIR}/containers"  # CONTAINERS_DIR/<id>/{rootfs,scratch,config.json}
LAYER_TARGET_RE = LAYERS_DIR + r"/[a-z0-9][a-z0-9-]{0,63}"
VOLUME_TARGET_RE = r"/run/parma/volumes/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"


def container_dir(container_id: str) -> str:
    return f"{CONTAINERS_DIR}/{container_id}"


def volume_path(volume: str) -> str:
    return f"{VOLUMES_DIR}/{volume}"


class Op(StrEnum):
    ping = "ping"
    set_policy = "set_policy"
    get_properties = "get_properties"
    dump_stacks = "dump_stacks"
    get_report = "get_report"
    mount_device = "mount_device"
    unmount_device = "unmount_device"
    mount_scratch = "mount_scratch"
    unmount_scratch = "unmount_scratch"
    mount_overlay = "mount_overlay"
    unmount_overlay = "unmount_overlay"
    create_volume = "create_volume"
    create_container = "create_container"
    start_container = "start_container"
    exec_process = "exec_process"
    signal_process = "signal_process"
    wait_process = "wait_process"
    read_output = "read_output"
    shutdown_container = "shutdown_container"
    list_containers = "list_containers"
    poweroff = "poweroff"


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


class ProtocolError(Exception):
    """A request that cannot be served; becomes an error response with this code."""

    def __init__(self, code: ErrorCode, message: str, *, details: dict[str, Any] | None = None,
                 request_id: RequestId = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}
        self.request_id = request_id


# ---------------------------------------------------------------------------------------------
# Payload schemas: field name -> Field. Unknown fields are rejected, so a typo never goes unnoticed.


@dataclass(frozen=True)
class Field:
    kind: str                 # str | int | number | bool | b64 | hex | list[str] | list[object] | object | map[b64]
    required: bool = True
    default: Any = None
    pattern: str | None = None  # for str fields, a full-match regex
    max_len: int | None = None  # for str, b64 (decoded) and list fields


CONTAINER_ID = r"[a-z0-9][a-z0-9_.-]{0,63}"
EXEC_ID = r"[a-z0-9][a-z0-9_.-]{0,63}"
ABS_PATH = r"/[^\x00]{0,4095}"
DEVICE_SERIAL = r"[A-Za-z0-9_-]{1,20}"
VOLUME_NAME = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"

_OPT_EXEC = Field("str", required=False, default=None, pattern=EXEC_ID)

PAYLOADS: dict[Op, dict[str, Field]] = {
    Op.ping: {},
    Op.set_policy: {"policy": Field("b64", max_len=MAX_FRAME_BYTES)},
    Op.get_properties: {},
    Op.dump_stacks: {},
    Op.get_report: {"nonce": Field("hex", max_len=1024)},  # binding.py: 16..1024 bytes
    Op.mount_device: {"device": Field("str", pattern=DEVICE_SERIAL), "target": Field("str", pattern=ABS_PATH)},
    Op.unmount_device: {"target": Field("str", pattern=ABS_PATH)},
    Op.mount_scratch: {"container_id": Field("str", pattern=CONTAINER_ID),
                       "encrypted": Field("bool", required=False, default=False)},
    Op.unmount_scratch: {"container_id": Field("str", pattern=CONTAINER_ID)},
    Op.mount_overlay: {"container_id": Field("str", pattern=CONTAINER_ID),
                       "layer_paths": Field("list[str]", max_len=128),
                       "target": Field("str", pattern=ABS_PATH)},
    Op.unmount_overlay: {"target": Field("str", pattern=ABS_PATH)},
    Op.create_volume: {"name": Field("str", pattern=VOLUME_NAME),
                       "kind": Field("str", pattern=r"emptyDir|tmpfs|secret"),
                       "size_mib": Field("int", required=False, default=None),
                       "items": Field("map[b64]", required=False, default=None)},
    Op.create_container: {
        "container_id": Field("str", pattern=CONTAINER_ID),
        "argv": Field("list[str]", max_len=4096),
        "env": Field("list[str]", max_len=4096),
        "working_dir": Field("str", required=False, default="/", pattern=ABS_PATH),
        "user": Field("str", required=False, default=""),
        "mounts": Field("list[object]", required=False, default=[], max_len=256),
        "capabilities": Field("object", required=False, default=None),
        "privileged": Field("bool", required=False, default=False),
        "no_new_privileges": Field("bool", required=False, default=False),
        "umask": Field("str", required=False, default="0022", pattern=r"0?[0-7]{3}"),
        "seccomp_profile_sha256": Field("str", required=False, default="", pattern=r"|[0-9a-f]{64}"),
    },
    Op.start_container: {"container_id": Field("str", pattern=CONTAINER_ID)},
    Op.exec_process: {"container_id": Field("str", pattern=CONTAINER_ID),
                      "argv": Field("list[str]", max_len=4096),
                      "env": Field("list[str]", required=False, default=[], max_len=4096),
                      "working_dir": Field("str", required=False, default="", pattern=r"|" + ABS_PATH)},
    Op.signal_process: {"container_id": Field("str", pattern=CONTAINER_ID), "exec_id": _OPT_EXEC,
                        "signal": Field("int")},
    Op.wait_process: {"container_id": Field("str", pattern=CONTAINER_ID), "exec_id": _OPT_EXEC,
                      "timeout": Field("number", required=False, default=0)},
    Op.read_output: {"container_id": Field("str", pattern=CONTAINER_ID), "exec_id": _OPT_EXEC,
                     "offset": Field("int", required=False, default=0),
                     "max_bytes": Field("int", required=False, default=65536),
                     "wait": Field("number", required=False, default=0)},
    Op.shutdown_container: {"container_id": Field("str", pattern=CONTAINER_ID),
                            "timeout": Field("number", required=False, default=10)},
    Op.list_containers: {},
    Op.poweroff: {},
}

_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "number": (int, float), "bool": (bool,), "b64": (str,), "hex": (str,),
    "list[str]": (list,), "list[object]": (list,), "object": (dict,), "map[b64]": (dict,),
}


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_field(name: str, spec: Field, value: Any) -> Any:
    ok_types = _TYPES[spec.kind]
    # bool is an int in Python: never accept it where a number is expected, and vice versa.
    if not isinstance(value, ok_types) or (isinstance(value, bool) and spec.kind != "bool"):
        raise ValueError(f"{name}: expected {spec.kind}, got {_type_name(value)}")
    if spec.kind == "str":
        if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
            raise ValueError(f"{name}: {value[:80]!r} does not match {spec.pattern}")
        if spec.max_len is not None and len(value) > spec.max_len:
            raise ValueError(f"{name}: longer than {spec.max_len} characters")
    elif spec.kind == "b64":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"{name}: not valid base64") from e
        if spec.max_len is not None and len(decoded) > spec.max_len:
            raise ValueError(f"{name}: longer than {spec.max_len} bytes")
    elif spec.kind == "hex":
        if not re.fullmatch(r"(?:[0-9a-fA-F]{2})*", value):
            raise ValueError(f"{name}: not a hex string")
        if spec.max_len is not None and len(value) // 2 > spec.max_len:
            raise ValueError(f"{name}: longer than {spec.max_len} bytes")
    elif spec.kind.startswith("list["):
        elem = str if spec.kind == "list[str]" else dict
        for i, item in enumerate(value):
            if not isinstance(item, elem):
                raise ValueError(f"{name}[{i}]: expected {'string' if elem is str else 'object'}, "
                                 f"got {_type_name(item)}")
        if spec.max_len is not None and len(value) > spec.max_len:
            raise ValueError(f"{name}: more than {spec.max_len} items")
    elif spec.kind == "map[b64]":
        for key, item in value.items():
            _check_field(f"{name}.{key}", Field("b64"), item)
    return value


def validate_payload(op: Op, payload: Any) -> dict[str, Any]:
    """Check `payload` against the op's schema; return it with defaults filled in. Raises ValueError."""
    if not isinstance(payload, dict):
        raise ValueError(f"payload: expected object, got {_type_name(payload)}")
    schema = PAYLOADS[op]
    unknown = sorted(set(payload) - set(schema))
    if unknown:
        raise ValueError(f"payload: unknown field(s) {', '.join(unknown)} for op {op.value}")
    out: dict[str, Any] = {}
    for name, spec in schema.items():
        if name not in payload or (payload[name] is None and not spec.required):
            if spec.required:
                raise ValueError(f"payload.{name}: required for op {op.value}")
            out[name] = spec.default
            continue
        out[name] = _check_field(f"payload.{name}", spec, payload[name])
    return out


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class Request:
    id: RequestId
    op: Op
    payload: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "id": self.id, "op": self.op.value, "payload": self.payload}


@dataclass(frozen=True)
class ErrorInfo:
    code: ErrorCode | str   # a str when a newer peer sends a code we do not know
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Response:
    id: RequestId
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error: ErrorInfo | None = None

    def to_json(self) -> dict[str, Any]:
        if self.ok:
            return {"v": PROTOCOL_VERSION, "id": self.id, "ok": True, "result": self.result}
        assert self.error is not None
        code = self.error.code.value if isinstance(self.error.code, ErrorCode) else self.error.code
        return {"v": PROTOCOL_VERSION, "id": self.id, "ok": False,
                "error": {"code": code, "message": self.error.message, "details": self.error.details}}

    @classmethod
    def success(cls, request_id: RequestId, result: dict[str, Any] | None = None) -> Response:
        return cls(request_id, True, result or {})

    @classmethod
    def failure(cls, err: ProtocolError) -> Response:
        return cls(err.request_id, False, error=ErrorInfo(err.code, err.message, err.details))


def encode_frame(message: dict[str, Any]) -> bytes:
    """Serialise one frame. Raises ValueError when it would exceed MAX_FRAME_BYTES."""
    data = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"
    if len(data) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(data)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return data


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**53) < value < 2**53
    return isinstance(value, str) and 0 < len(value) <= ID_MAX_LEN


_ID_GUESS = re.compile(rb'"id"\s*:\s*(-?\d{1,15}|"[^"\\]{1,64}")')


def guess_request_id(frame_prefix: bytes) -> RequestId:
    """Best effort: find the id in the start of a frame we cannot parse, so the error reply carries it."""
    m = _ID_GUESS.search(frame_prefix[:4096])
    if m is None:
        return None
    raw = m.group(1)
    return raw[1:-1].decode("utf-8", "replace") if raw.startswith(b'"') else int(raw)


def _load_object(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line.decode("utf-8"), object_pairs_hook=no_duplicate_keys,
                         parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(ErrorCode.malformed_frame, f"not a JSON object: {e}",
                            request_id=guess_request_id(line)) from e
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.malformed_frame, f"a frame must be a JSON object, got {_type_name(obj)}")
    return obj


def parse_request(line: bytes) -> Request:
    """Decode and validate one request frame (without its newline). Raises ProtocolError."""
    obj = _load_object(line)
    rid = obj.get("id")
    if not _valid_id(rid):
        raise ProtocolError(ErrorCode.malformed_frame,
                            f"'id' must be an integer or a string of 1-{ID_MAX_LEN} characters")
    unknown = sorted(set(obj) - {"v", "id", "op", "payload"})
    if unknown:
        raise ProtocolError(ErrorCode.malformed_frame, f"unknown request field(s): {', '.join(unknown)}",
                            request_id=rid)
    if obj.get("v") not in SUPPORTED_VERSIONS:
        raise ProtocolError(ErrorCode.unsupported_version, f"protocol version {obj.get('v')!r} is not supported",
                            details={"supported": list(SUPPORTED_VERSIONS)}, request_id=rid)
    op_name = obj.get("op")
    try:
        op = Op(op_name)
    except ValueError:
        raise ProtocolError(ErrorCode.unknown_op, f"unknown op {str(op_name)[:64]!r}", request_id=rid) from None
    try:
        payload = validate_payload(op, obj.get("payload", {}))
    except ValueError as e:
        raise ProtocolError(ErrorCode.invalid_request, str(e), request_id=rid) from None
    return Request(rid, op, payload)


def parse_response(line: bytes) -> Response:
    """Decode one response frame (host side). Raises ProtocolError on anything malformed."""
    obj = _load_object(line)
    rid = obj.get("id")
    if rid is not None and not _valid_id(rid):
        raise ProtocolError(ErrorCode.malformed_frame, "response 'id' is invalid")
    if obj.get("v") not in SUPPORTED_VERSIONS:
        raise ProtocolError(ErrorCode.unsupported_version, f"response has protocol version {obj.get('v')!r}")
    ok = obj.get("ok")
    if ok is True:
        result = obj.get("result", {})
        if not isinstance(result, dict):
            raise ProtocolError(ErrorCode.malformed_frame, "response 'result' must be an object")
        return Response(rid, True, result)
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
        return Response(rid, False, error=ErrorInfo(code, err["message"], details))
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
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
