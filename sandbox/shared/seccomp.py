"""Seccomp profiles as the policy pins them: the OCI runtime spec's `linux.seccomp`, parsed strictly,
measured as ACI measures it, and applied exactly as measured.

The host sends a profile's JSON with create_container. The guest parses it here (strict JSON: no
duplicate keys, no unknown fields, every value checked), writes it back in one canonical form, and
that form is both what it hashes and what it puts into the container's OCI spec, so crun applies
exactly the profile whose hash the engine checked against the policy's `seccomp_profile_sha256`.

The canonical form is what hcsshim's guest hashes in ACI (securitypolicy.MeasureSeccompProfile:
SHA-256 of Go's json.Marshal of specs.LinuxSeccomp): the struct's field order (defaultAction,
defaultErrnoRet, architectures, flags, syscalls; names, action, errnoRet, args; index, value,
valueTwo, op), compact separators, optional fields left out when absent or empty (Go's omitempty:
valueTwo 0 included). Every string here is an identifier ([A-Za-z0-9_]), so Go's string escaping
and Python's agree byte for byte; confcom computes the same hash for the same profile.

No profile at all is the empty measurement "", and (as in ACI's framework, `input.seccompProfileSHA256
== seccomp_profile_sha256`) a policy pin of "" allows exactly that: a container without a seccomp
filter. A profile that needs a seccomp agent (SCMP_ACT_NOTIFY, listenerPath) is refused: nothing in
the UVM would answer it, and it would hand syscall decisions to a process outside the container.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sandbox.shared import sha2
from sandbox.shared.errors import InputError
from sandbox.shared.jsonstrict import JsonObject, decode_utf8, loads_strict
from sandbox.shared.messages import MAX_SECCOMP_PROFILE_BYTES as MAX_PROFILE_BYTES

MAX_SYSCALL_RULES = 4096
MAX_NAMES = 1024
MAX_ARGS = 6                  # a syscall has at most six arguments
MAX_ERRNO = 4095              # errno values the kernel can return (MAX_ERRNO)
U64 = (1 << 64) - 1

ACTIONS = frozenset({"SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
                     "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG"})
REFUSED_ACTIONS = {"SCMP_ACT_NOTIFY": "needs a seccomp agent listening outside the container"}
ARCHES = frozenset({"SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32", "SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64",
                    "SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32", "SCMP_ARCH_MIPSEL",
                    "SCMP_ARCH_MIPSEL64", "SCMP_ARCH_MIPSEL64N32", "SCMP_ARCH_PPC", "SCMP_ARCH_PPC64",
                    "SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390", "SCMP_ARCH_S390X", "SCMP_ARCH_PARISC",
                    "SCMP_ARCH_PARISC64", "SCMP_ARCH_RISCV64", "SCMP_ARCH_LOONGARCH64", "SCMP_ARCH_M68K",
                    "SCMP_ARCH_SH", "SCMP_ARCH_SHEB"})
FLAGS = frozenset({"SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
                   "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"})
OPERATORS = frozenset({"SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
                       "SCMP_CMP_MASKED_EQ"})
SYSCALL_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")

TOP_FIELDS = ("defaultAction", "defaultErrnoRet", "architectures", "flags", "listenerPath", "listenerMetadata",
              "syscalls")
SYSCALL_FIELDS = ("names", "action", "errnoRet", "args")
ARG_FIELDS = ("index", "value", "valueTwo", "op")


class SeccompError(InputError):
    """A seccomp profile is malformed or asks for what the guest does not do; `at` is its JSON path."""

    def __init__(self, message: str, at: str = "") -> None:
        super().__init__(f"seccomp profile{' ' + at if at else ''}: {message}",
                         hint="a profile is the OCI runtime spec's linux.seccomp object (docs/policy.md, seccomp)")
        self.at = at


@dataclass(frozen=True)
class SeccompProfile:
    """A validated profile: `canonical` is the JSON crun gets and the bytes that are measured."""

    canonical: bytes

    @property
    def sha256(self) -> str:
        return sha2.sha256(self.canonical).hexdigest()

    def to_oci(self) -> dict[str, object]:
        """The spec's linux.seccomp, exactly the measured object."""
        spec: dict[str, object] = json.loads(self.canonical)     # a JSON object: parse_profile checked it
        return spec


def measure(profile: SeccompProfile | None) -> str:
    """The policy's measurement of a container's profile: its SHA-256, or "" for none (ACI's)."""
    return profile.sha256 if profile is not None else ""


