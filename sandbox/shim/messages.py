"""Protobuf messages of ttrpc, containerd's Task API (shim v2) and its task events: our own definitions.

Only the fields the shim reads or writes are declared; a field we do not declare is kept as an unknown
field by the protobuf runtime and ignored. Field numbers and types are facts of the protocol, taken
from the public definitions of containerd 1.6 (runtime/v2/task shim.proto, api/types, api/events,
api/services/ttrpc/events/v1, pkg/runtimeoptions/v1) and of ttrpc (request.proto) and google.rpc
(status.proto). The descriptors are built at import time into a private pool, so nothing here clashes
with another library's copy of the same names.

We use the `protobuf` package (Google's runtime, upb-backed) rather than hand-written varint code: it is
the reference implementation of the wire format, fast, and handles unknown fields, packed repeated
scalars and well-known types correctly.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, TypeVar, cast

from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    empty_pb2,
    message_factory,
    timestamp_pb2,
)
from google.protobuf.message import DecodeError, Message

FD = descriptor_pb2.FieldDescriptorProto
_Msg = TypeVar("_Msg", bound=Message)

# Field kinds: a scalar name, or ".package.Message" / "enum:.package.Enum".
_SCALARS = {
    "string": FD.TYPE_STRING, "bytes": FD.TYPE_BYTES, "bool": FD.TYPE_BOOL, "uint32": FD.TYPE_UINT32,
    "int32": FD.TYPE_INT32, "int64": FD.TYPE_INT64, "uint64": FD.TYPE_UINT64,
}
ANY = ".google.protobuf.Any"
TIMESTAMP = ".google.protobuf.Timestamp"

# (package, message, [(field, number, kind, repeated)]): one entry per message we use.
_Field = tuple[str, int, str, bool]
_DEFS: list[tuple[str, str, list[_Field]]] = [
    # google/rpc/status.proto
    ("google.rpc", "Status", [("code", 1, "int32", False), ("message", 2, "string", False),
                              ("details", 3, ANY, True)]),
    # ttrpc request.proto
    ("ttrpc", "KeyValue", [("key", 1, "string", False), ("value", 2, "string", False)]),
    ("ttrpc", "Request", [("service", 1, "string", False), ("method", 2, "string", False),
                          ("payload", 3, "bytes", False), ("timeout_nano", 4, "int64", False),
                          ("metadata", 5, ".ttrpc.KeyValue", True)]),
    ("ttrpc", "Response", [("status", 1, ".google.rpc.Status", False), ("payload", 2, "bytes", False)]),
    # api/types/mount.proto, api/types/task/task.proto
    ("containerd.types", "Mount", [("type", 1, "string", False), ("source", 2, "string", False),
                                   ("target", 3, "string", False), ("options", 4, "string", True)]),
    ("containerd.v1.types", "ProcessInfo", [("pid", 1, "uint32", False), ("info", 2, ANY, False)]),
    # runtime/v2/task/shim.proto
    ("containerd.task.v2", "CreateTaskRequest", [
        ("id", 1, "string", False), ("bundle", 2, "string", False), ("rootfs", 3, ".containerd.types.Mount", True),
        ("terminal", 4, "bool", False), ("stdin", 5, "string", False), ("stdout", 6, "string", False),
        ("stderr", 7, "string", False), ("checkpoint", 8, "string", False),
        ("parent_checkpoint", 9, "string", False), ("options", 10, ANY, False)]),
    ("containerd.task.v2", "CreateTaskResponse", [("pid", 1, "uint32", False)]),
    ("containerd.task.v2", "DeleteRequest", [("id", 1, "string", False), ("exec_id", 2, "string", False)]),
    ("containerd.task.v2", "DeleteResponse", [("pid", 1, "uint32", False), ("exit_status", 2, "uint32", False),
                                              ("exited_at", 3, TIMESTAMP, False)]),
    ("containerd.task.v2", "ExecProcessRequest", [
        ("id", 1, "string", False), ("exec_id", 2, "string", False), ("terminal", 3, "bool", False),
        ("stdin", 4, "string", False), ("stdout", 5, "string", False), ("stderr", 6, "string", False),
        ("spec", 7, ANY, False)]),
    ("containerd.task.v2", "ResizePtyRequest", [("id", 1, "string", False), ("exec_id", 2, "string", False),
                                                ("width", 3, "uint32", False), ("height", 4, "uint32", False)]),
    ("containerd.task.v2", "StateRequest", [("id", 1, "string", False), ("exec_id", 2, "string", False)]),
    ("containerd.task.v2", "StateResponse", [
        ("id", 1, "string", False), ("bundle", 2, "string", False), ("pid", 3, "uint32", False),
        ("status", 4, "enum:.containerd.v1.types.Status", False), ("stdin", 5, "string", False),
        ("stdout", 6, "string", False), ("stderr", 7, "string", False), ("terminal", 8, "bool", False),
        ("exit_status", 9, "uint32", False), ("exited_at", 10, TIMESTAMP, False), ("exec_id", 11, "string", False)]),
    ("containerd.task.v2", "KillRequest", [("id", 1, "string", False), ("exec_id", 2, "string", False),
                                           ("signal", 3, "uint32", False), ("all", 4, "bool", False)]),
    ("containerd.task.v2", "CloseIORequest", [("id", 1, "string", False), ("exec_id", 2, "string", False),
                                              ("stdin", 3, "bool", False)]),
    ("containerd.task.v2", "PidsRequest", [("id", 1, "string", False)]),
    ("containerd.task.v2", "PidsResponse", [("processes", 1, ".containerd.v1.types.ProcessInfo", True)]),
    ("containerd.task.v2", "StartRequest", [("id", 1, "string", False), ("exec_id", 2, "string", False)]),
    ("containerd.task.v2", "StartResponse", [("pid", 1, "uint32", False)]),
    ("containerd.task.v2", "WaitRequest", [("id", 1, "string", False), ("exec_id", 2, "string", False)]),
    ("containerd.task.v2", "WaitResponse", [("exit_status", 1, "uint32", False), ("exited_at", 2, TIMESTAMP, False)]),
    ("containerd.task.v2", "StatsRequest", [("id", 1, "string", False)]),
    ("containerd.task.v2", "ConnectRequest", [("id", 1, "string", False)]),
    ("containerd.task.v2", "ConnectResponse", [("shim_pid", 1, "uint32", False), ("task_pid", 2, "uint32", False),
                                               ("version", 3, "string", False)]),
    ("containerd.task.v2", "ShutdownRequest", [("id", 1, "string", False), ("now", 2, "bool", False)]),
    ("containerd.task.v2", "PauseRequest", [("id", 1, "string", False)]),
    ("containerd.task.v2", "ResumeRequest", [("id", 1, "string", False)]),
    # api/events/task.proto
    ("containerd.events", "TaskIO", [("stdin", 1, "string", False), ("stdout", 2, "string", False),
                                     ("stderr", 3, "string", False), ("terminal", 4, "bool", False)]),
    ("containerd.events", "TaskCreate", [
        ("container_id", 1, "string", False), ("bundle", 2, "string", False),
        ("rootfs", 3, ".containerd.types.Mount", True), ("io", 4, ".containerd.events.TaskIO", False),
        ("checkpoint", 5, "string", False), ("pid", 6, "uint32", False)]),
    ("containerd.events", "TaskStart", [("container_id", 1, "string", False), ("pid", 2, "uint32", False)]),
    ("containerd.events", "TaskDelete", [("container_id", 1, "string", False), ("pid", 2, "uint32", False),
                                         ("exit_status", 3, "uint32", False), ("exited_at", 4, TIMESTAMP, False),
                                         ("id", 5, "string", False)]),
    ("containerd.events", "TaskExit", [("container_id", 1, "string", False), ("id", 2, "string", False),
                                       ("pid", 3, "uint32", False), ("exit_status", 4, "uint32", False),
                                       ("exited_at", 5, TIMESTAMP, False)]),
    ("containerd.events", "TaskExecAdded", [("container_id", 1, "string", False), ("exec_id", 2, "string", False)]),
    ("containerd.events", "TaskExecStarted", [("container_id", 1, "string", False), ("exec_id", 2, "string", False),
                                              ("pid", 3, "uint32", False)]),
    # api/services/ttrpc/events/v1/events.proto
    ("containerd.services.events.ttrpc.v1", "Envelope", [
        ("timestamp", 1, TIMESTAMP, False), ("namespace", 2, "string", False), ("topic", 3, "string", False),
        ("event", 4, ANY, False)]),
    ("containerd.services.events.ttrpc.v1", "ForwardRequest", [
        ("envelope", 1, ".containerd.services.events.ttrpc.v1.Envelope", False)]),
    # pkg/runtimeoptions/v1/api.proto: what CRI's `options` (and `ctr run --runtime-config-path`) send
    ("runtimeoptions.v1", "Options", [("type_url", 1, "string", False), ("config_path", 2, "string", False)]),
]

# containerd.v1.types.Status (api/types/task/task.proto)
TASK_STATUS = {"UNKNOWN": 0, "CREATED": 1, "RUNNING": 2, "STOPPED": 3, "PAUSED": 4, "PAUSING": 5}
_ENUMS = [("containerd.v1.types", "Status", TASK_STATUS)]


def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for wkt in (any_pb2, empty_pb2, timestamp_pb2):
        pool.AddSerializedFile(wkt.DESCRIPTOR.serialized_pb)
    packages: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def file_for(package: str) -> descriptor_pb2.FileDescriptorProto:
        if package not in packages:
            f = descriptor_pb2.FileDescriptorProto(name=f"parma/{package}.proto", package=package, syntax="proto3")
            f.dependency.extend(["google/protobuf/any.proto", "google/protobuf/timestamp.proto"])
            packages[package] = f
        return packages[package]

    for package, name, values in _ENUMS:
        enum = file_for(package).enum_type.add(name=name)
        for value_name, number in values.items():
            enum.value.add(name=value_name, number=number)
    for package, name, fields in _DEFS:
        msg = file_for(package).message_type.add(name=name)
        for field_name, number, kind, repeated in fields:
            f = msg.field.add(name=field_name, number=number,
                              label=FD.LABEL_REPEATED if repeated else FD.LABEL_OPTIONAL)
            if kind in _SCALARS:
                f.type = _SCALARS[kind]
            elif kind.startswith("enum:"):
                f.type, f.type_name = FD.TYPE_ENUM, kind.removeprefix("enum:")
            else:
                f.type, f.type_name = FD.TYPE_MESSAGE, kind
    # Files in dependency order: a file may use messages of the packages added before it.
    added: list[str] = []
    for package, file in packages.items():
        file.dependency.extend(f"parma/{p}.proto" for p in added)
        pool.Add(file)
        added.append(package)
    return pool


_POOL = _build_pool()

if TYPE_CHECKING:
    class DynamicMessage(Message):
        """What the type checker knows of a class built from the descriptors above: protobuf's Message API,
        and fields of any type. No generated code declares the fields (the classes exist only at run time),
        so they are Any here; a field we did not declare still fails at run time (AttributeError, or
        ValueError in the constructor)."""

        def __init__(self, **fields: Any) -> None: ...
        def __getattr__(self, name: str) -> Any: ...
        def __setattr__(self, name: str, value: Any) -> None: ...
else:
    DynamicMessage = Message


def message_class(full_name: str) -> type[DynamicMessage]:
    """The generated class of one of our messages, e.g. `containerd.task.v2.CreateTaskRequest`."""
    return cast("type[DynamicMessage]", message_factory.GetMessageClass(_POOL.FindMessageTypeByName(full_name)))


def _task(name: str) -> type[DynamicMessage]:
    return message_class(f"containerd.task.v2.{name}")


Status = message_class("google.rpc.Status")
TtrpcRequest = message_class("ttrpc.Request")
TtrpcResponse = message_class("ttrpc.Response")
Mount = message_class("containerd.types.Mount")
ProcessInfo = message_class("containerd.v1.types.ProcessInfo")
AnyMessage = message_class("google.protobuf.Any")
Empty = message_class("google.protobuf.Empty")
Timestamp = message_class("google.protobuf.Timestamp")
CreateTaskRequest = _task("CreateTaskRequest")
CreateTaskResponse = _task("CreateTaskResponse")
DeleteRequest = _task("DeleteRequest")
DeleteResponse = _task("DeleteResponse")
ExecProcessRequest = _task("ExecProcessRequest")
ResizePtyRequest = _task("ResizePtyRequest")
StateRequest = _task("StateRequest")
StateResponse = _task("StateResponse")
KillRequest = _task("KillRequest")
CloseIORequest = _task("CloseIORequest")
PidsRequest = _task("PidsRequest")
PidsResponse = _task("PidsResponse")
StartRequest = _task("StartRequest")
StartResponse = _task("StartResponse")
WaitRequest = _task("WaitRequest")
WaitResponse = _task("WaitResponse")
StatsRequest = _task("StatsRequest")
ConnectRequest = _task("ConnectRequest")
ConnectResponse = _task("ConnectResponse")
ShutdownRequest = _task("ShutdownRequest")
PauseRequest = _task("PauseRequest")
ResumeRequest = _task("ResumeRequest")
TaskIO = message_class("containerd.events.TaskIO")
ForwardRequest = message_class("containerd.services.events.ttrpc.v1.ForwardRequest")
Envelope = message_class("containerd.services.events.ttrpc.v1.Envelope")
RuntimeOptions = message_class("runtimeoptions.v1.Options")

# containerd names the Any of an event or option by the bare message name (typeurl.TypeURL uses
# proto.MessageName); OCI specs travel as JSON under this prefix (containerd's typeurl registration).
OCI_PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"


def event(name: str, **fields: object) -> DynamicMessage:
    """A containerd task event, e.g. event("TaskExit", container_id=..., exit_status=...)."""
    return message_class(f"containerd.events.{name}")(**fields)


def pack_any(msg: Message) -> DynamicMessage:
    return AnyMessage(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


def timestamp(at: float | None = None) -> DynamicMessage:
    """A Timestamp for a time.time() value (now when None)."""
    at = time.time() if at is None else at
    seconds = int(at)
    return Timestamp(seconds=seconds, nanos=int((at - seconds) * 1e9))


def unpack_oci_process(spec: DynamicMessage) -> dict[str, Any]:
    """The OCI process (JSON) of an ExecProcessRequest.spec. Raises ValueError when it is something else."""
    url = spec.type_url
    if url.rpartition("/")[2] != "Process" or "runtime-spec" not in url:
        raise ValueError(f"exec spec has type {url!r}, expected an OCI runtime-spec Process")
    try:
        value = json.loads(spec.value.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"exec spec is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("exec spec is not a JSON object")
    return value


def parse(cls: type[_Msg], data: bytes) -> _Msg:
    """Decode `data` as `cls`. Raises ValueError on malformed bytes."""
    msg = cls()
    try:
        msg.ParseFromString(data)
    except DecodeError as e:
        raise ValueError(f"malformed {cls.DESCRIPTOR.full_name}: {e}") from None
    return msg
