"""What runs against an existing sandbox: list, inspect, logs, exec and down."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from sandbox.launch.agent_client import AgentClient, AgentDenied, AgentError, AgentUnreachable
from sandbox.launch.pipeline import agent_sockets, load_running, sandbox_paths
from sandbox.log import log
from sandbox.shared import errors as E
from sandbox.shared.messages import (
    ExecProcessRequest,
    ListContainersRequest,
    OutputStream,
    PingRequest,
    PoweroffRequest,
    ReadOutputRequest,
    ShutdownContainerRequest,
    WaitProcessRequest,
)
from sandbox.shared.protocol import PORT_COUNT
from sandbox.state import ProcessRef, SandboxRecord, SandboxStatus, StateStore, process_start_time
from sandbox.vmm import backend as vmm


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
    }
    live: dict[str, Any] = {}
    if info["status"] == "running":
        try:
            with connect(record, store, wait=2) as client:
                live = {c.id: c for c in client.call(ListContainersRequest(), timeout=10).containers}
        except E.SandboxError as e:
            info["agent_error"] = str(e)
    for c in info["containers"]:
        if c["name"] in live:
            c["status"] = live[c["name"]].status
            c["exit_code"] = live[c["name"]].exit_code
    return info


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
                stdout: BinaryIO | None = None, stderr: BinaryIO | None = None) -> None:
    """Copy container output to our stdout/stderr until every stream ends (or, without follow, is drained)."""
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr.buffer
    prefixed = len(streams) > 1 if prefixed is None else prefixed
    width = max((len(s.container) for s in streams), default=0)
    pending: dict[int, bytes] = {}
    while True:
        progressed = False
        for s in streams:
            if s.eof:
                continue
            wait = 0.5 if follow and len([x for x in streams if not x.eof]) == 1 else 0.0
            r = client.call(ReadOutputRequest(s.container, s.exec_id, s.offset, 256 * 1024, wait), timeout=wait + 30)
            prefix = f"{s.container.ljust(width)} | ".encode() if prefixed else b""
            for ch in r.chunks:
                _write(stdout if ch.stream == OutputStream.stdout else stderr, prefix, ch.data, pending)
                progressed = progressed or bool(ch.data)
            s.offset = r.next_offset
            s.eof = r.eof
        if all(s.eof for s in streams) or (not follow and not progressed):
            break
        if stop is not None and stop():
            break
        if not progressed and follow and len([x for x in streams if not x.eof]) > 1:
            time.sleep(0.2)
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


def exec_in(name: str, container: str, argv: Sequence[str], *, store: StateStore | None = None) -> int:
    """Run argv in a running container (policy-checked); stream its output; return its exit code."""
    store = store or StateStore()
    try:
        record = load_running(name, store)
    except (E.InputError, E.StateError) as e:
        raise E.ExecSetupError(e.message, hint=e.hint) from None
    spec = record.container(container)
    if spec is None:
        raise E.ExecSetupError(f"sandbox {name!r} has no container {container!r}")
    try:
        client = connect(record, store, wait=10)
    except AgentUnreachable as e:
        raise E.ExecSetupError(str(e), hint=e.hint) from None
    with client:
        try:
            r = client.call(ExecProcessRequest(container, tuple(argv), spec.env, spec.working_dir))
        except AgentDenied as e:
            raise E.ExecDenied(e.message, hint=e.hint) from None
        except AgentError as e:
            reason = e.details.get("reason")
            if reason == "not_found":
                raise E.ExecNotFound(e.message) from None
            if reason == "permission":
                raise E.ExecCannotInvoke(e.message) from None
            raise E.ExecSetupError(e.message) from None
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
    vm: vmm.Vm | None = vmm.attach(record.vm) if record.vm is not None else None
    refs = [ref for key, ref in record.processes.items() if key != "launcher"]
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
    launcher = record.processes.get("launcher")
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


def down_all(store: StateStore | None = None) -> Iterator[dict[str, Any]]:
    store = store or StateStore()
    for name in store.names():
        yield down(name, store=store)


def run_attached(name: str, main: str, containers: Sequence[str], *, store: StateStore | None = None) -> int:
    """Stream the group's output until the main container exits, then take the sandbox down.

    Returns the main container's exit code (128 + signal when it was killed). Ctrl-C also takes the
    sandbox down, and re-raises.
    """
    store = store or StateStore()
    record = load_running(name, store)
    code = 1
    try:
        with connect(record, store) as client:
            def main_exited() -> bool:
                return not client.call(WaitProcessRequest(main)).running

            streams = [OutputCursor(c) for c in containers]
            if streams:
                pump_output(client, streams, follow=True, stop=main_exited)
                pump_output(client, streams, follow=False)
            w = client.call(WaitProcessRequest(main, timeout=600), timeout=660)
            while w.running:
                w = client.call(WaitProcessRequest(main, timeout=600), timeout=660)
            code = int(w.exit_code or 0)
    finally:
        down(name, store=store)
    return code
