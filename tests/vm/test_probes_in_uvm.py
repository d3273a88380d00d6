"""Probes in a UVM (docs/group-spec.md, "Probes"): a detached group whose container's exec liveness probe
starts failing is stopped and restarted by the supervisor (restartPolicy Always), through policy-checked
execs and the usual policy-checked restart; readiness follows its own exec probe and shows in `inspect`
and `ps`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_hello import BUSYBOX_LAYOUT, Cli, ensure_example_image, running_cli

NAME = "probes-vm"
HEALTHY = ["/bin/cat", "/tmp/healthy"]
READY = ["/bin/ls", "/tmp/healthy"]


def group(d: Path) -> Path:
    busybox = f"oci:{BUSYBOX_LAYOUT}:latest"
    doc = {
        "name": "probes", "resources": {"scratchGiB": 1},
        "containers": [{
            "name": "web", "image": busybox,
            # Healthy for 20 s after each start, then broken (but running) until restarted.
            "command": ["/bin/sh", "-c", "echo start; touch /tmp/healthy; sleep 20; rm /tmp/healthy; echo broken; "
                                         "while true; do sleep 1; done"],
            # TCG makes `crun exec` slow: generous timeouts, so that only the broken state fails.
            "livenessProbe": {"exec": {"command": HEALTHY}, "initialDelaySeconds": 2, "periodSeconds": 3,
                              "timeoutSeconds": 20, "failureThreshold": 2},
            "readinessProbe": {"exec": {"command": READY}, "periodSeconds": 2, "timeoutSeconds": 20,
                               "failureThreshold": 1}}],
    }
    path = d / "group.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    yield from running_cli(tmp_path_factory)


def web(cli: Cli) -> dict[str, Any]:
    r = cli("inspect", NAME, "--format", "json")
    assert r.returncode == 0, r.stderr
    return next(c for c in json.loads(r.stdout)["containers"] if c["name"] == "web")


def wait_for(cli: Cli, check: Callable[[dict[str, Any]], bool], seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        c = web(cli)
        if check(c):
            return c
        assert time.monotonic() < deadline, c
        time.sleep(1)


def test_a_failing_liveness_probe_restarts_the_container_and_readiness_is_reported(cli: Cli, tmp_path: Path) -> None:
    ensure_example_image()
    r = cli("up", "-d", "--name", NAME, str(group(tmp_path)), timeout=900)
    assert r.returncode == 0, r.stderr
    # The generated policy lists both probe commands as exec processes of the container.
    policy = json.loads(cli("policy", "gen", str(tmp_path / "group.json"), timeout=300).stdout)
    assert [p["command"] for p in policy["containers"][0]["exec_processes"]] == [HEALTHY, READY]

    c = wait_for(cli, lambda c: c.get("ready") is True, 60)
    assert c["status"] == "running" and c["restarts"] == 0
    # /tmp/healthy goes: readiness fails first (period 2 s, threshold 1), then liveness twice: a restart.
    c = wait_for(cli, lambda c: c.get("ready") is False, 60)
    assert "readiness probe failed 1 time: exit code 1" in (c.get("probe_error") or ""), c
    c = wait_for(cli, lambda c: c["restarts"] >= 1, 120)
    assert c["exit_code"] in (137, 143), c                  # stopped by the supervisor's shutdown
    assert "liveness probe failed 2 times: exit code 1" in (c.get("probe_error") or ""), c
    # The new incarnation (a fresh writable layer holding /tmp/healthy again) becomes ready.
    c = wait_for(cli, lambda c: c["status"] == "running" and c.get("ready") is True, 120)
    assert c["restarts"] >= 1
    logs = cli("logs", NAME, "web").stdout
    assert logs.count("start\n") >= 2 and "broken\n" in logs
    ps = cli("ps").stdout
    assert "web (" in ps and "restarts" in ps
    log = (Path(web_state_dir(cli)) / "supervisor.log").read_text()
    assert "container web was stopped: its liveness probe failed 2 times: exit code 1" in log, log
    assert cli("down", NAME, timeout=120).returncode == 0


def web_state_dir(cli: Cli) -> str:
    r = cli("inspect", NAME, "--format", "json")
    return str(json.loads(r.stdout)["state_dir"])
