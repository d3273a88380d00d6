"""The execution policy document: model, strict validation, canonical bytes and the policy hash.

Field names are ACI's (hcsshim framework.rego / confcom), so a policy maps 1:1 onto the data of an
ACI Rego policy, and everything an ACI policy module can say has a place here: `fragments` (the
imports of signed policy fragments), `"command": null` (a command that never matches), the two forms
of env rules, `rules` (enforcement points the module answers with a constant, or has no rule for) and
`ignored_container_layers` (layers of container objects the framework ignores but still mounts).
Two parma-sandbox extensions: `volumes` pins each group volume's kind (and a `files` volume's device
root hash), and `key_brokers` pins the key brokers the agent trusts for secret release
(docs/policy.md). Validation reports every problem with its JSON path and rejects unknown fields;
regexes are checked when the policy is loaded, not when they are first used.

`parse_policy` takes either form of a policy's bytes: our JSON document, or ACI's Rego policy module
(the ccePolicy text), which sandbox.shared.rego reads as ACI's framework reads it.

Canonical form (fixed forever, because HOST_DATA is the SHA-256 of these bytes): JSON with keys
sorted by code point, separators "," and ":" with no whitespace, non-ASCII escaped as \\uXXXX (so
the bytes are pure ASCII, hence UTF-8), integers only, and no trailing newline.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sandbox.shared import sha2
from sandbox.shared.errors import InvalidDocument
from sandbox.shared.jsoncheck import Checker, join
from sandbox.shared.jsonstrict import JsonObject, decode_utf8, loads_strict
from sandbox.shared.messages import Capabilities
from sandbox.shared.policy import defaults
from sandbox.shared.policy.points import VolumeKind
from sandbox.shared.policy.regex import RegexError, check
from sandbox.shared.rego.framework import ENFORCEMENT_POINTS

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


class Strategy(StrEnum):
    """How an env rule's pattern is compared with `NAME=VALUE`."""

    string = "string"   # exact equality
    re2 = "re2"         # regex, always matched against the whole string


class IdStrategy(StrEnum):
    """How a user or group is matched: anything, by numeric id, by name, or by regex on the name."""

    any = "any"
    id = "id"
    name = "name"
    re2 = "re2"


@dataclass(frozen=True)
class EnvRule:
    """`NAME=VALUE` compared as a whole with `pattern`."""

    pattern: str
    strategy: Strategy
    required: bool = False


@dataclass(frozen=True)
class NameValueEnvRule:
    """Framework 0.5.0's second form: the name and the value (split at the first '=') compared separately;
    a variable without '=' never matches."""

    name: str
    name_strategy: Strategy
    value: str
    value_strategy: Strategy
    required: bool = False


AnyEnvRule = EnvRule | NameValueEnvRule


@dataclass(frozen=True)
class Mount:
    destination: str
    source: str           # exact path, or "sandbox://" + regex (relative to the sandbox dir)
    type: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class ExecProcess:
    command: tuple[str, ...] | None         # None (JSON null): never matches an argv
    signals: tuple[int, ...] = ()


@dataclass(frozen=True)
class IdName:
    pattern: str
    strategy: IdStrategy


ANY_ID = IdName("", IdStrategy.any)


@dataclass(frozen=True)
class User:
    user_idname: IdName = ANY_ID
    group_idnames: tuple[IdName, ...] = (ANY_ID,)
    umask: str = defaults.DEFAULT_UMASK


@dataclass(frozen=True)
class Container:
    """One allowed container. Fields that the policy's framework_version predates are None (absent)."""

    layers: tuple[str, ...]                 # dm-verity root hashes, base first
    command: tuple[str, ...] | None         # None (JSON null, an image without ENTRYPOINT or CMD): never matches
    env_rules: tuple[AnyEnvRule, ...]
    working_dir: str
    mounts: tuple[Mount, ...]
    exec_processes: tuple[ExecProcess, ...]
    signals: tuple[int, ...]
    allow_elevated: bool
    allow_stdio_access: bool
    name: str | None = None
    id: str | None = None                   # image reference, informational
    no_new_privileges: bool | None = None   # framework >= 0.2.0
    user: User | None = None                # framework >= 0.2.1
    capabilities: Capabilities | None = None  # framework >= 0.2.2; None (JSON null) = the runtime defaults
    seccomp_profile_sha256: str | None = None  # framework >= 0.2.3; "" = no seccomp profile

    def label(self, index: int) -> str:
        return self.name if self.name else f"containers[{index}]"


