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

from sandbox.log import log
from sandbox.shared.errors import InputError, InvalidDocument
from sandbox.shared.policy.inputs import EnforcementPoint
from sandbox.shared.policy.model import FLAGS, Policy, parse_version, validate_policy
from sandbox.shared.policy.points import EXTENSION_POINTS
from sandbox.shared.rego import framework as fw
from sandbox.shared.rego.policy import RegoPolicy, RuleKind, read_policy_text

# The rules of confcom's customer policy template, in its order. An export writes them, then every other
# enforcement point of api.rego (sandbox/shared/rego/framework.py) that the policy's api_version has.
CONFCOM_RULES = ("mount_device", "unmount_device", "mount_overlay", "unmount_overlay", "create_container",
                 "exec_in_container", "exec_external", "shutdown_container", "signal_container_process",
                 "plan9_mount", "plan9_unmount", "get_properties", "dump_stacks", "runtime_logging", "load_fragment",
                 "scratch_mount", "scratch_unmount")

# The points our engine enforces: an imported module must delegate each of them (when its
# api_version has it), otherwise ACI would deny requests that our engine would judge.
ENFORCED = tuple(ep.value for ep in EnforcementPoint if ep not in EXTENSION_POINTS)

FUTURE_IMPORTS = ("future.keywords.every", "future.keywords.in")



def _compact(value: Any) -> str:
    # confcom template_util.print_func
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _pretty(value: Any) -> str:
    # confcom template_util.pretty_print_func
    return json.dumps(value, indent=2, sort_keys=True)


def export_rego(policy: Policy) -> str:
    """The policy as an ACI Rego policy module (UTF-8 text; ACI's HOST_DATA is SHA-256 of its bytes)."""
    return rego_module(policy.to_document())


def rego_module(doc: dict[str, Any], fragments: list[dict[str, Any]] | None = None) -> str:
    """A policy document (and fragment imports) in confcom's module layout; one rule per enforcement point
    of confcom's template plus those the document's api_version adds."""
    version = parse_version(doc["api_version"])
    lines = ["package policy", ""]
    lines += [f"import {name}" for name in FUTURE_IMPORTS]
    lines += ["", f"api_version := {_pretty(doc['api_version'])}",
              f"framework_version := {_pretty(doc['framework_version'])}", "",
              f"fragments := {_pretty(fragments or [])}", "",
              f"containers := {_compact(doc['containers'])}", ""]
    for name in ("external_processes", "volumes", "key_brokers"):
        if doc.get(name):
            lines += [f"{name} := {_compact(doc[name])}", ""]
    lines += [f"{flag} := {_pretty(doc[flag])}" for flag in FLAGS]
    lines.append("")
    rules = [*CONFCOM_RULES, *(ep for ep, info in fw.ENFORCEMENT_POINTS.items()
                               if ep not in CONFCOM_RULES and info.introduced <= version)]
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


def read_rego(text: str, *, source: str = "policy.rego", module_index: int | None = None) -> RegoPolicy:
    """An ACI Rego policy module read as ACI's framework reads it (sandbox/shared/rego)."""
    return read_policy_text(text, source, module_index=module_index)


def import_rego(text: str, *, source: str = "policy.rego", drop_fragments: bool = False,
                module_index: int | None = None) -> Policy:
    """Read an ACI Rego policy module (the accepted subset, docs/aci.md) into the policy model."""
    rego = read_rego(text, source=source, module_index=module_index)
    for warning in rego.warnings:
        log.warning("%s: %s", source, warning)
    doc = rego.document()
    if drop_fragments:
        doc["fragments"] = []
    if doc["fragments"]:
        raise InputError(f"{source}: the policy imports {len(doc['fragments'])} policy fragment(s), which "
                         "parma-sandbox does not enforce yet",
                         hint="--drop-fragments imports it without them (stricter: fragments only add "
                              "containers, such as ACI's infrastructure sidecars)")
    del doc["fragments"]
    try:
        policy = validate_policy(doc, source=f"{source} (data)")
    except InvalidDocument as e:
        raise InvalidDocument(e.source, e.problems,
                              hint="the data assignments of the module must form a valid policy "
                                   "(docs/policy.md); see docs/aci.md for what import accepts") from None
    unenforceable = [f"{ep} ({rule.describe()})" for ep, rule in rego.rules.items()
                     if ep in ENFORCED and rule.kind not in (RuleKind.framework, RuleKind.default)]
    if unenforceable:
        raise InputError(f"{source}: {', '.join(unenforceable)}: parma-sandbox's engine cannot express this yet",
                         hint="add 'EP := data.framework.EP' for each, as az confcom writes them")
    return policy
