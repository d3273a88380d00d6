"""`policy check`: replay a JSON-lines trace of host requests through the engine (docs/policy-trace.md).

The whole trace is read and every request validated before anything is replayed, so bad input
(exit 2) never comes with half a report.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.fsutil import read_input_file
from sandbox.shared.errors import InputError
from sandbox.shared.jsonstrict import decode_utf8, loads_strict
from sandbox.shared.policy.engine import Decision, PolicyEngine
from sandbox.shared.policy.inputs import EnforcementInput, PolicyInputError, enforcement_point, parse_input

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

    def to_json(self) -> dict[str, Any]:
        d = self.decision
        return {"line": self.request.line, "ep": d.ep, "allowed": d.allowed, "reason": d.reason,
                "results": dict(d.results), "changes": [] if self.rolled_back else list(d.changes),
                "rolled_back": self.rolled_back}


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


def replay(engine: PolicyEngine, requests: list[TraceRequest]) -> Iterator[Outcome]:
    for r in requests:
        try:
            decision = engine.enforce(r.input, _fail if r.action_fails else None)
        except SimulatedActionFailure as failure:
            yield Outcome(r, failure.decision, rolled_back=True)   # allowed, but nothing was committed
        else:
            yield Outcome(r, decision)                              # denied, or allowed and committed
