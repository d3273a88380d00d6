"""The enforcement engine: every host request is checked against the policy, with ACI's semantics.

It follows hcsshim's framework.rego (0.5.0) rule by rule, re-implemented in plain Python:
- candidate-set narrowing: mount_overlay records every policy container whose layers match the
  mounted devices; create_container, exec_in_container and signal_container_process narrow that set;
- tracked state: mounted devices, overlays, candidate sets, started containers, scratch mounts;
- transactions: a decision's state changes are committed only when it allows and the caller's action
  succeeds; if the action raises, nothing changes and the exception propagates;
- env and capability dropping when the policy allows it, with the framework's "largest set, and all
  largest sets must agree" rule; ambiguity on allow_stdio_access denies;
- version-dependent defaults for older framework_versions (framework.rego check_container);
- fragments: load_fragment accepts a fragment some import names (issuer, feed, SVN) and adds what the
  import includes (containers, external processes, further imports) to the candidates;
- a policy module's own rules: a point answered by a constant, or without a rule, is decided as
  api.rego decides it (securitypolicyenforcer_rego.go applyDefaults).
Regexes match whole values (see regex.py; one deliberate difference from the framework).

Every decision explains itself: a denial names the first failing field with expected and actual.
Beyond ACI, parma-sandbox pins every group volume (`volumes` in the policy) by kind: a `files`
volume's device may only be mounted at its own target with its own root hash; any other volume only
comes to exist through create_volume (an extra enforcement point) with the kind the policy gives it.
A volume the policy does not list may be created only where no container may bind it directly (ACI's
policies reach volumes only through kind-typed sources, which the agent checks). A container may
bind-mount a volume target only while that volume exists as pinned.
"""

from __future__ import annotations

import difflib
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sandbox.shared.errors import InputError, InvalidDocument, StateError
from sandbox.shared.jsonstrict import JsonObject
from sandbox.shared.messages import (
    Capabilities,
    ContainerMount,
    DumpStacksRequest,
    GetPropertiesRequest,
    MountOverlayRequest,
    ShutdownContainerRequest,
    UnmountDeviceRequest,
    UnmountOverlayRequest,
)
from sandbox.shared.policy import defaults
from sandbox.shared.policy.inputs import (
    INHERIT,
    CreateContainerInput,
    CreateVolumeInput,
    EnforcementInput,
    ExecExternalInput,
    ExecInContainerInput,
    LoadFragmentInput,
    MountDeviceInput,
    NamedId,
    RuntimeLoggingInput,
    ScratchMountInput,
    ScratchUnmountInput,
    SignalContainerProcessInput,
    enforcement_point,
    parse_input,
    point_of,
)
from sandbox.shared.policy.model import (
    CAPABILITY_DROPPING_SINCE,
    DEFAULT_SIGNALS_UNTIL,
    VERSIONED_FIELDS,
    AnyEnvRule,
    Container,
    EnvRule,
    ExternalProcess,
    IdName,
    IdStrategy,
    NameValueEnvRule,
    Policy,
    Strategy,
    parse_policy,
    parse_version,
    policy_hash,
    validate_policy,
)
from sandbox.shared.policy.points import EnforcementPoint as EP
from sandbox.shared.policy.points import VolumeKind
from sandbox.shared.policy.regex import whole_matcher
from sandbox.shared.protocol import VOLUME_TARGET_RE
from sandbox.shared.rego.framework import ENFORCEMENT_POINTS

T = TypeVar("T")


@dataclass(frozen=True)
class Results:
    """What an allowed create_container, exec_in_container or exec_external tells the agent to apply:
    the env and capabilities after dropping (framework.rego env_list, caps_list) and stdio access."""

    env_list: tuple[str, ...] | None = None
    caps_list: Capabilities | None = None
    allow_stdio_access: bool | None = None


NO_RESULTS = Results()


@dataclass(frozen=True)
class Decision:
    """The outcome of one request. `changes` lists the state changes it commits (if allowed)."""

    ep: EP
    allowed: bool
    reason: str = ""
    grant: Results = NO_RESULTS
    changes: tuple[str, ...] = ()

    @property
    def env_list(self) -> tuple[str, ...] | None:
        return self.grant.env_list

    @property
    def caps_list(self) -> Capabilities | None:
        return self.grant.caps_list

    @property
    def allow_stdio_access(self) -> bool:
        return bool(self.grant.allow_stdio_access)

    @property
    def results(self) -> dict[str, object]:
        """The results in JSON form (docs/policy-trace.md), only those the point produces."""
        g = self.grant
        out: dict[str, object] = {}
        if g.env_list is not None:
            out["env_list"] = list(g.env_list)
        if g.caps_list is not None:
            out["caps_list"] = {k: list(v) for k, v in g.caps_list.sets().items()}
        if g.allow_stdio_access is not None:
            out["allow_stdio_access"] = g.allow_stdio_access
        return out

    def to_json(self) -> dict[str, object]:
        return {"ep": self.ep.value, "allowed": self.allowed, "reason": self.reason, "results": self.results,
                "changes": list(self.changes)}


# ---------------------------------------------------------------------------------------------------------
# Compiled policy pieces


def _fmt(values: tuple[str, ...] | list[str] | None) -> str:
    if values is None:
        return "null (which matches no argv)"
    return "[" + ", ".join(repr(v) for v in values) + "]"


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _matcher(pattern: str, strategy: Strategy) -> Callable[[str], bool]:
    return pattern.__eq__ if strategy == Strategy.string else whole_matcher(pattern)


def _shown_rule(pattern: str, strategy: Strategy) -> str:
    return repr(pattern) if strategy == Strategy.string else f"{pattern!r} (re2)"


class _EnvRule:
    __slots__ = ("text", "required", "matches")

    def __init__(self, rule: AnyEnvRule) -> None:
        self.required = rule.required
        if isinstance(rule, NameValueEnvRule):
            name, value = _matcher(rule.name, rule.name_strategy), _matcher(rule.value, rule.value_strategy)

            def matches(env: str) -> bool:
                key, eq, val = env.partition("=")
                return bool(eq) and name(key) and value(val)

            self.matches: Callable[[str], bool] = matches
            self.text = (f"name {_shown_rule(rule.name, rule.name_strategy)} with value "
                         f"{_shown_rule(rule.value, rule.value_strategy)}")
        else:
            self.matches = _matcher(rule.pattern, rule.strategy)
            self.text = _shown_rule(rule.pattern, rule.strategy)


