"""Record what a launch asks the agent as a `policy check` trace (docs/policy-trace.md).

Every request to the agent goes through AgentClient.send, which hands each reply to a TraceRecorder.
The recorder writes the agent's own account of what it asked its policy (the reply's `policy`,
sandbox/shared/protocol.py PolicyCheck): the enforcement point and the input exactly as the engine saw
it, with what the guest derived itself (the device's root hash, the user as the image's /etc/passwd
resolves it, the runtime's own mounts). Nothing is re-derived on the host, so replaying the trace
with `policy check` against the same policy gives the same decisions the agent made, and against
another policy answers "would it have allowed this run?".

Requests the policy was never asked about become comments, so the trace still reads as the sequence
the host sent: state changes outside the policy (start_container), and requests the agent refused
before asking it (its own invariants, e.g. a mount target outside its fixed directories). Polling
requests (ping, read_output, ...) are left out.

Secure env values (`secureValue`) are replaced by `NAME=<secure>`, in inputs and in comments: a trace
is made to be shared. The policy generator pins secure vars by name only (`NAME=(?s:.*)`), so a
redacted trace replays with the same decisions against generated policies.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sandbox.fsutil import atomic_write
from sandbox.policy.trace import comment_lines, trace_line
from sandbox.shared.codec import shown
from sandbox.shared.protocol import ErrorCode, Response

# Requests that only read or wait: nothing to replay, and no state change worth a comment.
POLLING_OPS = frozenset({"ping", "get_report", "read_output", "wait_process", "list_containers",
                         "watch_containers"})
SECURE_PLACEHOLDER = "<secure>"
SHORTENED = 160   # the engine quotes env entries in denial reasons cut to this many characters


class TraceRecorder:
    """Collects the trace lines of the requests sent through one or more AgentClients (thread-safe)."""

    def __init__(self, secure_env: Iterable[str] = ()) -> None:
        """secure_env: the "NAME=VALUE" entries whose values must not be written."""
        self._secure = {entry: entry.partition("=")[0] + "=" + SECURE_PLACEHOLDER for entry in secure_env}
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def observe(self, op: str, payload: Any, response: Response) -> None:
        """One request and the agent's reply to it."""
        lines = self._policy_lines(response) if response.policy else self._other_lines(op, payload, response)
        with self._lock:
            self._lines.extend(lines)

    def lines(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._lines)

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines())

    def write(self, path: Path) -> None:
        """Write the trace so far (atomically: a reader never sees half a trace)."""
        atomic_write(Path(path), self.text().encode(), 0o600)

    # -- lines ----------------------------------------------------------------------------------------

    def _policy_lines(self, response: Response) -> list[str]:
        out = []
        error = response.error
        for check in response.policy:
            if check.input is None:
                out += comment_lines(f"{check.ep}: its input was too large for the agent to send back; "
                                     "not recorded")
                continue
            out.append(trace_line(check.ep, self._redact_input(check.input), action_fails=check.action_failed))
            if not check.allowed:
                reason = error.message if error is not None and error.code == ErrorCode.policy_denied else "denied"
                out += comment_lines(f"^ denied: {self._redact(reason)}")
            elif check.action_failed and error is not None:
                out += comment_lines(f"^ allowed, but the guest action failed ({_code(error.code)}): "
                                     f"{self._redact(error.message)}")
        return out

    def _other_lines(self, op: str, payload: Any, response: Response) -> list[str]:
        if op == "set_policy":
            if response.ok:
                return comment_lines(f"set_policy: policy sha256 {response.result.get('policy_hash')} installed; "
                                     "replay against this policy to see the same decisions")
            assert response.error is not None
            return comment_lines(f"set_policy failed ({_code(response.error.code)}): "
                                 f"{self._redact(response.error.message)}")
        if op in POLLING_OPS:
            return []
        what = f"{op} {_subject(payload)}".rstrip()
        if response.ok:
            return comment_lines(f"{what}: done (not a policy enforcement point)")
        assert response.error is not None
        return comment_lines(f"{what}: refused by the agent before any policy check "
                             f"({_code(response.error.code)}): {self._redact(response.error.message)}")

    # -- secure values --------------------------------------------------------------------------------

    def _redact_input(self, input: dict[str, Any]) -> dict[str, Any]:
        env = input.get("env")
        if not self._secure or not isinstance(env, list):
            return input
        return {**input, "env": [self._secure.get(e, e) if isinstance(e, str) else e for e in env]}

    def _redact(self, text: str) -> str:
        for entry, shown_instead in self._secure.items():
            for form in (entry, repr(entry)[1:-1]):   # as is, and as a denial reason quotes it
                text = text.replace(form, shown_instead)
                if len(form) > SHORTENED:             # ... cut short
                    text = text.replace(form[:SHORTENED - 3], shown_instead)
        return text


def _code(code: ErrorCode | str) -> str:
    return code.value if isinstance(code, ErrorCode) else str(code)


def _subject(payload: Any) -> str:
    """What a request is about, for its comment: the container or volume it names."""
    if not isinstance(payload, dict):
        return ""
    for key in ("container_id", "name", "target"):
        value = payload.get(key)
        if isinstance(value, str):
            return shown(value) if not value.isprintable() else value
    return ""
