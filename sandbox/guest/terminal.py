"""Interactive stdio for exec'd processes: a pseudo-terminal, or a stdin pipe, that the host feeds.

With a terminal, crun (`exec --console-socket PATH --detach` with `"terminal": true` in process.json)
opens the pty inside the container's own devpts instance, makes its slave the process's controlling
terminal and stdio, and sends the master to PATH as one SCM_RIGHTS message (payload: one byte). The agent
receives it with a ConsoleSocket and wraps it in a Terminal: output goes to the process's OutputLog (one
stream, as on any terminal), input chunks are written to the master, window sizes are set with TIOCSWINSZ
(the kernel sends SIGWINCH to the foreground process group), and Ctrl-C / Ctrl-D are just bytes that the
line discipline turns into SIGINT and end-of-file. Without a terminal, `exec -i` gets a StdinPipe.

Everything here is non-blocking on the agent's side: a process that stops reading its input makes
`write_input` accept fewer bytes (the host retries), never stalls the agent.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import stat
import struct
import tempfile
import termios
import threading
from dataclasses import dataclass
from pathlib import Path

from sandbox.guest.output import OutputLog
from sandbox.shared.errors import GuestOperationFailed

CONSOLE_DIR = Path("/run/parma/console")
TIOCGPTN = 0x80045430          # _IOR('T', 0x30, unsigned int): only a pty master answers it
MAX_DIMENSION = 0xFFFF         # struct winsize fields are unsigned short


class TerminalError(GuestOperationFailed):
    pass


@dataclass(frozen=True)
class WindowSize:
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if not (0 <= self.rows <= MAX_DIMENSION and 0 <= self.cols <= MAX_DIMENSION):
            raise ValueError(f"window size {self.rows}x{self.cols} is out of range (0-{MAX_DIMENSION})")


def set_window_size(fd: int, size: WindowSize) -> None:
    # struct winsize: ws_row, ws_col, ws_xpixel, ws_ypixel (unsigned short each).
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))


def get_window_size(fd: int) -> WindowSize:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return WindowSize(rows, cols)


def is_pty_master(fd: int) -> bool:
    try:
        if not stat.S_ISCHR(os.fstat(fd).st_mode):
            return False
        fcntl.ioctl(fd, TIOCGPTN, bytes(4))
        return True
    except OSError:
        return False


def open_pty(size: WindowSize | None = None) -> tuple[int, int]:
    """(master, slave) of a new pty in the agent's own devpts, both close-on-exec."""
    master, slave = os.openpty()
    for fd in (master, slave):
        os.set_inheritable(fd, False)
    if size is not None:
        set_window_size(master, size)
    return master, slave


class ConsoleSocket:
    """A one-shot unix socket in a private directory where crun delivers a terminal's master."""

    def __init__(self, base: Path = CONSOLE_DIR) -> None:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix="console-", dir=base))
        self.path = self._dir / "sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(str(self.path))
            self._sock.listen(1)
        except OSError:
            self.close()
            raise

    def receive(self, timeout: float = 30.0) -> int:
        """The pty master the first connection sends (close-on-exec, non-blocking). Anything else, more
        than one descriptor, or nothing within `timeout` is an error; stray descriptors are closed."""
        self._sock.settimeout(timeout)
        try:
            conn, _ = self._sock.accept()
        except TimeoutError:
            raise TerminalError(f"no terminal arrived on {self.path} within {timeout:g} s") from None
        with conn:
            conn.settimeout(timeout)
            try:
                # crun sends one byte with the descriptor (runc sends the pty's name): the payload is ignored.
                _, received, _, _ = socket.recv_fds(conn, 64, 4, socket.MSG_CMSG_CLOEXEC)
            except (TimeoutError, OSError) as e:
                raise TerminalError(f"no terminal received on {self.path}: {e}") from None
        if len(received) != 1 or not is_pty_master(received[0]):
            for fd in received:
                os.close(fd)
            raise TerminalError(f"expected one pty master on {self.path}, got {len(received)} descriptor(s)"
                                + ("" if len(received) != 1 else " that is not a pty master"))
        master = received[0]
        os.set_inheritable(master, False)
        os.set_blocking(master, False)
        return master

    def close(self) -> None:
        self._sock.close()
        try:
            self.path.unlink(missing_ok=True)
            self._dir.rmdir()
        except OSError:
            pass

    def __enter__(self) -> ConsoleSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_some(fd: int, data: bytes) -> int:
    """Write what the kernel takes now; 0 when the buffer is full."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


class Terminal:
    """A process's terminal, from the agent's side of the master. A thread copies the master into the log
    until the process side is gone (EIO); the master itself stays open until close(), because closing it
    hangs the terminal up, and a process that closed its stdio on the way out must not die of SIGHUP."""

    def __init__(self, master: int, log: OutputLog) -> None:
        self._master = master
        self._lock = threading.Lock()
        os.set_blocking(master, False)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stream_closed = log.open_stream()
        self._log = log
        self._reader = threading.Thread(target=self._pump, name="pump-terminal", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        poller = select.poll()
        poller.register(self._master, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._wake_r in events:
                    break
                try:
                    data = os.read(self._master, 65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:        # EIO: every slave descriptor is closed
                    break
                if not data:
                    break
                self._log.append("stdout", data)
        finally:
            self._stream_closed()

    def _fd(self) -> int:
        if self._master < 0:
            raise TerminalError("the terminal is closed")
        return self._master

    def write_input(self, data: bytes) -> int:
        """Bytes typed at the terminal (Ctrl-C is b"\\x03", Ctrl-D b"\\x04"); returns how many were taken."""
        with self._lock:
            return _write_some(self._fd(), data)

    def resize(self, size: WindowSize) -> None:
        with self._lock:
            set_window_size(self._fd(), size)

    def window_size(self) -> WindowSize:
        with self._lock:
            return get_window_size(self._fd())

    def close_input(self) -> None:
        """End of input: the terminal's EOF character, as a user's Ctrl-D."""
        with self._lock:
            veof = termios.tcgetattr(self._fd())[6][termios.VEOF]
            _write_some(self._fd(), veof if isinstance(veof, bytes) else bytes([veof]))

    def close(self, timeout: float = 5.0) -> None:
        """Stop reading and hang up: once the master is closed, the kernel sends SIGHUP to the terminal's
        session if a process is still attached. Call it when the process has exited, or to end it."""
        with self._lock:
            if self._master < 0:
                return
            os.write(self._wake_w, b"x")
        self._reader.join(timeout)
        with self._lock:
            for fd in (self._master, self._wake_r, self._wake_w):
                os.close(fd)
            self._master = -1


class StdinPipe:
    """stdin for `exec -i` without a terminal: the process reads `read_end`; the host's chunks go in at the
    other end, and close_input() is its end-of-file."""

    def __init__(self) -> None:
        self.read_end, self._write_end = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._write_end, False)
        self._lock = threading.Lock()

    def write_input(self, data: bytes) -> int:
        with self._lock:
            if self._write_end < 0:
                raise TerminalError("stdin is closed")
            try:
                return _write_some(self._write_end, data)
            except BrokenPipeError:
                raise TerminalError("the process closed its stdin") from None

    def close_input(self) -> None:
        with self._lock:
            if self._write_end >= 0:
                os.close(self._write_end)
                self._write_end = -1

    def release_read_end(self) -> None:
        """Once the process holds its stdin, the agent's copy of the read end goes."""
        if self.read_end >= 0:
            os.close(self.read_end)
            self.read_end = -1
