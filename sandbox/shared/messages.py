"""The payloads of the host<->agent protocol: one frozen dataclass per request op and per result.

This module is the schema of docs/protocol.md ("Ops"). The launcher builds these requests, the
client sends `request.to_json()` as a frame's `payload`, the agent's frame parser returns them
(`REQUEST_TYPES[op].from_json(payload)`), the agent dispatches on their type, and the policy engine
checks the same objects where a request needs nothing the guest must find out itself
(sandbox/shared/policy/inputs.py). Results travel back the same way.

Adding an op: add it to `Op`, define `<Name>Request(Request[<Name>Result])` with `op = Op.<name>` and its
result class, list the request in `AgentRequest`, handle it in sandbox/guest/service.py and document it
in docs/protocol.md (tests/unit/test_protocol.py checks all four).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Generic, TypeVar

from sandbox.shared.codec import Base64, Hex, Match, MaxLen, Message, NonEmpty, Range

MAX_POLICY_BYTES = 1 << 20
MAX_FRAGMENT_BYTES = 1 << 20


class Op(StrEnum):
    ping = "ping"
    set_policy = "set_policy"
    load_fragment = "load_fragment"
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


# ---------------------------------------------------------------------------------------------------------
# Field types (every str field also refuses NUL characters, see codec.py)

CONTAINER_ID = r"[a-z0-9][a-z0-9_.-]{0,63}"
EXEC_ID = r"[a-z0-9][a-z0-9_.-]{0,63}"
ABS_PATH = r"(?s)/.{0,4095}"
DEVICE_SERIAL = r"[A-Za-z0-9_-]{1,20}"
VOLUME_NAME = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
UMASK = r"0?[0-7]{3}"
SHA256_OR_EMPTY = r"|[0-9a-f]{64}"
CAP_NAME = r"CAP_[A-Z_]+"

ContainerId = Annotated[str, Match(CONTAINER_ID, "a container id ([a-z0-9][a-z0-9_.-], at most 64)")]
ExecId = Annotated[str, Match(EXEC_ID, "an exec id ([a-z0-9][a-z0-9_.-], at most 64)")]
AbsPath = Annotated[str, Match(ABS_PATH, "an absolute path (at most 4096 characters)")]
Strings = Annotated[tuple[str, ...], MaxLen(4096)]
CapName = Annotated[str, Match(CAP_NAME, "a capability name like CAP_CHOWN")]
CapSet = tuple[CapName, ...]
Seconds = float           # the agent clamps each timeout to its op's limit (docs/protocol.md)


@dataclass(frozen=True)
class Capabilities(Message):
    """The five capability sets of a process (OCI runtime spec; the policy's `capabilities` too).
    In a request a missing set is empty."""

    bounding: CapSet = ()
    effective: CapSet = ()
    inheritable: CapSet = ()
    permitted: CapSet = ()
    ambient: CapSet = ()

    def sets(self) -> dict[str, tuple[str, ...]]:
        return {"bounding": self.bounding, "effective": self.effective, "inheritable": self.inheritable,
                "permitted": self.permitted, "ambient": self.ambient}


@dataclass(frozen=True)
class ContainerMount(Message):
    """One mount of a container, as the host asks for it and as the policy engine checks it."""

    destination: Annotated[str, MaxLen(4096)]
    source: Annotated[str, MaxLen(4096)]
    type: Annotated[str, MaxLen(64)] = "bind"
    options: Annotated[tuple[Annotated[str, MaxLen(256)], ...], MaxLen(64)] = ()


# ---------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class EmptyResult(Message):
    pass


JsonObject = dict[str, Any]     # results whose content is diagnostic or defined elsewhere


@dataclass(frozen=True)
class PingResult(Message):
    protocol: int
    agent: str
    policy_set: bool
    policy_hash: str | None
    uptime_s: float


@dataclass(frozen=True)
class SetPolicyResult(Message):
    policy_hash: str
    host_data_source: str


@dataclass(frozen=True)
class LoadFragmentResult(Message):
    issuer: str
    feed: str
    namespace: str
    header_svn: int | None


@dataclass(frozen=True)
class DumpStacksResult(Message):
    stacks: str


@dataclass(frozen=True)
class MountDeviceResult(Message):
    root_hash: str
    data_blocks: int
    dm_device: str
    enforce_s: float


@dataclass(frozen=True)
class MountScratchResult(Message):
    target: str


@dataclass(frozen=True)
class MountOverlayResult(Message):
    enforce_s: float


@dataclass(frozen=True)
class CreateVolumeResult(Message):
    path: str


@dataclass(frozen=True)
class CreateContainerResult(Message):
    pid: int | None
    stdio: bool
    enforce_s: float
    enforce_cpu_s: float
    total_s: float


@dataclass(frozen=True)
class StartContainerResult(Message):
    pid: int | None
    total_s: float


@dataclass(frozen=True)
class ExecProcessResult(Message):
    exec_id: str
    pid: int
    stdio: bool


@dataclass(frozen=True)
class ProcessExit(Message):
    """A process's state: `exit_code` is 128 + signal when a signal killed it."""

    running: bool
    exit_code: int | None
    signal: int | None


@dataclass(frozen=True)
class ShutdownResult(Message):
    exit_code: int | None
    signal: int | None


class OutputStream(StrEnum):
    stdout = "stdout"
    stderr = "stderr"


@dataclass(frozen=True)
class OutputChunk(Message):
    stream: OutputStream
    data: Annotated[bytes, Base64()]


@dataclass(frozen=True)
class ReadOutputResult(Message):
    chunks: tuple[OutputChunk, ...]
    next_offset: int
    dropped: int
    eof: bool


@dataclass(frozen=True)
class ContainerInfo(Message):
    id: str
    status: str            # created | running | exited
    pid: int | None
    exit_code: int | None
    stdio: bool


@dataclass(frozen=True)
class ListContainersResult(Message):
    containers: tuple[ContainerInfo, ...]


# ---------------------------------------------------------------------------------------------------------
# Requests

R = TypeVar("R")


class Request(Message, Generic[R]):
    """Base of the request payloads. `op` names the op; `result_type` (from `Request[Result]`) decodes
    the result on the host (a JsonObject result is passed through as parsed)."""

    __slots__ = ()
    op: ClassVar[Op]
    result_type: ClassVar[Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in cls.__dict__.get("__orig_bases__", ()):
            if typing.get_origin(base) is Request:
                cls.result_type = typing.get_args(base)[0]


@dataclass(frozen=True)
class PingRequest(Request[PingResult]):
    op = Op.ping


@dataclass(frozen=True)
class SetPolicyRequest(Request[SetPolicyResult]):
    """The exact policy bytes; accepted once, and only if their SHA-256 equals HOST_DATA."""

    op = Op.set_policy
    policy: Annotated[bytes, Base64(), MaxLen(MAX_POLICY_BYTES)]


@dataclass(frozen=True)
class LoadFragmentRequest(Request[LoadFragmentResult]):
    """A signed policy fragment: the exact COSE_Sign1 envelope (confcom's .cose file or registry artifact)."""

    op = Op.load_fragment
    fragment: Annotated[bytes, Base64(), MaxLen(MAX_FRAGMENT_BYTES)]


@dataclass(frozen=True)
class GetPropertiesRequest(Request[JsonObject]):
    op = Op.get_properties


@dataclass(frozen=True)
class DumpStacksRequest(Request[DumpStacksResult]):
    op = Op.dump_stacks


@dataclass(frozen=True)
class GetReportRequest(Request[JsonObject]):
    """Fresh evidence bound to `nonce`; the result is sandbox.shared.snp.evidence's payload."""

    op = Op.get_report
    nonce: Annotated[bytes, Hex(), MaxLen(1024)]


@dataclass(frozen=True)
class MountDeviceRequest(Request[MountDeviceResult]):
    op = Op.mount_device
    device: Annotated[str, Match(DEVICE_SERIAL, "a virtio-blk serial ([A-Za-z0-9_-], at most 20)")]
    target: AbsPath


@dataclass(frozen=True)
class UnmountDeviceRequest(Request[EmptyResult]):
    op = Op.unmount_device
    target: AbsPath


@dataclass(frozen=True)
class MountScratchRequest(Request[MountScratchResult]):
    op = Op.mount_scratch
    container_id: ContainerId
    encrypted: bool = False


@dataclass(frozen=True)
class UnmountScratchRequest(Request[EmptyResult]):
    op = Op.unmount_scratch
    container_id: ContainerId


@dataclass(frozen=True)
class MountOverlayRequest(Request[MountOverlayResult]):
    op = Op.mount_overlay
    container_id: ContainerId
    layer_paths: Annotated[tuple[AbsPath, ...], MaxLen(128)]     # top-most layer first
    target: AbsPath


@dataclass(frozen=True)
class UnmountOverlayRequest(Request[EmptyResult]):
    op = Op.unmount_overlay
    target: AbsPath


class MemoryVolumeKind(StrEnum):
    """The volumes the guest makes in its own memory (`files` volumes are devices: mount_device)."""

    empty_dir = "emptyDir"
    tmpfs = "tmpfs"
    secret = "secret"


@dataclass(frozen=True)
class CreateVolumeRequest(Request[CreateVolumeResult]):
    op = Op.create_volume
    name: Annotated[str, Match(VOLUME_NAME, "a volume name ([a-z0-9-], at most 63)")]
    kind: MemoryVolumeKind
    size_mib: Annotated[int, Range(1, 1 << 20)] | None = None          # tmpfs
    items: dict[str, Annotated[bytes, Base64()]] | None = None         # secret: file name -> content


@dataclass(frozen=True)
class CreateContainerRequest(Request[CreateContainerResult]):
    op = Op.create_container
    container_id: ContainerId
    argv: Annotated[Strings, NonEmpty()]
    env: Strings                            # "NAME=VALUE"
    working_dir: AbsPath = "/"
    user: Annotated[str, MaxLen(256)] = ""  # an image User: uid, uid:gid, name or name:group; "" = root
    mounts: Annotated[tuple[ContainerMount, ...], MaxLen(256)] = ()
    capabilities: Capabilities | None = None     # None: the runtime's default sets
    privileged: bool = False
    no_new_privileges: bool = False
    umask: Annotated[str, Match(UMASK, "an octal umask such as '0022'")] = "0022"
    seccomp_profile_sha256: Annotated[str, Match(SHA256_OR_EMPTY, "'' or a SHA-256 hex digest")] = ""


@dataclass(frozen=True)
class StartContainerRequest(Request[StartContainerResult]):
    op = Op.start_container
    container_id: ContainerId


@dataclass(frozen=True)
class ExecProcessRequest(Request[ExecProcessResult]):
    op = Op.exec_process
    container_id: ContainerId
    argv: Annotated[Strings, NonEmpty()]
    env: Strings = ()
    working_dir: Annotated[str, Match(r"(?s)|/.{0,4095}", "'' or an absolute path")] = ""   # "": the container's


@dataclass(frozen=True)
class SignalProcessRequest(Request[EmptyResult]):
    op = Op.signal_process
    container_id: ContainerId
    signal: Annotated[int, Range(1, 64)]
    exec_id: ExecId | None = None           # None: the container's init process


@dataclass(frozen=True)
class WaitProcessRequest(Request[ProcessExit]):
    op = Op.wait_process
    container_id: ContainerId
    exec_id: ExecId | None = None
    timeout: Seconds = 0


@dataclass(frozen=True)
class ReadOutputRequest(Request[ReadOutputResult]):
    op = Op.read_output
    container_id: ContainerId
    exec_id: ExecId | None = None
    offset: int = 0
    max_bytes: int = 65536
    wait: Seconds = 0


@dataclass(frozen=True)
class ShutdownContainerRequest(Request[ShutdownResult]):
    op = Op.shutdown_container
    container_id: ContainerId
    timeout: Seconds = 10


@dataclass(frozen=True)
class ListContainersRequest(Request[ListContainersResult]):
    op = Op.list_containers


@dataclass(frozen=True)
class PoweroffRequest(Request[EmptyResult]):
    op = Op.poweroff


AgentRequest = (
    PingRequest | SetPolicyRequest | LoadFragmentRequest | GetPropertiesRequest | DumpStacksRequest |
    GetReportRequest |
    MountDeviceRequest | UnmountDeviceRequest | MountScratchRequest | UnmountScratchRequest |
    MountOverlayRequest | UnmountOverlayRequest | CreateVolumeRequest | CreateContainerRequest |
    StartContainerRequest | ExecProcessRequest | SignalProcessRequest | WaitProcessRequest |
    ReadOutputRequest | ShutdownContainerRequest | ListContainersRequest | PoweroffRequest
)

REQUEST_TYPES: dict[Op, type[AgentRequest]] = {cls.op: cls for cls in typing.get_args(AgentRequest)}
