"""A stand-in guest agent for the lifecycle verbs, in-process: a sandbox record in the state store, the
real frame loop (sandbox.guest.server.serve_fd) on every agent socket of its state directory, and a
scripted service behind it, so `logs`, `exec`, `inspect`, `down` and attached `up` run their real host
side without a UVM. The real service's answers are the model: a denial is `policy_denied`, a failed exec
is `failed` with the reason crun gave (`not_found`, `permission`).

Scripted exec commands: `/bin/exit N` prints "exec output" and exits N; `/bin/sh` is not an
exec_process of the policy; `/nope` does not exist; `/etc/passwd` is not executable.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sandbox.guest.server import serve_fd
from sandbox.launch.pipeline import agent_sockets
from sandbox.shared import messages as M
from sandbox.shared.protocol import ErrorCode, ProtocolError
from sandbox.state import ContainerRecord, ProcessRef, SandboxRecord, SandboxStatus, StateStore


@dataclass
class Output:
    data: bytes = b""
    done: bool = False
    exit_code: int | None = None


@dataclass
class FakeAgent:
    """The scripted service. `outputs` holds each container's (and exec's) output and exit."""

    outputs: dict[str, Output] = field(default_factory=dict)
    on_poweroff: list = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    output_ends_on_shutdown: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, r: M.AgentRequest) -> M.Message:
        self.requests.append(r.op.value)
        match r:
            case M.PingRequest():
                return M.PingResult(1, "fake", True, None, 1.0)
            case M.ListContainersRequest():
                return M.ListContainersResult(tuple(
                    M.ContainerInfo(name, "exited" if o.done else "running", 1, o.exit_code, True)
                    for name, o in self.outputs.items() if "/" not in name))
            case M.ExecProcessRequest():
                return self.exec(r)
            case M.ReadOutputRequest():
                o = self.outputs[self.key(r.container_id, r.exec_id)]
                if not o.done and r.wait:
                    time.sleep(min(r.wait, 0.05))
                chunk = o.data[r.offset:r.offset + r.max_bytes]
                end = r.offset + len(chunk)
                return M.ReadOutputResult((M.OutputChunk(M.OutputStream.stdout, chunk),) if chunk else (), end, 0,
                                          o.done and end == len(o.data))
            case M.WaitProcessRequest():
                o = self.outputs[self.key(r.container_id, r.exec_id)]
                deadline = time.monotonic() + min(r.timeout, 1.0)
                while not o.done and time.monotonic() < deadline:
                    time.sleep(0.02)
                return M.ProcessExit(not o.done, o.exit_code if o.done else None, None)
            case M.ShutdownContainerRequest():
                o = self.outputs[r.container_id]
                if not o.done and self.output_ends_on_shutdown:
                    o.done, o.exit_code = True, 143
                return M.ShutdownResult(143, None)
            case M.PoweroffRequest():
                threading.Thread(target=self.poweroff, daemon=True).start()
                return M.EmptyResult()
        raise ProtocolError(ErrorCode.unknown_op, f"the stand-in agent does not serve {r.op.value}")

    @staticmethod
    def key(container: str, exec_id: str | None) -> str:
        return f"{container}/{exec_id}" if exec_id else container

    def exec(self, r: M.ExecProcessRequest) -> M.ExecProcessResult:
        program = r.argv[0]
        if program == "/bin/sh":
            raise ProtocolError(ErrorCode.policy_denied, f"exec_in_container denied for {r.container_id!r}: argv "
                                "['/bin/sh'] is not an exec_process of the container")
        if program == "/nope":
            raise ProtocolError(ErrorCode.failed, f"exec in {r.container_id}: /nope: no such file or directory",
                                details={"reason": "not_found"})
        if program == "/etc/passwd":
            raise ProtocolError(ErrorCode.failed, f"exec in {r.container_id}: /etc/passwd: permission denied",
                                details={"reason": "permission"})
        if program == "/bin/exit":
            with self.lock:
                exec_id = f"e{len(self.outputs)}"
                self.outputs[self.key(r.container_id, exec_id)] = Output(b"exec output\n", True, int(r.argv[1]))
            return M.ExecProcessResult(exec_id, 100, True)
        raise ProtocolError(ErrorCode.invalid_request, f"the stand-in agent has no script for {program}")

    def poweroff(self) -> None:
        time.sleep(0.1)   # as the real agent: the reply reaches the host first
        for hook in self.on_poweroff:
            hook()


@dataclass
class FakeSandbox:
    name: str
    store: StateStore
    agent: FakeAgent
    qemu: subprocess.Popen[bytes]    # a stand-in for QEMU: the recorded VM process


@contextmanager
def fake_sandbox(store: StateStore, name: str = "demo", *, containers: tuple[str, ...] = ("web",),
                 stdio: bool = True) -> Iterator[FakeSandbox]:
    """A running sandbox as `up -d` leaves it, served by a FakeAgent; its containers run until shut down.
    Powering it off ends the stand-in QEMU and drops every agent connection, as a real poweroff does."""
    qemu = subprocess.Popen(["sleep", "600"])
    ref = ProcessRef.of(qemu.pid)
    agent = FakeAgent()
    for c in containers:
        agent.outputs[c] = Output(f"{c} says hello\n".encode())
    record = SandboxRecord(
        name=name, status=SandboxStatus.running, processes={"qemu": ref}, group=name, tee="emulated",
        accel="tcg", backend="qemu", policy_hash="ab" * 32,
        containers=tuple(ContainerRecord(c, "busybox", ("/bin/httpd",), ("PATH=/bin",), "/", stdio,
                                         (("/bin/exit", "3"),)) for c in containers),
        vm={"backend": "qemu", "pid": ref.pid, "start_time": ref.start_time,
            "qmp_socket": str(store.dir(name) / "qmp.sock")})
    with store.lock(name) as state_dir:
        store.save(record)
    listeners: list[socket.socket] = []
    conns: list[socket.socket] = []
    for path in agent_sockets(state_dir):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(8)
        listeners.append(listener)

        def accept(listener: socket.socket = listener) -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                conns.append(conn)
                threading.Thread(target=serve_fd, args=(conn.fileno(), agent.handle),
                                 kwargs={"reconnecting": False}, daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def power_off() -> None:
        for sock in listeners:
            sock.close()
        for conn in conns:   # the serving threads see the end of the stream and stop
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        qemu.kill()
        qemu.wait()

    agent.on_poweroff.append(power_off)
    try:
        yield FakeSandbox(name, store, agent, qemu)
    finally:
        power_off()
        time.sleep(0.05)
        for conn in conns:
            conn.close()
        if store.load(name) is not None:
            store.remove(name)


def kill_later(signum: int, delay: float) -> threading.Timer:
    """Send `signum` to this process after `delay` seconds (the main thread handles it)."""
    timer = threading.Timer(delay, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()
    return timer
