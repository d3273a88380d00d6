"""A group's containers through their lifecycle, as ACI runs a container group: the init containers in
order, each to completion, then the containers, restarted as the group's `restartPolicy` says (Always,
the default; OnFailure; Never).

Restarts are the host's doing, as on ACI: the agent creates, starts and stops only what the host asks,
and every step goes through the execution policy. A restart is shutdown_container (the agent stops the
old incarnation and deletes it from crun), unmount_overlay and unmount_scratch, then mount_scratch (a
fresh writable layer), mount_overlay, create_container and start_container: the new create is checked
against the policy exactly like the first (docs/policy.md). Nothing here is a security decision; a host
that restarts nothing only hurts its own availability.

Back-off as Kubernetes and ACI: 10 s before the first restart, doubling up to 5 minutes; a container
that ran for 10 minutes starts over at 10 s. The group can no longer run once no container runs or
will restart: then `run` returns the exit code of the first container that failed (0 when none did).
An attached `up` runs the supervisor on a thread; `up -d` hands the group over to a supervisor process
(sandbox/launch/supervisor_process.py) that `down` stops first.

Probes, as ACI and Kubernetes run them (docs/group-spec.md, "Probes"; sandbox/launch/probes.py runs one),
are timed by the same loop: each from its container's start plus initialDelaySeconds, then every
periodSeconds. While a startup probe has not passed, the other two wait. A startup or liveness probe
failing failureThreshold times in a row stops the container (shutdown_container), which then restarts
as the restartPolicy says, with the same back-off; a readiness probe makes the container ready after
successThreshold passes in a row and not ready after failureThreshold failures (ContainerRun.ready).
Counters start over with each start of a container, and when another supervisor takes the group over.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sandbox.fsutil import atomic_write
from sandbox.group.spec import ProbeKind, RestartPolicy
from sandbox.launch.agent_client import AgentClient, AgentError
from sandbox.launch.plan import ContainerPlan, LaunchPlan, ProbePlan
from sandbox.launch.probes import ProbeResult, run_probe
from sandbox.shared.codec import Message
from sandbox.shared.errors import PolicyDenied
from sandbox.shared.messages import (
    ContainerInfo,
    Request,
    ShutdownContainerRequest,
    StartContainerRequest,
    WatchContainersRequest,
)
from sandbox.shared.protocol import ErrorCode
from sandbox.state import ContainerRun, RunStatus

BACKOFF_FIRST_S = 10.0
BACKOFF_MAX_S = 300.0
BACKOFF_RESET_S = 600.0      # a container that ran this long restarts after BACKOFF_FIRST_S again
WATCH_S = 5.0                # the longest wait for a change (an attached `up` notices Ctrl-C this fast)
STOP_TIMEOUT_S = 10.0
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class SupervisedGroup(Message):
    """What the supervisor needs to (re)start the group's containers: `plan.json` in the state directory."""

    restart_policy: RestartPolicy
    init_containers: tuple[ContainerPlan, ...]
    containers: tuple[ContainerPlan, ...]

    @classmethod
    def of(cls, plan: LaunchPlan) -> SupervisedGroup:
        return cls(plan.restart_policy, plan.init_containers, plan.containers)

    @property
    def all_containers(self) -> tuple[ContainerPlan, ...]:
        return self.init_containers + self.containers


@dataclass(frozen=True)
class GroupOutcome:
    """Where `run` stopped: `done` with the group's exit code, or handed over (`done` false)."""

    done: bool
    exit_code: int | None = None


@dataclass
class _Probing:
    """One probe of one running container: when it runs next, and its results in a row."""

    due: float
    successes: int = 0
    failures: int = 0
    pending: str | None = None      # an exec probe that overran its timeout and still runs
    last: ProbeResult | None = field(default=None, repr=False)


def backoff_delay(backoff: int) -> float:
    """Seconds before a restart, `backoff` restarts since the back-off last started over."""
    return min(BACKOFF_FIRST_S * 2 ** backoff, BACKOFF_MAX_S)


def initial_runs(group: SupervisedGroup) -> dict[str, ContainerRun]:
    return {c.name: ContainerRun(c.name, init=c.init) for c in group.all_containers}


