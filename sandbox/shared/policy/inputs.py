"""The enforcement points and their inputs: names, required fields, safe defaults, type checks.

Input keys are snake_case versions of ACI's Rego input fields (containerID → container_id, argList →
argv, envList → env, isInitProcess → is_init, unmountTarget → target ...). A missing required field,
an unknown field or a wrong type is an InputError naming the enforcement point and the field; the
guest agent treats it as a denial, `policy check` as bad input (exit 2).
"""

from __future__ import annotations

import difflib
import signal as signal_module
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

from sandbox.shared.errors import InputError
from sandbox.shared.policy import defaults


class EnforcementPoint(StrEnum):
    mount_device = "mount_device"
    unmount_device = "unmount_device"
    mount_overlay = "mount_overlay"
    unmount_overlay = "unmount_overlay"
    scratch_mount = "scratch_mount"
    scratch_unmount = "scratch_unmount"
    create_container = "create_container"
    exec_in_container = "exec_in_container"
    exec_external = "exec_external"
    shutdown_container = "shutdown_container"
    signal_container_process = "signal_container_process"
    get_properties = "get_properties"
    dump_stacks = "dump_stacks"
    runtime_logging = "runtime_logging"


class PolicyInputError(InputError):
    """An enforcement request is malformed (unknown point, missing, unknown or mistyped field)."""


# ---------------------------------------------------------------------------------------------------------
# Field parsers: value -> normalised value, raising _Bad. The path of a bad field is assembled only on
# the way out of a failure, so the common (valid) case builds no strings.

Parser = Callable[[Any], Any]


class _Bad(Exception):
    def __init__(self, message: str, at: str = "", hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.at, self.hint = message, at, hint

    def under(self, prefix: str) -> _Bad:
        self.at = prefix + self.at
        return self


def _expected(expected: str, value: Any) -> _Bad:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return _Bad(f"expected {expected}, got {shown}")


def _string(value: Any) -> str:
    if type(value) is not str:
        raise _expected("a string", value)
    return value


def _nonempty_string(value: Any) -> str:
    if not _string(value):
        raise _Bad("must not be empty")
    return value


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise _expected("true or false", value)
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if type(value) not in (list, tuple):
        raise _expected("an array of strings", value)
    try:
        "".join(value)   # a C-speed check that every item is a string
    except TypeError:
        for i, item in enumerate(value):
            if type(item) is not str:
                raise _expected("a string", item).under(f"[{i}]") from None
    return tuple(value)


def _object(value: Any, fields: Mapping[str, tuple[Parser, Any]]) -> dict[str, Any]:
    """Parse an object whose fields map to (parser, default); default REQUIRED means required."""
    if type(value) is not dict:
        raise _expected("an object", value)
    for key in value:
        if key not in fields:
            raise _unknown(key, fields)
    out = {}
    for key, (parse, default) in fields.items():
        if key in value:
            try:
                out[key] = parse(value[key])
            except _Bad as e:
                raise e.under("." + key) from None
        elif default is REQUIRED:
            raise _Bad("required field is missing", "." + key)
        else:
            out[key] = default
    return out


# ACI's Rego input names, so that a request written against ACI's docs gets a pointed hint.
ACI_NAMES = {"containerID": "container_id", "argList": "argv", "envList": "env", "workingDir": "working_dir",
             "deviceHash": "device_hash", "layerPaths": "layer_paths", "unmountTarget": "target",
             "isInitProcess": "is_init", "noNewPrivileges": "no_new_privileges",
             "seccompProfileSHA256": "seccomp_profile_sha256"}


def _unknown(key: str, fields: Mapping[str, Any]) -> _Bad:
    close = [ACI_NAMES[key]] if ACI_NAMES.get(key) in fields else difflib.get_close_matches(key, list(fields), n=1)
    extra = f" (did you mean {close[0]!r}?)" if close else ""
    return _Bad(f"unknown field{extra}", "." + key, hint="known fields: " + ", ".join(fields))


def _id(value: Any) -> str:
    # Ids are compared as strings (hcsshim IDName.ID is a string); accept JSON numbers too.
    if type(value) is int and value >= 0:
        return str(value)
    return _string(value)


def _idname(value: Any) -> tuple[str, str]:
    d = _object(value, _IDNAME)
    return d["id"], d["name"]


def _each(value: Any, what: str, parse: Parser) -> tuple:
    if type(value) not in (list, tuple):
        raise _expected(what, value)
    out = []
    for i, item in enumerate(value):
        try:
            out.append(parse(item))
        except _Bad as e:
            raise e.under(f"[{i}]") from None
    return tuple(out)


def _groups(value: Any) -> tuple[tuple[str, str], ...]:
    return _each(value, "an array of {id, name} objects", _idname)


def _mount(value: Any) -> tuple[str, str, str, tuple[str, ...]]:
    d = _object(value, _MOUNT)
    return d["destination"], d["source"], d["type"], d["options"]


def _mounts(value: Any) -> tuple[tuple[str, str, str, tuple[str, ...]], ...]:
    return _each(value, "an array of mount objects", _mount)


def _capabilities(value: Any) -> dict[str, tuple[str, ...]] | None:
    if value is None:
        return None
    return _object(value, _CAPABILITIES)


def _signal(value: Any) -> int:
    if type(value) is int:
        if 1 <= value <= 64:
            return value
        raise _Bad(f"signal {value} is out of range 1-64")
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal_module.Signals, name, None) if name.isidentifier() else None
        if sig is not None:
            return int(sig)
    raise _expected("a signal number or name such as 15 or 'SIGTERM'", value)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