def parse_profile(raw: bytes) -> SeccompProfile:
    """Parse and validate a profile's JSON bytes; raise SeccompError naming the first bad field."""
    if len(raw) > MAX_PROFILE_BYTES:
        raise SeccompError(f"is larger than {MAX_PROFILE_BYTES} bytes")
    try:
        value = loads_strict(decode_utf8(raw, "seccomp profile"), "seccomp profile")
    except InputError as e:
        raise SeccompError(e.message) from None
    return profile_from_json(value)


def profile_from_json(value: Any) -> SeccompProfile:
    """Validate a parsed profile (see parse_profile)."""
    doc = _object(value, "", TOP_FIELDS)
    for key in ("listenerPath", "listenerMetadata"):
        if key in doc:
            raise SeccompError("needs a seccomp agent listening outside the container, which the guest never "
                               "runs", key)
    out: dict[str, object] = {"defaultAction": _action(doc.get("defaultAction"), "defaultAction")}
    if "defaultErrnoRet" in doc:
        out["defaultErrnoRet"] = _uint(doc["defaultErrnoRet"], "defaultErrnoRet", MAX_ERRNO)
    for key, allowed in (("architectures", ARCHES), ("flags", FLAGS)):
        items = _list(doc.get(key, []), key, 64)
        names = [_member(x, f"{key}[{i}]", allowed) for i, x in enumerate(items)]
        if names:
            out[key] = names
    rules = [_syscall(x, f"syscalls[{i}]") for i, x in enumerate(_list(doc.get("syscalls", []), "syscalls",
                                                                          MAX_SYSCALL_RULES))]
    if rules:
        out["syscalls"] = rules
    return SeccompProfile(json.dumps(out, separators=(",", ":")).encode("ascii"))


def _syscall(value: Any, at: str) -> dict[str, object]:
    d = _object(value, at, SYSCALL_FIELDS)
    if "names" not in d:
        raise SeccompError("a syscall rule needs names", at)
    names = _list(d["names"], f"{at}.names", MAX_NAMES)
    if not names:
        raise SeccompError("must not be empty", f"{at}.names")
    for i, name in enumerate(names):
        if type(name) is not str or not SYSCALL_NAME.fullmatch(name):
            raise SeccompError(f"{_shown(name)} is not a syscall name", f"{at}.names[{i}]")
    out: dict[str, object] = {"names": list(names), "action": _action(d.get("action"), f"{at}.action")}
    if "errnoRet" in d:
        out["errnoRet"] = _uint(d["errnoRet"], f"{at}.errnoRet", MAX_ERRNO)
    args = [_arg(x, f"{at}.args[{i}]") for i, x in enumerate(_list(d.get("args", []), f"{at}.args", MAX_ARGS))]
    if args:
        out["args"] = args
    return out


def _arg(value: Any, at: str) -> dict[str, object]:
    d = _object(value, at, ARG_FIELDS)
    for key in ("index", "op"):
        if key not in d:
            raise SeccompError(f"needs {key}", at)
    out: dict[str, object] = {"index": _uint(d["index"], f"{at}.index", MAX_ARGS - 1),
                              "value": _uint(d.get("value", 0), f"{at}.value", U64)}
    value_two = _uint(d.get("valueTwo", 0), f"{at}.valueTwo", U64)
    if value_two:
        out["valueTwo"] = value_two
    out["op"] = _member(d["op"], f"{at}.op", OPERATORS)
    return out


def _object(value: Any, at: str, fields: tuple[str, ...]) -> JsonObject:
    if type(value) is not dict:
        raise SeccompError(f"expected an object, got {_type(value)}", at)
    for key in value:
        if key not in fields:
            raise SeccompError(f"unknown field {_shown(key)} (known: {', '.join(fields)})", at)
    return value


def _list(value: Any, at: str, limit: int) -> list[Any]:
    if type(value) is not list:
        raise SeccompError(f"expected an array, got {_type(value)}", at)
    if len(value) > limit:
        raise SeccompError(f"more than {limit} items", at)
    return value


def _uint(value: Any, at: str, limit: int) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise SeccompError(f"expected an integer from 0 to {limit}, got {_shown(value)}", at)
    return value


def _member(value: Any, at: str, allowed: frozenset[str]) -> str:
    if type(value) is not str or value not in allowed:
        raise SeccompError(f"{_shown(value)} is not one of {', '.join(sorted(allowed))}", at)
    return value


def _action(value: Any, at: str) -> str:
    if type(value) is str and value in REFUSED_ACTIONS:
        raise SeccompError(f"{value} {REFUSED_ACTIONS[value]}, which the guest never runs", at)
    if value is None:
        raise SeccompError("is required", at)
    return _member(value, at, ACTIONS)


def _type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
