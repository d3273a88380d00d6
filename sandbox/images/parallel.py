"""Jobs in forked worker processes, a few at a time: the layers of one image convert in parallel.

A conversion is Python work that holds the GIL (sandbox/layers/convert.py), so threads would take turns;
forked processes do not. Each job runs in a child forked from this process, which must run a single thread
then (a lock another thread holds would stay held in the child; `single_threaded`); otherwise, or with one
usable CPU, the jobs run here one after the other. A child sends its result, or the exception it raised,
back pickled through a pipe and leaves with os._exit, running none of the parent's cleanup.

Progress: a child prints whole lines, never the redrawn line of a terminal's progress display (two
processes redrawing one line would garble it); each line first clears whatever line the parent is drawing.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import sys
from collections.abc import Callable
from typing import Generic, TypeVar

from sandbox.progress import ProgressMode, Reporter, reporter, set_reporter
from sandbox.shared.errors import SandboxError
from sandbox.shared.verity import single_threaded

T = TypeVar("T")
MAX_WORKERS = 4                 # conversions at once at most: each already keeps more than one core busy


class WorkerFailed(SandboxError):
    """A worker process died without reporting a result (killed, or its result could not be read)."""


class _LineReporter(Reporter):
    """Plain lines for a worker whose parent draws progress on a terminal: each clears the line first."""

    def __init__(self) -> None:
        super().__init__(ProgressMode.plain)

    def _write(self, text: str) -> None:
        super()._write("\r\x1b[K" + text)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


class Workers(Generic[T]):
    """Run callables in at most `limit` forked children; `results()` gives their results in submission order.

    `submit` starts a job at once when a slot is free, else it first waits for a running one to end. With a
    limit of 1 or another thread running, jobs run in this process when submitted. After a failure no
    further job starts; `results()` raises it once every started job has ended.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, min(limit, MAX_WORKERS))
        self._running: dict[int, tuple[int, int, list[bytes]]] = {}    # read fd -> (job index, pid, data)
        self._done_hooks: dict[int, Callable[[], None] | None] = {}     # read fd -> its job's on_done
        self._results: dict[int, T] = {}
        self._errors: dict[int, BaseException] = {}
        self._count = 0

    def submit(self, job: Callable[[], T], on_done: Callable[[], None] | None = None) -> None:
        """Run `job`; `on_done` runs in this process when it has ended (e.g. to remove its input)."""
        index = self._count
        self._count += 1
        if self.limit == 1 or not single_threaded():
            try:
                if not self._errors:
                    self._results[index] = job()
            finally:
                if on_done is not None:
                    on_done()
            return
        while len(self._running) >= self.limit:
            self._reap_one()
        if self._errors:
            if on_done is not None:
                on_done()
            return
        read_end, write_end = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()                          # nothing buffered here may be written twice
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            self._child(job, write_end)
        os.close(write_end)
        self._running[read_end] = (index, pid, [])
        self._done_hooks[read_end] = on_done

    def __enter__(self) -> Workers[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._running:                           # leaving early (an error here, Ctrl-C): stop the workers
            for _, pid, _ in self._running.values():
                os.kill(pid, signal.SIGINT)          # they clean up (temporary files, locks) as for Ctrl-C
            while self._running:
                self._reap_one()

    @staticmethod
    def _child(job: Callable[[], T], write_end: int) -> None:
        code = 1
        try:
            if reporter().mode == ProgressMode.tty:
                set_reporter(_LineReporter())
            try:
                message = pickle.dumps(("ok", job()))
            except BaseException as e:  # handed to the parent, which raises it
                try:
                    message = pickle.dumps(("error", e))
                except Exception:  # an exception that does not pickle: its text
                    message = pickle.dumps(("error", SandboxError(f"{type(e).__name__}: {e}")))
            view = memoryview(message)
            while view:
                view = view[os.write(write_end, view):]
            code = 0
        finally:
            os._exit(code)

    def _reap_one(self) -> None:
        """Wait for one running job to end and take its result or error."""
        ready, _, _ = select.select(list(self._running), [], [])
        fd = ready[0]
        index, pid, parts = self._running[fd]
        chunk = os.read(fd, 1 << 16)
        if chunk:
            parts.append(chunk)
            return
        os.close(fd)
        del self._running[fd]
        _, status = os.waitpid(pid, 0)
        hook = self._done_hooks.pop(fd, None)
        if hook is not None:
            hook()
        try:
            kind, value = pickle.loads(b"".join(parts))
        except Exception:  # a child that died before reporting
            kind, value = "error", WorkerFailed(f"a worker process ended without a result "
                                                f"(exit status {os.waitstatus_to_exitcode(status)})")
        if kind == "ok":
            self._results[index] = value
        else:
            self._errors[index] = value

    def results(self) -> list[T]:
        """Every job's result, in submission order, once all have ended; raises the failure of the earliest
        job that failed."""
        while self._running:
            self._reap_one()
        if self._errors:
            raise self._errors[min(self._errors)]
        return [self._results[i] for i in range(self._count)]
