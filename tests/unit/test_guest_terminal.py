"""The guest's terminal plumbing against real ptys and processes: window sizes and SIGWINCH, Ctrl-C and
Ctrl-D through the line discipline, input back-pressure, a stdin pipe's EOF, and receiving a pty master
over a console socket the way crun sends it (SCM_RIGHTS, one byte of payload)."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.guest import terminal
from sandbox.guest.output import OutputLog
from sandbox.guest.terminal import ConsoleSocket, StdinPipe, Terminal, TerminalError, WindowSize


def wait_for(log: OutputLog, needle: bytes, timeout: float = 10) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        data = b"".join(c.data for c in log.read(0, 1 << 20, wait=0.2).chunks)
        if needle in data:
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in {data!r}")


def spawn_on_pty(argv: list[str], size: WindowSize | None = None) -> tuple[subprocess.Popen, Terminal, OutputLog]:
    """argv as the session leader with the pty's slave as its controlling terminal (what crun does)."""
    master, slave = terminal.open_pty(size or WindowSize(24, 80))

    def become_session_leader() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=become_session_leader, pass_fds=())
    os.close(slave)
    log = OutputLog()
    return proc, Terminal(master, log), log


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_window_size_and_sigwinch(procs: list) -> None:
    script = 'trap "stty size" WINCH; stty size; echo ready; while :; do sleep 0.05; done'
    proc, term, log = spawn_on_pty(["sh", "-c", script], WindowSize(30, 100))
    procs.append(proc)
    wait_for(log, b"ready")
    assert b"30 100" in wait_for(log, b"ready")
    term.resize(WindowSize(50, 132))
    wait_for(log, b"50 132")
    assert term.window_size() == WindowSize(50, 132)


def test_ctrl_c_interrupts_the_foreground_process(procs: list) -> None:
    proc, term, log = spawn_on_pty(["sh", "-c", "echo ready; exec sleep 30"])
    procs.append(proc)
    wait_for(log, b"ready")
    assert term.write_input(b"\x03") == 1
    assert proc.wait(10) == -signal.SIGINT


def test_ctrl_d_and_close_input_are_end_of_file(procs: list) -> None:
    proc, term, log = spawn_on_pty(["cat"])
    procs.append(proc)
    term.write_input(b"typed line\n")
    wait_for(log, b"typed line\r\ntyped line\r\n")      # the echo, then cat's copy
    term.close_input()
    assert proc.wait(10) == 0
    assert log.wait_closed(10)                          # the pump saw EIO: every slave is closed
    term.close()
    proc, term, log = spawn_on_pty(["cat"])
    procs.append(proc)
    term.write_input(b"\x04")
    assert proc.wait(10) == 0
    term.close()
    with pytest.raises(TerminalError, match="closed"):
        term.write_input(b"x")


def test_a_process_that_does_not_read_makes_input_back_off(procs: list) -> None:
    proc, term, log = spawn_on_pty(["sleep", "30"])
    procs.append(proc)
    taken = sum(term.write_input(b"x" * 65536) for _ in range(64))
    assert 0 < taken < 64 * 65536
    assert term.write_input(b"y" * 65536) == 0


def test_a_hangup_ends_the_session(procs: list) -> None:
    proc, term, log = spawn_on_pty(["sh", "-c", "echo ready; exec sleep 30"])
    procs.append(proc)
    wait_for(log, b"ready")
    term.close()
    assert proc.wait(10) == -signal.SIGHUP


def test_stdin_pipe(procs: list) -> None:
    pipe = StdinPipe()
    proc = subprocess.Popen(["cat"], stdin=pipe.read_end, stdout=subprocess.PIPE)
    procs.append(proc)
    pipe.release_read_end()
    assert pipe.write_input(b"one\n") == 4
    pipe.close_input()
    assert proc.communicate(timeout=10)[0] == b"one\n"
    with pytest.raises(TerminalError):
        pipe.write_input(b"late")


def test_window_size_bounds() -> None:
    WindowSize(0, 65535)
    with pytest.raises(ValueError):
        WindowSize(70000, 80)


def _send(path: Path, fds: list[int], payload: bytes = b" ") -> threading.Thread:
    def run() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            socket.send_fds(s, [payload], fds)
    t = threading.Thread(target=run)
    t.start()
    return t


def test_console_socket_receives_a_pty_master_like_crun_sends_it(tmp_path: Path) -> None:
    master, slave = os.openpty()
    with ConsoleSocket(tmp_path) as cs:
        assert cs.path.parent.stat().st_mode & 0o777 == 0o700
        t = _send(cs.path, [master])
        got = cs.receive(timeout=10)
        t.join()
    try:
        assert terminal.is_pty_master(got) and not os.get_inheritable(got)
        os.write(slave, b"from the slave\n")
        time.sleep(0.1)
        assert b"from the slave" in os.read(got, 100)
    finally:
        for fd in (got, master, slave):
            os.close(fd)
    assert not cs.path.exists() and not cs.path.parent.exists()


def test_console_socket_refuses_what_is_not_one_pty_master(tmp_path: Path) -> None:
    r, w = os.pipe()
    with ConsoleSocket(tmp_path) as cs:
        t = _send(cs.path, [r])
        with pytest.raises(TerminalError, match="not a pty master"):
            cs.receive(timeout=10)
        t.join()
    m1, s1 = os.openpty()
    m2, s2 = os.openpty()
    with ConsoleSocket(tmp_path) as cs:
        t = _send(cs.path, [m1, m2])
        with pytest.raises(TerminalError, match="got 2 descriptor"):
            cs.receive(timeout=10)
        t.join()
    with ConsoleSocket(tmp_path) as cs, pytest.raises(TerminalError, match="within 0.2 s"):
        cs.receive(timeout=0.2)
    for fd in (r, w, m1, s1, m2, s2):
        os.close(fd)
