"""Child processes of the agent, held by process handles (pidfds), never by bare pid numbers.

A pid is only a name, and the kernel gives it to a new process once the old one has been reaped.
Everything the agent signals or waits for is therefore a `Child`: a pidfd (pidfd_open(2)) opened
while the pid still provably belonged to that process, i.e. before anyone could reap it. Signals go
through pidfd_send_signal(2), which fails once that process is gone instead of reaching whichever
process holds the number now; waits collect the status through the same descriptor
(waitid(P_PIDFD)). Each Child keeps its own exit status; nothing is looked up by pid afterwards.

The agent is a child subreaper (or PID 1): `crun create` and `crun exec --detach` leave the container
processes re-parented to it, and `adopt()` turns the pid crun wrote into a Child. Until then only the
agent could reap that process, and the collector below never reaps a zombie it does not know while an
adoption is pending (`Reaper.adopting()`), so the pid cannot be reused in between.

`Reaper.start()` runs the collector that reaps every other exited child (orphans that are not
containers' processes); only the agent starts it, because it reaps any child of the process. spawn()
and run() are the only ways the agent starts a program.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

WAIT_EXITED = os.WEXITED


@dataclass(frozen=True)
class ExitStatus:
    code: int | None     # exit code, when it exited
    signal: int | None   # terminating signal, when it was killed

    @classmethod
    def from_siginfo(cls, info: os.waitid_result) -> ExitStatus:
        if info.si_code == os.CLD_EXITED:
            return cls(info.si_status, None)
        return cls(None, info.si_status)     # CLD_KILLED or CLD_DUMPED

    @property
    def shell_code(self) -> int:
        """The code a shell would report: the exit code, or 128 + signal."""
        return self.code if self.code is not None else 128 + (self.signal or 0)


class Child:
    """One child process held by its pidfd. Thread-safe: any thread may signal it or wait for it."""

    def __init__(self, pid: int, pidfd: int, on_reaped: Callable[[Child], None] | None = None) -> None:
        self.pid = pid               # for logs and replies only; never used to address the process
        self._fd: int | None = pidfd
        self._status: ExitStatus | None = None
        self._lock = threading.Lock()
        self._on_reaped = on_reaped

    def __repr__(self) -> str:
        return f"Child(pid={self.pid}, status={self._status})"

    @property
    def exited(self) -> ExitStatus | None:
        """The exit status once collected (without waiting)."""
        return self._status

    def send_signal(self, signum: int) -> bool:
        """Signal this process (never another one with its pid). False when it has exited."""
        with self._lock:
            if self._fd is None or self._status is not None:
                return False
            try:
                signal.pidfd_send_signal(self._fd, signum)
            except ProcessLookupError:
                return False
            return True

    def wait(self, timeout: float | None = 0) -> ExitStatus | None:
        """The exit status, waiting up to `timeout` seconds (None: forever); None if it still runs."""
        if self._status is not None:
            return self._status
        with self._lock:
            if self._status is not None or self._fd is None:
                return self._status
            fd = os.dup(self._fd)       # our own descriptor to poll: close() may run meanwhile
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    ready = poller.poll(None if left is None else int(left * 1000) + (left > 0))
                except InterruptedError:
                    continue
                if ready or (left is not None and left <= 0):
                    break
        finally:
            os.close(fd)
        return self.collect()

    def collect(self) -> ExitStatus | None:
        """Reap the process if it has exited (never blocks); its status, or None while it runs."""
        reaped = False
        with self._lock:
            if self._status is None and self._fd is not None:
                try:
                    info = os.waitid(os.P_PIDFD, self._fd, WAIT_EXITED | os.WNOHANG)
                except ChildProcessError:
                    info = None     # only this handle reaps this process: cannot happen, but never fatal
                if info is not None:
                    self._status = ExitStatus.from_siginfo(info)
                    reaped = True
            status = self._status
        if reaped and self._on_reaped is not None:
            self._on_reaped(self)      # outside our lock: the reaper takes its own, then ours
        return status

    def close(self) -> None:
        """Forget the process: reap it if it has exited and close the handle (idempotent)."""
        self.collect()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class Reaper:
    """Tracks the agent's children by pidfd and, once started, reaps every other child that exits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._children: dict[int, Child] = {}    # pid -> handle, for children not reaped yet
        self._adopting = 0                        # adoptions in progress (see adopting())
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run the collector (the agent only: it reaps any child of this process)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)
            self._thread.start()

    def _track(self, pid: int) -> Child:
        """A handle for `pid`, which must be an unreaped child (caller holds the lock)."""
        child = Child(pid, os.pidfd_open(pid), self._untrack)
        self._children[pid] = child
        return child

    def _untrack(self, child: Child) -> None:
        """A handle's process was reaped: its pid may now name another process."""
        with self._cond:
            if self._children.get(child.pid) is child:
                del self._children[child.pid]
            self._cond.notify_all()

    def spawned(self, start: Callable[[], int]) -> Child:
        """Run `start()` (which starts a child and returns its pid) and hold the new child by a pidfd
        before the collector could reap it."""
        with self._cond:
            pid = start()
            child = self._track(pid)
            self._cond.notify_all()
            return child

    @contextlib.contextmanager
    def adopting(self) -> Iterator[None]:
        """While this is open, the collector leaves unknown zombies alone: a process that crun started and
        re-parented to the agent keeps its pid reserved until adopt() holds it."""
        with self._cond:
            self._adopting += 1
        try:
            yield
        finally:
            with self._cond:
                self._adopting -= 1
                self._cond.notify_all()

    def adopt(self, pid: int) -> Child:
        """The handle of `pid`, a process another program started that is now the agent's child (crun's
        detached container processes). Raises ChildProcessError when `pid` is not the agent's child."""
        if pid <= 0:
            raise ChildProcessError(f"pid {pid} is not a process id")
        with self._cond:
            known = self._children.get(pid)
            if known is not None:
                return known
            # Raises ChildProcessError unless pid is a child of ours that nobody has reaped: then, and
            # only then, the number still names the process crun started.
            os.waitid(os.P_PID, pid, WAIT_EXITED | os.WNOHANG | os.WNOWAIT)
            return self._track(pid)

    def _loop(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, WAIT_EXITED | os.WNOWAIT)
            except ChildProcessError:
                with self._cond:
                    self._cond.wait(0.2)     # no children: woken early by the next spawn or adoption
                continue
            except InterruptedError:
                continue
            if info is None:
                continue
            self._reap(info.si_pid)

    def _reap(self, pid: int) -> None:
        with self._cond:
            child = self._children.get(pid)
            if child is not None:
                child.collect()        # stores the status in the handle and untracks it
                return
            if self._adopting:
                # Perhaps a container process crun just left us: keep its pid reserved until adopted.
                self._cond.wait(0.05)
                return
            try:
                os.waitid(os.P_PID, pid, WAIT_EXITED | os.WNOHANG)
            except ChildProcessError:
                pass

    def forget(self, child: Child) -> None:
        """Stop tracking `child` and close its handle (a zombie is reaped first)."""
        child.close()
        self._untrack(child)

    def tracked(self) -> int:
        """How many children are held (tests and diagnostics)."""
        with self._cond:
            return len(self._children)


