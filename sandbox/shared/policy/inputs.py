"""What the engine decides on: one typed input per enforcement point (ACI's Rego `input`).

Where a protocol request carries everything the policy needs, its input *is* the request
(sandbox/shared/messages.py): mount_overlay, unmount_device, unmount_overlay, shutdown_container,
get_properties, dump_stacks. Elsewhere the agent adds what it finds out itself and never takes from
the host (the device's root hash, the user as the container's /etc/passwd resolves it, the runtime's
own mounts, the process a signal goes to, a volume's target), and the input is built from the request plus those facts
by the `from_request` constructors below.

`policy check` traces spell these inputs in JSON (docs/policy-trace.md): `parse_input` decodes them
with the same classes. Field names are ACI's Rego input names in snake_case; a missing, unknown or
mistyped field is a PolicyInputError naming the enforcement point and the field.
"""

from __future__ import annotations

import signal as signal_module
from dataclasses import dataclass
from typing import Annotated, Any

from sandbox.shared.codec import Convert, FieldError, Match, Message, NonEmpty, Sentinel, field_names, shown
from sandbox.shared.errors import InputError
from sandbox.shared.messages import (
    Capabilities,
    ContainerMount,
    CreateContainerRequest,
    CreateVolumeRequest,
    DumpStacksRequest,
    GetPropertiesRequest,
    MountDeviceRequest,
    MountOverlayRequest,
    MountScratchRequest,
    ShutdownContainerRequest,
    Strings,
    UnmountDeviceRequest,
    UnmountOverlayRequest,
    UnmountScratchRequest,
)
from sandbox.shared.policy import defaults
from sandbox.shared.policy.points import EnforcementPoint, VolumeKind
from sandbox.shared.protocol import container_dir, volume_path

__all__ = ["EnforcementPoint"]   # re-exported: where the engine's callers have always found it


class PolicyInputError(InputError):
    """An enforcement request is malformed (unknown point, missing, unknown or mistyped field)."""


# ACI's Rego input names, so that a request written against ACI's docs gets a pointed hint.
ACI_NAMES = {"containerID": "container_id", "argList": "argv", "envList": "env", "workingDir": "working_dir",
             "deviceHash": "device_hash", "layerPaths": "layer_paths", "unmountTarget": "target",
             "isInitProcess": "is_init", "noNewPrivileges": "no_new_privileges",
             "seccompProfileSHA256": "seccomp_profile_sha256"}


class Inherit(Sentinel):
    """An exec's field the request leaves out: the container's own (recorded at create_container)."""

    INHERIT = "inherit"


INHERIT = Inherit.INHERIT


def _id(value: Any) -> str:
    # Ids are compared as strings (hcsshim IDName.ID is a string); accept JSON numbers too.
    if type(value) is int and value >= 0:
        return str(value)
    if type(value) is not str:
        raise FieldError(f"expected a string or a non-negative integer, got {shown(value)}")
    return value


def _signal(value: Any) -> int:
    if type(value) is int:
        if 1 <= value <= 64:
            return value
        raise FieldError(f"signal {shown(value)} is out of range 1-64")
    if type(value) is str:
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal_module.Signals, name, None) if name.isidentifier() else None
        if sig is not None:
            return int(sig)
    raise FieldError(f"expected a signal number or name such as 15 or 'SIGTERM', got {shown(value)}")


NonEmptyStr = Annotated[str, NonEmpty()]
# A dm-verity root hash as the guest derives it (SHA-256): exactly how the policy spells layer and volume hashes.
RootHash = Annotated[str, Match(r"[0-9a-f]{64}", "a dm-verity root hash: 64 lowercase hex digits")]


@dataclass(frozen=True)
class NamedId(Message):
    """A user or group as the policy sees it: numeric id and name (hcsshim IDName)."""

    id: Annotated[str, Convert(_id)]
    name: str


ROOT = NamedId("0", "root")