class _EnvRules:
    """A container's env rules, indexed: exact `string` patterns in a set, the others in a list."""

    __slots__ = ("rules", "exact", "others", "required")

    def __init__(self, rules: tuple[AnyEnvRule, ...]) -> None:
        self.rules = tuple(_EnvRule(r) for r in rules)
        self.exact = frozenset(r.pattern for r in rules if isinstance(r, EnvRule) and r.strategy == Strategy.string)
        self.others = tuple(c.matches for c, r in zip(self.rules, rules, strict=True)
                            if not (isinstance(r, EnvRule) and r.strategy == Strategy.string))
        self.required = tuple(r for r in self.rules if r.required)

    def allows(self, env: str) -> bool:
        """framework.rego: some rule in env_rules matches env."""
        if env in self.exact:
            return True
        for match in self.others:
            if match(env):
                return True
        return False


class _Mount:
    __slots__ = ("destination", "type", "source", "options", "option_set", "source_ok")

    def __init__(self, destination: str, type_: str, source: str, options: tuple[str, ...],
                 sandbox_dir: str) -> None:
        self.destination, self.type, self.source = destination, type_, source
        self.options = tuple(options)
        self.option_set = frozenset(self.options)
        src = self.source
        if src.startswith(defaults.SANDBOX_PREFIX):
            regex = whole_matcher(re.escape(sandbox_dir) + src[len(defaults.SANDBOX_PREFIX):])
            self.source_ok: Callable[[str], bool] = lambda s: s == src or regex(s)
        else:
            self.source_ok = src.__eq__

    @classmethod
    def of(cls, m: Mapping[str, Any], sandbox_dir: str) -> _Mount:
        return cls(m["destination"], m["type"], m["source"], m["options"], sandbox_dir)

    def allows(self, m: ContainerMount) -> bool:
        """framework.rego mountConstraint_ok."""
        options = m.options
        return (m.destination == self.destination and m.destination != "" and m.type == self.type
                and self.source_ok(m.source)
                and (options == self.options   # the same list in the same order: the same as a set
                     or (len(options) == len(self.options) and frozenset(options) == self.option_set)))

    def mismatch(self, m: ContainerMount) -> str | None:
        """framework.rego mountConstraint_ok, explained."""
        if m.destination != self.destination or not m.destination:
            return f"destination {m.destination!r} is not {self.destination!r}"
        if m.type != self.type:
            return f"type {m.type!r} is not {self.type!r}"
        if not self.source_ok(m.source):
            return f"source {m.source!r} does not match {self.source!r}"
        if len(m.options) != len(self.options) or frozenset(m.options) != self.option_set:
            return f"options {_fmt(m.options)} are not {_fmt(self.options)}"
        return None

    def describe(self) -> str:
        return f"{self.type} {self.source!r} at {self.destination!r}"


_MountIndex = dict[str, tuple[_Mount, ...]]


def _index_mounts(mounts: Iterable[_Mount]) -> _MountIndex:
    """Mount constraints by destination, each destination's in their order."""
    index: dict[str, list[_Mount]] = {}
    for m in mounts:
        index.setdefault(m.destination, []).append(m)
    return {d: tuple(ms) for d, ms in index.items()}


class _IdName:
    __slots__ = ("pattern", "strategy", "matches")

    def __init__(self, i: IdName) -> None:
        pattern = self.pattern = i.pattern
        self.strategy = i.strategy
        if i.strategy == IdStrategy.any:
            self.matches: Callable[[NamedId], bool] = lambda v: True
        elif i.strategy == IdStrategy.id:
            self.matches = lambda v: v.id == pattern
        elif i.strategy == IdStrategy.name:
            self.matches = lambda v: v.name == pattern
        else:
            m = whole_matcher(pattern)
            self.matches = lambda v: m(v.name)

    def __str__(self) -> str:
        return "any" if self.strategy == IdStrategy.any else f"{self.strategy.value} {self.pattern!r}"


class _Candidate:
    """One policy container with the framework's version defaults applied and its regexes compiled."""

    def __init__(self, index: int, c: Container, version: tuple[int, int, int], sandbox_dir: str,
                 default_mounts: tuple[_Mount, ...], privileged_mounts: tuple[_Mount, ...], origin: str = "") -> None:
        self.index = index
        self.label = c.name if c.name else f"{origin}containers[{index}]"
        self.layers = c.layers
        self.command = c.command
        self.env_rules = _EnvRules(c.env_rules)
        self.working_dir = c.working_dir
        self.mounts = tuple(_Mount(m.destination, m.type, m.source, m.options, sandbox_dir) for m in c.mounts)
        # What a create's mount may match (besides the container's /etc binds), by destination: its own mounts,
        # then the runtime's default mounts; the privileged mounts only for allow_elevated.
        self.mount_index = _index_mounts(self.mounts + default_mounts)
        self.privileged_index = _index_mounts(privileged_mounts) if c.allow_elevated else {}
        self.exec_processes = tuple((p.command, frozenset(p.signals)) for p in c.exec_processes)
        signals = c.signals + ((9, 15) if version < DEFAULT_SIGNALS_UNTIL else ())
        self.signals = frozenset(signals)
        self.signal_list = tuple(sorted(self.signals))
        self.allow_elevated = c.allow_elevated
        self.allow_stdio_access = c.allow_stdio_access
        has = {k: version >= since for k, since in VERSIONED_FIELDS.items()}
        self.no_new_privileges = bool(c.no_new_privileges) if has["no_new_privileges"] else False
        user = c.user if has["user"] and c.user is not None else None
        self.user_idname = _IdName(user.user_idname if user else IdName("", IdStrategy.any))
        self.group_idnames = tuple(_IdName(g) for g in (user.group_idnames if user else (IdName("", IdStrategy.any),)))
        self.umask = user.umask if user else defaults.DEFAULT_UMASK
        caps = c.capabilities if has["capabilities"] else None
        self.capabilities = caps.sets() if caps is not None else None
        self.seccomp = (c.seccomp_profile_sha256 or "") if has["seccomp_profile_sha256"] else ""

    def caps_for(self, privileged: bool) -> dict[str, tuple[str, ...]]:
        """framework.rego get_capabilities: explicit sets, else the runtime defaults."""
        if self.capabilities is not None:
            return self.capabilities
        return defaults.default_capabilities(privileged and self.allow_elevated)

    def has_exec(self, argv: tuple[str, ...]) -> bool:
        return any(cmd == argv for cmd, _ in self.exec_processes)


class _External:
    def __init__(self, index: int, e: ExternalProcess, origin: str = "") -> None:
        self.label = f"{origin}external_processes[{index}]"
        self.command = e.command
        self.env_rules = _EnvRules(e.env_rules)
        self.working_dir = e.working_dir
        self.allow_stdio_access = e.allow_stdio_access


# What the narrowing helpers narrow: policy containers, or external processes.
_Choice = TypeVar("_Choice", _Candidate, _External)


