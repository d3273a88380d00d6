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

from sandbox.shared.codec import field_names
from sandbox.shared.errors import InputError
from sandbox.shared.policy import PolicyEngine
from sandbox.shared.policy.inputs import INPUT_TYPES, PolicyInputError, enforcement_point

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
    inp = doc.get("input")
    if not isinstance(inp, dict):
        inp = {}
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


# -- replaying a denied request against the local engine --------------------------------------------------

# ACI's guest paths -> the project's (docs/protocol.md "Guest paths"): SCSI layer mounts, a sandbox's mounts
# directory, a container's directory.
_ACI_PATHS = ((re.compile(r"/run/mounts/scsi/(m[0-9]+)"), lambda m: f"/run/parma/layers/{m[1]}"),
              (re.compile(r"/run/gcs/c/[^/]+/sandboxMounts(?=/|$)"), lambda m: "/run/parma/sandbox"),
              (re.compile(r"/run/gcs/c/([0-9a-z][0-9a-z_.-]*)(?=/|$)"), lambda m: f"/run/parma/containers/{m[1]}"))
REDACTED = "<<redacted>>"
# Points whose decision needs no earlier request (create_container gets its overlay replayed first).
STATELESS = ("mount_device", "exec_external", "scratch_mount", "get_properties", "dump_stacks", "runtime_logging")


def _local_path(path: Any) -> Any:
    if not isinstance(path, str):
        return path
    for pattern, to in _ACI_PATHS:
        m = pattern.match(path)
        if m:
            return to(m) + path[m.end():]
    return path


@dataclass(frozen=True)
class Replay:
    """What the local engine says about a decoded request: its reasons, and what it could not replay."""

    decisions: tuple[str, ...]
    notes: tuple[str, ...]


def _local_input(d: PolicyDecision) -> tuple[dict[str, Any], list[str]]:
    inp = dict(d.request()["input"])
    notes = []
    for key in ("target", "layer_paths"):
        if key in inp:
            inp[key] = [_local_path(p) for p in inp[key]] if isinstance(inp[key], list) else _local_path(inp[key])
    if isinstance(inp.get("mounts"), list):
        inp["mounts"] = [{**m, "source": _local_path(m.get("source"))} if isinstance(m, dict) else m
                         for m in inp["mounts"]]
    if isinstance(inp.get("capabilities"), str):       # "[privileged]" / "[unprivileged]": the runtime defaults
        del inp["capabilities"]
    env = inp.get("env")
    if isinstance(env, list) and any(isinstance(e, str) and e.endswith("=" + REDACTED) for e in env):
        notes.append("ACI redacted the env values: the engine saw each as NAME=<<redacted>>, so an env rule "
                     "that pins a value does not match it here")
    # Fields of ACI's input that our input has no use for (devices, isSandboxContainer, hugePagesDir, ...).
    try:
        required, optional = field_names(INPUT_TYPES[enforcement_point(d.rule)])
    except InputError:
        return inp, notes
    dropped = sorted(k for k in inp if k not in (*required, *optional))
    if dropped:
        notes.append(f"ACI's input fields without a local meaning were left out: {', '.join(dropped)}")
    return {k: v for k, v in inp.items() if k in (*required, *optional)}, notes


def replay(d: PolicyDecision, policy: bytes) -> Replay:
    """The local engine's decision on the request of ACI's blob, under `policy` (its exact bytes), where it
    can be replayed: points that need no earlier request, and create_container after mounting each layer
    stack of the policy as the container's overlay (one decision per stack)."""
    if "input" in d.truncated or not d.input:
        return Replay((), ("ACI dropped the input from the blob (3 KiB limit): nothing to replay",))
    inp, notes = _local_input(d)

    def decide(engine: PolicyEngine) -> str:
        try:
            decision = engine.enforce_json(d.rule, inp)
        except PolicyInputError as e:
            return f"not replayable: {e.message}"
        return "allowed here" if decision.allowed else decision.reason

    if d.rule in STATELESS:
        return Replay((decide(PolicyEngine.from_bytes(policy)),), tuple(notes))
    if d.rule != "create_container":
        return Replay((), (*notes, f"{d.rule} depends on earlier requests (mounts, creates) that the blob does not "
                                   "carry: replay the sequence with 'policy check'",))
    stacks = list(dict.fromkeys(c.layers for c in PolicyEngine.from_bytes(policy).policy.containers))
    cid = inp.get("container_id", "")
    out = []
    for stack in stacks:
        engine = PolicyEngine.from_bytes(policy)
        paths = [f"/run/parma/layers/r{i}" for i in range(len(stack))]
        for path, digest in zip(paths, stack, strict=True):
            engine.enforce_json("mount_device", {"target": path, "device_hash": digest})
        overlay = engine.enforce_json("mount_overlay", {"container_id": cid, "layer_paths": paths[::-1],
                                                        "target": f"/run/parma/containers/{cid}/rootfs"})
        if overlay.allowed:
            out.append(f"with the layers {', '.join(h[:12] for h in stack)}: {decide(engine)}")
    return Replay(tuple(out), tuple(notes))


def render_replay(r: Replay) -> str:
    lines = ["  here (the local engine):"]
    lines += [f"    {text}" for text in r.decisions]
    lines += [f"    ({note})" for note in r.notes]
    return "\n".join(lines)
