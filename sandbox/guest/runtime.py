"""Containers under crun: create/start/exec/signal/wait/delete, with captured stdio.

crun's own diagnostics go to a per-container log file (--log), never into the container's stdout, so
a failure message can be returned to the host without mixing it with container output. crun create
and exec --detach leave the processes re-parented to the agent, which holds each by a process handle
(sandbox/guest/procs.py) from the moment crun exits: signals and waits address that process, never
a pid number that may have been reused.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from sandbox.guest import procs
from sandbox.guest.lazy import LazyModule
from sandbox.guest.output import OutputLog
from sandbox.guest.procs import REAPER, Child, ExitStatus
from sandbox.shared.errors import GuestOperationFailed

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path  # annotations only: the service makes the paths

    from sandbox.guest import terminal
else:
    terminal = LazyModule("sandbox.guest.terminal")   # interactive execs only (socket, pathlib)

CRUN_ROOT = "/run/crun"


class ContainerStatus(StrEnum):
    created = "created"
    running = "running"
    exited = "exited"


class CrunError(GuestOperationFailed):
    """crun failed; `reason` classifies it for the host (not_found / permission / other)."""

    def __init__(self, message: str, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Process:
    child: Child
    argv: tuple[str, ...]
    log: OutputLog | None     # None when the policy denies stdio access
    input: terminal.Terminal | terminal.StdinPipe | None = None    # an interactive exec's terminal or stdin pipe
    reported: bool = False    # wait_process has told the host its exit status
    drained: bool = False     # read_output has returned its output to the end

    @property
    def pid(self) -> int:
        return self.child.pid

    def status(self, timeout: float | None = 0) -> ExitStatus | None:
        return self.child.wait(timeout)

    def forget(self) -> None:
        """Release the process handle (the process has exited, or the container is gone)."""
        REAPER.forget(self.child)


@dataclass
class RuntimeContainer:
    id: str
    bundle: Path
    rootfs: Path
    argv: tuple[str, ...]
    stdio: bool
    exec_env: tuple[str, ...] = ()
    exec_caps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    user: tuple[int, int, tuple[int, ...]] = (0, 0, ())
    identity: dict[str, object] = field(default_factory=dict)   # user/groups/umask as the policy saw them
    working_dir: str = "/"
    no_new_privileges: bool = False
    volume_sources: frozenset[str] = frozenset()    # the group volumes bound into it
    status: ContainerStatus = ContainerStatus.created
    init: Process | None = None
    execs: dict[str, Process] = field(default_factory=dict)
    exec_counter: int = 0
    deleted: bool = False
    stopping: bool = False

    def refresh(self) -> ContainerStatus:
        if self.status == ContainerStatus.running and self.init is not None and self.init.status() is not None:
            self.status = ContainerStatus.exited
        return self.status


def _crun(log_file: Path, *args: str) -> list[str]:
    return ["crun", "--root", CRUN_ROOT, f"--log=file:{log_file}", *args]


def _crun_error(log_file: Path, fallback: str) -> CrunError:
    try:
        text = log_file.read_text(errors="replace").strip()
    except OSError:
        text = ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    message = lines[-1] if lines else fallback
    # crun logs look like "2024-..T..Z: error message"; keep just the message.
    if ": " in message and message[:4].isdigit():
        message = message.split(": ", 1)[1]
    low = message.lower()
    if "not found" in low or "no such file" in low:
        reason = "not_found"
    elif "permission denied" in low or "not permitted" in low:
        reason = "permission"
    else:
        reason = "other"
    return CrunError(message, reason)


def _stdio_pipes(log: OutputLog | None) -> tuple[int | None, int | None]:
    """Write ends for stdout and stderr; their read ends are pumped into `log`."""
    if log is None:
        return None, None
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    log.pump("stdout", out_r)
    log.pump("stderr", err_r)
    return out_w, err_w


def _run_crun(argv: list[str], log_file: Path, stdout: int | None, stderr: int | None,
              timeout: float = 60.0, stdin: int | None = None) -> None:
    try:
        child = procs.spawn(argv, stdin=stdin, stdout=stdout, stderr=stderr)
    finally:
        for fd in (stdout, stderr):
            if fd is not None:
                os.close(fd)
    status = child.wait(timeout)
    procs.finish(child, 0)      # kills it if it overran; forgets it either way
    if status is None:
        raise CrunError(f"crun {argv[4]} timed out after {timeout:g} s")
    if status.code != 0:
        raise _crun_error(log_file, f"crun failed ({'signal ' + str(status.signal) if status.signal else status.code})")


def _adopt(pid_file: Path) -> Child:
    """The process crun started and wrote to pid_file, held by its handle (see sandbox/guest/procs.py)."""
    try:
        pid = int(pid_file.read_text().strip())
        return REAPER.adopt(pid)
    except (OSError, ValueError) as e:
        raise CrunError(f"cannot take hold of the process crun started ({pid_file.name}): {e}") from None


def create(container: RuntimeContainer, spec: Mapping[str, object], log: OutputLog | None = None) -> None:
    """Write config.json and `crun create`; the init process waits for `start`. Output goes to `log` (a
    restarted container's output continues its previous log), or a new one."""
    bundle = container.bundle
    bundle.mkdir(parents=True, exist_ok=True)
    tmp = bundle / ".config.json.tmp"
    tmp.write_text(json.dumps(spec, indent=1))
    os.replace(tmp, bundle / "config.json")
    log_file = bundle / "crun.log"
    pid_file = bundle / "init.pid"
    log = (log or OutputLog()) if container.stdio else None
    out_w, err_w = _stdio_pipes(log)
    with REAPER.adopting():
        _run_crun(_crun(log_file, "create", "--bundle", str(bundle), "--pid-file", str(pid_file), container.id),
                  log_file, out_w, err_w)
        container.init = Process(_adopt(pid_file), container.argv, log)
    container.status = ContainerStatus.created


def start(container: RuntimeContainer) -> None:
    log_file = container.bundle / "crun.log"
    _run_crun(_crun(log_file, "start", container.id), log_file, None, None)
    container.status = ContainerStatus.running


def exec_process(container: RuntimeContainer, exec_id: str, argv: tuple[str, ...], env: tuple[str, ...],
                 cwd: str, *, window: terminal.WindowSize | None = None, stdin: bool = False) -> Process:
    """`crun exec --detach` a process described by a process.json the agent writes. With `window`, the
    process gets a pseudo-terminal of that size as its stdio (crun sends the master to a console socket);
    with `stdin` and no terminal, a pipe the host writes to."""
    uid, gid, extra = container.user
    process: dict[str, object] = {
        "terminal": window is not None,
        "user": {"uid": uid, "gid": gid, "additionalGids": list(extra)},
        "args": list(argv),
        "env": list(env),
        "cwd": cwd or "/",
        "capabilities": {k: list(v) for k, v in container.exec_caps.items()},
        "noNewPrivileges": container.no_new_privileges,
    }
    exec_dir = container.bundle / "exec"
    exec_dir.mkdir(exist_ok=True)
    if window is not None:
        process["consoleSize"] = {"height": window.rows, "width": window.cols}
    proc_file = exec_dir / f"{exec_id}.json"
    proc_file.write_text(json.dumps(process))
    pid_file = exec_dir / f"{exec_id}.pid"
    log_file = exec_dir / f"{exec_id}.log"
    log = OutputLog() if container.stdio else None
    args = ["exec", "--detach", "--process", str(proc_file), "--pid-file", str(pid_file)]
    if window is not None:
        if log is None:
            raise CrunError("a terminal needs stdio access", "permission")
        with terminal.ConsoleSocket() as console, REAPER.adopting():
            _run_crun(_crun(log_file, *args, "--console-socket", str(console.path), container.id),
                      log_file, None, None)
            child = _adopt(pid_file)
            try:
                master = console.receive(timeout=10)
            except terminal.TerminalError as e:
                child.send_signal(signal.SIGKILL)
                procs.finish(child, 10)
                raise CrunError(str(e)) from None
        tty = terminal.Terminal(master, log)
        tty.resize(window)     # crun applied consoleSize already; this changes nothing then (no SIGWINCH)
        proc = Process(child, argv, log, tty)
    else:
        pipe = terminal.StdinPipe() if stdin else None
        out_w, err_w = _stdio_pipes(log)
        try:
            with REAPER.adopting():
                _run_crun(_crun(log_file, *args, container.id), log_file, out_w, err_w,
                          stdin=pipe.read_end if pipe else None)
                child = _adopt(pid_file)
        except BaseException:
            if pipe is not None:
                pipe.close_input()
            raise
        finally:
            if pipe is not None:
                pipe.release_read_end()
        proc = Process(child, argv, log, pipe)
    container.execs[exec_id] = proc
    return proc


def kill(proc: Process, signum: int) -> bool:
    """Signal the process through its handle; False when it has exited (its pid may be another's now)."""
    return proc.child.send_signal(signum)


def begin_stop(container: RuntimeContainer) -> None:
    """SIGTERM the init process (quick: safe to run inside a policy decision's action)."""
    if container.init is not None and container.status != ContainerStatus.created:
        if container.init.status() is None:
            kill(container.init, signal.SIGTERM)


def finish_stop(container: RuntimeContainer, timeout: float) -> ExitStatus | None:
    """Wait up to `timeout` for the init process, SIGKILL it then, and delete the container from crun."""
    status = None
    if container.init is not None and container.status != ContainerStatus.created:
        status = container.init.status(timeout)
        if status is None:
            kill(container.init, signal.SIGKILL)
            status = container.init.status(10)
    delete(container)
    if container.init is not None and container.init.log is not None:
        container.init.log.wait_closed(2)
    container.status = ContainerStatus.exited
    return status


def delete(container: RuntimeContainer) -> None:
    """`crun delete --force` (which kills what still runs), then release every process handle; exit
    statuses already collected stay readable."""
    if container.deleted:
        return
    log_file = container.bundle / "crun.log"
    try:
        _run_crun(_crun(log_file, "delete", "--force", container.id), log_file, None, None, timeout=30)
    except CrunError:
        pass
    container.deleted = True
    for proc in ([container.init] if container.init else []) + list(container.execs.values()):
        proc.status(2)
        proc.forget()


_EXEC_LOCK = threading.Lock()


def next_exec_id(container: RuntimeContainer) -> str:
    with _EXEC_LOCK:
        container.exec_counter += 1
        return f"e{container.exec_counter}"