REAPER = Reaper()


def spawn(argv: Sequence[str], *, stdin: int | None = None, stdout: int | None = None, stderr: int | None = None,
          env: Mapping[str, str] | None = None, setsid: bool = False) -> Child:
    """Start argv (searched on PATH) with the given fds as stdio (None: /dev/null); return its handle."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = [
            (os.POSIX_SPAWN_DUP2, stdin if stdin is not None else null, 0),
            (os.POSIX_SPAWN_DUP2, stdout if stdout is not None else null, 1),
            (os.POSIX_SPAWN_DUP2, stderr if stderr is not None else null, 2),
        ]
        environ = dict(env if env is not None else os.environ)
        return REAPER.spawned(lambda: os.posix_spawnp(argv[0], list(argv), environ, file_actions=actions,
                                                      setsid=setsid))
    finally:
        os.close(null)


def finish(child: Child, timeout: float) -> ExitStatus | None:
    """Wait up to `timeout` for a spawned helper, SIGKILL it then, and forget it; its status (None if
    even SIGKILL did not end it within 10 s)."""
    status = child.wait(timeout)
    if status is None:
        child.send_signal(signal.SIGKILL)
        status = child.wait(10)
    REAPER.forget(child)
    return status


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
        child = spawn(argv, stdin=in_r, stdout=out_w, stderr=err_w, env=env)
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
                child.send_signal(signal.SIGKILL)
                break
            for key, _ in sel.select(left):
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    sel.unregister(key.fd)
    os.close(out_r)
    os.close(err_r)
    status = finish(child, max(0.0, deadline - time.monotonic()) + 5)
    assert status is not None
    return Completed(status, b"".join(chunks[out_r]), b"".join(chunks[err_r]))