class _Input(Message):
    __slots__ = ()
    json_aliases = ACI_NAMES


@dataclass(frozen=True)
class MountDeviceInput(_Input):
    target: NonEmptyStr
    device_hash: RootHash     # the dm-verity root hash the guest derived from the device

    @classmethod
    def from_request(cls, request: MountDeviceRequest, device_hash: str) -> MountDeviceInput:
        return cls(request.target, device_hash)


@dataclass(frozen=True)
class ScratchMountInput(_Input):
    target: NonEmptyStr
    encrypted: bool = False

    @classmethod
    def from_request(cls, request: MountScratchRequest) -> ScratchMountInput:
        return cls(scratch_target(request.container_id), request.encrypted)


@dataclass(frozen=True)
class ScratchUnmountInput(_Input):
    target: NonEmptyStr

    @classmethod
    def from_request(cls, request: UnmountScratchRequest) -> ScratchUnmountInput:
        return cls(scratch_target(request.container_id))


def scratch_target(container_id: str) -> str:
    return container_dir(container_id) + "/scratch"


@dataclass(frozen=True)
class CreateVolumeInput(_Input):
    """A volume the guest makes in its memory: where (from its name) and of which kind."""

    target: NonEmptyStr
    kind: VolumeKind

    @classmethod
    def from_request(cls, request: CreateVolumeRequest) -> CreateVolumeInput:
        return cls(volume_path(request.name), VolumeKind(request.kind.value))


@dataclass(frozen=True)
class CreateContainerInput(_Input):
    container_id: NonEmptyStr
    argv: Strings
    env: Strings = ()
    working_dir: str = "/"
    mounts: tuple[ContainerMount, ...] = ()     # the runtime's own mounts and the binds the host asked for
    user: NamedId = ROOT
    groups: tuple[NamedId, ...] = ()
    umask: str = defaults.DEFAULT_UMASK
    capabilities: Capabilities | None = None    # None: the runtime's default sets for this container
    privileged: bool = False
    no_new_privileges: bool = False
    seccomp_profile_sha256: str = ""

    @classmethod
    def from_request(cls, request: CreateContainerRequest, *, mounts: tuple[ContainerMount, ...], user: NamedId,
                     groups: tuple[NamedId, ...], capabilities: Capabilities,
                     seccomp_profile_sha256: str) -> CreateContainerInput:
        """The request with what the guest decided itself: every mount the container gets (the
        runtime's and the checked binds), the user and groups as its /etc files resolve them, the
        capability sets it applies (the runtime's defaults when the request named none), and its own
        measurement of the seccomp profile it will apply (sandbox/shared/seccomp.py)."""
        return cls(request.container_id, request.argv, request.env, request.working_dir, mounts, user, groups,
                   request.umask.rjust(4, "0"), capabilities, request.privileged, request.no_new_privileges,
                   seccomp_profile_sha256)


@dataclass(frozen=True)
class ExecInContainerInput(_Input):
    """Every field but the argv defaults to what the container was created with: an exec runs as the
    container's process (its env after dropping, its working dir, user, capabilities) unless the
    request says otherwise. An explicit `env: []` is an empty environment, checked as such; hosts send
    the container's env with each exec (containerd does), which is what leaving it out stands for."""

    container_id: NonEmptyStr
    argv: Strings
    env: Strings | Inherit = INHERIT
    working_dir: str | Inherit = INHERIT
    user: NamedId | Inherit = INHERIT
    groups: tuple[NamedId, ...] | Inherit = INHERIT
    umask: str | Inherit = INHERIT
    capabilities: Capabilities | None | Inherit = INHERIT
    no_new_privileges: bool | Inherit = INHERIT


@dataclass(frozen=True)
class ExecExternalInput(_Input):
    argv: Strings
    env: Strings = ()
    working_dir: str = "/"


