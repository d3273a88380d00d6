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
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sandbox.fsutil import atomic_write
from sandbox.group.spec import RestartPolicy
from sandbox.launch.agent_client import AgentClient, AgentError
from sandbox.launch.plan import ContainerPlan, LaunchPlan
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

    # -- the loop -------------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None, *, until_started: bool = False) -> GroupOutcome:
        """Start, watch and restart the containers until the group can no longer run (GroupOutcome.done with its
        exit code) or `stop` is set. With `until_started`, hand over (GroupOutcome(False)) as soon as every
        container has started once, or an init container failed and is waiting to be restarted."""
        stop = stop or threading.Event()
        while not stop.is_set():
            self._act()
            outcome = self.outcome()
            if outcome is not None:
                return outcome
            if until_started and self._started_or_retrying():
                return GroupOutcome(False)
            due = [r.restart_at for r in self.runs.values() if r.status == RunStatus.restarting and r.restart_at]
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
        self._set(replace(r, status=RunStatus.running, started_at=self._clock(), restart_at=None, error=None,
                          restarts=r.restarts + (1 if again else 0)),
                  f"{_what(c)} {c.name} restarted (restart {r.restarts + 1})" if again else None)

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

    def _exited(self, c: ContainerPlan, r: ContainerRun, code: int) -> None:
        now = self._clock()
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
                      f"{_what(c)} {c.name} exited with code {code}")
            return
        ran = now - r.started_at if r.started_at is not None else 0.0
        backoff = 0 if ran >= BACKOFF_RESET_S else r.backoff
        delay = backoff_delay(backoff)
        self._clean(c)
        self._set(replace(r, status=RunStatus.restarting, exit_code=code, finished_at=now, restart_at=now + delay,
                          backoff=backoff + 1),
                  f"{_what(c)} {c.name} exited with code {code}; restarting in {delay:g} s "
                  f"(restartPolicy {policy.value})")


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
