"""A Rego policy module (ACI's ccePolicy) read as the data and rules ACI's framework evaluates.

What the module says is taken as the framework takes it (hcsshim framework.rego and the enforcer
in securitypolicyenforcer_rego.go): `api_version`/`framework_version` (or the deprecated
`api_svn`/`framework_svn`), `fragments`, `containers`, `external_processes` and the flags, with
the framework's defaults for older versions (sandbox/shared/rego/data.py); and for each
enforcement point whether the module delegates it to the framework, answers it with a constant,
or leaves it out (then api.rego decides: a point the policy's api_version knows is denied, one it
predates gets api.rego's default result). Anything the framework would not evaluate as data
(custom rule logic, delegating one point to another point's rule, parameters) is refused.

`RegoPolicy.document()` is the policy as a JSON document in the vocabulary of the project's
policy model (docs/policy.md), for the engine to enforce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sandbox.shared.errors import InputError
from sandbox.shared.rego import framework as fw
from sandbox.shared.rego.data import DataReader, PolicyDataError, apply_defaults
from sandbox.shared.rego.syntax import Module, Ref, Statement, parse_modules

if TYPE_CHECKING:
    from sandbox.shared.jsonstrict import JsonObject

ACCEPTED_IMPORTS = frozenset({"future.keywords", "future.keywords.every", "future.keywords.in",
                              "future.keywords.if", "future.keywords.contains", "rego.v1"})
REASON_RULES = (Ref(("data", "framework", "errors")), Ref(("data", "framework", "reason")))
VERSION_NAMES = {"api_version": "api_svn", "framework_version": "framework_svn"}
DATA_NAMES = ("fragments", "containers", "external_processes", *fw.FLAGS)
HINT = "see docs/aci.md ('ccePolicy import') for what is accepted"


class RuleKind(StrEnum):
    """How one enforcement point is decided."""

    framework = "framework"     # EP := data.framework.EP
    constant = "constant"       # EP := {"allowed": ...}: the same answer for every request
    default = "default"         # no rule, and the policy's api_version predates the point: api.rego's default
    missing = "missing"         # no rule for a point the policy's api_version has: always denied


@dataclass(frozen=True)
class Rule:
    kind: RuleKind
    allowed: bool | None = None          # for constant and default: the answer (None: the framework decides)
    results: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        if self.kind == RuleKind.framework:
            return "ACI's framework"
        if self.kind == RuleKind.missing:
            return "always denied (no rule, although the policy's api_version has this point)"
        if self.allowed is None:
            return "ACI's framework (no rule; api.rego falls back to it)"
        return "always allowed" if self.allowed else "always denied"


@dataclass(frozen=True)
class RegoPolicy:
    """A policy module: its data (framework defaults applied) and how each enforcement point is decided."""

    package: str
    api_version: str
    framework_version: str
    fragments: tuple[JsonObject, ...]
    containers: tuple[JsonObject, ...]
    external_processes: tuple[JsonObject, ...]
    flags: dict[str, bool]
    rules: dict[str, Rule]
    raw_layers: tuple[str, ...]          # every layer hash of `containers` as written (mount_device reads these)
    warnings: tuple[str, ...] = ()
    extra: JsonObject = field(default_factory=dict)   # parma-sandbox extensions (volumes, key_brokers)

    def document(self) -> JsonObject:
        """The effective policy as a JSON document (field names are the policy model's, docs/policy.md)."""
        # A framework_version newer than the framework's leaves nothing to evaluate (read_policy empties the
        # containers, fragments and external processes); the model holds it as it is, with nothing listed.
        doc: JsonObject = {"api_version": self.api_version, "framework_version": self.framework_version,
                               # required_receipts: always empty here (read_policy refuses others)
                               "fragments": [{k: v for k, v in f.items() if k != "required_receipts"}
                                             for f in self.fragments],
                               "containers": [dict(c) for c in self.containers],
                               "external_processes": [dict(e) for e in self.external_processes]}
        doc.update(self.flags)
        doc.update(self.extra)
        return doc

    def policy_document(self) -> JsonObject:
        """document() plus what only a Rego module says, in the policy model's fields (docs/policy.md):
        `rules`, how the module's rules depart from confcom's layout (a point answered by a constant; a
        point without a rule, null; a delegation the layout does not write, "framework"), and
        `ignored_container_layers`, the layers of container objects the framework ignores (mount_device
        reads `data.policy.containers` raw, so those layers still mount)."""
        doc = self.document()
        api = fw.semver(self.api_version)
        rules: dict[str, object] = {}
        for ep, rule in self.rules.items():
            layout = fw.delegated_by_layout(ep, api)
            if rule.kind == RuleKind.constant:
                rules[ep] = {"allowed": rule.allowed, **dict(rule.results)}
            elif rule.kind == RuleKind.framework and not layout:
                rules[ep] = "framework"
            elif rule.kind in (RuleKind.missing, RuleKind.default) and layout:
                rules[ep] = None
        if rules:
            doc["rules"] = rules
        kept = {h for c in self.containers for h in c["layers"]}
        ignored = [h for h in self.raw_layers if h not in kept]
        if ignored:
            doc["ignored_container_layers"] = ignored
        return doc

    def effective_containers(self) -> list[JsonObject]:
        """The containers with the framework's defaults for what their framework version predates."""
        version = min(fw.semver(self.framework_version), fw.FRAMEWORK_VERSION)
        return [apply_defaults(c, version) for c in self.containers]


def _fail(source: str, stmt: Statement | None, message: str, hint: str = HINT) -> InputError:
    where = f"{source}:{stmt.line}" if stmt is not None else source
    return InputError(f"{where}: {message}", hint=hint)


def _first_ref(value: Any) -> Ref | None:
    if isinstance(value, Ref):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((r for r in map(_first_ref, items) if r is not None), None)


def _version(source: str, stmts: dict[str, Statement], name: str) -> tuple[str, fw.Version]:
    new, old = stmts.get(name), stmts.get(VERSION_NAMES[name])
    if new is not None and old is not None and new.value != old.value:
        raise _fail(source, old, f"{VERSION_NAMES[name]} and {name} disagree ({old.value!r}, {new.value!r}): "
                                 "ACI's framework fails on every request")
    stmt = new or old
    if stmt is None:
        raise _fail(source, None, f"no {name}: ACI denies every request of a policy without one",
                    hint=f"add {name} := \"...\" as az confcom writes it")
    parsed = fw.parse_semver(stmt.value)
    if parsed is None:
        raise _fail(source, stmt, f"{stmt.name} := {stmt.value!r} is not a version string such as \"0.2.3\"")
    return stmt.value, parsed


def read_policy(module: Module, source: str = "policy.rego") -> RegoPolicy:
    """Read one parsed module as an ACI policy; raise InputError (with the line) for what cannot be imported."""
    if module.package != "policy":
        raise InputError(f"{source}:{module.line}: package {module.package!r}: a policy module is "
                         "'package policy' (other packages are fragments: see 'policy fragment')", hint=HINT)
    stmts: dict[str, Statement] = {}
    for stmt in module.statements:
        if stmt.kind == "import":
            if stmt.name not in ACCEPTED_IMPORTS:
                raise _fail(source, stmt, f"import {stmt.name} is not accepted (only future keywords and rego.v1)")
            continue
        if stmt.kind == "default":
            raise _fail(source, stmt, f"'default {stmt.name}' belongs to custom rule logic, which cannot be "
                                      "imported")
        if stmt.name in stmts:
            raise _fail(source, stmt, f"{stmt.name} is assigned twice (line {stmts[stmt.name].line})")
        stmts[stmt.name] = stmt
    api_text, api = _version(source, stmts, "api_version")
    fw_text, version = _version(source, stmts, "framework_version")
    reader = DataReader(source)
    # A framework_version newer than the framework matches neither branch of policy_containers,
    # policy_fragments or candidate_external_processes: all three are then empty.
    newer = version > fw.FRAMEWORK_VERSION
    if newer:
        reader.warn("framework_version", f"{fw_text} is newer than ACI's framework "
                                         f"({fw.version_text(fw.FRAMEWORK_VERSION)}), which therefore ignores every "
                                         "container, fragment and external process of this policy")
    rules: dict[str, Rule] = {}
    extra: JsonObject = {}
    for name, stmt in stmts.items():
        value = stmt.value
        if name in fw.ENFORCEMENT_POINTS:
            rules[name] = _rule(source, stmt)
        elif name == "reason":
            # Only the text of a denial depends on it.
            refs = value.values() if isinstance(value, dict) else [value]
            if not refs or not all(isinstance(r, Ref) and r.parts[:2] == ("data", "framework") for r in refs):
                raise _fail(source, stmt, "reason must be data.framework.reason or an object of data.framework "
                                          "references such as {\"errors\": data.framework.errors}")
        elif name in VERSION_NAMES or name in VERSION_NAMES.values():
            continue
        elif (ref := _first_ref(value)) is not None:
            raise _fail(source, stmt, f"{name} refers to {ref}: references are accepted only as framework rule "
                                      "delegations")
        elif name in fw.FALSE_ONLY_FLAGS:
            if value is not False:
                raise _fail(source, stmt, f"{name} := {value!r} is not supported by parma-sandbox",
                            hint="only false (the default) can be imported")
        elif name in ("transparency_trust_lists", "platform_rules"):
            if value != []:
                raise _fail(source, stmt, f"{name} (framework 0.5.0) is not supported by parma-sandbox")
        elif name in ("volumes", "key_brokers"):
            extra[name] = value       # parma-sandbox extensions; ACI's framework ignores them
        elif name not in DATA_NAMES:
            reader.warn(name, f"line {stmt.line}: ACI's framework does not read {name}; ignored")
    for ep, info in fw.ENFORCEMENT_POINTS.items():
        if ep in rules:
            continue
        if api >= info.introduced:
            rules[ep] = Rule(RuleKind.missing, False)
        elif info.default_allowed is None:      # api.rego falls back to the framework's rule
            rules[ep] = Rule(RuleKind.default)
        else:
            rules[ep] = Rule(RuleKind.default, info.default_allowed, info.default_results)
    flags = {}
    for flag in fw.FLAGS:
        flag_stmt = stmts.get(flag)
        flags[flag] = False if flag_stmt is None else reader.boolean(flag_stmt.value, flag)
    if version < fw.CAPABILITY_DROPPING_SINCE and flags["allow_capability_dropping"]:
        reader.warn("allow_capability_dropping", f"ignored: framework {fw_text} predates it (0.2.2)")
        flags["allow_capability_dropping"] = False
    containers, raw_layers = [], []
    if "containers" in stmts:
        raw = reader.objects(stmts["containers"].value, "containers") or []
        for i, c in enumerate(raw):
            layers = c.get("layers")
            if isinstance(layers, list):
                raw_layers += [h for h in layers if isinstance(h, str)]
            checked = reader.container(c, f"containers[{i}]", min(version, fw.FRAMEWORK_VERSION),
                                       as_written=version == fw.FRAMEWORK_VERSION)
            if checked is not None and not newer:
                containers.append(checked)
    externals = []
    if "external_processes" in stmts:
        raw = reader.objects(stmts["external_processes"].value, "external_processes") or []
        externals = [e for i, r in enumerate(raw) if (e := reader.external_process(r, f"external_processes[{i}]"))
                     and not newer]
    fragments = []
    if "fragments" in stmts:
        raw = reader.objects(stmts["fragments"].value, "fragments") or []
        fragments = [f for i, r in enumerate(raw) if (f := reader.fragment_import(r, f"fragments[{i}]"))
                     and not newer]
    reader.raise_if_problems("the data assignments of the module must have the shapes ACI's framework reads "
                             "(docs/aci.md)")
    return RegoPolicy(package=module.package, api_version=api_text, framework_version=fw_text,
                      fragments=tuple(fragments), containers=tuple(containers),
                      external_processes=tuple(externals), flags={k: bool(v) for k, v in flags.items()},
                      rules=rules, raw_layers=tuple(dict.fromkeys(raw_layers)), warnings=tuple(reader.warnings),
                      extra=extra)


def _rule(source: str, stmt: Statement) -> Rule:
    value, name = stmt.value, stmt.name
    if isinstance(value, Ref):
        if value == Ref(("data", "framework", name)):
            return Rule(RuleKind.framework)
        raise _fail(source, stmt, f"{name} := {value}: delegating one enforcement point to another rule cannot be "
                                  "imported", hint=f"write '{name} := data.framework.{name}'")
    if isinstance(value, dict) and isinstance(value.get("allowed"), bool) and _first_ref(value) is None:
        results = tuple((k, v) for k, v in value.items() if k != "allowed")
        return Rule(RuleKind.constant, value["allowed"], results)
    raise _fail(source, stmt, f"rule {name} must be '{name} := data.framework.{name}' or a constant "
                              "{\"allowed\": true|false} (custom rule logic cannot be imported)")


def read_policy_text(text: str, source: str = "policy.rego", *, module_index: int | None = None) -> RegoPolicy:
    """Parse and read Rego text holding one policy module, or several (confcom's multi-group output:
    then `module_index` picks one, 0-based)."""
    modules = parse_modules(text, source)
    if len(modules) > 1 and module_index is None:
        lines = ", ".join(str(m.line) for m in modules)
        raise InputError(f"{source}: {len(modules)} policy modules (packages at lines {lines}): one per container "
                         "group, as az confcom writes a multi-group template's policies",
                         hint="pick one with --group (the template's group name, or its 0-based index)")
    index = module_index or 0
    if not 0 <= index < len(modules):
        raise InputError(f"{source}: there is no module {index} (the file has {len(modules)})")
    return read_policy(modules[index], source)


__all__ = ["PolicyDataError", "RegoPolicy", "Rule", "RuleKind", "read_policy", "read_policy_text"]