@dataclass(frozen=True)
class _LoadedFragment:
    """A fragment accepted by load_fragment: what its import's `includes` let it add (framework
    extract_fragment_includes), compiled."""

    issuer: str
    feed: str
    namespace: str
    candidates: tuple[_Candidate, ...]
    externals: tuple[_External, ...]
    imports: tuple[JsonObject, ...]
    layers: frozenset[str]


# ---------------------------------------------------------------------------------------------------------
# State and transactions

_REMOVE = object()


@dataclass(frozen=True)
class ProcessIdentity:
    """How a container's process runs, recorded at create_container: an exec inherits what it leaves out.
    The JSON keys are exec_in_container's input names."""

    env: tuple[str, ...]          # the env_list the container got (after dropping)
    working_dir: str
    user: NamedId
    groups: tuple[NamedId, ...]
    umask: str
    capabilities: Capabilities
    no_new_privileges: bool

    def to_json(self) -> dict[str, object]:
        return {"env": list(self.env), "working_dir": self.working_dir, "user": self.user.to_json(),
                "groups": [g.to_json() for g in self.groups], "umask": self.umask,
                "capabilities": {k: list(v) for k, v in self.capabilities.sets().items()},
                "no_new_privileges": self.no_new_privileges}


class _State:
    __slots__ = ("devices", "volumes", "overlays", "matches", "started", "stdio", "scratch", "process", "stopped",
                 "fragments")

    def __init__(self) -> None:
        self.devices: dict[str, str] = {}                       # target -> dm-verity root hash
        self.volumes: dict[str, str] = {}                       # target -> kind of a created volume
        self.overlays: dict[str, str] = {}                      # overlay target -> container id
        self.matches: dict[str, tuple[_Candidate, ...]] = {}    # container id -> remaining candidates
        self.started: dict[str, bool] = {}                      # container id -> privileged (until shut down)
        self.stdio: dict[str, bool] = {}                        # container id -> allow_stdio_access
        self.scratch: dict[str, bool] = {}                      # scratch target -> encrypted
        self.process: dict[str, ProcessIdentity] = {}           # container id -> identity it was created with
        self.stopped: dict[str, bool] = {}                      # container id -> shut down (may be created again)
        self.fragments: dict[int, _LoadedFragment] = {}         # load order -> accepted fragment


StateChange = tuple[str, str | int, Any]     # (state table, key, new value or _REMOVE)
RuleFn = Callable[[Any], tuple[Results, list[StateChange]]]


def _describe(change: StateChange) -> str:
    table, key, value = change
    if value is _REMOVE:
        return f"{table}: removed {key!r}"
    if table == "matches":
        return f"matches: {key!r} -> {', '.join(repr(c.label) for c in value)}"
    if table == "started":
        return f"started: {key!r} (privileged={str(value).lower()})"
    if table == "stdio":
        return f"stdio: {key!r} -> {str(value).lower()}"
    if table == "process":
        user = value.user
        return f"process: {key!r} runs as {user.name or user.id!r} (id {user.id}), umask {value.umask}"
    if table == "scratch":
        return f"scratch: {key!r} (encrypted={str(value).lower()})"
    if table == "stopped":
        return f"stopped: {key!r}"
    if table == "volumes":
        return f"volumes: {key!r} ({value})"
    if table == "fragments":
        return (f"fragments: loaded {value.namespace!r} from {value.issuer} ({value.feed}): "
                f"{len(value.candidates)} container(s), {len(value.externals)} external process(es), "
                f"{len(value.imports)} fragment import(s)")
    return f"{table}: {key!r} -> {value!r}"


