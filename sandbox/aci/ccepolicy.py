"""The exact policy bytes a file stands for, whatever form it takes: our JSON policy, or ACI's ccePolicy.

ACI sets HOST_DATA to SHA-256 of the Rego text of the ccePolicy (the base64-decoded value of the
template's confidentialComputeProperties.ccePolicy), so that text, byte for byte, is what a local run
must launch with and send to the agent. A policy file may hold our JSON document (used as it is), the
Rego text, its base64, or an ARM template whose ccePolicy carries it.
"""

from __future__ import annotations

from pathlib import Path

from sandbox.aci.rego import decode_policy_text
from sandbox.group.arm import ccepolicy_of_template, is_arm_template
from sandbox.group.jsonio import read_input_file
from sandbox.shared.errors import InputError
from sandbox.shared.jsonstrict import decode_utf8, loads_strict
from sandbox.shared.policy.model import is_rego


def template_ccepolicy(path: Path, doc: dict, group: str | None = None) -> bytes | None:
    """The Rego text of an ARM template's ccePolicy (of the container group `group` names, when it has
    several); None when the template's ccePolicy is empty or absent."""
    value = ccepolicy_of_template(path, doc, group)
    if value is None:
        return None
    text = decode_policy_text(value.encode("ascii", "replace"), f"{path} (ccePolicy)")
    if not text.lstrip().startswith(("package", "#")):
        raise InputError(f"{path}: the ccePolicy is neither base64 of a Rego module nor Rego text",
                         hint="the value of confidentialComputeProperties.ccePolicy is what 'az confcom "
                              "acipolicygen' writes (base64 of the policy's Rego text)")
    return text.encode("utf-8")


def template_ccepolicy_of_file(path: Path, group: str | None = None) -> bytes | None:
    """The Rego text of the ccePolicy when `path` is an ARM template that has a non-empty one, else None."""
    raw = read_input_file(path, "a group file or an ARM template")
    if not raw.lstrip().startswith(b"{"):
        return None
    doc = loads_strict(decode_utf8(raw, str(path)), str(path))
    return template_ccepolicy(path, doc, group) if is_arm_template(doc) else None


def policy_file_bytes(path: Path, group: str | None = None) -> bytes:
    """The exact bytes of the policy in `path`: a JSON policy as it is; Rego text, its base64 or an ARM
    template's ccePolicy as the Rego text."""
    raw = read_input_file(path, "a policy: JSON, Rego text or its base64, or an ARM template with a ccePolicy")
    if raw.lstrip().startswith(b"{"):
        doc = loads_strict(decode_utf8(raw, str(path)), str(path))
        if not is_arm_template(doc):
            return raw
        policy = template_ccepolicy(path, doc, group)
        if policy is None:
            raise InputError(f"{path}: the container group's confidentialComputeProperties.ccePolicy is empty",
                             hint="an empty ccePolicy means ACI's allow-all policy, which parma-sandbox does not "
                                  "run; 'up' on the template generates a policy instead")
        return policy
    text = decode_policy_text(raw, str(path))
    data = text.encode("utf-8")
    if not is_rego(data):
        raise InputError(f"{path}: the base64 content is JSON, not a Rego module")
    return data
