"""Running one container probe, as ACI's and Kubernetes' node agents do (docs/group-spec.md, "Probes").

An exec probe is an exec process in the container, asked of the agent like `parma-sandbox exec` and so
checked by the execution policy (the generated policy lists every exec probe's command, as confcom does);
it passes when it exits 0 within timeoutSeconds. One that overruns counts as a failure and is left
running (the policy lists no signal for it); while it runs no second one is started, and each period it
still runs is another failure. An httpGet probe is sent from the host to the group port that forwards the
probe's port, and passes on a status of 200-399; HTTPS is not verified (kubelet does not verify either).

The supervisor (sandbox/launch/supervisor.py) decides when each probe runs and what its results mean.
"""

from __future__ import annotations

import http.client
import ssl
from dataclasses import dataclass
from typing import Protocol, TypeVar

from sandbox.group.spec import HttpScheme
from sandbox.launch.agent_client import AgentError
from sandbox.launch.plan import ProbePlan
from sandbox.shared.errors import PolicyDenied
from sandbox.shared.messages import ExecProcessRequest, ReadOutputRequest, Request, WaitProcessRequest
from sandbox.shared.protocol import ErrorCode

R = TypeVar("R")
DETAIL_CHARS = 200         # of a failed probe's output, in its detail
OUTPUT_BYTES = 4096        # of its output read back (the rest is drained and dropped)
CALL_SLACK_S = 30.0        # on top of a request's own wait: the agent's time to answer


class Agent(Protocol):
    def call(self, request: Request[R], *, timeout: float | None = None) -> R: ...


@dataclass(frozen=True)
class ProbeResult:
    passed: bool
    detail: str = ""               # why it failed
    pending: str | None = None     # an exec probe still running after its timeout: its exec id


def run_probe(agent: Agent, container: str, stdio: bool, plan: ProbePlan,
              pending: str | None = None) -> ProbeResult | None:
    """Run the probe once. None: there is nothing to tell (the container is not running any more, or an
    httpGet probe's port is not forwarded to the host)."""
    probe = plan.probe
    if probe.exec_command is not None:
        return _run_exec(agent, container, stdio, probe.exec_command, probe.timeout_s, pending)
    if plan.host_port is None or plan.host_address is None or probe.http_get is None:
        return None
    return http_get(plan.host_address, plan.host_port, probe.http_get.path,
                    probe.http_get.scheme == HttpScheme.https, probe.timeout_s)


def _run_exec(agent: Agent, container: str, stdio: bool, argv: tuple[str, ...], timeout_s: int,
              pending: str | None) -> ProbeResult | None:
    try:
        if pending is not None:
            left = agent.call(WaitProcessRequest(container, pending, 0), timeout=CALL_SLACK_S)
            if left.running:
                return ProbeResult(False, f"the probe started {timeout_s} s or more ago still runs", pending)
            _output(agent, container, pending, stdio)      # drained: the agent forgets it
        started = agent.call(ExecProcessRequest(container, argv), timeout=CALL_SLACK_S)
        done = agent.call(WaitProcessRequest(container, started.exec_id, timeout_s), timeout=timeout_s + CALL_SLACK_S)
        if done.running:
            return ProbeResult(False, f"timed out after {timeout_s} s", started.exec_id)
        output = _output(agent, container, started.exec_id, stdio)
    except PolicyDenied as e:
        return ProbeResult(False, e.message)
    except AgentError as e:
        if e.code in (ErrorCode.conflict.value, ErrorCode.not_found.value):
            return None         # the container exited (or is being restarted): its watch tells
        return ProbeResult(False, e.message)
    if done.exit_code == 0:
        return ProbeResult(True)
    text = " ".join(output.decode("utf-8", "replace").split())[:DETAIL_CHARS]
    return ProbeResult(False, f"exit code {done.exit_code}" + (f": {text}" if text else ""))


def _output(agent: Agent, container: str, exec_id: str, stdio: bool) -> bytes:
    """Read an exited exec process's output to its end (so the agent forgets the process), keeping the
    first OUTPUT_BYTES; nothing without stdio access (the agent forgets it at its exit then)."""
    if not stdio:
        return b""
    out, offset = b"", 0
    try:
        while True:
            res = agent.call(ReadOutputRequest(container, exec_id, offset), timeout=CALL_SLACK_S)
            for chunk in res.chunks:
                out += chunk.data[:max(0, OUTPUT_BYTES - len(out))]
            if res.eof or res.next_offset == offset:
                return out
            offset = res.next_offset
    except (AgentError, PolicyDenied):
        return out


def http_get(address: str, port: int, path: str, https: bool, timeout_s: float) -> ProbeResult:
    """GET path from address:port; 200-399 passes (redirects are not followed, as kubelet does not
    follow them to another host)."""
    conn: http.client.HTTPConnection
    if https:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(address, port, timeout=timeout_s, context=context)
    else:
        conn = http.client.HTTPConnection(address, port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"User-Agent": "parma-sandbox-probe", "Connection": "close"})
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as e:
        return ProbeResult(False, f"GET {path} on port {port}: {e or type(e).__name__}")
    finally:
        conn.close()
    if 200 <= status < 400:
        return ProbeResult(True)
    return ProbeResult(False, f"GET {path} on port {port}: HTTP status {status}")
