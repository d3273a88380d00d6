"""What a policy allows, in a form people read: the summary behind `policy show`, and debug detection.

Debug mode is recognised by what a policy allows, not by a marker: a policy that lets the host read
logs, properties or stacks, exec a shell, or pass arbitrary env vars is flagged whoever generated it.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any, TypeGuard

from sandbox.fsutil import read_input_file
from sandbox.shared.policy.model import (
    AnyEnvRule,
    NameValueEnvRule,
    Policy,
    Strategy,
    parse_policy,
    policy_hash,
)
from sandbox.shared.policy.regex import whole_matcher

SHELLS = frozenset({"sh", "bash", "ash", "dash", "zsh", "ksh", "busybox"})
# Env vars no application sets on purpose: a rule admitting all of them admits anything.
_ENV_PROBES = ("LD_PRELOAD=/tmp/x.so", "PARMA_PROBE_1=", "Z9=any value")


def read_policy(path: Path) -> tuple[bytes, Policy]:
    raw = read_input_file(path, "a policy file")
    return raw, parse_policy(raw, str(path))


def _allows_any_env(rules: tuple[AnyEnvRule, ...]) -> bool:
    for r in rules:
        if isinstance(r, NameValueEnvRule):
            if r.name_strategy == r.value_strategy == Strategy.re2:
                name, value = whole_matcher(r.name), whole_matcher(r.value)
                if all(name(p.partition("=")[0]) and value(p.partition("=")[2]) for p in _ENV_PROBES):
                    return True
        elif r.strategy == Strategy.re2:
            match = whole_matcher(r.pattern)
            if all(match(p) for p in _ENV_PROBES):
                return True
    return False


def _env_rule_text(r: AnyEnvRule) -> str:
    required = ", required" if r.required else ""
    if isinstance(r, NameValueEnvRule):
        return f"name {r.name} ({r.name_strategy.value}) = {r.value} ({r.value_strategy.value}{required})"
    return f"{r.pattern} ({r.strategy.value}{required})"


def _command(command: tuple[str, ...] | None) -> list[str] | None:
    return None if command is None else list(command)


def _is_shell(command: tuple[str, ...] | None) -> TypeGuard[tuple[str, ...]]:
    return command is not None and 0 < len(command) <= 2 and posixpath.basename(command[0]) in SHELLS


def debug_features(policy: Policy) -> list[str]:
    """Everything in the policy that lets the host observe or steer the workload like a debugger."""
    out = []
    for flag, what in (("allow_runtime_logging", "the host may read the agent's logs"),
                       ("allow_properties_access", "the host may read properties"),
                       ("allow_dump_stacks", "the host may dump stacks")):
        if getattr(policy, flag):
            out.append(f"{flag}: {what}")
    for i, c in enumerate(policy.containers):
        label = c.label(i)
        shells = [p.command for p in c.exec_processes if _is_shell(p.command)]
        if shells:
            out.append(f"container {label!r}: the host may exec a shell ({' '.join(shells[0])})")
        if _allows_any_env(c.env_rules):
            out.append(f"container {label!r}: an env rule admits any variable")
    for i, e in enumerate(policy.external_processes):
        if _is_shell(e.command):
            out.append(f"external_processes[{i}]: the host may run a shell in the UVM")
    return out


def summarize(raw: bytes, policy: Policy) -> dict[str, Any]:
    """A JSON-able summary (the `policy show --format json` document)."""
    features = debug_features(policy)
    canonical = policy.canonical_bytes() == raw
    return {
        "sha256": policy_hash(raw),
        "canonical": canonical,
        "api_version": policy.api_version,
        "framework_version": policy.framework_version,
        "debug_mode": bool(features),
        "debug_features": features,
        "flags": {k: v for k, v in policy.to_document().items() if k.startswith("allow_")},
        "containers": [{
            "name": c.label(i), "id": c.id, "layers": list(c.layers), "command": _command(c.command),
            "env_rules": [_env_rule_text(r) for r in c.env_rules],
            "working_dir": c.working_dir,
            "mounts": [f"{m.type} {m.source} -> {m.destination} ({','.join(m.options)})" for m in c.mounts],
            "exec_processes": [{"command": _command(p.command), "signals": list(p.signals)} for p in c.exec_processes],
            "signals": list(c.signals), "allow_elevated": c.allow_elevated, "allow_stdio_access": c.allow_stdio_access,
            "no_new_privileges": c.no_new_privileges,
            "user": None if c.user is None else {
                "user": f"{c.user.user_idname.strategy.value} {c.user.user_idname.pattern!r}",
                "groups": [f"{g.strategy.value} {g.pattern!r}" for g in c.user.group_idnames], "umask": c.user.umask},
            "capabilities": None if c.capabilities is None else {k: len(v) for k, v in c.capabilities.sets().items()},
        } for i, c in enumerate(policy.containers)],
        "external_processes": [{"command": _command(e.command), "working_dir": e.working_dir,
                                "allow_stdio_access": e.allow_stdio_access} for e in policy.external_processes],
        "fragments": [f.to_json() for f in policy.fragments],
        "rules": {point: rule.to_json() for point, rule in policy.rules},
        "volumes": [{"name": v.name, "target": v.target, "device_hash": v.device_hash} for v in policy.volumes],
        "key_brokers": [b.public_key_sha256 for b in policy.key_brokers],
    }


BANNER = "!!! DEBUG-MODE POLICY: do not release secrets to workloads attested with it !!!"


def render(summary: dict[str, Any]) -> str:
    lines = []
    if summary["debug_mode"]:
        lines += [BANNER, *(f"!!!   {f}" for f in summary["debug_features"]), ""]
    lines.append(f"sha256 (HOST_DATA): {summary['sha256']}")
    if not summary["canonical"]:
        lines.append("note: not in canonical form (re-serialising it would give a different hash)")
    lines.append(f"versions: api {summary['api_version']}, framework {summary['framework_version']}")
    flags = [k for k, v in summary["flags"].items() if v]
    lines.append(f"flags: {', '.join(flags) if flags else 'none (everything optional is denied)'}")
    for v in summary["volumes"]:
        lines.append(f"volume {v['name']}: {v['target']} pinned to {v['device_hash']}")
    for pin in summary["key_brokers"]:
        lines.append(f"key broker: public key sha256 {pin} (secrets are accepted only from it)")
    for f in summary["fragments"]:
        lines.append(f"fragments accepted: from {f['issuer']} ({f['feed']}), minimum svn {f['minimum_svn']}, adding "
                     f"{', '.join(f['includes']) or 'nothing'}")
    for point, rule in summary["rules"].items():
        lines.append(f"rule {point}: " + ("no rule (api.rego decides)" if rule is None else
                                          "the framework's" if rule == "framework" else f"always {rule}"))
    for c in summary["containers"]:
        lines.append("")
        lines.append(f"container {c['name']}" + (f" ({c['id']})" if c["id"] else ""))
        lines.append(f"  layers:      {len(c['layers'])} (base first) " + ", ".join(h[:12] for h in c["layers"]))
        lines.append(f"  command:     {c['command'] if c['command'] is not None else 'null (matches no argv)'}")
        lines.append(f"  working_dir: {c['working_dir']}")
        for r in c["env_rules"]:
            lines.append(f"  env:         {r}")
        for m in c["mounts"]:
            lines.append(f"  mount:       {m}")
        for p in c["exec_processes"]:
            lines.append(f"  exec:        {p['command']} signals {p['signals']}")
        lines.append(f"  signals:     {c['signals']}")
        if c["user"]:
            u = c["user"]
            lines.append(f"  user:        {u['user']}, groups {', '.join(u['groups'])}, umask {u['umask']}")
        caps = c["capabilities"]
        lines.append("  capabilities: " + ("runtime defaults" if caps is None else
                                          ", ".join(f"{k} {n}" for k, n in caps.items())))
        lines.append(f"  privileged allowed: {c['allow_elevated']}, stdio readable: {c['allow_stdio_access']}, "
                     f"no_new_privileges: {c['no_new_privileges']}")
    for e in summary["external_processes"]:
        lines.append(f"external process: {e['command']} in {e['working_dir']}")
    if summary["debug_mode"]:
        lines += ["", BANNER]
    return "\n".join(lines)
