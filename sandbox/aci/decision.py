"""ACI's policyDecision blobs: what the guest reports when its policy denies a request.

hcsshim's Rego enforcer (securitypolicyenforcer_rego.go, policyDecisionToError) wraps a JSON object
in `policyDecision< BASE64 >policyDecision`: `decision` ("deny"), `input` (the request's input, with
`rule` the enforcement point, env values replaced by `<<redacted>>`, capability sets equal to the
default ones replaced by "[privileged]"/"[unprivileged]"), `reason` (the policy's `reason` rule:
`errors`, sometimes `error_objects`), `policyError` when evaluation itself failed, and `truncated`
listing what was dropped to fit 3 KiB (error_objects, then input, then reason).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from sandbox.shared.errors import InputError

_WRAPPED = re.compile(r"policyDecision<\s*([A-Za-z0-9+/=\s]+?)\s*>policyDecision")

# ACI's input names -> the project's request field names (sandbox/shared/policy/inputs.py).
INPUT_NAMES = {"containerID": "container_id", "argList": "argv", "envList": "env", "workingDir": "working_dir",
               "deviceHash": "device_hash", "layerPaths": "layer_paths", "unmountTarget": "target",
               "isInitProcess": "is_init", "noNewPrivileges": "no_new_privileges",
               "seccompProfileSHA256": "seccomp_profile_sha256", "target": "target", "mounts": "mounts",
               "user": "user", "groups": "groups", "umask": "umask", "capabilities": "capabilities",
               "privileged": "privileged", "signal": "signal", "layerHashes": "layer_hashes"}


@dataclass(frozen=True)
class PolicyDecision:
    rule: str
    decision: str
    errors: tuple[str, ...]
    input: dict[str, Any]
    error_objects: tuple[Any, ...]
    truncated: tuple[str, ...]
    policy_error: str | None

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "decision": self.decision, "errors": list(self.errors), "input": self.input,
                "error_objects": list(self.error_objects), "truncated": list(self.truncated),
                "policy_error": self.policy_error}

    def request(self) -> dict[str, Any]:
        """The input in the project's request vocabulary ({"ep", "input"}, as `policy check` reads it)."""
        fields = {INPUT_NAMES.get(k, k): v for k, v in self.input.items()
                  if k not in ("rule", "name", "mountPathRegex", "rootPrefix", "mountPathPrefix", "sandboxDir",
                               "hugePagesDir")}
        return {"ep": self.rule, "input": fields}


def parse_decision(text: str) -> PolicyDecision:
    """Decode the blob from an ACI error message (the whole message, the wrapped part, or the base64 alone)."""
    m = _WRAPPED.search(text)
    encoded = "".join((m.group(1) if m else text).split())
    try:
        raw = base64.b64decode(encoded, validate=True)
        doc = json.loads(raw)
    except (binascii.Error, ValueError):
        raise InputError("not a policyDecision: expected the base64 between 'policyDecision<' and '>policyDecision'",
                         hint="paste the whole error ACI printed, or the base64 part of it") from None
    if not isinstance(doc, dict) or "decision" not in doc:
        raise InputError("the decoded blob is not a policy decision (no 'decision' field)")
    reason = doc.get("reason")
    errors: tuple[str, ...] = ()
    objects: tuple[Any, ...] = ()
    if isinstance(reason, dict):
        errs = reason.get("errors")
        errors = tuple(str(e) for e in errs) if isinstance(errs, list) else ()
        objs = reason.get("error_objects")
        objects = tuple(objs) if isinstance(objs, list) else ()
    elif isinstance(reason, str):
        errors = (reason,)
    inp = doc.get("input") if isinstance(doc.get("input"), dict) else {}
    return PolicyDecision(rule=str(inp.get("rule") or inp.get("name") or "?"), decision=str(doc["decision"]),
                          errors=errors, input=inp, error_objects=objects,
                          truncated=tuple(map(str, doc.get("truncated") or ())),
                          policy_error=doc.get("policyError"))


def render(d: PolicyDecision) -> str:
    lines = [f"{d.rule}: {d.decision}"]
    lines += [f"  because: {e}" for e in d.errors] or ["  because: (no reason given)"]
    if d.policy_error:
        lines.append(f"  policy error: {d.policy_error}")
    for key, value in d.request()["input"].items():
        shown = json.dumps(value) if not isinstance(value, str) else value
        lines.append(f"  {key}: {shown if len(shown) <= 200 else shown[:197] + '...'}")
    if d.error_objects:
        lines.append(f"  ({len(d.error_objects)} candidate object(s) in error_objects; --format json shows them)")
    if d.truncated:
        lines.append(f"  (ACI dropped to fit 3 KiB: {', '.join(d.truncated)})")
    return "\n".join(lines)
