"""Attached `up` on the libvirt backend: output streams through, the exit code is the main
container's, and nothing is left behind (no domain, no QEMU, no state)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from libvirt_daemon import libvirtd  # noqa: F401 - a fixture

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from test_hello import BUSYBOX_LAYOUT, ensure_example_image  # noqa: E402


@pytest.mark.usefixtures("libvirtd")
def test_attached_up_streams_output_and_exits_with_the_main_containers_code(tmp_path: Path) -> None:
    import libvirt

    ensure_example_image()
    group = tmp_path / "group.json"
    group.write_text(json.dumps({"name": "attached", "containers": [{
        "name": "main", "image": f"oci:{BUSYBOX_LAYOUT}:latest",
        "command": ["/bin/sh", "-c", "echo hello from parma-sandbox; echo to stderr >&2; exit 3"]}]}))
    env = {**os.environ, "PARMA_SANDBOX_RUNTIME": str(tmp_path / "run"),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    r = subprocess.run([sys.executable, "-m", "sandbox", "up", "--backend", "libvirt", str(group)], env=env,
                       text=True, capture_output=True, timeout=600)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "hello from parma-sandbox\n"
    assert "to stderr" in r.stderr
    assert not any((tmp_path / "run").glob("attached"))
    conn = libvirt.open("qemu:///system")
    try:
        assert "parma-sandbox-attached" not in [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()


def test_sigterm_takes_an_attached_sandbox_down_and_exits_143(tmp_path: Path) -> None:
    """A supervisor's SIGTERM: the sandbox is taken down, then `up` exits 128 + 15 (Ctrl-C: 130)."""
    ensure_example_image()
    group = tmp_path / "group.json"
    group.write_text(json.dumps({"name": "sigterm", "containers": [{
        "name": "main", "image": f"oci:{BUSYBOX_LAYOUT}:latest",
        "command": ["/bin/sh", "-c", "echo started; while true; do sleep 1; done"]}]}))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PARMA_SANDBOX_RUNTIME": str(run_dir),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    up = subprocess.Popen([sys.executable, "-m", "sandbox", "up", str(group)], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert up.stdout is not None
        assert up.stdout.readline() == "started\n"    # attached: the container's output streams through
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            up.kill()
            subprocess.run([sys.executable, "-m", "sandbox", "down", "--all"], env=env, timeout=120)
    assert up.returncode == 143, err
    assert "stopped by SIGTERM" in err
    assert not any(run_dir.glob("sigterm"))
