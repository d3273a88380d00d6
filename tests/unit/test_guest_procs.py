"""Process handles (sandbox/guest/procs.py) with real processes: signals and waits by pidfd, adoption."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.guest import procs, sysapi
from sandbox.guest.procs import REAPER, ExitStatus


def test_spawned_children_are_waited_for_and_signalled_by_handle() -> None:
    child = procs.spawn(["sleep", "30"])
    assert child.wait(0) is None and child.wait(0.1) is None
    assert child.send_signal(signal.SIGTERM)
    assert child.wait(10) == ExitStatus(None, signal.SIGTERM)
    assert child.exited == ExitStatus(None, signal.SIGTERM)
    assert not child.send_signal(signal.SIGKILL)            # gone: refused, whoever has the pid now
    assert not os.path.exists(f"/proc/{child.pid}") or _not_ours(child.pid)
    REAPER.forget(child)
    assert child.wait(5) == ExitStatus(None, signal.SIGTERM)   # the status outlives the handle


def _not_ours(pid: int) -> bool:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) != os.getpid()
    except OSError:
        return True


def test_exit_codes_and_run() -> None:
    r = procs.run(["sh", "-c", "printf out; printf err >&2; exit 7"])
    assert (r.status, r.stdout, r.stderr, r.ok) == (ExitStatus(7, None), b"out", b"err", False)
    assert ExitStatus(None, 9).shell_code == 137
    r = procs.run(["sleep", "30"], timeout=0.3)
    assert r.status.signal == signal.SIGKILL


def test_many_waiters_see_one_status() -> None:
    import threading

    child = procs.spawn(["sh", "-c", "sleep 0.3; exit 5"])
    seen: list[ExitStatus | None] = []
    threads = [threading.Thread(target=lambda: seen.append(child.wait(10))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert seen == [ExitStatus(5, None)] * 8
    REAPER.forget(child)


def test_only_children_can_be_adopted() -> None:
    with pytest.raises(ChildProcessError):
        REAPER.adopt(1)                 # init: not ours
    with pytest.raises(ChildProcessError):
        REAPER.adopt(0)
    with pytest.raises(ChildProcessError):
        REAPER.adopt(os.getppid())


@pytest.fixture
def subreaper() -> Iterator[None]:
    """This test process as a child subreaper, like the agent (orphans of our children come to us)."""
    try:
        sysapi.set_child_subreaper()
    except OSError as e:
        pytest.skip(f"cannot become a subreaper: {e}")
    try:
        yield
    finally:
        sysapi.libc().prctl(sysapi.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _detach(pid_file: Path, child_code: str) -> procs.Child:
    """What crun exec --detach does: fork a process, write its pid, exit without reaping it."""
    return procs.spawn([sys.executable, "-c", "import os, sys, time\n"
                        "pid = os.fork()\n"
                        f"if pid == 0:\n    {child_code}\n"
                        f"open({str(pid_file)!r}, 'w').write(str(pid))\n"])


def test_a_detached_process_is_adopted_before_its_pid_can_be_reused(subreaper: None, tmp_path: Path) -> None:
    """The orphan is ours; even when it exits before we look, it stays a zombie that only we could reap,
    so its pid still names it."""
    pid_file = tmp_path / "pid"
    with REAPER.adopting():
        assert procs.finish(_detach(pid_file, "os._exit(4)"), 10).code == 0
        time.sleep(0.2)                 # the orphan has exited by now: a zombie of ours
        child = REAPER.adopt(int(pid_file.read_text()))
    assert child.wait(5) == ExitStatus(4, None)
    assert not child.send_signal(signal.SIGKILL)
    REAPER.forget(child)

    with REAPER.adopting():
        procs.finish(_detach(pid_file, "time.sleep(30); os._exit(0)"), 10)
        child = REAPER.adopt(int(pid_file.read_text()))
    assert child.wait(0) is None and child.send_signal(signal.SIGKILL)
    assert child.wait(10) == ExitStatus(None, signal.SIGKILL)
    REAPER.forget(child)