@dataclass(frozen=True)
class SignalContainerProcessInput(_Input):
    container_id: NonEmptyStr
    signal: Annotated[int, Convert(_signal)]
    is_init: bool = False
    argv: Strings = ()        # the exec process's argv when is_init is false


@dataclass(frozen=True)
class RuntimeLoggingInput(_Input):
    pass


@dataclass(frozen=True)
class LoadFragmentInput(_Input):
    """A policy fragment whose envelope the guest verified: the did:x509 issuer its certificate chain
    satisfies, the feed and SVN of its signed header, and the Rego module it carries (hcsshim
    LoadFragmentOptions). `policy check` traces spell it the same way."""

    issuer: NonEmptyStr
    feed: NonEmptyStr
    rego: str
    header_svn: int | None = None


EnforcementInput = (
    MountDeviceInput | UnmountDeviceRequest | MountOverlayRequest | UnmountOverlayRequest |
    ScratchMountInput | ScratchUnmountInput | CreateVolumeInput | CreateContainerInput | ExecInContainerInput |
    ExecExternalInput | ShutdownContainerRequest | SignalContainerProcessInput | GetPropertiesRequest |
    DumpStacksRequest | RuntimeLoggingInput | LoadFragmentInput
)

INPUT_TYPES: dict[EnforcementPoint, type[EnforcementInput]] = {
    EnforcementPoint.mount_device: MountDeviceInput,
    EnforcementPoint.unmount_device: UnmountDeviceRequest,
    EnforcementPoint.mount_overlay: MountOverlayRequest,
    EnforcementPoint.unmount_overlay: UnmountOverlayRequest,
    EnforcementPoint.scratch_mount: ScratchMountInput,
    EnforcementPoint.scratch_unmount: ScratchUnmountInput,
    EnforcementPoint.create_volume: CreateVolumeInput,
    EnforcementPoint.create_container: CreateContainerInput,
    EnforcementPoint.exec_in_container: ExecInContainerInput,
    EnforcementPoint.exec_external: ExecExternalInput,
    EnforcementPoint.shutdown_container: ShutdownContainerRequest,
    EnforcementPoint.signal_container_process: SignalContainerProcessInput,
    EnforcementPoint.get_properties: GetPropertiesRequest,
    EnforcementPoint.dump_stacks: DumpStacksRequest,
    EnforcementPoint.runtime_logging: RuntimeLoggingInput,
    EnforcementPoint.load_fragment: LoadFragmentInput,
}
POINTS: dict[type, EnforcementPoint] = {cls: ep for ep, cls in INPUT_TYPES.items()}


def point_of(input: EnforcementInput) -> EnforcementPoint:
    """The enforcement point an input is checked at."""
    try:
        return POINTS[type(input)]
    except KeyError:
        raise TypeError(f"{type(input).__name__} is not an enforcement input") from None


def enforcement_point(name: Any) -> EnforcementPoint:
    if isinstance(name, EnforcementPoint):
        return name
    if isinstance(name, str) and name in EnforcementPoint.__members__:
        return EnforcementPoint(name)
    import difflib  # only for a bad name: the guest agent's start-up does without it

    close = difflib.get_close_matches(str(name), list(EnforcementPoint.__members__), n=1)
    extra = f" (did you mean {close[0]!r}?)" if close else ""
    raise PolicyInputError(f"unknown enforcement point {shown(name)}{extra}",
                           hint="enforcement points: " + ", ".join(EnforcementPoint.__members__))


def parse_input(ep: EnforcementPoint, raw: Any) -> EnforcementInput:
    """Decode the JSON input of one request at `ep`; missing optional fields get their defaults."""
    cls = INPUT_TYPES[ep]
    try:
        return cls.from_json({} if raw is None else raw)
    except FieldError as e:
        required, optional = field_names(cls)
        hint = e.hint or f"required: {', '.join(required) or 'nothing'}; optional: {', '.join(optional) or '-'}"
        raise PolicyInputError(f"{ep.value}: input{e.at}: {e.message}", hint=hint) from None
