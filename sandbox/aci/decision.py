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


# What the framework's error strings (framework.rego `errors`) mean for the request, and what to check.
MEANINGS = {
    "deviceHash not found": "the layer's dm-verity root hash is in no container of the policy (nor of a loaded "
                            "fragment): the image changed since the policy was generated (pin images by digest; "
                            "regenerate the policy)",
    "device already mounted at path": "the host asked to mount a layer where one is mounted already",
    "mountpoint invalid": "the layer's mount target is not one ACI's guest allows (/run/mounts/scsi/m<N>)",
    "no matching containers for overlay": "no container of the policy has exactly these layers in this order",
    "overlay has already been mounted": "the container's root filesystem is mounted already",
    "invalid command": "the argv is not the command of any container the layers matched",
    "invalid env list": "an environment variable matches no env rule of the container (and the policy does not "
                        "allow dropping it)",
    "missing required environment variable": "a required env rule is matched by no variable",
    "invalid working directory": "the working directory differs from the policy's",
    "invalid user": "the user or group (resolved from the image's /etc/passwd and /etc/group) is not the policy's",
    "invalid noNewPrivileges": "no_new_privileges differs from the policy's",
    "invalid seccomp": "the seccomp profile's SHA-256 differs from the policy's",
    "privileged escalation not allowed": "the container asks to run privileged, and allow_elevated is false",
    "capabilities don't match": "the capability sets differ from the policy's (and dropping is not allowed)",
    "container already started": "a container with this id was created already",
    "container not started": "the request names a container that is not running",
    "target isn't allowed to receive the signal": "the signal is not in the container's (or exec process's) list",
    "unencrypted scratch not allowed": "scratch must be encrypted (allow_unencrypted_scratch is false)",
    "invalid fragment issuer": "no fragment import of the policy names this issuer",
    "invalid fragment feed": "the policy imports fragments from this issuer, but not from this feed",
    "fragment svn is below the specified minimum": "the fragment's SVN is below the import's minimum_svn",
    "missing fragment svn in either header or rego payload": "neither the fragment nor its envelope declares an SVN",
    "containers only distinguishable by allow_stdio_access": "several containers match and disagree on stdio access",
    "containers only distinguishable by capabilties": "several containers match and disagree on capabilities",
}


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
        return {"rule": self.rule, "decision": self.decision, "errors": list(self.errors),
                "meanings": {e: MEANINGS[e] for e in self.errors if e in MEANINGS}, "input": self.input,
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
    for e in d.errors:
        lines.append(f"  because: {e}")
        if e in MEANINGS:
            lines.append(f"    ({MEANINGS[e]})")
    if not d.errors:
        lines.append("  because: (no reason given)")
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
