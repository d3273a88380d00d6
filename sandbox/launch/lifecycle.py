"""What runs against an existing sandbox: inspect, logs, exec and down, and the group's supervision after
`up` (attached, on a thread; detached, in the supervisor process)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from sandbox.launch.agent_client import AgentClient, AgentDenied, AgentError, AgentUnreachable
from sandbox.launch.pipeline import Launched, agent_sockets, load_running, sandbox_paths
from sandbox.launch.supervisor import GroupOutcome, Notify, Supervisor, read_plan
from sandbox.log import log
from sandbox.shared import errors as E
from sandbox.shared.messages import (
    ExecProcessRequest,
    ExecProcessResult,
    ListContainersRequest,
    OutputStream,
    PingRequest,
    PoweroffRequest,
    ReadOutputRequest,
    ShutdownContainerRequest,
    WaitProcessRequest,
)
from sandbox.shared.protocol import PORT_COUNT
from sandbox.state import (
    LAUNCHER,
    SUPERVISOR,
    ContainerRecord,
    ContainerRun,
    ProcessRef,
    RunStatus,
    SandboxRecord,
    SandboxStatus,
    StateStore,
    process_start_time,
)
from sandbox.vmm import backend as vmm

SUPERVISOR_STOP_S = 10.0
EOF_RECHECK_S = 2.0           # an ended stream of an attached `up` is read again this often (restarts)


def connect(record: SandboxRecord, store: StateStore | None = None, *, wait: float = 30.0) -> AgentClient:
    store = store or StateStore()
    return AgentClient.connect(agent_sockets(store.dir(record.name)), wait=wait)


def inspect(name: str, store: StateStore | None = None) -> dict[str, Any]:
    store = store or StateStore()
    record = store.require(name)
    info: dict[str, Any] = {
        "name": name, "status": record.observed().value, "created": record.created,
        "tee": record.tee, "accel": record.accel, "backend": record.backend,
        "policy_hash": record.policy_hash, "expected_measurement": record.measurement,
        "devices": [d.to_json() for d in record.devices], "ports": [p.to_json() for p in record.ports],
        "vm": record.vm, "uvm": record.uvm.to_json() if record.uvm else None, "state_dir": str(store.dir(name)),
        "startup": record.startup, "launch": record.launch, "selfcheck": record.selfcheck,
        # the env may hold secure values: inspect never shows it
        "containers": [{k: v for k, v in c.to_json().items() if k != "env"} for c in record.containers],
        "restart_policy": record.restart_policy,
    }
    live: dict[str, Any] = {}
    if info["status"] == "running":
        try:
            with connect(record, store, wait=2) as client:
                live = {c.id: c for c in client.call(ListContainersRequest(), timeout=10).containers}
        except E.SandboxError as e:
            info["agent_error"] = str(e)
    for c in info["containers"]:
        run = record.run(c["name"])
        if run is not None:
            # The supervisor's view: it knows about restarts and back-off, the agent only the incarnation.
            c.update(status=run.status.value, restarts=run.restarts, exit_code=run.exit_code, error=run.error,
                     restart_at=run.restart_at, ready=run.ready, probe_error=run.probe_error)
        if c["name"] in live and (run is None or run.status == RunStatus.running):
            c["status"] = live[c["name"]].status
            if live[c["name"]].exit_code is not None:
                c["exit_code"] = live[c["name"]].exit_code
    return info


def launch_trace(name: str, store: StateStore | None = None) -> str:
    """The `policy check` trace of the requests the launch of sandbox NAME sent (docs/policy-trace.md)."""
    store = store or StateStore()
    record = store.require(name)
    lines = record.trace
    if not lines:
        raise E.StateError(f"sandbox {name!r} has no recorded trace: it is still starting, or an older "
                           "parma-sandbox launched it", hint="'parma-sandbox up --record-trace FILE' writes one")
    return "".join(line + "\n" for line in lines)


def save_runs(store: StateStore, name: str, runs: Mapping[str, ContainerRun]) -> None:
    """Record the containers' lifecycle in the sandbox's state (the supervisor is its only writer)."""
    record = store.load(name)
    if record is not None:
        store.save(replace(record, runs=tuple(runs.values())))


# ---------------------------------------------------------------------------------------------
# logs


@dataclass
class OutputCursor:
    container: str
    exec_id: str | None = None
    offset: int = 0
    eof: bool = False


def _write(out: BinaryIO, prefix: bytes, data: bytes, pending: dict[int, bytes]) -> None:
    """Write data, prefixing every line when several containers share the terminal."""
    if not prefix:
        out.write(data)
        out.flush()
        return
    buf = pending.get(id(out), b"") + data
    *lines, rest = buf.split(b"\n")
    for line in lines:
        out.write(prefix + line + b"\n")
    pending[id(out)] = rest
    out.flush()


def pump_output(client: AgentClient, streams: Sequence[OutputCursor], *, follow: bool,
                stop: Callable[[], bool] | None = None, prefixed: bool | None = None,
                stdout: BinaryIO | None = None, stderr: BinaryIO | None = None, eof_is_final: bool = True) -> None:
    """Copy container output to our stdout/stderr until every stream ends (or, without follow, is drained).
    Without `eof_is_final`, an ended stream is looked at again now and then until `stop()`: a restarted
    container's output goes on in the same log."""
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr.buffer
    prefixed = len(streams) > 1 if prefixed is None else prefixed
    width = max((len(s.container) for s in streams), default=0)
    pending: dict[int, bytes] = {}
    recheck: dict[int, float] = {}      # stream -> when to look at it again after its end
    while True:
        progressed = False
        live = [s for s in streams if not s.eof]
        for s in streams:
            if s.eof and (eof_is_final or recheck.get(id(s), 0.0) > time.monotonic()):
                continue
            wait = 0.5 if follow and len(live) == 1 and not s.eof else 0.0
            r = client.call(ReadOutputRequest(s.container, s.exec_id, s.offset, 256 * 1024, wait), timeout=wait + 30)
            prefix = f"{s.container.ljust(width)} | ".encode() if prefixed else b""
            for ch in r.chunks:
                _write(stdout if ch.stream == OutputStream.stdout else stderr, prefix, ch.data, pending)
                progressed = progressed or bool(ch.data)
            s.offset = r.next_offset
            s.eof = r.eof
            if s.eof:
                recheck[id(s)] = time.monotonic() + EOF_RECHECK_S
        if (eof_is_final and all(s.eof for s in streams)) or (not follow and not progressed):
            break
        if stop is not None and stop():
            break
        if not progressed and follow and len(live) != 1:     # one live stream was long-polled instead
            time.sleep(0.2 if live else 0.5)
    for out in (stdout, stderr):
        rest = pending.get(id(out))
        if rest:
            out.write(rest + b"\n")
            out.flush()


