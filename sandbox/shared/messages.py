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
from sandbox.shared.jsonstrict import JsonObject as JsonObject  # re-exported: results use it

MAX_POLICY_BYTES = 1 << 20
MAX_SECCOMP_PROFILE_BYTES = 1 << 20
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
    setup_scratch = "setup_scratch"
    mount_scratch = "mount_scratch"
    unmount_scratch = "unmount_scratch"
    mount_overlay = "mount_overlay"
    unmount_overlay = "unmount_overlay"
    create_volume = "create_volume"
    create_container = "create_container"
    start_container = "start_container"
    set_group_network = "set_group_network"
    exec_process = "exec_process"
    write_stdin = "write_stdin"
    close_stdin = "close_stdin"
    resize_terminal = "resize_terminal"
    signal_process = "signal_process"
    wait_process = "wait_process"
    read_output = "read_output"
    shutdown_container = "shutdown_container"
    list_containers = "list_containers"
    watch_containers = "watch_containers"
    poweroff = "poweroff"


# ---------------------------------------------------------------------------------------------------------
# Field types (every str field also refuses NUL characters, see codec.py)

CONTAINER_ID = r"[a-z0-9][a-z0-9_.-]{0,63}"
EXEC_ID = r"[a-z0-9][a-z0-9_.-]{0,63}"
ABS_PATH = r"(?s)/.{0,4095}"
DEVICE_SERIAL = r"[A-Za-z0-9_-]{1,20}"
VOLUME_NAME = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
UMASK = r"0?[0-7]{3}"
CAP_NAME = r"CAP_[A-Z_]+"
MAX_STDIN_CHUNK = 64 * 1024      # bytes of one write_stdin (the host sends the rest in further requests)
MAX_DIMENSION = 0xFFFF           # a terminal's rows and columns (struct winsize holds unsigned shorts)

ContainerId = Annotated[str, Match(CONTAINER_ID, "a container id ([a-z0-9][a-z0-9_.-], at most 64)")]
ExecId = Annotated[str, Match(EXEC_ID, "an exec id ([a-z0-9][a-z0-9_.-], at most 64)")]
AbsPath = Annotated[str, Match(ABS_PATH, "an absolute path (at most 4096 characters)")]
Strings = Annotated[tuple[str, ...], MaxLen(4096)]
CapName = Annotated[str, Match(CAP_NAME, "a capability name like CAP_CHOWN")]
CapSet = tuple[CapName, ...]
Seconds = float           # the agent clamps each timeout to its op's limit (docs/protocol.md)
Dimension = Annotated[int, Range(0, MAX_DIMENSION)]


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


# JsonObject: results whose content is diagnostic or defined elsewhere.


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
class SetupScratchResult(Message):
    target: str              # where the group's encrypted scratch filesystem is mounted
    size_bytes: int          # what the filesystem got (the disk minus integrity tags and metadata)
    setup_s: float


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
class WriteStdinResult(Message):
    accepted: int            # bytes the process's terminal or pipe took now; the host sends the rest again


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


@dataclass(frozen=True)
class WatchContainersResult(Message):
    generation: int          # changes whenever a container is created, started, exits or is deleted
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
    """Fresh evidence bound to `nonce` and, unless `runtime_key` is false, to the agent's runtime key; the
    result is sandbox.shared.snp.evidence's payload. Keyless evidence (the launch self-check's) shows which
    UVM answered without making a key for it; no secret is released on it."""

    op = Op.get_report
    nonce: Annotated[bytes, Hex(), MaxLen(1024)]
    runtime_key: bool = True


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
class SetupScratchRequest(Request[SetupScratchResult]):
    """Turn the group's raw scratch disk into an encrypted, integrity-protected filesystem with a key
    made in the guest (checked as an encrypted scratch_mount of the group's scratch directory)."""

    op = Op.setup_scratch
    device: Annotated[str, Match(DEVICE_SERIAL, "a disk serial ([A-Za-z0-9_-], at most 20)")]


@dataclass(frozen=True)
class MountScratchRequest(Request[MountScratchResult]):
    """A container's writable layer: a fresh directory on the group's encrypted scratch (encrypted), or a
    tmpfs in guest memory (not encrypted by the guest; the policy's allow_unencrypted_scratch decides)."""

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
    # The OCI linux.seccomp JSON (sandbox/shared/seccomp.py); None: no profile. The guest measures it
    # itself: the policy's seccomp_profile_sha256 is checked against that, never against the host's word.
    seccomp_profile: Annotated[bytes, Base64(), MaxLen(MAX_SECCOMP_PROFILE_BYTES)] | None = None