class _Deny(Exception):
    """Raised inside a rule with the explanation; turned into a denied Decision."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------
# The engine


class PolicyEngine:
    """Checks host requests against one policy. Thread-safe; one decision (and its action) at a time."""

    def __init__(self, policy: Policy, *, raw: bytes | None = None,
                 sandbox_dir: str = defaults.DEFAULT_SANDBOX_DIR) -> None:
        self.policy = policy
        self.hash = policy_hash(raw) if raw is not None else None
        version = parse_version(policy.framework_version)
        self._api_version = parse_version(policy.api_version)
        self._sandbox_dir = sandbox_dir
        self._default_mounts = tuple(_Mount.of(m, sandbox_dir) for m in defaults.DEFAULT_MOUNTS)
        self._privileged_mounts = tuple(_Mount.of(m, sandbox_dir) for m in defaults.PRIVILEGED_MOUNTS)
        self._candidates = tuple(self._candidate(i, c, version) for i, c in enumerate(policy.containers))
        self._externals = tuple(_External(i, e) for i, e in enumerate(policy.external_processes))
        self._imports = tuple(f.to_json() for f in policy.fragments)
        # mount_device accepts the layers of every container object of the policy, also of those the framework
        # ignores (it reads data.policy.containers raw there).
        self._layer_hashes = frozenset(h for c in policy.containers for h in c.layers) | frozenset(
            policy.ignored_container_layers)
        self._layer_target = whole_matcher(defaults.LAYER_TARGET_PATTERN)
        self._volumes = {v.target: v for v in policy.volumes}
        self._sandbox_dir = sandbox_dir
        self._env_dropping = policy.allow_environment_variable_dropping
        self._caps_dropping = policy.allow_capability_dropping and version >= CAPABILITY_DROPPING_SINCE
        # Points the policy module answers itself (a constant), or has no rule for.
        self._point_rules = {EP(point): rule for point, rule in policy.rules if point in EP.__members__}
        self._state = _State()
        self._lock = threading.RLock()
        self._in_action = False
        # One rule per input type (inputs.INPUT_TYPES says which point each type is checked at).
        self._rules: dict[type, RuleFn] = {
            MountDeviceInput: self._mount_device, UnmountDeviceRequest: self._unmount_device,
            MountOverlayRequest: self._mount_overlay, UnmountOverlayRequest: self._unmount_overlay,
            ScratchMountInput: self._scratch_mount, ScratchUnmountInput: self._scratch_unmount,
            CreateVolumeInput: self._create_volume, CreateContainerInput: self._create_container, ExecInContainerInput: self._exec_in_container,
            ExecExternalInput: self._exec_external, ShutdownContainerRequest: self._shutdown_container,
            SignalContainerProcessInput: self._signal_container_process,
            GetPropertiesRequest: self._flag_rule("allow_properties_access", EP.get_properties),
            DumpStacksRequest: self._flag_rule("allow_dump_stacks", EP.dump_stacks),
            RuntimeLoggingInput: self._flag_rule("allow_runtime_logging", EP.runtime_logging),
            LoadFragmentInput: self._load_fragment,
        }

    def _candidate(self, index: int, c: Container, version: tuple[int, int, int], origin: str = "") -> _Candidate:
        return _Candidate(index, c, version, self._sandbox_dir, self._default_mounts, self._privileged_mounts, origin)

    @classmethod
    def from_bytes(cls, raw: bytes, *, source: str = "policy",
                   sandbox_dir: str = defaults.DEFAULT_SANDBOX_DIR) -> PolicyEngine:
        """Parse and validate the exact policy bytes (whose SHA-256 is HOST_DATA) and build an engine."""
        return cls(parse_policy(raw, source), raw=raw, sandbox_dir=sandbox_dir)

    # -- the public entry points -----------------------------------------------------------------------

    def enforce(self, input: EnforcementInput,
                action: Callable[[Decision], object] | None = None) -> Decision:
        """Decide one request (a typed input, sandbox/shared/policy/inputs.py). When it is allowed, run
        `action(decision)` and only then commit the state changes; if the action raises, the state is
        left as it was and the exception propagates."""
        return self.transact(input, action)[0]

    def enforce_json(self, ep: str | EP, raw: Any,
                     action: Callable[[Decision], object] | None = None) -> Decision:
        """enforce() on an input spelled in JSON, as in a `policy check` trace (docs/policy-trace.md).
        A malformed input raises PolicyInputError (an InputError)."""
        return self.enforce(parse_input(enforcement_point(ep), raw), action)

    def transact(self, input: EnforcementInput,
                 action: Callable[[Decision], T] | None = None) -> tuple[Decision, T | None]:
        """enforce(), also returning what the action returned (None when denied or without action)."""
        point = point_of(input)
        with self._lock:
            if self._in_action:
                raise StateError(f"{point.value} was enforced from inside the action of another decision",
                                 hint="actions must not call enforce(); decide first, then act")
            try:
                results, changes = self._decide(point, input)
            except _Deny as deny:
                return Decision(point, False, deny.reason), None
            decision = Decision(point, True, "", results, tuple(_describe(c) for c in changes))
            value = None
            if action is not None:
                self._in_action = True
                try:
                    value = action(decision)
                finally:
                    self._in_action = False
            self._commit(changes)
            return decision, value

    def _decide(self, point: EP, input: EnforcementInput) -> tuple[Results, list[StateChange]]:
        """The framework's rule for the point, unless the policy module answers it itself (api.rego via
        securitypolicyenforcer_rego.go applyDefaults: a constant's results over the point's default results;
        no rule: denied if the policy's api_version has the point, else the point's default results)."""
        rule = self._point_rules.get(point)
        if rule is None or rule.framework:     # every point the engine enforces is delegated by the layout
            return self._rules[type(input)](input)
        info = ENFORCEMENT_POINTS[point.value]
        results = dict(info.default_results)
        if rule.allowed is None:
            if self._api_version >= info.introduced:
                raise _Deny(f"{point.value} denied: rule for {point.value} is missing from policy (its api_version "
                            f"{self.policy.api_version} has the point, so a policy without the rule denies it)")
            if info.default_allowed is None:    # rw_mount_device, rw_unmount_device: the framework's rule
                return self._rules[type(input)](input)
            allowed = info.default_allowed
            why = f"the policy's api_version {self.policy.api_version} predates {point.value} (its default)"
        else:
            allowed = rule.allowed
            results.update(rule.results)
            why = f"the policy answers every {point.value} request with {rule.to_json()}"
        if not allowed:
            raise _Deny(f"{point.value} denied: {why}")
        # Like hcsshim's getEnvsToKeep and getCapsToKeep: what the results list, of what the request asked for.
        env, caps = results.get("env_list"), results.get("caps_list")
        env_list = None
        if env is not None and isinstance(input, CreateContainerInput | ExecInContainerInput | ExecExternalInput):
            keep = set(env)
            asked = input.env
            if asked is INHERIT:    # an exec that leaves env out runs with the container's (none recorded: empty)
                own = (self._state.process.get(input.container_id) if isinstance(input, ExecInContainerInput)
                       else None)
                asked = own.env if own is not None else ()
            env_list = _dedupe(e for e in asked if e in keep)
        caps_list = None
        if isinstance(caps, dict) and isinstance(input, CreateContainerInput):
            requested = (input.capabilities.sets() if input.capabilities is not None
                         else defaults.default_capabilities(input.privileged))
            caps_list = Capabilities(**{k: tuple(c for c in v if c in set(caps.get(k) or ()))
                                        for k, v in requested.items()})
        stdio = results.get("allow_stdio_access")
        if isinstance(input, ExecInContainerInput):      # hcsshim answers with the container's, from its create
            stdio = self._state.stdio.get(input.container_id, False)
        grant = Results(env_list=env_list, caps_list=caps_list, allow_stdio_access=stdio)
        changes: list[StateChange] = []
        if isinstance(input, CreateContainerInput):
            # hcsshim remembers the stdio answer of every allowed create (exec_in_container reports it).
            changes.append(("stdio", input.container_id, bool(grant.allow_stdio_access)))
        return grant, changes

    def snapshot(self) -> JsonObject:
        """The tracked state (JSON-able), for logs and `policy check`."""
        with self._lock:
            s = self._state
            return {"devices": dict(s.devices), "volumes": dict(s.volumes), "overlays": dict(s.overlays),
                    "matches": {k: [c.label for c in v] for k, v in s.matches.items()},
                    "started": dict(s.started), "stopped": sorted(s.stopped), "scratch": dict(s.scratch),
                    "processes": {cid: p.to_json() for cid, p in s.process.items()},
                    "fragments": [{"namespace": f.namespace, "issuer": f.issuer, "feed": f.feed}
                                  for f in s.fragments.values()]}

    def _commit(self, changes: list[StateChange]) -> None:
        for table, key, value in changes:
            d = getattr(self._state, table)
            if value is _REMOVE:
                d.pop(key, None)
            else:
                d[key] = value

    # -- devices, overlays, scratch --------------------------------------------------------------------

    def _mount_device(self, a: MountDeviceInput) -> tuple[Results, list[StateChange]]:
        target, digest = a.target, a.device_hash
        deny = f"mount_device denied for target {target!r}"
        if target in self._state.devices:
            raise _Deny(f"{deny}: a device is already mounted there ({self._state.devices[target]})")
        volume = self._volumes.get(target)
        if volume is not None:
            if volume.kind != VolumeKind.files:
                raise _Deny(f"{deny}: volume {volume.name!r} is a {volume.kind.value} volume, which the guest "
                            "creates itself; only files volumes are devices")
            if target in self._state.volumes:
                raise _Deny(f"{deny}: volume {volume.name!r} was created there already")
            if digest != volume.device_hash:
                raise _Deny(f"{deny}: device hash {digest!r} is not the hash pinned for volume {volume.name!r} "
                            f"({volume.device_hash})")
        elif re.fullmatch(VOLUME_TARGET_RE, target) and self._allows_shares():
            # A share (ACI's azureFile or gitRepo volume): its content is the owner's, unmeasured on ACI too;
            # the policy checks where containers bind it (sandbox:///tmp/atlas/azureFileVolume/...).
            pass
        else:
            if not self._known_layer(digest):
                raise _Deny(f"{deny}: device hash {digest!r} is not a layer of any container in the policy"
                            + (" or in a loaded fragment" if self._state.fragments else ""))
            if not self._layer_target(target):
                raise _Deny(f"{deny}: layer devices may only be mounted at targets matching "
                            f"{defaults.LAYER_TARGET_PATTERN!r}")
        return NO_RESULTS, [("devices", target, digest)]

    def _known_layer(self, digest: str) -> bool:
        """framework.rego deviceHash_ok: a layer of the policy's containers or of a loaded fragment's."""
        return digest in self._layer_hashes or any(digest in f.layers for f in self._state.fragments.values())

    def _allows_shares(self) -> bool:
        """Whether some container may bind an unmeasured share volume (ACI's azureFile or gitRepo sources)."""
        return any(m.source.startswith(defaults.ACI_SHARE_SOURCES) for c in self._all_candidates() for m in c.mounts)

    def _all_candidates(self) -> tuple[_Candidate, ...]:
        """framework.rego candidate_containers: the policy's, then those of loaded fragments."""
        loaded = self._state.fragments
        return self._candidates + tuple(c for f in loaded.values() for c in f.candidates) if loaded \
            else self._candidates

    def _all_externals(self) -> tuple[_External, ...]:
        """framework.rego candidate_external_processes."""
        return self._externals + tuple(e for f in self._state.fragments.values() for e in f.externals)

    def _unmount_device(self, a: UnmountDeviceRequest) -> tuple[Results, list[StateChange]]:
        target = a.target
        if target not in self._state.devices:
            raise _Deny(f"unmount_device denied for target {target!r}: no device is mounted there")
        return NO_RESULTS, [("devices", target, _REMOVE)]

    def _mount_overlay(self, a: MountOverlayRequest) -> tuple[Results, list[StateChange]]:
        cid, paths, target = a.container_id, a.layer_paths, a.target
        deny = f"mount_overlay denied for container {cid!r}"
        if cid in self._state.matches:
            raise _Deny(f"{deny}: it already has an overlay")
        if target in self._state.overlays:
            raise _Deny(f"{deny}: target {target!r} already has an overlay")
        devices = self._state.devices
        unmounted = [p for p in paths if p not in devices]
        if unmounted:
            raise _Deny(f"{deny}: layer path {unmounted[0]!r} has no device mounted")
        stack = tuple(devices[p] for p in reversed(paths))  # layer_paths are top-most first
        matched = tuple(c for c in self._all_candidates() if c.layers == stack)
        if not matched:
            raise _Deny(f"{deny}: {self._explain_layers(stack)}")
        return NO_RESULTS, [("matches", cid, matched), ("overlays", target, cid)]

    def _explain_layers(self, stack: tuple[str, ...]) -> str:
        """Name the policy container closest to the requested layer stack and how it differs."""
        candidates = self._all_candidates()
        if not candidates:
            return "the policy allows no containers"
        # The same layers in another order say the most; otherwise the closest stack.
        best = max(candidates, key=lambda c: (sorted(c.layers) == sorted(stack),
                                              difflib.SequenceMatcher(a=c.layers, b=stack).ratio()))
        want = best.layers
        if sorted(want) == sorted(stack):
            return (f"layers of {best.label!r} are in a different order "
                    f"(expected base-first {_fmt(_abbrev(want))}, got {_fmt(_abbrev(stack))})")
        if not set(want) & set(stack):
            return f"the layer stack {_fmt(_abbrev(stack))} (base first) matches no container in the policy"
        parts = []
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=want, b=stack).get_opcodes():
            if tag == "insert":
                parts.append(f"{j2 - j1} extra layer(s) {_fmt(_abbrev(stack[j1:j2]))} at position {j1}")
            elif tag == "delete":
                parts.append(f"{i2 - i1} missing layer(s) {_fmt(_abbrev(want[i1:i2]))} at position {i1}")
            elif tag == "replace":
                parts.append(f"layer(s) {_fmt(_abbrev(stack[j1:j2]))} at position {j1} instead of "
                             f"{_fmt(_abbrev(want[i1:i2]))}")
        return f"layers do not match {best.label!r} (positions count from the base): " + "; ".join(parts)

    def _unmount_overlay(self, a: UnmountOverlayRequest) -> tuple[Results, list[StateChange]]:
        target = a.target
        if target not in self._state.overlays:
            raise _Deny(f"unmount_overlay denied for target {target!r}: no overlay is mounted there")
        return NO_RESULTS, [("overlays", target, _REMOVE)]

    def _create_volume(self, a: CreateVolumeInput) -> tuple[Results, list[StateChange]]:
        target, kind = a.target, a.kind
        deny = f"create_volume denied for {target!r}"
        if target in self._state.volumes or target in self._state.devices:
            raise _Deny(f"{deny}: a volume exists there already")
        volume = self._volumes.get(target)
        if volume is None:
            # Unpinned: only if no container may bind this path as it is. Then the volume is reachable only
            # through ACI's sources (`sandbox:///tmp/atlas/<kind>/<volume>`), whose pattern pins the kind
            # and which the agent resolves only to a volume of that kind.
            binders = [c.label for c in self._all_candidates() if any(m.source_ok(target) for m in c.mounts)]
            if binders:
                listed = ", ".join(sorted(v.name for v in self._volumes.values())) or "none"
                raise _Deny(f"{deny}: {', '.join(repr(b) for b in binders)} may bind it, but the policy does not "
                            f"pin its kind (its volumes: {listed})")
            return NO_RESULTS, [("volumes", target, kind.value)]
        if volume.kind == VolumeKind.files:
            raise _Deny(f"{deny}: volume {volume.name!r} is a files volume: only its pinned device may be "
                        "mounted there (mount_device)")
        if kind != volume.kind:
            raise _Deny(f"{deny}: volume {volume.name!r} is a {volume.kind.value} volume in the policy, "
                        f"not {kind.value}")
        return NO_RESULTS, [("volumes", target, kind.value)]

    def _scratch_mount(self, a: ScratchMountInput) -> tuple[Results, list[StateChange]]:
        target, encrypted = a.target, a.encrypted
        if target in self._state.scratch:
            raise _Deny(f"scratch_mount denied for target {target!r}: scratch is already mounted there")
        if not encrypted and not self.policy.allow_unencrypted_scratch:
            raise _Deny(f"scratch_mount denied for target {target!r}: encrypted is false but the policy "
                        "requires encrypted scratch (allow_unencrypted_scratch is false)")
        return NO_RESULTS, [("scratch", target, encrypted)]

    def _scratch_unmount(self, a: ScratchUnmountInput) -> tuple[Results, list[StateChange]]:
        target = a.target
        if target not in self._state.scratch:
            raise _Deny(f"scratch_unmount denied for target {target!r}: no scratch is mounted there")
        return NO_RESULTS, [("scratch", target, _REMOVE)]

    # -- containers -----------------------------------------------------------------------------------

    def _create_container(self, a: CreateContainerInput) -> tuple[Results, list[StateChange]]:
        cid = a.container_id
        state = self._state
        if cid in state.started:
            raise _Deny(f"create_container denied for container {cid!r}: it was already created (and has not "
                        "been shut down)")
        candidates = state.matches.get(cid)
        if not candidates:
            again = " since it was shut down" if cid in state.stopped else ""
            raise _Deny(f"create_container denied for container {cid!r}: no overlay has been mounted for it{again}")
        self._check_volume_mounts(cid, a.mounts)
        privileged = a.privileged
        who = _container_subject(cid)
        etc = _index_mounts(self._etc_mounts(cid))     # the request's own default mounts, built once per request
        survivors = _narrow("create_container", who, candidates, lambda c: self._create_mismatch(c, a, etc))
        env_list, survivors = self._narrow_env("create_container", who, survivors, a.env)
        caps_list, survivors = self._narrow_caps("create_container", who, survivors, a.capabilities, privileged)
        stdio = _stdio_agreement("create_container", who, survivors)
        identity = ProcessIdentity(env_list, a.working_dir, a.user, a.groups, a.umask, caps_list,
                                   a.no_new_privileges)
        changes: list[StateChange] = [("matches", cid, survivors), ("started", cid, privileged), ("stdio", cid, stdio),
                                      ("process", cid, identity)]
        if cid in state.stopped:        # a restart: the id is no longer a stopped one
            changes.append(("stopped", cid, _REMOVE))
        return Results(env_list, caps_list, stdio), changes

    def _check_volume_mounts(self, cid: str, mounts: tuple[ContainerMount, ...]) -> None:
        for m in mounts:
            volume = self._volumes.get(m.source)
            if volume is None:
                # An unpinned group volume (created, or a share's device) is the host's to fill: bound by
                # its path it would pass for whatever a fragment added later expects there. It is
                # reachable only through ACI's kind-typed sources, which the agent resolves.
                if re.fullmatch(VOLUME_TARGET_RE, m.source):
                    raise _Deny(f"create_container denied for container {cid!r}: mount at {m.destination!r} "
                                f"binds {m.source}, a volume the policy does not pin (its volumes: "
                                f"{', '.join(sorted(v.name for v in self._volumes.values())) or 'none'})")
                continue
            if volume.kind == VolumeKind.files:
                if self._state.devices.get(m.source) != volume.device_hash:
                    raise _Deny(f"create_container denied for container {cid!r}: mount at {m.destination!r} "
                                f"binds volume {volume.name!r} ({m.source}), but its pinned device is not "
                                "mounted there")
            elif self._state.volumes.get(m.source) != volume.kind.value:
                raise _Deny(f"create_container denied for container {cid!r}: mount at {m.destination!r} binds "
                            f"volume {volume.name!r} ({m.source}), but no {volume.kind.value} volume has been "
                            "created there")

    def _create_mismatch(self, c: _Candidate, a: CreateContainerInput, etc: _MountIndex) -> str | None:
        """The first field of a create request that this candidate does not allow (framework.rego
        create_container's initial narrowing), or None. `etc`: the container's /etc binds, by destination."""
        if a.argv != c.command:
            return f"argv {_fmt(a.argv)} does not match command {_fmt(c.command)}"
        if a.working_dir != c.working_dir:
            return f"working_dir {a.working_dir!r} does not match {c.working_dir!r}"
        why = _user_mismatch(c, a.user, a.groups, a.umask)
        if why:
            return why
        if a.privileged and not c.allow_elevated:
            return "privileged is requested but allow_elevated is false"
        if c.no_new_privileges and not a.no_new_privileges:
            return "no_new_privileges is false but the policy requires true"
        for mount in a.mounts:
            why = self._mount_mismatch(c, mount, etc)
            if why:
                return why
        if a.seccomp_profile_sha256 != c.seccomp:
            return f"seccomp_profile_sha256 {a.seccomp_profile_sha256!r} does not match {c.seccomp!r}"
        return None

    def _etc_mounts(self, cid: str) -> tuple[_Mount, ...]:
        """The container's own /etc/hostname, /etc/hosts and /etc/resolv.conf binds: default mounts, as
        hcsshim adds them to the framework's (ExtendDefaultMounts) before it checks a create."""
        return tuple(_Mount.of(m, self._sandbox_dir) for m in defaults.etc_file_mounts(cid))

    def _mount_mismatch(self, c: _Candidate, mount: ContainerMount, etc: _MountIndex) -> str | None:
        """framework.rego mountList_ok for one mount: some constraint of the candidate's own mounts, the default
        mounts, the container's /etc binds and (allow_elevated) the privileged mounts allows it. Only a
        constraint with the mount's destination can, so each list is indexed by destination (in its order)."""
        dest = mount.destination
        allowed = c.mount_index.get(dest, ()) + etc.get(dest, ()) + c.privileged_index.get(dest, ())
        for constraint in allowed:
            if constraint.allows(mount):
                return None
        # Denied: explain against the constraints for the same destination.
        if allowed:
            return f"mount at {dest!r}: {allowed[0].mismatch(mount)}"
        return f"mount {mount.type} {mount.source!r} at {dest!r} matches no allowed mount destination"

    def _narrow_env(self, ep: str, who: Subject, survivors: tuple[_Choice, ...],
                    env: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[_Choice, ...]]:
        """framework.rego valid_envs_for_all + envList_ok."""
        if self._env_dropping:
            kept_sets = [frozenset(e for e in env if c.env_rules.allows(e)) for c in survivors]
            largest = max(len(s) for s in kept_sets)
            biggest = {s for s in kept_sets if len(s) == largest}
            if len(biggest) > 1:
                raise _Deny(f"{ep} denied for {who(survivors)}: env after dropping is ambiguous "
                            f"(candidates keep different sets of {largest} variables)")
            keep = next(iter(biggest))
            env_list = _dedupe(e for e in env if e in keep)
        else:
            env_list = _dedupe(env)
        return env_list, _narrow(ep, who, survivors, lambda c: _env_mismatch(c.env_rules, env_list))

    def _narrow_caps(self, ep: str, who: Subject, survivors: tuple[_Candidate, ...],
                     capabilities: Capabilities | None,
                     privileged: bool) -> tuple[Capabilities, tuple[_Candidate, ...]]:
        """framework.rego valid_caps_for_all + caps_ok."""
        requested = (defaults.default_capabilities(privileged) if capabilities is None
                     else capabilities.sets())
        if self._caps_dropping:
            filtered = []
            for c in survivors:
                allowed = c.caps_for(privileged)
                filtered.append({k: frozenset(requested[k]) & frozenset(allowed[k]) for k in requested})
            largest = max(sum(len(v) for v in f.values()) for f in filtered)
            biggest = [f for f in filtered if sum(len(v) for v in f.values()) == largest]
            if any(f != biggest[0] for f in biggest[1:]):
                raise _Deny(f"{ep} denied for {who(survivors)}: capabilities after dropping are "
                            "ambiguous (candidates keep different sets)")
            caps_list = {k: tuple(cap for cap in _dedupe(requested[k]) if cap in biggest[0][k]) for k in requested}
            checked = caps_list
        else:
            caps_list = {k: _dedupe(v) for k, v in requested.items()}
            checked = requested
        survivors = _narrow(ep, who, survivors, lambda c: _caps_mismatch(c.caps_for(privileged), checked))
        return Capabilities(**caps_list), survivors

    def _exec_in_container(self, a: ExecInContainerInput) -> tuple[Results, list[StateChange]]:
        cid = a.container_id
        state = self._state
        if cid not in state.started:
            raise _Deny(f"exec_in_container denied for container {cid!r}: {_not_running(state, cid)}")
        candidates = state.matches.get(cid)
        if not candidates:
            raise _Deny(f"exec_in_container denied for container {cid!r}: it has been shut down")
        privileged = state.started[cid]
        own = state.process[cid]
        argv = a.argv
        env = own.env if a.env is INHERIT else a.env
        working_dir = own.working_dir if a.working_dir is INHERIT else a.working_dir
        user = own.user if a.user is INHERIT else a.user
        groups = own.groups if a.groups is INHERIT else a.groups
        umask = own.umask if a.umask is INHERIT else a.umask
        capabilities = own.capabilities if a.capabilities is INHERIT else a.capabilities
        no_new_privileges = own.no_new_privileges if a.no_new_privileges is INHERIT else a.no_new_privileges

        def mismatch(c: _Candidate) -> str | None:
            if not c.has_exec(argv):
                listed = ", ".join(_fmt(cmd) for cmd, _ in c.exec_processes) or "none"
                return f"argv {_fmt(argv)} is not an exec_process (allowed: {listed})"
            if working_dir != c.working_dir:
                return f"working_dir {working_dir!r} does not match {c.working_dir!r}"
            if c.no_new_privileges and not no_new_privileges:
                return "no_new_privileges is false but the policy requires true"
            return _user_mismatch(c, user, groups, umask)

        who = _container_subject(cid)
        survivors = _narrow("exec_in_container", who, candidates, mismatch)
        env_list, survivors = self._narrow_env("exec_in_container", who, survivors, env)
        caps_list, survivors = self._narrow_caps("exec_in_container", who, survivors, capabilities, privileged)
        return Results(env_list, caps_list, state.stdio.get(cid, False)), [("matches", cid, survivors)]

    def _exec_external(self, a: ExecExternalInput) -> tuple[Results, list[StateChange]]:
        argv = a.argv

        def mismatch(p: _External) -> str | None:
            if argv != p.command:
                return f"argv {_fmt(argv)} is not {_fmt(p.command)}"
            if a.working_dir != p.working_dir:
                return f"working_dir {a.working_dir!r} does not match {p.working_dir!r}"
            return None

        externals = self._all_externals()
        if not externals:
            raise _Deny(f"exec_external denied for {_fmt(argv)}: the policy allows no external processes")

        def who(_c: Sequence[_Candidate | _External]) -> str:
            return f"argv {_fmt(argv)}"
        survivors = _narrow("exec_external", who, externals, mismatch)
        env_list, survivors = self._narrow_env("exec_external", who, survivors, a.env)
        stdio = _stdio_agreement("exec_external", who, survivors)
        return Results(env_list=env_list, allow_stdio_access=stdio), []

    def _shutdown_container(self, a: ShutdownContainerRequest) -> tuple[Results, list[StateChange]]:
        cid = a.container_id
        if cid in self._state.stopped:
            return NO_RESULTS, []       # again: nothing left to forget (the framework allows it too)
        if cid not in self._state.started:
            raise _Deny(f"shutdown_container denied for container {cid!r}: it has not been created")
        # Unlike the framework (where `started` stays, so an id is never created twice), a shut-down id may be
        # created again: the host restarts a container under its own id (restartPolicy), and the new create
        # needs a fresh mount_overlay, which makes every policy container with that layer stack a candidate
        # again, and is then checked exactly like the first. ACI restarts under a new id instead, which the
        # framework allows just the same: re-creating gives the host nothing a new id would not.
        return NO_RESULTS, [("matches", cid, _REMOVE), ("started", cid, _REMOVE), ("stdio", cid, _REMOVE),
                            ("process", cid, _REMOVE), ("stopped", cid, True)]

    def _signal_container_process(self, a: SignalContainerProcessInput) -> tuple[Results, list[StateChange]]:
        cid, sig = a.container_id, a.signal
        if cid not in self._state.started:
            raise _Deny(f"signal_container_process denied for container {cid!r}: {_not_running(self._state, cid)}")
        candidates = self._state.matches.get(cid)
        if not candidates:
            raise _Deny(f"signal_container_process denied for container {cid!r}: it has been shut down")
        if a.is_init:
            def mismatch(c: _Candidate) -> str | None:
                if sig in c.signals:
                    return None
                return f"signal {sig} to the init process is not in signals {list(c.signal_list)}"
        else:
            argv = a.argv

            def mismatch(c: _Candidate) -> str | None:
                procs = [sigs for cmd, sigs in c.exec_processes if cmd == argv]
                if not procs:
                    return f"argv {_fmt(argv)} is not an exec_process"
                if not any(sig in sigs for sigs in procs):
                    return f"signal {sig} is not in the signals {sorted(set().union(*procs))} of exec_process " \
                           f"{_fmt(argv)}"
                return None
        survivors = _narrow("signal_container_process", _container_subject(cid), candidates, mismatch)
        return NO_RESULTS, [("matches", cid, survivors)]

    # -- fragments ------------------------------------------------------------------------------------

    def _load_fragment(self, a: LoadFragmentInput) -> tuple[Results, list[StateChange]]:
        """framework.rego load_fragment (both calls): some import of the policy, or of a loaded fragment that
        included `fragments`, names the issuer and the feed, and the SVN is at least its minimum_svn; then
        what the import's `includes` name is added to what the policy allows."""
        # The reader is loaded with the first fragment, not when the agent boots.
        from sandbox.shared.rego.fragment import FragmentRefused, check_load, read_fragment_text

        deny = f"load_fragment denied for issuer {a.issuer} (feed {a.feed!r})"
        try:
            fragment = read_fragment_text(a.rego, "the fragment's module")
        except InputError as e:
            raise _Deny(f"{deny}: {e.message}") from None
        imports = self._imports + tuple(i for f in self._state.fragments.values() for i in f.imports)
        try:
            accepted = check_load(imports, issuer=a.issuer, feed=a.feed, header_svn=a.header_svn, fragment=fragment)
        except FragmentRefused as e:
            raise _Deny(f"load_fragment denied: {e.message}") from None
        adds = accepted.contributions()
        version = min(parse_version(fragment.framework_version), parse_version(defaults.FRAMEWORK_VERSION))
        doc = {"api_version": self.policy.api_version, "framework_version": ".".join(map(str, version)),
               "containers": list(adds.get("containers", ())),
               "external_processes": list(adds.get("external_processes", ())),
               "fragments": [{k: v for k, v in f.items() if k != "required_receipts"}
                             for f in adds.get("fragments", ())]}
        try:
            held = validate_policy(doc, source=f"fragment {fragment.namespace}")
        except InvalidDocument as e:
            raise _Deny(f"{deny}: parma-sandbox cannot enforce what it adds: {'; '.join(e.problems[:3])}") from None
        origin = f"fragment {fragment.namespace}: "
        candidates = tuple(self._candidate(i, c, version, origin) for i, c in enumerate(held.containers))
        loaded = _LoadedFragment(a.issuer, a.feed, fragment.namespace, candidates,
                                 tuple(_External(i, e, origin) for i, e in enumerate(held.external_processes)),
                                 tuple(f.to_json() for f in held.fragments),
                                 frozenset(h for c in held.containers for h in c.layers))
        return NO_RESULTS, [("fragments", len(self._state.fragments), loaded)]

    def _flag_rule(self, flag: str, ep: EP) -> RuleFn:
        def rule(_a: object) -> tuple[Results, list[StateChange]]:
            if not getattr(self.policy, flag):
                raise _Deny(f"{ep.value} denied: {flag} is false")
            return NO_RESULTS, []
        return rule