def logs(name: str, container: str | None, *, follow: bool, store: StateStore | None = None) -> None:
    """Print the containers' output; with `follow`, until they exit or the sandbox is taken down."""
    store = store or StateStore()
    record = load_running(name, store)
    names = [c.name for c in record.containers]
    if container is not None and container not in names:
        raise E.NotFoundError(f"sandbox {name!r} has no container {container!r}",
                           hint=f"its containers: {', '.join(names)}")
    chosen = [container] if container else [c.name for c in record.containers if c.stdio]
    if not chosen:
        raise E.PolicyDenied(f"no container of {name!r} allows stdio access")
    with connect(record, store) as client:
        try:
            pump_output(client, [OutputCursor(c) for c in chosen], follow=follow,
                        prefixed=container is None and len(names) > 1)
        except E.GuestError:
            if follow and taken_down(name, store):
                return  # `down` stopped the containers and the VM: the end of the logs, not an error
            raise


def taken_down(name: str, store: StateStore) -> bool:
    """The sandbox is gone or going the normal way: `down` removed its state or is stopping it."""
    record = store.load(name)
    return record is None or record.status == SandboxStatus.stopping


# ---------------------------------------------------------------------------------------------
# exec


def exec_target(name: str, container: str, store: StateStore) -> tuple[SandboxRecord, ContainerRecord]:
    """The running sandbox and the container an exec goes to (ExecSetupError, exit 125, when either is not)."""
    try:
        record = load_running(name, store)
    except (E.InputError, E.StateError) as e:
        raise E.ExecSetupError(e.message, hint=e.hint) from None
    spec = record.container(container)
    if spec is None:
        raise E.ExecSetupError(f"sandbox {name!r} has no container {container!r}")
    return record, spec


