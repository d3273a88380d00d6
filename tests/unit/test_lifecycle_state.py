"""What `ps` shows for sandboxes in every state, and that `down` cleans what a killed `up` left."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.launch.lifecycle import down
from sandbox.shared.errors import InputError
from sandbox.state import ProcessRef, SandboxRecord, SandboxStatus, StateStore, list_sandboxes

STARTING, RUNNING = SandboxStatus.starting, SandboxStatus.running


def dead_ref() -> ProcessRef:
    p = subprocess.Popen(["sleep", "30"])
    ref = ProcessRef.of(p.pid)
    p.kill()
    p.wait()
    return ref


def test_observed_status() -> None:
    me, dead = ProcessRef.of(os.getpid()), dead_ref()

    def observed(status: SandboxStatus, **processes: ProcessRef) -> str:
        return SandboxRecord("a", status, processes=processes).observed()

    assert observed(STARTING, launcher=me) == "starting"
    assert observed(STARTING, launcher=dead, qemu=me) == "failed"
    assert observed(STARTING, launcher=dead) == "stale"
    assert observed(RUNNING, launcher=dead, qemu=me) == "running"
    assert observed(RUNNING, launcher=dead, qemu=dead) == "stale"
    assert observed(RUNNING, qemu=dead) == "stale"
    assert observed(SandboxStatus.stopping, launcher=me) == "stopping"
    assert observed(RUNNING) == "stale"     # nothing recorded: nothing runs


def test_down_kills_a_vm_that_a_killed_up_only_left_in_its_pidfile(isolated_dirs: Path) -> None:
    store = StateStore()
    with store.lock("orphan") as state_dir:
        store.save(SandboxRecord("orphan", STARTING, processes={"launcher": dead_ref()}))
    # A stand-in "QEMU": its command line names the state dir, as QEMU's does (-pidfile, sockets).
    qemu = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(state_dir / "qemu.pid")])
    (state_dir / "qemu.pid").write_text(f"{qemu.pid}\n")
    deadline = time.monotonic() + 5   # until the child has exec'd (its cmdline is still ours before)
    while str(state_dir).encode() not in Path(f"/proc/{qemu.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [r["status"] for r in list_sandboxes(store)] == ["stale"]
    assert down("orphan", store=store)["graceful"] is False
    deadline = time.monotonic() + 5
    while qemu.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert qemu.poll() is not None
    assert not state_dir.exists() and list_sandboxes(store) == []


def test_down_of_an_unknown_sandbox_is_an_input_error(isolated_dirs: Path) -> None:
    with pytest.raises(InputError, match="no sandbox named 'ghost'"):
        down("ghost")
