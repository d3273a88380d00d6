"""`exec -i` and `exec -t`: a process in the guest fed from our stdin, on a terminal sized like ours.

As `docker exec -it`: with -t our terminal goes into raw mode, so every key (Ctrl-C, Ctrl-D, arrows)
travels to the guest's pseudo-terminal, whose line discipline turns Ctrl-C into SIGINT for the
process's foreground job and Ctrl-D into end-of-file; a window size change (SIGWINCH) is forwarded.
With -i alone our stdin is piped to the process, its end-of-file closing the process's stdin; Ctrl-C
is sent to the process as SIGINT when the policy lists that signal for it (a second Ctrl-C detaches).
The exit code is the process's (128 + N when signal N ended it).

Two agent connections: one carries the output (read_output long-polls) and then the exit status, the
other the input (write_stdin, resize_terminal, close_stdin, signal_process), so that typing never waits
behind output. The policy decides the exec exactly as a non-interactive one; it must also allow the
container's stdio.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import threading
import time
import tty as ttymod
from collections.abc import Iterator
from typing import Any, BinaryIO

from sandbox.launch.agent_client import AgentClient, AgentDenied, AgentError
from sandbox.launch.lifecycle import exec_client, exec_target, start_exec
from sandbox.shared import errors as E
from sandbox.shared.messages import (
    MAX_STDIN_CHUNK,
    CloseStdinRequest,
    ExecProcessRequest,
    OutputStream,
    ReadOutputRequest,
    ResizeTerminalRequest,
    SignalProcessRequest,
    WaitProcessRequest,
    WriteStdinRequest,
)
from sandbox.shared.protocol import ErrorCode
from sandbox.state import StateStore

READ_WAIT_S = 1.0
FULL_RETRY_S = 0.02      # the process is not reading its input: try again after this
RESIZE, INTERRUPT, QUIT = b"w", b"i", b"q"


def terminal_size(fd: int) -> tuple[int, int]:
    """(rows, columns) of the terminal on fd, (24, 80) when it reports none."""
    try:
        size = os.get_terminal_size(fd)
        return (size.lines or 24, size.columns or 80)
    except OSError:
        return (24, 80)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Our terminal in raw mode (every key goes through as typed), restored on every way out."""
    saved = termios.tcgetattr(fd)
    try:
        ttymod.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class InputPump:
    """Our stdin (and SIGWINCH, and Ctrl-C without a terminal) to the process, on a thread of its own."""

    def __init__(self, client: AgentClient, container: str, exec_id: str, stdin_fd: int, tty: bool,
                 messages: BinaryIO) -> None:
        self.client, self.container, self.exec_id = client, container, exec_id
        self.stdin_fd, self.tty, self.messages = stdin_fd, tty, messages
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="exec-input", daemon=True)
        self.error: BaseException | None = None
        self.interrupts = 0

    def start(self) -> None:
        self._thread.start()

    def poke(self, what: bytes) -> None:
        """From a signal handler: have the thread act on it."""
        try:
            os.write(self._wake_w, what)
        except OSError:
            pass

    def stop(self) -> None:
        self.poke(QUIT)
        self._thread.join(5)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _say(self, text: str) -> None:
        self.messages.write((text + ("\r\n" if self.tty else "\n")).encode())
        self.messages.flush()

    def _run(self) -> None:
        try:
            self._loop()
        except AgentError as e:
            if e.code not in (ErrorCode.conflict.value, ErrorCode.not_found.value):
                self.error = e
            # else: the process has exited (its input is closed): its output says the rest
        except BaseException as e:  # the output side notices and reports it
            self.error = e

    def _loop(self) -> None:
        reading = True
        while True:
            fds = [self._wake_r] + ([self.stdin_fd] if reading else [])
            ready, _, _ = select.select(fds, [], [])
            if self._wake_r in ready:
                events = os.read(self._wake_r, 64)
                if QUIT in events:
                    return
                if RESIZE in events and self.tty:
                    rows, cols = terminal_size(self.stdin_fd)
                    self.client.call(ResizeTerminalRequest(self.container, self.exec_id, rows, cols))
                if INTERRUPT in events:
                    self._interrupt()
            if reading and self.stdin_fd in ready:
                data = os.read(self.stdin_fd, MAX_STDIN_CHUNK)
                if not data:
                    self.client.call(CloseStdinRequest(self.container, self.exec_id))
                    reading = False
                    continue
                self._send(data)

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            accepted = self.client.call(WriteStdinRequest(self.container, self.exec_id, bytes(view))).accepted
            view = view[accepted:]
            if view and not accepted:
                time.sleep(FULL_RETRY_S)

    def _interrupt(self) -> None:
        try:
            self.client.call(SignalProcessRequest(self.container, signal.SIGINT, self.exec_id))
        except AgentDenied as e:
            self._say(f"parma-sandbox: Ctrl-C not forwarded: {e.message}; press Ctrl-C again to detach")


def exec_interactive(name: str, container: str, argv: tuple[str, ...], *, tty: bool, stdin: bool,
                     store: StateStore | None = None, stdin_fd: int = 0,
                     stdout: BinaryIO | None = None, stderr: BinaryIO | None = None) -> int:
    """Run argv in a running container with our stdin (`stdin`) and/or on a terminal (`tty`); return its
    exit code."""
    store = store or StateStore()
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr.buffer
    if tty and not os.isatty(stdin_fd):
        raise E.ExecSetupError("the input device is not a TTY (exec -t needs a terminal)",
                           hint="run it from a terminal, or pipe the input with -i alone")
    record, spec = exec_target(name, container, store)
    rows, cols = terminal_size(stdin_fd) if tty else (0, 0)
    with exec_client(record, store) as output, exec_client(record, store) as control:
        r = start_exec(output, ExecProcessRequest(container, argv, spec.env, spec.working_dir, tty=tty,
                                                  stdin=stdin or tty, rows=rows, cols=cols))
        pump = InputPump(control, container, r.exec_id, stdin_fd, tty, stderr)
        handlers = _install_handlers(pump, tty)
        try:
            with raw_mode(stdin_fd) if tty else contextlib.nullcontext():
                pump.start()
                _copy_output(output, container, r.exec_id, stdout, stderr, pump)
        finally:
            pump.stop()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        while True:
            w = output.call(WaitProcessRequest(container, r.exec_id, 30), timeout=60)
            if not w.running:
                return int(w.exit_code or 0)


def _install_handlers(pump: InputPump, tty: bool) -> dict[int, Any]:
    previous: dict[int, Any] = {}
    if tty:
        previous[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, lambda *_: pump.poke(RESIZE))
    else:
        def interrupt(*_: object) -> None:
            pump.interrupts += 1
            if pump.interrupts > 1:
                raise KeyboardInterrupt("detached")
            pump.poke(INTERRUPT)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
    return previous


def _copy_output(client: AgentClient, container: str, exec_id: str, stdout: BinaryIO, stderr: BinaryIO,
                 pump: InputPump) -> None:
    offset = 0
    while True:
        page = client.call(ReadOutputRequest(container, exec_id, offset, 256 * 1024, READ_WAIT_S),
                           timeout=READ_WAIT_S + 30)
        for chunk in page.chunks:
            out = stdout if chunk.stream == OutputStream.stdout else stderr
            out.write(chunk.data)
            out.flush()
        offset = page.next_offset
        if page.eof:
            return
        if pump.error is not None:
            raise pump.error
