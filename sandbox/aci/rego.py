"""Our JSON policy as ACI's Rego policy module (the ccePolicy) and back (docs/aci.md).

Export writes the module in the layout `az confcom acipolicygen` writes (its customer policy
template): `package policy`, the future-keyword imports, `api_version` and `framework_version`,
`fragments`, `containers` as one line of compact JSON with sorted keys, the six flags, one rule per
enforcement point delegating to `data.framework`, and `reason`. Versions, fragments and flags are
written as confcom writes them (JSON with sorted keys and a 2-space indent). Two assignments that
confcom does not write appear only when the policy has them: `external_processes` (read by ACI's
framework), and `volumes` and `key_brokers` (parma-sandbox extensions; ACI's framework ignores them).

Import reads the data assignments of such a module (confcom's, hcsshim's or ours) into the policy
model and validates it like any policy. Rules must be exactly `EP := data.framework.EP`: a module
that defines its own logic, or leaves out an enforcement point that our engine enforces (ACI would
deny it outright), is refused, because importing it would change what is allowed.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from sandbox.aci.regoparse import Ref, Statement, parse_module
from sandbox.shared.errors import InputError, InvalidDocument
from sandbox.shared.policy.inputs import EnforcementPoint
from sandbox.shared.policy.model import FLAGS, Policy, parse_version, validate_policy

# Enforcement points and the API version that introduced each (hcsshim pkg/securitypolicy/api.rego).
# The first 18, in this order, are the rules of confcom's customer policy template.
ENFORCEMENT_POINTS: dict[str, tuple[int, int, int]] = {
    "mount_device": (0, 1, 0),
    "unmount_device": (0, 2, 0),
    "mount_overlay": (0, 1, 0),
    "unmount_overlay": (0, 6, 0),
    "create_container": (0, 1, 0),
    "exec_in_container": (0, 2, 0),
    "exec_external": (0, 3, 0),
    "shutdown_container": (0, 4, 0),
    "signal_container_process": (0, 5, 0),
    "plan9_mount": (0, 6, 0),
    "plan9_unmount": (0, 6, 0),
    "get_properties": (0, 7, 0),
    "dump_stacks": (0, 7, 0),
    "runtime_logging": (0, 8, 0),
    "load_fragment": (0, 9, 0),
    "scratch_mount": (0, 10, 0),
    "scratch_unmount": (0, 10, 0),
    "rw_mount_device": (0, 11, 0),
    "rw_unmount_device": (0, 11, 0),
    "mount_cims": (0, 11, 0),
    "registry_changes": (0, 10, 0),
    "log_provider": (0, 11, 0),
    "mount_blockdev": (0, 11, 1),
    "unmount_blockdev": (0, 11, 1),
    "load_transparency_trust_list": (0, 12, 0),
    "host_network": (0, 12, 0),
}
CONFCOM_RULES = tuple(ENFORCEMENT_POINTS)[:18]

# The points our engine enforces: an imported module must delegate each of them (when its
# api_version has it), otherwise ACI would deny requests that our engine would judge.
ENFORCED = tuple(ep.value for ep in EnforcementPoint)

FUTURE_IMPORTS = ("future.keywords.every", "future.keywords.in")
ACCEPTED_IMPORTS = frozenset({"future.keywords", "future.keywords.every", "future.keywords.in",
                              "future.keywords.if", "future.keywords.contains", "rego.v1"})
REASON_RULES = (Ref(("data", "framework", "errors")), Ref(("data", "framework", "reason")))

# Data assignments: our model's names, plus deprecated and newer ACI names handled on import.
DATA_NAMES = ("api_version", "framework_version", "fragments", "containers", "external_processes", "volumes",
              "key_brokers", *FLAGS)
LEGACY_NAMES = {"api_svn": "api_version", "framework_svn": "framework_version"}
FALSE_ONLY = ("allow_host_network", "allow_log_provider_dropping")


def _compact(value: Any) -> str:
    # confcom template_util.print_func
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _pretty(value: Any) -> str:
    # confcom template_util.pretty_print_func
    return json.dumps(value, indent=2, sort_keys=True)


def export_rego(policy: Policy) -> str:
    """The policy as an ACI Rego policy module (UTF-8 text; ACI's HOST_DATA is SHA-256 of its bytes)."""
    doc = policy.to_document()
    version = parse_version(policy.api_version)
    lines = ["package policy", ""]
    lines += [f"import {name}" for name in FUTURE_IMPORTS]
    lines += ["", f"api_version := {_pretty(doc['api_version'])}",
              f"framework_version := {_pretty(doc['framework_version'])}", "",
              f"fragments := {_pretty([])}", "",
              f"containers := {_compact(doc['containers'])}", ""]
    for name in ("external_processes", "volumes", "key_brokers"):
        if doc.get(name):
            lines += [f"{name} := {_compact(doc[name])}", ""]
    lines += [f"{flag} := {_pretty(doc[flag])}" for flag in FLAGS]
    lines.append("")
    rules = [ep for ep, since in ENFORCEMENT_POINTS.items() if ep in CONFCOM_RULES or since <= version]
    lines += [f"{ep} := data.framework.{ep}" for ep in rules]
    lines += ["", 'reason := {"errors": data.framework.errors}', ""]
    return "\n".join(lines)


def ccepolicy_base64(rego: str) -> str:
    """The value of an ARM template's confidentialComputeProperties.ccePolicy."""
    return base64.b64encode(rego.encode("utf-8")).decode("ascii")


def decode_policy_text(raw: bytes, source: str) -> str:
    """Rego module text from a file holding it either as text or base64-encoded (a ccePolicy value)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{source}: not UTF-8 text (bad byte at offset {e.start})") from None
    stripped = "".join(text.split())
    if stripped and not text.lstrip().startswith(("package", "#")):
        try:
            decoded = base64.b64decode(stripped, validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        if decoded.lstrip().startswith((b"package", b"#")):
            try:
                return decoded.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{source}: the base64 content is not UTF-8 text "
                                 f"(bad byte at offset {e.start})") from None
    return text


def _first_ref(value: Any) -> Ref | None:
    if isinstance(value, Ref):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((r for r in map(_first_ref, items) if r is not None), None)


def _data_and_rules(statements: list[Statement], source: str) -> tuple[dict[str, tuple[int, Any]], set[str]]:
    def fail(stmt: Statement, message: str) -> InputError:
        return InputError(f"{source}:{stmt.line}: {message}",
                          hint="see docs/aci.md ('ccePolicy import') for the accepted subset")

    if not statements or statements[0].kind != "package":
        raise InputError(f"{source}: a policy module starts with 'package policy'",
                         hint="is this an ACI ccePolicy (Rego text, or its base64)?")
    if statements[0].name != "policy":
        raise fail(statements[0], f"package {statements[0].name!r}: only the top-level 'package policy' "
                                  "is accepted (fragments are not supported)")
    data: dict[str, tuple[int, Any]] = {}
    rules: set[str] = set()
    for stmt in statements[1:]:
        if stmt.kind == "package":
            raise fail(stmt, "a second package statement")
        if stmt.kind == "import":
            if stmt.name not in ACCEPTED_IMPORTS:
                raise fail(stmt, f"import {stmt.name} is not accepted (only future keywords and rego.v1)")
            continue
        name, value = stmt.name, stmt.value
        if name in data or name in rules or (name == "reason" and "reason" in rules):
            raise fail(stmt, f"{name} is assigned twice")
        if name in ENFORCEMENT_POINTS:
            if value != Ref(("data", "framework", name)):
                raise fail(stmt, f"rule {name} must be exactly '{name} := data.framework.{name}' "
                                 "(custom rule logic cannot be imported)")
            rules.add(name)
        elif name == "reason":
            if value not in REASON_RULES and value != {"errors": REASON_RULES[0]}:
                raise fail(stmt, "reason must be {\"errors\": data.framework.errors} or data.framework.reason")
            rules.add(name)
        elif (ref := _first_ref(value)) is not None:
            raise fail(stmt, f"{name} refers to {ref}: references are accepted only as framework rule delegations")
        elif name in DATA_NAMES or name in LEGACY_NAMES or name in FALSE_ONLY:
            data[name] = (stmt.line, value)
        else:
            raise fail(stmt, f"unknown assignment {name!r}")
    return data, rules


def import_rego(text: str, *, source: str = "policy.rego", drop_fragments: bool = False) -> Policy:
    """Read an ACI Rego policy module (the accepted subset, docs/aci.md) into the policy model."""
    data, rules = _data_and_rules(parse_module(text, source), source)
    doc: dict[str, Any] = {}
    for name, (line, value) in data.items():
        target = LEGACY_NAMES.get(name, name)
        if target in doc:
            raise InputError(f"{source}:{line}: {name} repeats {target}")
        if name in FALSE_ONLY:
            if value is not False:
                raise InputError(f"{source}:{line}: {name} := {json.dumps(value)} is not supported by parma-sandbox",
                                 hint="only false (the default) can be imported")
            continue
        doc[target] = value
    if drop_fragments and isinstance(doc.get("fragments"), list):
        doc["fragments"] = []
    if doc.get("fragments"):
        raise InputError(f"{source}: the policy imports {len(doc['fragments'])} policy fragment(s), which "
                         "parma-sandbox does not support",
                         hint="--drop-fragments imports it without them (stricter: fragments only add "
                              "containers, such as ACI's infrastructure sidecars)")
    try:
        policy = validate_policy(doc, source=f"{source} (data)")
    except InvalidDocument as e:
        raise InvalidDocument(e.source, e.problems,
                              hint="the data assignments of the module must form a valid policy "
                                   "(docs/policy.md); see docs/aci.md for what import accepts") from None
    version = parse_version(policy.api_version)
    missing = [ep for ep in ENFORCED if ENFORCEMENT_POINTS[ep] <= version and ep not in rules]
    if missing:
        raise InputError(f"{source}: no rule for {', '.join(missing)}: ACI denies every such request, and "
                         "parma-sandbox cannot express that",
                         hint="add 'EP := data.framework.EP' for each, as az confcom writes them")
    return policy