Notify = Callable[[Mapping[str, ContainerRun], str | None], None]


class Supervisor:
    """Drives one group's containers over one agent connection. `notify(runs, event)` is called after
    every change, with a sentence for the user when something happened to a container."""

    def __init__(self, client: AgentClient, group: SupervisedGroup, runs: Mapping[str, ContainerRun] | None = None,
                 *, notify: Notify | None = None, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.group = group
        self.runs = dict(runs) if runs else initial_runs(group)
        for c in group.all_containers:
            self.runs.setdefault(c.name, ContainerRun(c.name, init=c.init))
        self._notify = notify or (lambda runs, event: None)
        self._clock = clock
        self._generation = -1
        self.start_results: dict[str, dict[str, Any]] = {}    # each container's first create and start
        self._probing: dict[tuple[str, ProbeKind], _Probing] = {}
        self._started: set[str] = set()     # containers whose startup probe passed (or that have none)
        for c in group.containers:          # taken over running: probe from now on
            r = self.runs[c.name]
            if r.status == RunStatus.running:
                self._arm(c, r, max(self._clock(), r.started_at or 0.0))

    # -- the loop -------------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None, *, until_started: bool = False) -> GroupOutcome:
        """Start, watch and restart the containers until the group can no longer run (GroupOutcome.done with its
        exit code) or `stop` is set. With `until_started`, hand over (GroupOutcome(False)) as soon as every
        container has started once, or an init container failed and is waiting to be restarted."""
        stop = stop or threading.Event()
        while not stop.is_set():
            self._act()
            self._probe()
            outcome = self.outcome()
            if outcome is not None:
                return outcome
            if until_started and self._started_or_retrying():
                return GroupOutcome(False)
            due = [r.restart_at for r in self.runs.values() if r.status == RunStatus.restarting and r.restart_at]
            due += [p.due for (name, kind), p in self._probing.items() if self._active(name, kind)]
            wait = min([WATCH_S, *(max(0.0, t - self._clock()) for t in due)])
            w = self.client.call(WatchContainersRequest(self._generation, wait), timeout=wait + 30)
            self._generation = w.generation
            self._observe(w.containers)
        return GroupOutcome(False)

    def outcome(self) -> GroupOutcome | None:
        """The group's exit code once it can no longer run, else None."""
        for c in self.group.init_containers:
            r = self.runs[c.name]
            if r.over and not r.completed:
                return GroupOutcome(True, self._code(r))
            if not r.completed:
                return None
        mains = [self.runs[c.name] for c in self.group.containers]
        if not all(r.over for r in mains):
            return None
        failed = sorted((r for r in mains if self._code(r) != 0), key=lambda r: r.finished_at or 0.0)
        return GroupOutcome(True, self._code(failed[0]) if failed else 0)

    @staticmethod
    def _code(r: ContainerRun) -> int:
        if r.status == RunStatus.failed and r.exit_code in (None, 0):
            return 1
        return r.exit_code or 0

    def _started_or_retrying(self) -> bool:
        if any(self.runs[c.name].status == RunStatus.restarting for c in self.group.init_containers):
            return True
        return all(self.runs[c.name].status != RunStatus.waiting for c in self.group.containers)

    def _set(self, run: ContainerRun, event: str | None = None) -> None:
        self.runs[run.name] = run
        self._notify(dict(self.runs), event)

    # -- starting -------------------------------------------------------------------------------------

    def _act(self) -> None:
        """Start whatever is due: the next init container, the containers once every init container has
        completed, and restarts whose back-off has passed."""
        for c in self.group.init_containers:
            r = self.runs[c.name]
            if r.completed:
                continue
            if r.status == RunStatus.waiting or self._due(r):
                self._start(c, r)
            return      # one init container at a time, in order
        for c in self.group.containers:
            r = self.runs[c.name]
            if r.status == RunStatus.waiting or self._due(r):
                self._start(c, r)

    def _due(self, r: ContainerRun) -> bool:
        return r.status == RunStatus.restarting and (r.restart_at is None or r.restart_at <= self._clock())

    def _start(self, c: ContainerPlan, r: ContainerRun) -> None:
        again = r.status == RunStatus.restarting
        t0 = time.monotonic()
        try:
            self.client.call(c.scratch)
            self.client.call(c.overlay)
            created = self.client.call(c.create, timeout=120)
            started = self.client.call(StartContainerRequest(c.name), timeout=120)
        except (AgentError, PolicyDenied) as e:
            if not again:
                raise           # the first start happens in `up`, which reports it
            self._clean(c)
            self._set(replace(r, status=RunStatus.failed, error=e.message, restart_at=None),
                      f"{_what(c)} {c.name} could not be restarted: {e.message}")
            return
        self.start_results.setdefault(c.name, {"create": created.to_json(), "start": started.to_json(),
                                               "seconds": round(time.monotonic() - t0, 3)})
        now = self._clock()
        run = replace(r, status=RunStatus.running, started_at=now, restart_at=None, error=None,
                      restarts=r.restarts + (1 if again else 0))
        self._set(self._arm(c, run, now), f"{_what(c)} {c.name} restarted (restart {r.restarts + 1})" if again else None)

    def _clean(self, c: ContainerPlan) -> None:
        """Undo what a container's start left (best effort: a step that never happened is not an error)."""
        steps: tuple[tuple[Request[Any], float], ...] = (
            (ShutdownContainerRequest(c.name, STOP_TIMEOUT_S), STOP_TIMEOUT_S + 30),
            (c.unmount_overlay, 60.0), (c.unmount_scratch, 60.0))
        for request, timeout in steps:
            try:
                self.client.call(request, timeout=timeout)
            except AgentError as e:
                if e.code not in (ErrorCode.not_found.value, ErrorCode.conflict.value):
                    raise
            except PolicyDenied:
                pass            # e.g. shutdown of an id that was never created

    # -- exits ----------------------------------------------------------------------------------------

    def _observe(self, infos: Sequence[ContainerInfo]) -> None:
        by_id = {i.id: i for i in infos}
        for c in self.group.all_containers:
            r = self.runs[c.name]
            info = by_id.get(c.name)
            if r.status == RunStatus.running and info is not None and info.status == "exited":
                self._exited(c, r, info.exit_code if info.exit_code is not None else 0)

    def _exited(self, c: ContainerPlan, r: ContainerRun, code: int, cause: str | None = None) -> None:
        """The container exited with `code`, or (with `cause`, a sentence) a probe had it stopped."""
        now = self._clock()
        self._disarm(c)
        if c.probes and any(p.kind == ProbeKind.readiness for p in c.probes):
            r = replace(r, ready=False)
        what = cause or f"exited with code {code}"
        policy = self.group.restart_policy
        if c.init and code == 0:
            self._clean(c)      # done for good: its scratch goes back to the group (its output stays readable)
            self._set(replace(r, status=RunStatus.exited, exit_code=0, finished_at=now),
                      f"init container {c.name} completed")
            return
        restart = policy == RestartPolicy.always or (policy == RestartPolicy.on_failure and code != 0)
        if c.init:
            restart = policy != RestartPolicy.never     # a failed init container is retried unless Never
        if not restart:
            self._set(replace(r, status=RunStatus.exited, exit_code=code, finished_at=now),
                      f"{_what(c)} {c.name} {what}")
            return
        ran = now - r.started_at if r.started_at is not None else 0.0
        backoff = 0 if ran >= BACKOFF_RESET_S else r.backoff
        delay = backoff_delay(backoff)
        self._clean(c)
        self._set(replace(r, status=RunStatus.restarting, exit_code=code, finished_at=now, restart_at=now + delay,
                          backoff=backoff + 1),
                  f"{_what(c)} {c.name} {what}; restarting in {delay:g} s (restartPolicy {policy.value})")

    # -- probes ---------------------------------------------------------------------------------------

    def _arm(self, c: ContainerPlan, r: ContainerRun, started: float) -> ContainerRun:
        """Schedule the probes of a container that (re)started at `started`; the run as it starts. An httpGet
        probe whose port no group port forwards is not run: the run says so, and counts as passing."""
        self._disarm(c)
        self._started.add(c.name)
        ready: bool | None = None
        note = None
        for p in c.probes:
            if p.probe.http_get is not None and p.host_port is None:
                note = (f"{p.kind.value} probe not run: port {p.probe.http_get.port} is not forwarded to the host "
                        "(add it to the group's ports)")
                continue
            self._probing[(c.name, p.kind)] = _Probing(started + p.probe.initial_delay_s)
            if p.kind == ProbeKind.startup:
                self._started.discard(c.name)
            elif p.kind == ProbeKind.readiness:
                ready = False           # not ready until the probe passes
        if any(p.kind == ProbeKind.readiness for p in c.probes) and ready is None:
            ready = True                # its probe cannot run here
        return replace(r, ready=ready, probe_error=note or r.probe_error)    # why it last restarted stays

    def _disarm(self, c: ContainerPlan) -> None:
        for p in c.probes:
            self._probing.pop((c.name, p.kind), None)
        self._started.discard(c.name)

    def _active(self, name: str, kind: ProbeKind) -> bool:
        """Whether the probe runs now: startup until it passes, the others after."""
        return (kind == ProbeKind.startup) != (name in self._started)

    def _probe(self) -> None:
        """Run the probes that are due, one after another, and act on their results."""
        for c in self.group.containers:
            for p in c.probes:
                state = self._probing.get((c.name, p.kind))
                if state is None or state.due > self._clock() or not self._active(c.name, p.kind):
                    continue
                if self.runs[c.name].status != RunStatus.running:
                    break
                result = run_probe(self.client, c.name, c.stdio, p, state.pending)
                state.due = self._clock() + p.probe.period_s
                if result is None:
                    continue
                state.pending, state.last = result.pending, result
                state.successes, state.failures = ((state.successes + 1, 0) if result.passed
                                                   else (0, state.failures + 1))
                self._judge(c, p, state)

    def _judge(self, c: ContainerPlan, p: ProbePlan, state: _Probing) -> None:
        r = self.runs[c.name]
        probe, result = p.probe, state.last
        assert result is not None
        times = f"{state.failures} time{'s' if state.failures > 1 else ''}"
        failed = f"{p.kind.value} probe failed {times}: {result.detail}"
        if p.kind == ProbeKind.readiness:
            if result.passed and state.successes >= probe.success_threshold and r.ready is not True:
                self._set(replace(r, ready=True), f"container {c.name} is ready")
            elif (not result.passed and state.failures >= probe.failure_threshold
                  and (r.ready is not False or r.probe_error is None)):
                self._set(replace(r, ready=False, probe_error=failed),
                          f"container {c.name} is not ready ({failed})" if r.ready else None)
            return
        if result.passed:
            if p.kind == ProbeKind.startup:
                self._started.add(c.name)       # liveness and readiness start now (when due)
            return
        if state.failures < probe.failure_threshold:
            return
        # As kubelet: stop the container; its restart (or not) is the restartPolicy's.
        try:
            stopped = self.client.call(ShutdownContainerRequest(c.name, STOP_TIMEOUT_S), timeout=STOP_TIMEOUT_S + 30)
            code = stopped.exit_code if stopped.exit_code is not None else 137
        except AgentError as e:
            if e.code not in (ErrorCode.not_found.value, ErrorCode.conflict.value):
                raise
            return          # it exited meanwhile: its watch tells
        self._exited(c, replace(r, probe_error=failed), code, f"was stopped: its {failed}")


def _what(c: ContainerPlan) -> str:
    return "init container" if c.init else "container"


# -------------------------------------------------------------------------------------------------------
# The plan a detached group's supervisor process works from


def write_plan(state_dir: Path, group: SupervisedGroup) -> Path:
    """The supervisor's plan, beside the state record (mode 0600: it holds the containers' env)."""
    path = state_dir / PLAN_FILE
    atomic_write(path, json.dumps(group.to_json(), separators=(",", ":")).encode(), 0o600)
    return path


def read_plan(state_dir: Path) -> SupervisedGroup:
    return SupervisedGroup.from_json(json.loads((state_dir / PLAN_FILE).read_text()))