def exec_client(record: SandboxRecord, store: StateStore) -> AgentClient:
    try:
        return connect(record, store, wait=10)
    except AgentUnreachable as e:
        raise E.ExecSetupError(str(e), hint=e.hint) from None


def start_exec(client: AgentClient, request: ExecProcessRequest) -> ExecProcessResult:
    """exec_process, its refusals as `exec`'s typed errors (docs/cli.md, "Exit codes")."""
    try:
        return client.call(request)
    except AgentDenied as e:
        raise E.ExecDenied(e.message, hint=e.hint) from None
    except AgentError as e:
        reason = e.details.get("reason")
        if reason == "not_found":
            raise E.ExecNotFound(e.message) from None
        if reason == "permission":
            raise E.ExecCannotInvoke(e.message) from None
        raise E.ExecSetupError(e.message) from None   # e.g. the container is between two incarnations


def exec_in(name: str, container: str, argv: Sequence[str], *, store: StateStore | None = None) -> int:
    """Run argv in a running container (policy-checked); stream its output; return its exit code."""
    store = store or StateStore()
    record, spec = exec_target(name, container, store)
    with exec_client(record, store) as client:
        r = start_exec(client, ExecProcessRequest(container, tuple(argv), spec.env, spec.working_dir))
        if r.stdio:
            pump_output(client, [OutputCursor(container, r.exec_id)], follow=True, prefixed=False)
        while True:
            w = client.call(WaitProcessRequest(container, r.exec_id, 30), timeout=60)
            if not w.running:
                return int(w.exit_code or 0)


# ---------------------------------------------------------------------------------------------
# down