# ---------------------------------------------------------------------------------------------------------
# Narrowing helpers


Subject = Callable[["Sequence[_Candidate | _External]"], str]   # names the request in a denial


def _not_running(state: _State, cid: str) -> str:
    """Why a container id that is not in `started` cannot be asked for anything."""
    return "it has been shut down" if cid in state.stopped else "it has not been created"


def _container_subject(cid: str) -> Subject:
    """Name a request by its container id and the policy containers still in question."""
    def who(candidates: Sequence[_Candidate | _External]) -> str:
        labels = [c.label for c in candidates]
        if len(labels) == 1:
            return repr(cid) if labels[0] == cid else f"{cid!r} (policy container {labels[0]!r})"
        return f"{cid!r} (candidates {', '.join(repr(x) for x in labels)})"
    return who


def _narrow(ep: str, who: Subject, candidates: tuple[_Choice, ...],
            mismatch: Callable[[_Choice], str | None]) -> tuple[_Choice, ...]:
    """Keep the candidates that allow the request; deny with every candidate's reason if none does."""
    kept: list[_Choice] = []
    reasons: list[tuple[str, str]] = []
    for c in candidates:
        why = mismatch(c)
        if why is None:
            kept.append(c)
        else:
            reasons.append((c.label, why))
    if kept:
        return tuple(kept)
    if len(reasons) == 1:
        raise _Deny(f"{ep} denied for {who(candidates)}: {reasons[0][1]}")
    detail = "; ".join(f"{label!r}: {why}" for label, why in reasons)
    raise _Deny(f"{ep} denied for {who(candidates)}: no candidate allows it ({detail})")