@dataclass(frozen=True)
class StartContainerRequest(Request[StartContainerResult]):
    op = Op.start_container
    container_id: ContainerId


@dataclass(frozen=True)
class DnsSettings(Message):
    """What a container's /etc/resolv.conf says (resolv.conf(5); checked by sandbox/shared/names.py)."""

    nameservers: Annotated[tuple[Annotated[str, MaxLen(64)], ...], MaxLen(3)]
    search: Annotated[tuple[Annotated[str, MaxLen(253)], ...], MaxLen(6)] = ()
    options: Annotated[tuple[Annotated[str, MaxLen(32)], ...], MaxLen(16)] = ()


@dataclass(frozen=True)
class SetGroupNetworkRequest(Request[EmptyResult]):
    """The group's hostname, the names /etc/hosts maps to the group (127.0.0.1), and its DNS settings: the
    content of every container's /etc/hostname, /etc/hosts and /etc/resolv.conf from now on."""

    op = Op.set_group_network
    hostname: Annotated[str, MaxLen(63)]
    names: Annotated[tuple[Annotated[str, MaxLen(253)], ...], MaxLen(512)] = ()
    dns: DnsSettings | None = None          # None: QEMU user networking's resolver


@dataclass(frozen=True)
class ExecProcessRequest(Request[ExecProcessResult]):
    """Start a process in a running container. `stdin`: its input comes from write_stdin (a pipe, or the
    terminal with `tty`); `tty`: a pseudo-terminal of `rows` x `cols` is its stdin, stdout and stderr."""

    op = Op.exec_process
    container_id: ContainerId
    argv: Annotated[Strings, NonEmpty()]
    env: Strings | None = None      # None: the container's own env (as created, after the policy's dropping)
    working_dir: Annotated[str, Match(r"(?s)|/.{0,4095}", "'' or an absolute path")] = ""   # "": the container's
    tty: bool = False
    stdin: bool = False
    rows: Dimension = 0
    cols: Dimension = 0


@dataclass(frozen=True)
class WriteStdinRequest(Request[WriteStdinResult]):
    """Bytes for an interactive exec's input (keys typed at its terminal: Ctrl-C is 0x03, Ctrl-D 0x04)."""

    op = Op.write_stdin
    container_id: ContainerId
    exec_id: ExecId
    data: Annotated[bytes, Base64(), MaxLen(MAX_STDIN_CHUNK)]


@dataclass(frozen=True)
class CloseStdinRequest(Request[EmptyResult]):
    """End of input: the pipe is closed; a terminal gets its end-of-file character."""

    op = Op.close_stdin
    container_id: ContainerId
    exec_id: ExecId


@dataclass(frozen=True)
class ResizeTerminalRequest(Request[EmptyResult]):
    op = Op.resize_terminal
    container_id: ContainerId
    exec_id: ExecId
    rows: Dimension
    cols: Dimension


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
class WatchContainersRequest(Request[WatchContainersResult]):
    """The containers, once their generation differs from `since` or after `wait` seconds."""

    op = Op.watch_containers
    since: int = -1
    wait: Seconds = 0


@dataclass(frozen=True)
class PoweroffRequest(Request[EmptyResult]):
    op = Op.poweroff


AgentRequest = (
    PingRequest | SetPolicyRequest | LoadFragmentRequest | GetPropertiesRequest | DumpStacksRequest |
    GetReportRequest | MountDeviceRequest | UnmountDeviceRequest | SetupScratchRequest | MountScratchRequest |
    UnmountScratchRequest | MountOverlayRequest | UnmountOverlayRequest | CreateVolumeRequest |
    SetGroupNetworkRequest | CreateContainerRequest | StartContainerRequest | ExecProcessRequest |
    WriteStdinRequest | CloseStdinRequest | ResizeTerminalRequest | SignalProcessRequest | WaitProcessRequest |
    ReadOutputRequest | ShutdownContainerRequest | ListContainersRequest | WatchContainersRequest | PoweroffRequest
)

# Keyed by Op, a StrEnum: a frame's op text looks its class up as is (an Op is equal to its text).
REQUEST_TYPES: dict[str, type[AgentRequest]] = {cls.op: cls for cls in typing.get_args(AgentRequest)}
