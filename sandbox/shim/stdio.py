"""Container output into the stdio containerd hands the shim (FIFOs, or `file://` paths), and exits.

The agent keeps each process's output in the guest; one pump thread reads it (`read_output`, long-poll
when one stream is active) over its own agent connection and writes it to the process's FIFOs. A
stream whose output ended, or whose container's policy gives the host no stdio access, is then asked
for its exit status, which goes to the task service (TaskExit, Wait).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from sandbox.launch.agent_client import AgentClient, AgentDenied, AgentError
from sandbox.shared.errors import SandboxError
from sandbox.shared.messages import PingRequest, ReadOutputRequest, WaitProcessRequest

log = logging.getLogger("parma-sandbox.shim")

EXIT_LOST = 255          # the sandbox went away before the process's exit could be read


class StdioError(Exception):
    pass


def open_output(uri: str, *, timeout: float = 30.0) -> BinaryIO | None:
    """A writer for a stdout/stderr path containerd gave us; None when it gave none.

    A FIFO is opened once its reader is there (containerd opens the read end before Create; waiting with
    O_NONBLOCK keeps a missing reader from hanging us). `file://PATH` appends to a file.
    """
    if not uri:
        return None
    if uri.startswith("binary://"):
        raise StdioError("binary:// log drivers are not supported by the parma shim")
    path = uri.removeprefix("file://") if uri.startswith("file://") else uri
    if uri.startswith("file://") or not os.path.exists(path) or not stat.S_ISFIFO(os.stat(path).st_mode):
        return open(path, "ab", buffering=0)  # owned by the stream, closed at its end
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            break
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise StdioError(f"cannot open {path} for writing: {e.strerror}") from None
            time.sleep(0.05)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return os.fdopen(fd, "wb", buffering=0)


@dataclass
class Stream:
    guest_id: str
    exec_id: str | None                      # None: the container's init process
    stdout: BinaryIO | None
    stderr: BinaryIO | None
    on_exit: Callable[[int], None]
    stdio: bool = True
    offset: int = 0
    eof: bool = False

    def write(self, which: str, data: bytes) -> None:
        out = self.stdout if which == "stdout" else self.stderr
        if out is None:
            return
        try:
            out.write(data)
        except OSError as e:        # the reader went away (e.g. `ctr` was interrupted): drop the rest
            log.debug("%s of %s/%s: %s", which, self.guest_id, self.exec_id, e)
            self._close(which)

    def _close(self, which: str) -> None:
        out = self.stdout if which == "stdout" else self.stderr
        if out is not None:
            with contextlib.suppress(OSError):
                out.close()
        if which == "stdout":
            self.stdout = None
        else:
            self.stderr = None

    def close(self) -> None:
        self._close("stdout")
        self._close("stderr")


class OutputPump:
    """One thread copying every running process's output to its stdio and reporting exits."""

    def __init__(self, connect: Callable[[], AgentClient]) -> None:
        self._connect = connect
        self._streams: list[Stream] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="output")
        self._thread.start()

    def add(self, stream: Stream) -> None:
        with self._cond:
            self._streams.append(stream)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(10)

    def _run(self) -> None:
        client: AgentClient | None = None
        while True:
            with self._cond:
                while not self._streams and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    break
                active = list(self._streams)
            try:
                if client is None:
                    client = self._connect()
                progressed = self._cycle(client, active)
            except SandboxError as e:
                log.warning("output: %s", e)
                if client is not None:
                    client.close()
                client = None
                if not self._sandbox_alive():
                    self._finish_all(EXIT_LOST)
                else:
                    time.sleep(0.5)
                continue
            if not progressed and len(active) > 1:
                time.sleep(0.1)
        if client is not None:
            client.close()
        self._finish_all(EXIT_LOST)

    def _sandbox_alive(self) -> bool:
        try:
            with self._connect() as c:
                c.call(PingRequest(), timeout=5)
            return True
        except SandboxError:
            return False

    def _cycle(self, client: AgentClient, active: list[Stream]) -> bool:
        progressed = False
        single = len(active) == 1
        for s in active:
            if s.stdio and not s.eof:
                wait = 0.5 if single else 0.0
                try:
                    r = client.call(ReadOutputRequest(s.guest_id, s.exec_id, s.offset, 256 * 1024, wait),
                                    timeout=wait + 30)
                except AgentDenied:
                    s.stdio = False     # the policy keeps this container's output from the host
                    s.close()
                else:
                    for ch in r.chunks:
                        s.write(ch.stream.value, ch.data)
                        progressed = progressed or bool(ch.data)
                    s.offset, s.eof = r.next_offset, r.eof
                    if not s.eof:
                        continue
            code = self._exit_code(client, s, wait=0.5 if single and not s.stdio else 0.0)
            if code is not None:
                self._finish(s, code)
                progressed = True
        return progressed

    @staticmethod
    def _exit_code(client: AgentClient, s: Stream, wait: float) -> int | None:
        try:
            w = client.call(WaitProcessRequest(s.guest_id, s.exec_id, wait), timeout=wait + 30)
        except AgentError as e:
            if e.code == "not_found":
                return EXIT_LOST
            raise
        return None if w.running else int(w.exit_code or 0)

    def _finish(self, s: Stream, code: int) -> None:
        with self._cond:
            if s in self._streams:
                self._streams.remove(s)
        s.close()
        s.on_exit(code)

    def _finish_all(self, code: int) -> None:
        with self._cond:
            left, self._streams = self._streams, []
        for s in left:
            s.close()
            s.on_exit(code)