def _user_mismatch(c: _Candidate, user: NamedId, groups: tuple[NamedId, ...], umask: str) -> str | None:
    """framework.rego user_ok."""
    if umask != c.umask:
        return f"umask {umask!r} does not match {c.umask!r}"
    if not c.user_idname.matches(user):
        return f"user {user.name!r} (id {user.id}) does not match user_idname {c.user_idname}"
    for group in groups:
        if not any(g.matches(group) for g in c.group_idnames):
            allowed = ", ".join(str(g) for g in c.group_idnames) or "none"
            return f"group {group.name!r} (id {group.id}) matches no group_idname ({allowed})"
    return None


def _env_mismatch(rules: _EnvRules, env_list: tuple[str, ...]) -> str | None:
    """framework.rego envList_ok: every env matches some rule, every required rule matches some env."""
    allows = rules.allows
    for env in env_list:
        if not allows(env):
            return f"env {_short(env)!r} matches no env_rule"
    for r in rules.required:
        if not any(r.matches(env) for env in env_list):
            return f"required env_rule {r.text} is matched by no env"
    return None


def _caps_mismatch(allowed: Mapping[str, tuple[str, ...]], requested: Mapping[str, tuple[str, ...]]) -> str | None:
    """framework.rego caps_ok/capsList_ok: per set, same size and the same members."""
    for name in defaults.CAPABILITY_SETS:
        want, got = allowed[name], requested[name]
        if want == got or (len(want) == len(got) and set(want) == set(got)):
            continue
        extra = sorted(set(got) - set(want))
        missing = sorted(set(want) - set(got))
        if extra:
            return f"capabilities.{name}: {', '.join(extra)} not allowed"
        if missing:
            return f"capabilities.{name}: missing {', '.join(missing)} (the policy expects exactly {len(want)})"
        return f"capabilities.{name}: lists a capability more than once"
    return None


def _stdio_agreement(ep: str, who: Subject, survivors: tuple[_Candidate, ...] | tuple[_External, ...]) -> bool:
    values = {c.allow_stdio_access for c in survivors}
    if len(values) > 1:
        raise _Deny(f"{ep} denied for {who(survivors)}: the remaining candidates disagree on "
                    "allow_stdio_access, so the decision is ambiguous")
    return values.pop()


def _dedupe(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _abbrev(hashes: tuple[str, ...] | list[str]) -> list[str]:
    return [h[:12] for h in hashes]