class _Inherit:
    def __repr__(self) -> str:
        return "INHERIT"


INHERIT: Any = _Inherit()   # take the value the container was created with
_IDNAME = {"id": (_id, REQUIRED), "name": (_string, REQUIRED)}
_MOUNT = {"destination": (_string, REQUIRED), "source": (_string, REQUIRED), "type": (_string, REQUIRED),
          "options": (_strings, ())}
_CAPABILITIES = {k: (_strings, ()) for k in defaults.CAPABILITY_SETS}

# Defaults: least privilege and fail-closed. A capabilities value of None means "the runtime's default
# sets for this container" (what the agent applies when the host asks for nothing special).
ROOT = ("0", "root")

INPUTS: dict[EnforcementPoint, dict[str, tuple[Parser, Any]]] = {
    EnforcementPoint.mount_device: {"target": (_nonempty_string, REQUIRED), "device_hash": (_string, REQUIRED)},
    EnforcementPoint.unmount_device: {"target": (_nonempty_string, REQUIRED)},
    EnforcementPoint.mount_overlay: {"container_id": (_nonempty_string, REQUIRED),
                                     "layer_paths": (_strings, REQUIRED), "target": (_nonempty_string, REQUIRED)},
    EnforcementPoint.unmount_overlay: {"target": (_nonempty_string, REQUIRED)},
    EnforcementPoint.scratch_mount: {"target": (_nonempty_string, REQUIRED), "encrypted": (_bool, False)},
    EnforcementPoint.scratch_unmount: {"target": (_nonempty_string, REQUIRED)},
    EnforcementPoint.create_container: {
        "container_id": (_nonempty_string, REQUIRED), "argv": (_strings, REQUIRED), "env": (_strings, ()),
        "working_dir": (_string, "/"), "mounts": (_mounts, ()), "user": (_idname, ROOT), "groups": (_groups, ()),
        "umask": (_string, defaults.DEFAULT_UMASK), "capabilities": (_capabilities, None),
        "privileged": (_bool, False), "no_new_privileges": (_bool, False),
        "seccomp_profile_sha256": (_string, ""),
    },
    # The identity fields of an exec default to the container's own (recorded at create_container): an
    # exec runs as the container's process unless the request says otherwise.
    EnforcementPoint.exec_in_container: {
        "container_id": (_nonempty_string, REQUIRED), "argv": (_strings, REQUIRED), "env": (_strings, ()),
        "working_dir": (_string, "/"), "user": (_idname, INHERIT), "groups": (_groups, INHERIT),
        "umask": (_string, INHERIT), "capabilities": (_capabilities, INHERIT), "no_new_privileges": (_bool, INHERIT),
    },
    EnforcementPoint.exec_external: {"argv": (_strings, REQUIRED), "env": (_strings, ()),
                                     "working_dir": (_string, "/")},
    EnforcementPoint.shutdown_container: {"container_id": (_nonempty_string, REQUIRED)},
    EnforcementPoint.signal_container_process: {
        "container_id": (_nonempty_string, REQUIRED), "signal": (_signal, REQUIRED), "is_init": (_bool, False),
        "argv": (_strings, ()),
    },
    EnforcementPoint.get_properties: {},
    EnforcementPoint.dump_stacks: {},
    EnforcementPoint.runtime_logging: {},
}


def enforcement_point(name: Any) -> EnforcementPoint:
    if isinstance(name, EnforcementPoint):
        return name
    if isinstance(name, str) and name in EnforcementPoint.__members__:
        return EnforcementPoint(name)
    close = difflib.get_close_matches(str(name), list(EnforcementPoint.__members__), n=1)
    extra = f" (did you mean {close[0]!r}?)" if close else ""
    raise PolicyInputError(f"unknown enforcement point {name!r}{extra}",
                           hint="enforcement points: " + ", ".join(EnforcementPoint.__members__))


def parse_input(ep: EnforcementPoint, raw: Any) -> dict[str, Any]:
    """Validate and normalise the input of one request; missing optional fields get their defaults."""
    fields = INPUTS[ep]
    try:
        return _object({} if raw is None else raw, fields)
    except _Bad as e:
        required = [k for k, (_, d) in fields.items() if d is REQUIRED]
        optional = [k for k, (_, d) in fields.items() if d is not REQUIRED]
        hint = e.hint or (f"required: {', '.join(required) or 'nothing'}; optional: {', '.join(optional) or '-'}")
        raise PolicyInputError(f"{ep.value}: input{e.at}: {e.message}", hint=hint) from None
