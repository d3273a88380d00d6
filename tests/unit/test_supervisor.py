"""The group's lifecycle (sandbox/launch/supervisor.py) against a scripted agent: init containers in order,
restartPolicy, back-off, and when the group is over. Every request the supervisor sends is recorded, so
the tests see the exact sequence a real agent (and its policy) would be asked."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable
from typing import Any

import pytest

from sandbox.group.spec import HttpGetAction, ProbeKind, ProbeSpec, RestartPolicy
from sandbox.launch.agent_client import AgentDenied
from sandbox.launch.plan import ContainerPlan, ProbePlan
from sandbox.launch.supervisor import (
    BACKOFF_MAX_S,
    ContainerRun,
    RunStatus,
    SupervisedGroup,
    Supervisor,
    backoff_delay,
)
from sandbox.shared import messages as M
from sandbox.shared.protocol import ErrorCode


def plan(name: str, init: bool = False, probes: tuple[ProbePlan, ...] = ()) -> ContainerPlan:
    return ContainerPlan(name, ("/run/parma/layers/l0",), M.CreateContainerRequest(name, ("/bin/true",), ()), True,
                         init=init, probes=probes)


Exits = dict[str, int]


class FakeAgent:
    """Answers like the agent: containers are created, started, exit when the script says, and are
    deleted by shutdown_container. The script is a list of steps {container: exit code}: at each watch
    (once its wait has passed), the next step happens if every container it names is running."""

    def __init__(self, script: list[Exits] | None = None, deny_create: set[str] | None = None,
                 after: Callable[[FakeAgent, Exits], None] | None = None,
                 probe: Callable[[FakeAgent, str, tuple[str, ...]], int | None] | None = None) -> None:
        self.now = 1000.0
        self.calls: list[tuple[str, str]] = []
        self.status: dict[str, str] = {}
        self.codes: dict[str, int | None] = {}
        self.generation = 0
        self.watches = 0
        self.script = list(script or [])
        self.deny_create = deny_create or set()
        self.after = after
        # Exec probes: `probe(agent, container, argv)` is the exit code (None: it hangs; -1: the policy denies it).
        self.probe = probe
        self.execs: dict[str, int | None] = {}

    def clock(self) -> float:
        return self.now

    def exit(self, name: str, code: int) -> None:
        assert self.status[name] == "running", f"{name} is {self.status.get(name)}"
        self.status[name], self.codes[name] = "exited", code
        self.generation += 1

    def call(self, request: Any, timeout: float | None = None) -> Any:
        op = request.op.value
        cid = getattr(request, "container_id", None) or getattr(request, "target", "").split("/")[-2:][0]
        if op != "watch_containers":
            self.calls.append((op, cid))
        match request:
            case M.CreateContainerRequest():
                if request.container_id in self.deny_create:
                    raise AgentDenied("create_container denied for container: no")
                self.status[request.container_id], self.codes[request.container_id] = "created", None
                return M.CreateContainerResult(1, True, 0.0, 0.0, 0.0)
            case M.StartContainerRequest():
                self.status[request.container_id] = "running"
                self.generation += 1
                return M.StartContainerResult(1, 0.0)
            case M.ShutdownContainerRequest():
                if self.status.get(request.container_id) in (None, "deleted"):
                    from sandbox.launch.agent_client import AgentError
                    raise AgentError("no such container", code=ErrorCode.not_found.value)
                if self.status[request.container_id] == "running":     # stopped by the shutdown's SIGTERM
                    self.status[request.container_id], self.codes[request.container_id] = "exited", 143
                self.status[request.container_id] = "deleted"
                return M.ShutdownResult(self.codes.get(request.container_id), None)
            case M.ExecProcessRequest():
                if self.status.get(request.container_id) != "running":
                    from sandbox.launch.agent_client import AgentError
                    raise AgentError("not running", code=ErrorCode.conflict.value)
                assert self.probe is not None
                code = self.probe(self, request.container_id, request.argv)
                if code == -1:
                    raise AgentDenied("exec_in_container denied: not an exec_process of the container")
                exec_id = f"e{len(self.execs)}"
                self.execs[exec_id] = code
                return M.ExecProcessResult(exec_id, 2, True)
            case M.WaitProcessRequest():
                code = self.execs[request.exec_id]
                if code is None:
                    self.now += request.timeout
                    return M.ProcessExit(True, None, None)
                return M.ProcessExit(False, code, None)
            case M.ReadOutputRequest():
                data = b"" if self.execs[request.exec_id] == 0 else b"not\nhealthy\n"
                chunk = data[request.offset:]
                return M.ReadOutputResult((M.OutputChunk(M.OutputStream.stdout, chunk),) if chunk else (),
                                          request.offset + len(chunk), 0, True)
            case M.WatchContainersRequest():
                self.watches += 1
                self.now += request.wait
                if self.script and all(self.status.get(n) == "running" for n in self.script[0]):
                    step = self.script.pop(0)
                    for name, code in step.items():
                        self.exit(name, code)
                    if self.after is not None:
                        self.after(self, step)
                infos = tuple(M.ContainerInfo(n, "exited" if s == "deleted" else s, 1, self.codes.get(n), True)
                              for n, s in self.status.items())
                return M.WatchContainersResult(self.generation, infos)
        return M.EmptyResult()


def supervise(group: SupervisedGroup, agent: FakeAgent, **kw: Any) -> tuple[Supervisor, Any, list[str]]:
    events: list[str] = []
    sup = Supervisor(agent, group, notify=lambda runs, event: events.append(event) if event else None,  # type: ignore[arg-type]
                     clock=agent.clock)
    outcome = sup.run(**kw)
    return sup, outcome, events


def starts(agent: FakeAgent) -> list[str]:
    return [cid for op, cid in agent.calls if op == "start_container"]


def test_init_containers_run_in_order_to_completion_before_the_containers() -> None:
    group = SupervisedGroup(RestartPolicy.never, (plan("i1", True), plan("i2", True)), (plan("app"), plan("db")))
    agent = FakeAgent([{"i1": 0}, {"i2": 0}, {"app": 0, "db": 0}])
    sup, outcome, events = supervise(group, agent)
    assert starts(agent) == ["i1", "i2", "app", "db"]
    ops = [op for op, cid in agent.calls if cid == "i1"]
    # Each step of a start is its own (policy-checked) request; a completed init container is cleaned up.
    assert ops == ["mount_scratch", "mount_overlay", "create_container", "start_container",
                   "shutdown_container", "unmount_overlay", "unmount_scratch"]
    assert agent.calls.index(("start_container", "app")) > agent.calls.index(("shutdown_container", "i2"))
    assert outcome.done and outcome.exit_code == 0
    assert events[:2] == ["init container i1 completed", "init container i2 completed"]


def test_a_failed_init_container_under_never_ends_the_group_with_its_code() -> None:
    group = SupervisedGroup(RestartPolicy.never, (plan("i1", True),), (plan("app"),))
    agent = FakeAgent([{"i1": 3}])
    sup, outcome, _ = supervise(group, agent)
    assert starts(agent) == ["i1"] and outcome.done and outcome.exit_code == 3
    assert sup.runs["app"].status == RunStatus.waiting


def test_a_failed_init_container_is_retried_under_on_failure_and_up_hands_over() -> None:
    group = SupervisedGroup(RestartPolicy.on_failure, (plan("i1", True),), (plan("app"),))
    agent = FakeAgent([{"i1": 1}])
    sup, outcome, events = supervise(group, agent, until_started=True)
    assert not outcome.done and sup.runs["i1"].status == RunStatus.restarting
    assert events == ["init container i1 exited with code 1; restarting in 10 s (restartPolicy OnFailure)"]
    # The supervisor (here the same object, as the detached process takes over the runs) goes on.
    agent.script = [{"i1": 0}, {"app": 0}]
    outcome = sup.run()
    assert starts(agent) == ["i1", "i1", "app"] and sup.runs["i1"].restarts == 1
    assert outcome.done and outcome.exit_code == 0


def test_on_failure_restarts_a_failed_container_and_not_a_successful_one() -> None:
    group = SupervisedGroup(RestartPolicy.on_failure, (), (plan("flaky"), plan("ok")))
    agent = FakeAgent([{"flaky": 1, "ok": 0}, {"flaky": 0}])
    sup, outcome, events = supervise(group, agent)
    assert starts(agent) == ["flaky", "ok", "flaky"]
    assert sup.runs["flaky"].restarts == 1 and sup.runs["flaky"].exit_code == 0
    assert sup.runs["ok"].restarts == 0 and sup.runs["ok"].status == RunStatus.exited
    # The restart: the old incarnation is stopped and unmounted, then every step is asked for again.
    i = agent.calls.index(("shutdown_container", "flaky"))
    assert [op for op, cid in agent.calls[i:] if cid == "flaky"][:7] == [
        "shutdown_container", "unmount_overlay", "unmount_scratch", "mount_scratch", "mount_overlay",
        "create_container", "start_container"]
    assert "container flaky exited with code 1; restarting in 10 s (restartPolicy OnFailure)" in events
    assert outcome.done and outcome.exit_code == 0


def test_never_restarts_nothing_and_the_group_exits_with_the_first_failure() -> None:
    group = SupervisedGroup(RestartPolicy.never, (), (plan("a"), plan("b"), plan("c")))
    agent = FakeAgent([{"b": 7}, {"a": 0, "c": 9}])
    sup, outcome, _ = supervise(group, agent)
    assert starts(agent) == ["a", "b", "c"]
    assert {n: (r.status, r.exit_code, r.restarts) for n, r in sup.runs.items()} == {
        "a": (RunStatus.exited, 0, 0), "b": (RunStatus.exited, 7, 0), "c": (RunStatus.exited, 9, 0)}
    assert outcome.done and outcome.exit_code == 7


def test_always_restarts_even_a_clean_exit_with_back_off() -> None:
    group = SupervisedGroup(RestartPolicy.always, (), (plan("app"),))
    agent = FakeAgent([{"app": 0}] * 3)
    sup = Supervisor(agent, group, clock=agent.clock)  # type: ignore[arg-type]
    exits: list[float] = []
    restarts: list[float] = []

    def notify(runs: Any, event: str | None) -> None:
        if event and "restarting" in event:
            exits.append(agent.now)
        if event and "restarted" in event:
            restarts.append(agent.now)
    sup._notify = notify
    class Stop:
        def is_set(self) -> bool:
            return len(restarts) == 3

    outcome = sup.run(Stop())  # type: ignore[arg-type]
    assert not outcome.done
    assert sup.runs["app"].restarts == 3
    assert [round(r - e) for e, r in zip(exits, restarts, strict=False)] == [10, 20, 40]


def test_back_off_doubles_to_five_minutes_and_starts_over_after_a_long_run() -> None:
    assert [backoff_delay(n) for n in range(7)] == [10, 20, 40, 80, 160, 300, 300]
    assert backoff_delay(20) == BACKOFF_MAX_S
    group = SupervisedGroup(RestartPolicy.always, (), (plan("app"),))
    agent = FakeAgent([{"app": 1}])
    sup = Supervisor(agent, group, {"app": ContainerRun("app", status=RunStatus.running, started_at=0.0, backoff=5)},
                     clock=agent.clock)  # type: ignore[arg-type]
    agent.status["app"] = "running"

    class Once:
        def is_set(self) -> bool:
            return agent.watches >= 1

    sup.run(Once())  # type: ignore[arg-type]
    run = sup.runs["app"]        # it ran 1000 s: back to 10 s
    assert run.status == RunStatus.restarting and run.restart_at == agent.now + 10 and run.backoff == 1


def test_a_restart_the_policy_denies_fails_the_container_for_good() -> None:
    group = SupervisedGroup(RestartPolicy.always, (), (plan("app"),))
    agent = FakeAgent([{"app": 2}], after=lambda a, step: a.deny_create.add("app"))
    sup, outcome, events = supervise(group, agent)
    run = sup.runs["app"]
    assert run.status == RunStatus.failed and "denied" in (run.error or "") and run.exit_code == 2
    assert outcome.done and outcome.exit_code == 2
    assert events[-1].startswith("container app could not be restarted: create_container denied")


def test_the_first_start_reports_a_denial_to_up() -> None:
    group = SupervisedGroup(RestartPolicy.always, (), (plan("app"),))
    with pytest.raises(AgentDenied):
        supervise(group, FakeAgent(deny_create={"app"}), until_started=True)


def test_runs_survive_the_state_file() -> None:
    run = ContainerRun("app", status=RunStatus.restarting, restarts=2, exit_code=137, restart_at=5.0, backoff=2)
    assert ContainerRun.from_json(run.to_json()) == run


# -- probes -------------------------------------------------------------------------------------------------

HEALTHY = ("/bin/cat", "/tmp/healthy")


def exec_probe(kind: ProbeKind, argv: tuple[str, ...] = HEALTHY, **timing: int) -> ProbePlan:
    return ProbePlan(kind, ProbeSpec(exec_command=argv, **timing))


class Until:
    """A stop event that is set once `check` holds (the supervisor checks it before each round)."""

    def __init__(self, check: Callable[[], bool]) -> None:
        self.check = check

    def is_set(self) -> bool:
        return self.check()


def healthy_until(t: float) -> Callable[[FakeAgent, str, tuple[str, ...]], int | None]:
    """The probe passes until clock time t (absolute), then fails (exit 1) for good."""
    return lambda agent, container, argv: 0 if agent.now < t else 1


def test_a_failing_liveness_probe_restarts_the_container_as_the_restart_policy_says() -> None:
    live = exec_probe(ProbeKind.liveness, initial_delay_s=5, period_s=2, failure_threshold=3)
    group = SupervisedGroup(RestartPolicy.always, (), (plan("web", probes=(live,)),))
    times: list[float] = []
    passing = healthy_until(1020.0)
    agent = FakeAgent(probe=lambda a, c, argv: (times.append(a.now), passing(a, c, argv))[1])
    events: list[str] = []
    sup = Supervisor(agent, group, notify=lambda runs, e: events.append(e) if e else None,  # type: ignore[arg-type]
                     clock=agent.clock)
    sup.run(Until(lambda: sup.runs["web"].restarts == 1))  # type: ignore[arg-type]
    run = sup.runs["web"]
    assert run.status == RunStatus.running and run.restarts == 1 and run.exit_code == 143
    # Probed from 5 s after the start (at 1000), every 2 s: 1005 ... 1019 pass, and three failures in a row
    # (1021, 1023, 1025) stop it; the new incarnation is probed 5 s after its start.
    assert times[:11] == [1005.0 + 2 * i for i in range(11)] and times[11:] == []
    execs = [op for op, cid in agent.calls if op == "exec_process"]
    assert events[0] == ("container web was stopped: its liveness probe failed 3 times: exit code 1: not healthy; "
                         "restarting in 10 s (restartPolicy Always)")
    assert events[1] == "container web restarted (restart 1)"
    assert run.probe_error == "liveness probe failed 3 times: exit code 1: not healthy"
    # The stop is the agent's shutdown, then the usual restart: every step asked for again.
    i = agent.calls.index(("shutdown_container", "web"))
    assert [op for op, cid in agent.calls[i:] if op != "exec_process"][:7] == [
        "shutdown_container", "shutdown_container", "unmount_overlay", "unmount_scratch", "mount_scratch",
        "mount_overlay", "create_container"]
    # Each probe's output is read to its end (so the agent forgets the process).
    assert [op for op, _ in agent.calls].count("read_output") == len(execs)


def test_a_liveness_failure_under_never_ends_the_group() -> None:
    live = exec_probe(ProbeKind.liveness, period_s=1, failure_threshold=1)
    group = SupervisedGroup(RestartPolicy.never, (), (plan("web", probes=(live,)),))
    sup, outcome, events = supervise(group, FakeAgent(probe=lambda a, c, argv: 2))
    assert outcome.done and outcome.exit_code == 143
    assert sup.runs["web"].status == RunStatus.exited and sup.runs["web"].restarts == 0
    assert events == ["container web was stopped: its liveness probe failed 1 time: exit code 2: not healthy"]


def test_readiness_follows_its_thresholds_and_never_restarts() -> None:
    ready = exec_probe(ProbeKind.readiness, period_s=1, failure_threshold=2, success_threshold=2)
    group = SupervisedGroup(RestartPolicy.always, (), (plan("web", probes=(ready,)),))
    seen: list[bool | None] = []
    agent = FakeAgent(probe=lambda a, c, argv: 0 if a.now < 1010 or a.now >= 1020 else 1)
    sup = Supervisor(agent, group, notify=lambda runs, e: seen.append(runs["web"].ready),  # type: ignore[arg-type]
                     clock=agent.clock)
    events: list[str] = []
    inner = sup._notify
    sup._notify = lambda runs, e: (inner(runs, e), events.append(e) if e else None)  # type: ignore[assignment]
    sup.run(Until(lambda: agent.now >= 1030))  # type: ignore[arg-type]
    assert seen[0] is False                    # not ready until the probe passes
    assert events == ["container web is ready", "container web is not ready (readiness probe failed 2 times: "
                      "exit code 1: not healthy)", "container web is ready"]
    assert sup.runs["web"].restarts == 0 and sup.runs["web"].ready is True


def test_a_startup_probe_holds_the_others_back_and_restarts_when_it_fails() -> None:
    start = exec_probe(ProbeKind.startup, ("/bin/started",), period_s=1, failure_threshold=4)
    live = exec_probe(ProbeKind.liveness, period_s=1)
    group = SupervisedGroup(RestartPolicy.always, (), (plan("web", probes=(start, live)),))
    ran: list[tuple[float, tuple[str, ...]]] = []

    def probe(agent: FakeAgent, container: str, argv: tuple[str, ...]) -> int:
        ran.append((agent.now, argv))
        return 0 if argv == HEALTHY or agent.now >= 1003 else 1
    agent = FakeAgent(probe=probe)
    sup, _, _ = supervise(group, agent, stop=Until(lambda: agent.now >= 1008))
    commands = [argv for _, argv in ran]
    first_live = commands.index(HEALTHY)
    assert set(commands[:first_live]) == {("/bin/started",)} and ("/bin/started",) not in commands[first_live:]
    assert sup.runs["web"].restarts == 0
    # Failing four times in a row before it passes: a restart.
    agent = FakeAgent(probe=lambda a, c, argv: 1)
    sup, _, events = supervise(group, agent, stop=Until(lambda: agent.now >= 1020))
    assert sup.runs["web"].restarts == 1 and "its startup probe failed 4 times" in events[0]


def test_an_exec_probe_that_overruns_fails_and_is_not_started_twice() -> None:
    live = exec_probe(ProbeKind.liveness, period_s=5, timeout_s=2, failure_threshold=2)
    group = SupervisedGroup(RestartPolicy.never, (), (plan("web", probes=(live,)),))
    agent = FakeAgent(probe=lambda a, c, argv: None)        # hangs
    sup, outcome, events = supervise(group, agent)
    assert [op for op, _ in agent.calls].count("exec_process") == 1
    assert events == ["container web was stopped: its liveness probe failed 2 times: the probe started 2 s or "
                      "more ago still runs"]
    assert outcome.exit_code == 143


def test_a_probe_the_policy_denies_fails_with_the_denial() -> None:
    live = exec_probe(ProbeKind.liveness, period_s=1, failure_threshold=1)
    group = SupervisedGroup(RestartPolicy.never, (), (plan("web", probes=(live,)),))
    sup, _, _ = supervise(group, FakeAgent(probe=lambda a, c, argv: -1))
    assert "denied by policy" not in (sup.runs["web"].probe_error or "x")
    assert "exec_in_container denied" in (sup.runs["web"].probe_error or "")


class Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:     # the stdlib's name
        self.send_response(Health.status if self.path == "/ready" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_http_probes_go_to_the_forwarded_port_from_the_host() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        ready = ProbePlan(ProbeKind.readiness, ProbeSpec(http_get=HttpGetAction(8080, "/ready"), period_s=1,
                                                         failure_threshold=1), "127.0.0.1", port)
        group = SupervisedGroup(RestartPolicy.always, (), (plan("web", probes=(ready,)),))
        agent = FakeAgent()
        sup, _, _ = supervise(group, agent, stop=Until(lambda: agent.now >= 1003))
        assert sup.runs["web"].ready is True
        Health.status = 503
        sup.run(Until(lambda: agent.now >= 1006))  # type: ignore[arg-type]
        assert sup.runs["web"].ready is False
        assert sup.runs["web"].probe_error == f"readiness probe failed 1 time: GET /ready on port {port}: HTTP status 503"
        assert "exec_process" not in [op for op, _ in agent.calls]
    finally:
        Health.status = 200
        server.shutdown()
        server.server_close()


def test_an_http_probe_on_a_port_the_host_cannot_reach_is_not_run() -> None:
    ready = ProbePlan(ProbeKind.readiness, ProbeSpec(http_get=HttpGetAction(8080), period_s=1))
    group = SupervisedGroup(RestartPolicy.always, (), (plan("web", probes=(ready,)),))
    agent = FakeAgent()
    sup, _, _ = supervise(group, agent, stop=Until(lambda: agent.now >= 1003))
    run = sup.runs["web"]
    assert run.ready is True and run.probe_error == ("readiness probe not run: port 8080 is not forwarded to the "
                                                     "host (add it to the group's ports)")


def test_probing_resumes_when_another_supervisor_takes_over() -> None:
    live = exec_probe(ProbeKind.liveness, period_s=1, failure_threshold=1)
    group = SupervisedGroup(RestartPolicy.never, (), (plan("web", probes=(live,)),))
    agent = FakeAgent(probe=lambda a, c, argv: 1)
    agent.status["web"] = "running"
    runs = {"web": ContainerRun("web", status=RunStatus.running, started_at=900.0)}
    sup = Supervisor(agent, group, runs, clock=agent.clock)  # type: ignore[arg-type]
    outcome = sup.run()
    assert outcome.done and sup.runs["web"].exit_code == 143
    assert agent.calls[0] == ("exec_process", "web")      # due at once: its start was long ago
