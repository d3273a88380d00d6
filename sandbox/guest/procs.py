"""Child processes of the agent: one reaper collects every exit status, including orphans.

The agent is a child subreaper (or PID 1): container init processes and `crun exec --detach`
processes are re-parented to it when crun exits, so their exit statuses arrive here. Nothing else in
the agent may call waitpid(); spawn() and run() below are the only ways to start a program.
"""

from __future__ import annotations

import os
import selectors
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ExitStatus:
    code: int | None     # exit code, when it exited
    signal: int | None   # terminating signal, when it was killed

    @classmethod
    def from_wait(cls, status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return cls(None, os.WTERMSIG(status))
        return cls(os.waitstatus_to_exitcode(status), None)

    @property
    def shell_code(self) -> int:
        """The code a shell would report: the exit code, or 128 + signal."""
        return self.code if self.code is not None else 128 + (self.signal or 0)


class Reaper:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._status: dict[int, ExitStatus] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                with self._cond:
                    self._cond.wait(0.2)  # woken early by spawn()
                continue
            except InterruptedError:
                continue
            with self._cond:
                self._status[pid] = ExitStatus.from_wait(status)
                self._cond.notify_all()

    def notify_spawned(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait(self, pid: int, timeout: float | None = None) -> ExitStatus | None:
        """The exit status of `pid` (kept until popped), or None if it is still running after timeout."""
        with self._cond:
            self._cond.wait_for(lambda: pid in self._status, timeout)
            return self._status.get(pid)

    def pop(self, pid: int) -> None:
        with self._cond:
            self._status.pop(pid, None)


REAPER = Reaper()


def spawn(argv: Sequence[str], *, stdin: int | None = None, stdout: int | None = None, stderr: int | None = None,
          env: Mapping[str, str] | None = None, setsid: bool = False) -> int:
    """Start argv (searched on PATH) with the given fds as stdio (None: /dev/null); return its pid."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = [
            (os.POSIX_SPAWN_DUP2, stdin if stdin is not None else null, 0),
            (os.POSIX_SPAWN_DUP2, stdout if stdout is not None else null, 1),
            (os.POSIX_SPAWN_DUP2, stderr if stderr is not None else null, 2),
        ]
        pid = os.posix_spawnp(argv[0], list(argv), dict(env if env is not None else os.environ),
                              file_actions=actions, setsid=setsid)
    finally:
        os.close(null)
    REAPER.notify_spawned()
    return pid


@dataclass(frozen=True)
class Completed:
    status: ExitStatus
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.status.code == 0


def run(argv: Sequence[str], *, input: bytes | None = None, env: Mapping[str, str] | None = None,
        timeout: float = 60.0) -> Completed:
    """Run argv to completion, capturing stdout and stderr; kill it if it overruns `timeout`."""
    in_r, in_w = os.pipe2(os.O_CLOEXEC) if input is not None else (None, None)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = spawn(argv, stdin=in_r, stdout=out_w, stderr=err_w, env=env)
    except OSError:
        for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
            if fd is not None:
                os.close(fd)
        raise
    for fd in (in_r, out_w, err_w):
        if fd is not None:
            os.close(fd)
    if in_w is not None:
        try:
            os.write(in_w, input or b"")
        except BrokenPipeError:
            pass
        os.close(in_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for fd in chunks:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, 9)
                break
            for key, _ in sel.select(left):
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    sel.unregister(key.fd)
    os.close(out_r)
    os.close(err_r)
    status = REAPER.wait(pid, max(0.0, deadline - time.monotonic()) + 5)
    if status is None:
        os.kill(pid, 9)
        status = REAPER.wait(pid)
    REAPER.pop(pid)
    assert status is not None
    return Completed(status, b"".join(chunks[out_r]), b"".join(chunks[err_r]))
