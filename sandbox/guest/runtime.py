"""Containers under crun: create/start/exec/signal/wait/delete, with captured stdio.

crun's own diagnostics go to a per-container log file (--log), never into the container's stdout, so
a failure message can be returned to the host without mixing it with container output. Exit statuses
come from the agent's reaper: crun create/exec --detach leave the processes re-parented to the agent.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sandbox.guest import procs
from sandbox.guest.output import OutputLog
from sandbox.guest.procs import REAPER, ExitStatus
from sandbox.shared.errors import GuestOperationFailed

if TYPE_CHECKING:
    from pathlib import Path  # annotations only: the service makes the paths

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
    pid: int
    argv: tuple[str, ...]
    log: OutputLog | None     # None when the policy denies stdio access

    def status(self, timeout: float | None = 0) -> ExitStatus | None:
        return REAPER.wait(self.pid, timeout)


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
    identity: dict[str, Any] = field(default_factory=dict)   # user/groups/umask as the policy saw them
    working_dir: str = "/"
    no_new_privileges: bool = False
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
              timeout: float = 60.0) -> None:
    pid = procs.spawn(argv, stdout=stdout, stderr=stderr)
    for fd in (stdout, stderr):
        if fd is not None:
            os.close(fd)
    status = REAPER.wait(pid, timeout)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        REAPER.wait(pid)
        REAPER.pop(pid)
        raise CrunError(f"crun {argv[4]} timed out after {timeout:g} s")
    REAPER.pop(pid)
    if status.code != 0:
        raise _crun_error(log_file, f"crun failed ({'signal ' + str(status.signal) if status.signal else status.code})")


def _read_pid(path: Path) -> int:
    return int(path.read_text().strip())


def create(container: RuntimeContainer, spec: dict[str, Any]) -> None:
    """Write config.json and `crun create`; the init process waits for `start`."""
    bundle = container.bundle
    bundle.mkdir(parents=True, exist_ok=True)
    tmp = bundle / ".config.json.tmp"
    tmp.write_text(json.dumps(spec, indent=1))
    os.replace(tmp, bundle / "config.json")
    log_file = bundle / "crun.log"
    pid_file = bundle / "init.pid"
    log = OutputLog() if container.stdio else None
    out_w, err_w = _stdio_pipes(log)
    _run_crun(_crun(log_file, "create", "--bundle", str(bundle), "--pid-file", str(pid_file), container.id),
              log_file, out_w, err_w)
    container.init = Process(_read_pid(pid_file), container.argv, log)
    container.status = ContainerStatus.created


def start(container: RuntimeContainer) -> None:
    log_file = container.bundle / "crun.log"
    _run_crun(_crun(log_file, "start", container.id), log_file, None, None)
    container.status = ContainerStatus.running


def exec_process(container: RuntimeContainer, exec_id: str, argv: tuple[str, ...], env: tuple[str, ...],
                 cwd: str) -> Process:
    """`crun exec --detach` a process described by a process.json the agent writes."""
    uid, gid, extra = container.user
    process = {
        "terminal": False,
        "user": {"uid": uid, "gid": gid, "additionalGids": list(extra)},
        "args": list(argv),
        "env": list(env),
        "cwd": cwd or "/",
        "capabilities": {k: list(v) for k, v in container.exec_caps.items()},
        "noNewPrivileges": container.no_new_privileges,
    }
    exec_dir = container.bundle / "exec"
    exec_dir.mkdir(exist_ok=True)
    proc_file = exec_dir / f"{exec_id}.json"
    proc_file.write_text(json.dumps(process))
    pid_file = exec_dir / f"{exec_id}.pid"
    log_file = exec_dir / f"{exec_id}.log"
    log = OutputLog() if container.stdio else None
    out_w, err_w = _stdio_pipes(log)
    _run_crun(_crun(log_file, "exec", "--detach", "--process", str(proc_file), "--pid-file", str(pid_file),
                    container.id), log_file, out_w, err_w)
    proc = Process(_read_pid(pid_file), argv, log)
    container.execs[exec_id] = proc
    return proc


def kill(proc: Process, signum: int) -> None:
    try:
        os.kill(proc.pid, signum)
    except ProcessLookupError:
        pass


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
    if container.deleted:
        return
    log_file = container.bundle / "crun.log"
    try:
        _run_crun(_crun(log_file, "delete", "--force", container.id), log_file, None, None, timeout=30)
    except CrunError:
        pass
    container.deleted = True


_EXEC_LOCK = threading.Lock()


def next_exec_id(container: RuntimeContainer) -> str:
    with _EXEC_LOCK:
        container.exec_counter += 1
        return f"e{container.exec_counter}"
