"""Acceptance (issue 16): an attached `up` of a group with restartPolicy Never and two init containers.

The init containers run in order, each to completion, before the containers; an interactive `exec -it`
runs while the attached `up` streams the group's output (both keep working); the container that exits 1
is not restarted; `up` ends once no container runs, with the first failed container's exit code, and
takes the sandbox down.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pexpect
from test_hello import BUSYBOX_LAYOUT, REPO, cli_in, ensure_example_image

NAME = "never-vm"


def group(d: Path) -> Path:
    busybox = f"oci:{BUSYBOX_LAYOUT}:latest"
    doc = {
        "name": "never", "restartPolicy": "Never", "policy": {"debugMode": True},
        "resources": {"scratchGiB": 1},
        "initContainers": [
            {"name": "one", "image": busybox, "command": ["/bin/sh", "-c", "sleep 1; echo init one"]},
            {"name": "two", "image": busybox, "command": ["/bin/sh", "-c", "echo init two"]}],
        "containers": [
            {"name": "app", "image": busybox,
             "command": ["/bin/sh", "-c", "echo app starts; while [ ! -e /tmp/stop ]; do echo tick; sleep 1; done; "
                                          "echo app stops; exit 1"]},
            {"name": "ok", "image": busybox, "command": ["/bin/sh", "-c", "echo ok done"]}],
    }
    path = d / "group.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def test_attached_up_runs_init_containers_first_restarts_nothing_and_exits_with_the_failure(tmp_path: Path) -> None:
    ensure_example_image()
    run_dir = tmp_path / "run"
    env = cli_in(run_dir).env
    up = subprocess.Popen([sys.executable, "-m", "sandbox", "up", "--name", NAME, str(group(tmp_path))], env=env,
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: list[tuple[float, bytes]] = []
    err: list[bytes] = []
    readers = [threading.Thread(target=lambda: [out.append((time.monotonic(), x)) for x in up.stdout], daemon=True),  # type: ignore[union-attr]
               threading.Thread(target=lambda: [err.append(x) for x in up.stderr], daemon=True)]  # type: ignore[union-attr]
    for r in readers:
        r.start()
    try:
        deadline = time.monotonic() + 900
        while not any(b"tick" in line for _, line in out):
            assert up.poll() is None and time.monotonic() < deadline, b"".join(err).decode()[-3000:]
            time.sleep(0.5)
        t0 = time.monotonic()
        sh = pexpect.spawn(sys.executable, ["-m", "sandbox", "exec", "-it", NAME, "app", "--", "/bin/sh"], env=env,
                           cwd=str(REPO), dimensions=(24, 80), timeout=120)
        sh.expect(r"# ")
        sh.sendline("sleep 3; touch /tmp/stop; exit 4")
        sh.expect(pexpect.EOF)
        sh.close()
        t1 = time.monotonic()
        assert sh.exitstatus == 4
        assert up.wait(300) == 1                        # app's exit code: the first (and only) failure
    finally:
        if up.poll() is None:
            up.terminate()
            up.wait(60)
    for r in readers:
        r.join(10)
    lines = [line.decode().rstrip("\n") for _, line in out]
    stderr = b"".join(err).decode()
    assert lines.index("one | init one") < lines.index("two | init two") < lines.index("app | app starts")
    assert lines.count("app | app starts") == 1 and lines.count("app | app stops") == 1   # not restarted
    assert "ok  | ok done" in lines
    ticks = [t for t, line in out if b"tick" in line and t0 < t < t1]
    assert len(ticks) >= 2, lines                       # the attached up streamed on during the session
    assert "container app exited with code 1\n" in stderr and "restarting" not in stderr
    assert "init container one completed" in stderr
    assert not (run_dir / NAME).exists()                # taken down