@dataclass(frozen=True)
class ExternalProcess:
    command: tuple[str, ...] | None
    env_rules: tuple[AnyEnvRule, ...]
    working_dir: str
    allow_stdio_access: bool


@dataclass(frozen=True)
class Volume:
    """parma-sandbox extension: one group volume. The kind decides how it may come to exist: a `files`
    volume's device only with its pinned root hash (mount_device), every other kind only through the
    guest's create_volume with that kind."""

    name: str
    target: str         # where the guest puts it (defaults.volume_target(name))
    device_hash: str    # files: the dm-verity root hash; "" for the other kinds
    kind: VolumeKind = VolumeKind.files


@dataclass(frozen=True)
class KeyBroker:
    """parma-sandbox extension: a key broker the agent accepts secrets from, pinned by its public key."""

    public_key_sha256: str  # SHA-256 (hex) of the broker's DER SubjectPublicKeyInfo (docs/kbs.md)


@dataclass(frozen=True)
class FragmentImport:
    """Fragments the policy accepts: signed by `issuer` for `feed` with an SVN of at least `minimum_svn`;
    an accepted fragment adds what `includes` names (containers, fragments, external_processes)."""

    issuer: str
    feed: str
    minimum_svn: str | int
    includes: tuple[str, ...]

    def to_json(self) -> JsonObject:
        return {"issuer": self.issuer, "feed": self.feed, "minimum_svn": self.minimum_svn,
                "includes": list(self.includes)}


@dataclass(frozen=True)
class PointRule:
    """How a policy module's rule for one enforcement point departs from confcom's layout (which delegates
    the template's points and those its api_version has to the framework, and has no rule for the others):
    a constant answer (`allowed` and the other results, the same for every request); no rule at all
    (`allowed` None: api.rego decides, sandbox/shared/rego/framework.py); or a delegation to the framework
    that the layout would not write (`framework`)."""

    allowed: bool | None
    results: tuple[tuple[str, Any], ...] = ()
    framework: bool = False

    def to_json(self) -> JsonObject | str | None:
        if self.framework:
            return "framework"
        return None if self.allowed is None else {"allowed": self.allowed, **dict(self.results)}


@dataclass(frozen=True)
class Policy:
    api_version: str
    framework_version: str
    containers: tuple[Container, ...]
    external_processes: tuple[ExternalProcess, ...] = ()
    fragments: tuple[FragmentImport, ...] = ()
    rules: tuple[tuple[str, PointRule], ...] = ()           # (enforcement point, rule), sorted; others: the layout
    ignored_container_layers: tuple[str, ...] = ()
    volumes: tuple[Volume, ...] = ()
    key_brokers: tuple[KeyBroker, ...] = ()
    allow_properties_access: bool = False
    allow_dump_stacks: bool = False
    allow_runtime_logging: bool = False
    allow_environment_variable_dropping: bool = False
    allow_unencrypted_scratch: bool = False
    allow_capability_dropping: bool = False

    def to_document(self) -> JsonObject:
        return _policy_doc(self)

    def canonical_bytes(self) -> bytes:
        return canonical_bytes(self.to_document())


FLAGS = ("allow_properties_access", "allow_dump_stacks", "allow_runtime_logging",
         "allow_environment_variable_dropping", "allow_unencrypted_scratch", "allow_capability_dropping")

# Container fields that appeared in later framework versions (framework.rego check_container).
VERSIONED_FIELDS = {
    "no_new_privileges": (0, 2, 0),
    "user": (0, 2, 1),
    "capabilities": (0, 2, 2),
    "seccomp_profile_sha256": (0, 2, 3),
}
CAPABILITY_DROPPING_SINCE = (0, 2, 2)
DEFAULT_SIGNALS_UNTIL = (0, 4, 1)     # below this, the init process always accepts SIGKILL and SIGTERM

