"""Our JSON policy as ACI's Rego policy module (the ccePolicy) and back (docs/aci.md).

Export writes the module in the layout `az confcom acipolicygen` writes (its customer policy
template): `package policy`, the future-keyword imports, `api_version` and `framework_version`,
`fragments`, `containers` as one line of compact JSON with sorted keys, the six flags, one rule per
enforcement point delegating to `data.framework`, and `reason`. Versions, fragments and flags are
written as confcom writes them (JSON with sorted keys and a 2-space indent). Two assignments that
confcom does not write appear only when the policy has them: `external_processes` (read by ACI's
framework), and `volumes` and `key_brokers` (parma-sandbox extensions; ACI's framework ignores them).

Import reads such a module (confcom's, hcsshim's or ours) as ACI's framework reads it
(sandbox/shared/rego) into the policy model, and validates it like any policy: fragment imports,
rules the module answers with a constant (or has none for) and the layers of container objects the
framework ignores all have their place in the model, so that export writes a module that imports
back to the same policy. A module with its own rule logic is refused (sandbox/shared/rego/syntax.py).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from sandbox.log import log
from sandbox.shared.errors import InputError, InvalidDocument
from sandbox.shared.policy.model import FLAGS, Policy, parse_version, validate_policy
from sandbox.shared.rego import framework as fw
from sandbox.shared.rego.policy import RegoPolicy, read_policy_text

# The rules of confcom's customer policy template, in its order. An export writes them, then every other
# enforcement point of api.rego (sandbox/shared/rego/framework.py) that the policy's api_version has.
CONFCOM_RULES = fw.CONFCOM_TEMPLATE_RULES

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
    """A policy document in confcom's module layout: one rule per enforcement point of confcom's template
    plus those the document's api_version adds, each delegating to the framework, except where the
    document's `rules` depart from that layout. `fragments` replaces the document's imports."""
    version = parse_version(doc["api_version"])
    own_rules = doc.get("rules") or {}
    containers = list(doc["containers"])
    if doc.get("ignored_container_layers"):
        # An object lacking the fields a container needs: the framework ignores it, but mounts its layers.
        containers.append({"layers": list(doc["ignored_container_layers"])})
    lines = ["package policy", ""]
    lines += [f"import {name}" for name in FUTURE_IMPORTS]
    lines += ["", f"api_version := {_pretty(doc['api_version'])}",
              f"framework_version := {_pretty(doc['framework_version'])}", "",
              f"fragments := {_pretty(doc.get('fragments', []) if fragments is None else fragments)}", "",
              f"containers := {_compact(containers)}", ""]
    for name in ("external_processes", "volumes", "key_brokers"):
        if doc.get(name):
            lines += [f"{name} := {_compact(doc[name])}", ""]
    lines += [f"{flag} := {_pretty(doc[flag])}" for flag in FLAGS]
    lines.append("")
    rules = list(fw.layout_rules(version))
    rules += [ep for ep in sorted(own_rules) if ep not in rules]
    for ep in rules:
        rule = own_rules.get(ep, "framework")
        if rule == "framework":
            lines.append(f"{ep} := data.framework.{ep}")
        elif rule is not None:
            lines.append(f"{ep} := {_compact(rule)}")
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
    doc = rego.policy_document()
    if drop_fragments:
        doc["fragments"] = []
    try:
        return validate_policy(doc, source=f"{source} (data)")
    except InvalidDocument as e:
        raise InvalidDocument(e.source, e.problems,
                              hint="the data assignments of the module must form a valid policy "
                                   "(docs/policy.md); see docs/aci.md for what import accepts") from None
