"""`policy check`: replay a JSON-lines trace of host requests through the engine (docs/policy-trace.md).

The whole trace is read and every request validated before anything is replayed, so bad input
(exit 2) never comes with half a report. `trace_line` writes one request the way `read_trace` reads
it (the launcher's recording, sandbox/launch/trace_record.py, uses it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.fsutil import read_input_file
from sandbox.shared import agent_rules
from sandbox.shared.errors import InputError
from sandbox.shared.jsonstrict import decode_utf8, loads_strict
from sandbox.shared.messages import MountOverlayRequest
from sandbox.shared.policy.engine import Decision, PolicyEngine
from sandbox.shared.policy.inputs import (
    CreateContainerInput,
    EnforcementInput,
    MountDeviceInput,
    PolicyInputError,
    enforcement_point,
    parse_input,
    point_of,
    scratch_target,
)

RECORD_KEYS = ("ep", "input", "action")
ACTIONS = ("ok", "fail")


@dataclass(frozen=True)
class TraceRequest:
    """One line of a trace: the engine's typed input (the same classes the agent enforces with)."""

    line: int
    input: EnforcementInput
    action_fails: bool = False


@dataclass(frozen=True)
class Outcome:
    request: TraceRequest
    decision: Decision
    rolled_back: bool = False    # allowed, but the simulated action failed: nothing was committed
    refused: bool = False        # the agent's own rules refused it before asking the policy (the reason says why)

    def to_json(self) -> dict[str, Any]:
        d = self.decision
        return {"line": self.request.line, "ep": d.ep, "allowed": d.allowed, "reason": d.reason,
                "results": dict(d.results), "changes": [] if self.rolled_back else list(d.changes),
                "rolled_back": self.rolled_back, "refused_by_agent": self.refused}


def trace_line(ep: str, input: Mapping[str, Any], *, action_fails: bool = False) -> str:
    """One request as a trace line: {"ep", "input"} and, when the action behind it failed, "action": "fail"."""
    record: dict[str, Any] = {"ep": ep, "input": dict(input)}
    if action_fails:
        record["action"] = "fail"
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


def comment_lines(text: str) -> list[str]:
    """Free text as trace comment lines (a trace line never spans two lines)."""
    return ["# " + line if line.strip() else "#" for line in text.splitlines() or [""]]


def read_trace(path: Path) -> list[TraceRequest]:
    text = decode_utf8(read_input_file(path, "a JSON-lines trace"), str(path))
    requests = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        record = loads_strict(line, where)
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected an object like {{\"ep\": ..., \"input\": {{...}}}}")
        unknown = [k for k in record if k not in RECORD_KEYS]
        if unknown:
            raise InputError(f"{where}: unknown field {unknown[0]!r}", hint="a trace line has 'ep', 'input' and "
                                                                          "optionally 'action' ('ok' or 'fail')")
        if "ep" not in record:
            raise InputError(f"{where}: the field 'ep' (the enforcement point) is missing")
        action = record.get("action", "ok")
        if action not in ACTIONS:
            raise InputError(f"{where}: action must be 'ok' or 'fail', got {action!r}")
        try:
            typed = parse_input(enforcement_point(record["ep"]), record.get("input"))
        except PolicyInputError as e:
            raise PolicyInputError(f"{where}: {e.message}", hint=e.hint) from None
        requests.append(TraceRequest(number, typed, action == "fail"))
    if not requests:
        raise InputError(f"{path}: the trace has no requests", hint="one JSON object per line: "
                                                                  '{"ep": "mount_device", "input": {...}}')
    return requests


class SimulatedActionFailure(Exception):
    """Stands in for a failing mount or runtime call, to show that the state rolls back."""

    def __init__(self, decision: Decision) -> None:
        super().__init__("simulated action failure")
        self.decision = decision


def _fail(decision: Decision) -> None:
    raise SimulatedActionFailure(decision)


def agent_refusal(input: EnforcementInput, state: Mapping[str, Any]) -> str | None:
    """Why the agent would refuse this request before asking its policy (sandbox/shared/agent_rules.py),
    given the engine's state so far (PolicyEngine.snapshot(): the agent and the engine commit the same
    mounts), or None. Covered: mount targets, an overlay at its container's rootfs over mounted layer
    devices and after its scratch, a create after its overlay, NAME=VALUE env entries. Not covered,
    because a trace does not hold them: whether the device exists, how the image resolves the user,
    whether a bind's volume was created, and the runtime's own failures."""
    match input:
        case MountDeviceInput(target=target):
            return agent_rules.device_target_problem(target)
        case MountOverlayRequest(container_id=cid, layer_paths=paths, target=target):
            problem = agent_rules.overlay_problem(cid, paths, target)
            if problem is not None:
                return problem
            if target in state["overlays"]:
                return f"{target} is already mounted"
            for path in paths:
                if path not in state["devices"] or not agent_rules.is_layer_target(path):
                    return f"{path} is not a mounted layer device"
            if scratch_target(cid) not in state["scratch"]:
                return f"mount_scratch for {cid} first"
        case CreateContainerInput(container_id=cid, env=env):
            rootfs = agent_rules.rootfs_target(cid)
            if rootfs not in state["overlays"]:
                return f"mount_overlay for {cid} first (at {rootfs})"
            return agent_rules.env_problem(env)
    return None


def replay(engine: PolicyEngine, requests: list[TraceRequest], *,
           agent_checks: bool = True) -> Iterator[Outcome]:
    """Each request's decision, in order, against one engine. With agent_checks, a request the agent
    would refuse by its own rules is reported as refused and never reaches the engine (as in the guest)."""
    for r in requests:
        refusal = agent_refusal(r.input, engine.snapshot()) if agent_checks else None
        if refusal is not None:
            point = point_of(r.input)
            yield Outcome(r, Decision(point, False, f"refused by the agent before the policy is asked: {refusal}"),
                          refused=True)
            continue
        try:
            decision = engine.enforce(r.input, _fail if r.action_fails else None)
        except SimulatedActionFailure as failure:
            yield Outcome(r, failure.decision, rolled_back=True)   # allowed, but nothing was committed
        else:
            yield Outcome(r, decision)                              # denied, or allowed and committed