HEX64 = re.compile(r"[0-9a-f]{64}")
SEMVER = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")
UMASK = re.compile(r"[0-7]{3,4}")
CAP_NAME = re.compile(r"CAP_[A-Z_]+")
MAX_SIGNAL = 64


def parse_version(text: str) -> tuple[int, int, int]:
    m = SEMVER.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a version of the form MAJOR.MINOR.PATCH")
    return int(m[1]), int(m[2]), int(m[3])


def canonical_bytes(document: Any) -> bytes:
    """The canonical serialisation (see the module docstring). Floats are refused."""
    _refuse_floats(document, "")
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _refuse_floats(value: Any, path: str) -> None:
    if isinstance(value, float):
        raise ValueError(f"{path or 'document'}: floats have no canonical form")
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_floats(v, join(path, k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _refuse_floats(v, f"{path}[{i}]")


def policy_hash(raw: bytes) -> str:
    """SHA-256 hex of the exact policy bytes: the value that becomes SNP HOST_DATA."""
    return sha2.sha256(raw).hexdigest()


def is_rego(raw: bytes) -> bool:
    """Whether policy bytes are a Rego module (ACI's ccePolicy text) rather than our JSON document."""
    head = raw.lstrip()[:1]
    return bool(head) and head != b"{"


def parse_policy(raw: bytes, source: str = "policy") -> Policy:
    """Decode, parse strictly and validate a policy: our JSON document, or an ACI Rego policy module read as
    ACI's framework reads it (sandbox/shared/rego). Raise InvalidDocument (or InputError, for Rego outside
    the accepted subset) listing the problems."""
    text = decode_utf8(raw, source)
    if not is_rego(raw):
        return validate_policy(loads_strict(text, source), source=source)
    # Loaded on first use: the agent boots without the Rego reader, and most policies are JSON.
    from sandbox.shared.rego.policy import read_policy_text

    return validate_policy(read_policy_text(text, source).policy_document(), source=f"{source} (Rego data)")


# ---------------------------------------------------------------------------------------------------------
# Serialisation


def _env_rule_doc(r: AnyEnvRule) -> dict[str, str | bool]:
    if isinstance(r, NameValueEnvRule):
        return {"name": r.name, "name_strategy": r.name_strategy.value, "value": r.value,
                "value_strategy": r.value_strategy.value, "required": r.required}
    return {"pattern": r.pattern, "strategy": r.strategy.value, "required": r.required}


def _command_doc(command: tuple[str, ...] | None) -> list[str] | None:
    return None if command is None else list(command)


def _idname_doc(i: IdName) -> dict[str, str]:
    return {"pattern": i.pattern, "strategy": i.strategy.value}


def _container_doc(c: Container, version: tuple[int, int, int]) -> dict[str, object]:
    d: dict[str, object] = {
        "layers": list(c.layers),
        "command": _command_doc(c.command),
        "env_rules": [_env_rule_doc(r) for r in c.env_rules],
        "working_dir": c.working_dir,
        "mounts": [{"destination": m.destination, "source": m.source, "type": m.type, "options": list(m.options)}
                   for m in c.mounts],
        "exec_processes": [{"command": _command_doc(p.command), "signals": list(p.signals)}
                           for p in c.exec_processes],
        "signals": list(c.signals),
        "allow_elevated": c.allow_elevated,
        "allow_stdio_access": c.allow_stdio_access,
    }
    if c.name is not None:
        d["name"] = c.name
    if c.id is not None:
        d["id"] = c.id
    # Versioned fields are written exactly when the policy's framework_version has them.
    if version >= VERSIONED_FIELDS["no_new_privileges"]:
        d["no_new_privileges"] = bool(c.no_new_privileges)
    if version >= VERSIONED_FIELDS["user"]:
        user = c.user or User()
        d["user"] = {"user_idname": _idname_doc(user.user_idname),
                     "group_idnames": [_idname_doc(g) for g in user.group_idnames],
                     "umask": user.umask}
    if version >= VERSIONED_FIELDS["capabilities"]:
        d["capabilities"] = ({k: list(v) for k, v in c.capabilities.sets().items()}
                             if c.capabilities is not None else None)
    if version >= VERSIONED_FIELDS["seccomp_profile_sha256"]:
        d["seccomp_profile_sha256"] = c.seccomp_profile_sha256 or ""
    return d


def _volume_doc(v: Volume) -> dict[str, str]:
    # A files volume is written as before kinds existed ({name, target, device_hash}): its bytes, and
    # so HOST_DATA, stay what they were.
    if v.kind == VolumeKind.files:
        return {"name": v.name, "target": v.target, "device_hash": v.device_hash}
    return {"name": v.name, "target": v.target, "kind": v.kind.value}


def _policy_doc(p: Policy) -> JsonObject:
    d: JsonObject = {
        "api_version": p.api_version,
        "framework_version": p.framework_version,
        "containers": [_container_doc(c, parse_version(p.framework_version)) for c in p.containers],
        "external_processes": [{"command": _command_doc(e.command),
                                "env_rules": [_env_rule_doc(r) for r in e.env_rules],
                                "working_dir": e.working_dir, "allow_stdio_access": e.allow_stdio_access}
                               for e in p.external_processes],
    }
    for flag in FLAGS:
        d[flag] = getattr(p, flag)
    # What only imported ACI policies have is written only when present, so the canonical bytes (and the
    # hash) of every other policy stay what they were.
    if p.fragments:
        d["fragments"] = [f.to_json() for f in p.fragments]
    if p.rules:
        d["rules"] = {point: rule.to_json() for point, rule in p.rules}
    if p.ignored_container_layers:
        d["ignored_container_layers"] = list(p.ignored_container_layers)
    if p.volumes:
        d["volumes"] = [_volume_doc(v) for v in p.volumes]
    if p.key_brokers:
        d["key_brokers"] = [{"public_key_sha256": b.public_key_sha256} for b in p.key_brokers]
    return d


# ---------------------------------------------------------------------------------------------------------
# Validation: walk the raw JSON, collect every problem with its JSON path, build the model only when clean.

class _Checker(Checker):
    def signals(self, d: JsonObject, key: str, path: str) -> tuple[int, ...] | None:
        items = self.get(d, key, path, list, None)
        if items is None:
            return None
        out: list[int] = []
        for i, item in enumerate(items):
            if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= MAX_SIGNAL:
                self.problem(f"{join(path, key)}[{i}]", f"expected a signal number 1-{MAX_SIGNAL}, got {item!r}")
            else:
                out.append(item)
        return tuple(out)

    def regex(self, pattern: str, path: str) -> None:
        try:
            check(pattern)
        except RegexError as e:
            self.problem(path, f"regex {pattern!r} {e}")


def _strategy(c: _Checker, d: JsonObject, key: str, path: str) -> Strategy | None:
    strategy = c.string(d, key, path, None)
    if strategy is not None and strategy not in Strategy.__members__:
        c.problem(join(path, key), f"must be 'string' or 're2', got {strategy!r}")
        return None
    return None if strategy is None else Strategy(strategy)


def _check_env_rule(c: _Checker, raw: Any, path: str) -> AnyEnvRule | None:
    if isinstance(raw, dict) and "pattern" not in raw and "strategy" not in raw and "name" in raw:
        return _check_name_value_env_rule(c, raw, path)
    d = c.obj(raw, path, ("pattern", "strategy", "required"), ("pattern", "strategy"))
    if d is None:
        return None
    pattern = c.string(d, "pattern", path, None)
    strategy = _strategy(c, d, "strategy", path)
    required = c.get(d, "required", path, bool, False)
    if pattern is None or strategy is None:
        return None
    if strategy == Strategy.re2:
        c.regex(pattern, join(path, "pattern"))
    return EnvRule(pattern, strategy, required)


def _check_name_value_env_rule(c: _Checker, raw: Mapping[str, object], path: str) -> NameValueEnvRule | None:
    keys = ("name", "name_strategy", "value", "value_strategy")
    d = c.obj(raw, path, (*keys, "required"), keys)
    if d is None:
        return None
    name, value = c.string(d, "name", path, None), c.string(d, "value", path, None)
    name_strategy, value_strategy = _strategy(c, d, "name_strategy", path), _strategy(c, d, "value_strategy", path)
    required = c.get(d, "required", path, bool, False)
    if name is None or value is None or name_strategy is None or value_strategy is None:
        return None
    for key, pattern, strategy in (("name", name, name_strategy), ("value", value, value_strategy)):
        if strategy == Strategy.re2:
            c.regex(pattern, join(path, key))
    return NameValueEnvRule(name, name_strategy, value, value_strategy, required)


def _check_command(c: _Checker, d: JsonObject, path: str) -> tuple[str, ...] | None | Any:
    """A command: a non-empty array of strings, or null (never matches); _BAD when neither."""
    if "command" in d and d["command"] is None:
        return None
    command = c.strings(d, "command", path, nonempty=True)
    return command if command else _BAD


_BAD: Any = object()


def _check_mount(c: _Checker, raw: Any, path: str) -> Mount | None:
    keys = ("destination", "source", "type", "options")
    d = c.obj(raw, path, keys, keys)
    if d is None:
        return None
    destination = c.string(d, "destination", path, None)
    source = c.string(d, "source", path, None)
    type_ = c.string(d, "type", path, None)
    options = c.strings(d, "options", path)
    if destination == "":
        c.problem(join(path, "destination"), "must not be empty")
    if source is not None and source.startswith(defaults.SANDBOX_PREFIX):
        c.regex(source[len(defaults.SANDBOX_PREFIX):], join(path, "source"))
    elif source is not None and source.startswith(("plan9://", "hugepages://")):
        c.problem(join(path, "source"), f"{source.split('://')[0]}:// sources are not supported by parma-sandbox")
    if not destination or source is None or type_ is None or options is None:
        return None
    return Mount(destination, source, type_, options)


def _check_exec_process(c: _Checker, raw: Any, path: str) -> ExecProcess | None:
    d = c.obj(raw, path, ("command", "signals"), ("command", "signals"))
    if d is None:
        return None
    command = _check_command(c, d, path)
    signals = c.signals(d, "signals", path)
    return ExecProcess(command, signals) if command is not _BAD and signals is not None else None


def _check_idname(c: _Checker, raw: Any, path: str) -> IdName | None:
    d = c.obj(raw, path, ("pattern", "strategy"), ("pattern", "strategy"))
    if d is None:
        return None
    pattern = c.string(d, "pattern", path, None)
    strategy = c.string(d, "strategy", path, None)
    if strategy is not None and strategy not in IdStrategy.__members__:
        c.problem(join(path, "strategy"), f"must be one of any, id, name, re2; got {strategy!r}")
        return None
    if pattern is None or strategy is None:
        return None
    if strategy == IdStrategy.re2:
        c.regex(pattern, join(path, "pattern"))
    return IdName(pattern, IdStrategy(strategy))


def _check_user(c: _Checker, raw: Any, path: str) -> User | None:
    keys = ("user_idname", "group_idnames", "umask")
    d = c.obj(raw, path, keys, keys)
    if d is None:
        return None
    user = _check_idname(c, d.get("user_idname"), join(path, "user_idname")) if "user_idname" in d else None
    groups = c.items(d, "group_idnames", path, lambda r, p: _check_idname(c, r, p))
    umask = c.string(d, "umask", path, None, pattern=UMASK, what="an octal umask such as '0022'")
    if user is None or groups is None or umask is None:
        return None
    return User(user, groups, umask)


def _check_capabilities(c: _Checker, raw: Any, path: str) -> Capabilities | None:
    d = c.obj(raw, path, defaults.CAPABILITY_SETS, defaults.CAPABILITY_SETS)
    if d is None:
        return None
    sets = {k: c.strings(d, k, path, unique=True, pattern=CAP_NAME, what="a capability name like CAP_CHOWN")
            for k in defaults.CAPABILITY_SETS}
    checked = {k: v for k, v in sets.items() if v is not None}
    return Capabilities(**checked) if len(checked) == len(sets) else None


def _check_container(c: _Checker, raw: Any, path: str, version: tuple[int, int, int]) -> Container | None:
    base = ("layers", "command", "env_rules", "working_dir", "mounts", "exec_processes", "signals",
            "allow_elevated", "allow_stdio_access")
    versioned = tuple(k for k, since in VERSIONED_FIELDS.items() if version >= since)
    d = c.obj(raw, path, (*base, "name", "id", *VERSIONED_FIELDS), (*base, *versioned))
    if d is None:
        return None
    before = len(c.problems)
    for key, since in VERSIONED_FIELDS.items():
        if key in d and version < since:
            c.problem(join(path, key), f"needs framework_version {'.'.join(map(str, since))} or later "
                                        f"(the policy says {'.'.join(map(str, version))})")
    name = c.string(d, "name", path, None)
    image_id = c.string(d, "id", path, None)
    layers = c.strings(d, "layers", path, nonempty=True, pattern=HEX64,
                       what="a dm-verity root hash (64 lowercase hex digits)")
    command = _check_command(c, d, path)
    env_rules: tuple[AnyEnvRule, ...] | None = c.items(d, "env_rules", path,
                                                       lambda r, p: _check_env_rule(c, r, p))
    working_dir = c.string(d, "working_dir", path, None)
    if working_dir is not None and not working_dir.startswith("/"):
        c.problem(join(path, "working_dir"), f"{working_dir!r} is not an absolute path")
    mounts = c.items(d, "mounts", path, lambda r, p: _check_mount(c, r, p))
    execs = c.items(d, "exec_processes", path, lambda r, p: _check_exec_process(c, r, p))
    signals = c.signals(d, "signals", path)
    allow_elevated = c.get(d, "allow_elevated", path, bool, None)
    allow_stdio = c.get(d, "allow_stdio_access", path, bool, None)
    nnp = c.get(d, "no_new_privileges", path, bool, None)
    user = _check_user(c, d["user"], join(path, "user")) if "user" in d else None
    caps = None
    if d.get("capabilities") is not None:
        caps = _check_capabilities(c, d["capabilities"], join(path, "capabilities"))
    seccomp = c.string(d, "seccomp_profile_sha256", path, None, pattern=re.compile(r"|[0-9a-f]{64}"),
                       what="'' or a SHA-256 hex digest")
    if (len(c.problems) != before or layers is None or env_rules is None or mounts is None or execs is None
            or signals is None):    # None only with a problem noted: they are required
        return None
    return Container(layers=layers, command=command, env_rules=env_rules, working_dir=working_dir, mounts=mounts,
                     exec_processes=execs, signals=signals, allow_elevated=allow_elevated,
                     allow_stdio_access=allow_stdio, name=name, id=image_id, no_new_privileges=nnp, user=user,
                     capabilities=caps, seccomp_profile_sha256=seccomp)


def _check_external_process(c: _Checker, raw: Any, path: str) -> ExternalProcess | None:
    keys = ("command", "env_rules", "working_dir", "allow_stdio_access")
    d = c.obj(raw, path, keys, keys)
    if d is None:
        return None
    before = len(c.problems)
    command = _check_command(c, d, path)
    env_rules: tuple[AnyEnvRule, ...] | None = c.items(d, "env_rules", path,
                                                       lambda r, p: _check_env_rule(c, r, p))
    working_dir = c.string(d, "working_dir", path, None)
    allow_stdio = c.get(d, "allow_stdio_access", path, bool, None)
    if len(c.problems) != before or command is _BAD or env_rules is None:
        return None
    return ExternalProcess(command, env_rules, working_dir, allow_stdio)


def _check_volume(c: _Checker, raw: Any, path: str) -> Volume | None:
    d = c.obj(raw, path, ("name", "target", "device_hash", "kind"), ("name", "target"))
    if d is None:
        return None
    before = len(c.problems)
    name = c.string(d, "name", path, None)
    target = c.string(d, "target", path, None)
    kind_text = c.string(d, "kind", path, VolumeKind.files.value)
    kind = VolumeKind(kind_text) if kind_text in tuple(VolumeKind) else None
    if kind is None and kind_text is not None:
        c.problem(join(path, "kind"), f"must be one of {', '.join(k.value for k in VolumeKind)}; got {kind_text!r}")
    device_hash = ""
    if kind == VolumeKind.files:
        if "device_hash" not in d:
            c.problem(join(path, "device_hash"), "a files volume needs its device's dm-verity root hash")
        device_hash = c.string(d, "device_hash", path, "", pattern=HEX64,
                               what="a dm-verity root hash (64 lowercase hex digits)") or ""
    elif kind is not None and "device_hash" in d:
        c.problem(join(path, "device_hash"), f"only files volumes have a device (this one is {kind.value})")
    if target is not None and (not target.startswith("/") or re.fullmatch(defaults.LAYER_TARGET_PATTERN, target)):
        c.problem(join(path, "target"), f"{target!r} must be an absolute path outside the layer mount targets")
    if not name or target is None or kind is None or len(c.problems) != before:
        return None
    return Volume(name, target, device_hash, kind)


def _check_key_broker(c: _Checker, raw: Any, path: str) -> KeyBroker | None:
    d = c.obj(raw, path, ("public_key_sha256",), ("public_key_sha256",))
    if d is None:
        return None
    pin = c.string(d, "public_key_sha256", path, None, pattern=HEX64,
                   what="a SHA-256 of the broker's public key (64 lowercase hex digits)")
    return KeyBroker(pin) if pin is not None else None


def _check_fragment_import(c: _Checker, raw: Any, path: str) -> FragmentImport | None:
    keys = ("issuer", "feed", "minimum_svn", "includes")
    d = c.obj(raw, path, keys, keys)
    if d is None:
        return None
    issuer = c.string(d, "issuer", path, None, nonempty=True)
    feed = c.string(d, "feed", path, None, nonempty=True)
    svn = d.get("minimum_svn")
    if isinstance(svn, bool) or not isinstance(svn, str | int):
        c.problem(join(path, "minimum_svn"), f"expected an SVN (a number, or a string holding one), got {svn!r}")
        svn = None
    # Names other than containers, fragments and external_processes add nothing (the framework skips them).
    includes = c.strings(d, "includes", path)
    if issuer is None or feed is None or svn is None or includes is None:
        return None
    return FragmentImport(issuer, feed, svn, includes)


# What a constant rule's results may say, per result (hcsshim reads these; others are kept and unused).
_RESULT_CHECKS: dict[str, Callable[[object], bool]] = {
    "env_list": lambda v: v is None or (isinstance(v, list) and all(isinstance(e, str) for e in v)),
    "caps_list": lambda v: v is None or (isinstance(v, dict) and set(v) <= set(defaults.CAPABILITY_SETS) and all(
        isinstance(x, list) and all(isinstance(e, str) for e in x) for x in v.values())),
    "allow_stdio_access": lambda v: isinstance(v, bool),
}


def _check_rules(c: _Checker, raw: Any) -> tuple[tuple[str, PointRule], ...] | None:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        c.problem("rules", f"expected an object, got {raw!r}")
        return None
    out = []
    for point in sorted(raw):
        path, value = f"rules.{point}", raw[point]
        if point not in ENFORCEMENT_POINTS:
            c.problem(path, "not an enforcement point of ACI's api.rego")
            continue
        if value is None or value == "framework":
            out.append((point, PointRule(None, framework=value == "framework")))
            continue
        if not isinstance(value, dict) or not isinstance(value.get("allowed"), bool):
            c.problem(path, 'expected null (no rule), "framework" or a constant answer {"allowed": true|false, ...}')
            continue
        if "metadata" in value:
            c.problem(join(path, "metadata"), "a constant rule that changes the framework's metadata is not supported")
            continue
        for key, valid in _RESULT_CHECKS.items():
            if key in value and not valid(value[key]):
                c.problem(join(path, key), f"{value[key]!r} is not a valid {key}")
        try:
            _refuse_floats(value, path)
        except ValueError as e:
            c.problem(path, str(e))
            continue
        out.append((point, PointRule(value["allowed"], tuple(sorted((k, v) for k, v in value.items()
                                                                    if k != "allowed")))))
    return tuple(out)


def _evaluates_nothing(d: Mapping[str, object]) -> bool:
    """A policy whose framework_version is newer than the framework's: ACI's framework matches none of its
    containers, external processes or fragment imports (only their layers still mount), so such a policy
    can be held as long as it lists none."""
    return not any(d.get(key) for key in ("containers", "external_processes", "fragments"))


TOP_LEVEL = ("api_version", "framework_version", "containers", "external_processes", "fragments", "rules",
             "ignored_container_layers", "volumes", "key_brokers", *FLAGS)


def validate_policy(raw: Any, *, source: str = "policy") -> Policy:
    """Validate a parsed policy document; raise InvalidDocument listing every problem with its JSON path."""
    c = _Checker()
    hint = "see docs/policy.md for the policy format"
    d = c.obj(raw, "", TOP_LEVEL, ("api_version", "framework_version", "containers"))
    if d is None:
        raise InvalidDocument(source, c.problems, hint=hint)
    versions = {}
    for key, newest in (("api_version", defaults.API_VERSION), ("framework_version", defaults.FRAMEWORK_VERSION)):
        text = c.string(d, key, "", None)
        if text is None:
            continue
        try:
            versions[key] = parse_version(text)
        except ValueError as e:
            c.problem(key, str(e))
            continue
        if versions[key] > parse_version(newest) and not (key == "framework_version" and _evaluates_nothing(d)):
            c.problem(key, f"{text} is newer than this engine supports ({newest})")
        elif versions[key] < (0, 1, 0):
            c.problem(key, f"{text} predates every framework release (0.1.0)")
    version = versions.get("framework_version", parse_version(defaults.FRAMEWORK_VERSION))
    containers = c.items(d, "containers", "", lambda r, p: _check_container(c, r, p, version))
    externals = c.items(d, "external_processes", "", lambda r, p: _check_external_process(c, r, p))
    volumes = c.items(d, "volumes", "", lambda r, p: _check_volume(c, r, p))
    key_brokers = c.items(d, "key_brokers", "", lambda r, p: _check_key_broker(c, r, p))
    for i, b in enumerate(key_brokers or ()):
        if b in (key_brokers or ())[:i]:
            c.problem(f"key_brokers[{i}]", f"broker {b.public_key_sha256} is listed twice")
    fragments = c.items(d, "fragments", "", lambda r, p: _check_fragment_import(c, r, p))
    rules = _check_rules(c, d.get("rules"))
    ignored_layers = c.strings(d, "ignored_container_layers", "", unique=True)
    flags = {flag: c.get(d, flag, "", bool, False) for flag in FLAGS}
    if flags["allow_capability_dropping"] and version < CAPABILITY_DROPPING_SINCE:
        c.problem("allow_capability_dropping", "needs framework_version 0.2.2 or later")
    seen_names: set[str] = set()
    seen_targets: set[str] = set()
    for i, v in enumerate(volumes or ()):
        if v.name in seen_names:
            c.problem(f"volumes[{i}].name", f"duplicate volume name {v.name!r}")
        if v.target in seen_targets:
            c.problem(f"volumes[{i}].target", f"{v.target} is the target of two volumes")
        seen_names.add(v.name)
        seen_targets.add(v.target)
    if c.problems or containers is None:    # containers is required: None only with a problem noted
        raise InvalidDocument(source, c.problems, hint=hint)
    return Policy(api_version=d["api_version"], framework_version=d["framework_version"], containers=containers,
                  external_processes=externals or (), fragments=fragments or (), rules=rules or (),
                  ignored_container_layers=ignored_layers or (), volumes=volumes or (),
                  key_brokers=key_brokers or (), **flags)