def _pidfile_ref(state_dir: Path) -> ProcessRef | None:
    """QEMU's own pidfile: covers an `up` killed between spawning QEMU and recording it."""
    try:
        pid = int(sandbox_paths(state_dir)["pidfile"].read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if str(state_dir).encode() not in cmdline:
        return None
    start = process_start_time(pid)
    return ProcessRef(pid, start) if start is not None else None


def _shutdown_one(record: SandboxRecord, store: StateStore, name: str, timeout: float) -> None:
    try:
        with connect(record, store, wait=timeout) as client:
            client.call(ShutdownContainerRequest(name, timeout), timeout=timeout + 30)
    except E.SandboxError as e:
        log.debug("shutdown %s: %s", name, e)


def _graceful(record: SandboxRecord, store: StateStore, timeout: float) -> bool:
    """Ask the agent to stop every container (in parallel, one agent port each) and power off.
    False when the agent cannot be reached."""
    try:
        with connect(record, store, wait=2) as client:
            client.call(PingRequest(), timeout=10)
            names = [c.name for c in record.containers]
            with ThreadPoolExecutor(max_workers=max(1, min(len(names), PORT_COUNT - 1))) as pool:
                list(pool.map(lambda n: _shutdown_one(record, store, n, timeout), names))
            client.call(PoweroffRequest(), timeout=10)
        return True
    except (E.SandboxError, OSError) as e:
        log.debug("graceful shutdown of %s failed: %s", record.name, e)
        return False


def down(name: str, *, timeout: float = 10.0, store: StateStore | None = None) -> dict[str, Any]:
    """Stop the sandbox: containers, then the VM (gracefully, then forced). Its state is removed."""
    store = store or StateStore()
    record = store.require(name)
    state_dir = store.dir(name)
    stop_supervisor(record)     # first: it would restart the containers being stopped
    vm: vmm.Vm | None = vmm.attach(record.vm) if record.vm is not None else None
    refs = [ref for key, ref in record.processes.items() if key not in (LAUNCHER, SUPERVISOR)]
    if (ref := _pidfile_ref(state_dir)) is not None and ref not in refs:
        refs.append(ref)
    graceful = False
    if vm is not None and vm.alive() and record.status != SandboxStatus.starting:
        record = replace(record, status=SandboxStatus.stopping)
        store.save(record)
        graceful = _graceful(record, store, timeout) and vm.wait(timeout)
    if vm is not None:
        vm.stop(timeout=5)
    for ref in refs:   # anything left: QEMU recorded only by pid or pidfile
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if ref.alive():
                try:
                    os.kill(ref.pid, sig)
                except ProcessLookupError:
                    pass
                except PermissionError:   # another user's process (libvirt's QEMU): reported below
                    log.warning("not permitted to signal process %d of sandbox %s", ref.pid, name)
                    break
                deadline = time.monotonic() + 5
                while ref.alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
    launcher = record.processes.get(LAUNCHER)
    if launcher is not None and launcher.alive() and launcher.pid != os.getpid():
        # An `up` still starting: its VM is gone now, so it fails and removes the state itself.
        deadline = time.monotonic() + 10
        while launcher.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    left = [r.pid for r in refs if r.alive()]
    if left:
        raise E.StateError(f"processes of sandbox {name!r} are still running: {left}")
    store.remove(name)
    return {"name": name, "graceful": graceful}


def stop_supervisor(record: SandboxRecord, timeout: float = SUPERVISOR_STOP_S) -> None:
    """SIGTERM a detached group's supervisor process and wait for it (SIGKILL after `timeout`)."""
    ref = record.processes.get(SUPERVISOR)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if ref is None or not ref.alive():
            return
        try:
            os.kill(ref.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while ref.alive() and time.monotonic() < deadline:
            time.sleep(0.05)


def down_all(store: StateStore | None = None) -> Iterator[dict[str, Any]]:
    store = store or StateStore()
    for name in store.names():
        yield down(name, store=store)


def _announce(store: StateStore, name: str, echo: Callable[[str], None] | None) -> Notify:
    """The supervisor's notify: record the runs, and tell the user what happened."""
    def notify(runs: Mapping[str, ContainerRun], event: str | None) -> None:
        save_runs(store, name, runs)
        if event:
            (echo or (lambda text: log.info("%s", text)))(event)
    return notify


def run_attached(launched: Launched, *, store: StateStore | None = None,
                 echo: Callable[[str], None] | None = None) -> int:
    """Stream the group's output while a supervisor thread restarts its containers as the restartPolicy
    says, until the group can no longer run; then take the sandbox down.

    Returns the exit code of the first container that failed (128 + signal when one was killed), 0 when
    none did. Ctrl-C also takes the sandbox down, and re-raises.
    """
    store = store or StateStore()
    name = launched.name
    record = load_running(name, store)
    containers = [c.name for c in record.containers if c.stdio]
    stop = threading.Event()
    result: dict[str, Any] = {}

    def supervise() -> None:
        try:
            if launched.outcome is not None and launched.outcome.done:
                result["outcome"] = launched.outcome
                return
            with connect(record, store) as client:
                group = read_plan(store.dir(name))
                result["outcome"] = Supervisor(client, group, launched.runs,
                                               notify=_announce(store, name, echo)).run(stop)
        except BaseException as e:  # handed to the main thread, which raises it
            result["error"] = e

    thread = threading.Thread(target=supervise, name="supervisor", daemon=True)
    thread.start()
    try:
        with connect(record, store) as client:
            streams = [OutputCursor(c) for c in containers]
            if streams:
                pump_output(client, streams, follow=True, stop=lambda: not thread.is_alive(), eof_is_final=False)
                pump_output(client, streams, follow=False)
            thread.join()
    finally:
        stop.set()
        thread.join(60)
        down(name, store=store)
    if "error" in result:
        raise result["error"]
    outcome: GroupOutcome = result.get("outcome") or GroupOutcome(False)
    return outcome.exit_code if outcome.exit_code is not None else 1


def supervise_detached(name: str, *, store: StateStore | None = None) -> GroupOutcome:
    """The supervisor process of a detached sandbox: take over its group where `up` left it, until the
    group is over (or SIGTERM from `down`)."""
    store = store or StateStore()
    record = load_running(name, store)
    store.save(record.with_process(SUPERVISOR, ProcessRef.of(os.getpid())))     # `down` stops it first
    with connect(record, store) as client:
        runs = {r.name: r for r in record.runs}
        supervisor = Supervisor(client, read_plan(store.dir(name)), runs, notify=_announce(store, name, None))
        return supervisor.run()
