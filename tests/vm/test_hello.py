"""Acceptance: examples/hello through the real CLI, `up -d` to `down` (one UVM for the module, in order)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docblocks import blocks

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello"
BUSYBOX_LAYOUT = REPO / "build" / "images" / "busybox"
NAME = "hello-vm"


@dataclass
class Cli:
    env: dict[str, str]
    cwd: Path

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sandbox", *args], env=self.env, cwd=self.cwd, text=True,
                              capture_output=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch_page(port: int, timeout: float = 30) -> bytes:
    """GET / on a forwarded loopback port, retrying while the server inside the guest comes up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def ensure_example_image() -> None:
    if not (BUSYBOX_LAYOUT / "index.json").exists():
        subprocess.run(["make", "-C", str(REPO), "example-images"], check=True, timeout=600,
                       stdout=subprocess.DEVNULL)


def hello_group(tmp: Path, port: int) -> Path:
    """examples/hello with a free host port, and its relative paths made absolute."""
    group = json.loads((HELLO / "group.json").read_text())
    group["ports"] = [{"port": 8080, "hostPort": port}]
    for c in group["containers"]:
        c["image"] = f"oci:{BUSYBOX_LAYOUT}:latest"
    group["volumes"][0]["files"]["path"] = str(HELLO / "www")
    path = tmp / "group.json"
    path.write_text(json.dumps(group, indent=1))
    return path


def cli_in(run_dir: Path) -> Cli:
    """The CLI of this checkout with its sandboxes' state in `run_dir` (PARMA_SANDBOX_RUNTIME)."""
    env = {**os.environ, "PARMA_SANDBOX_RUNTIME": str(run_dir), "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return Cli(env, REPO)


def running_cli(factory: pytest.TempPathFactory) -> Iterator[Cli]:
    """A Cli in a fresh run directory of its own; every sandbox it started goes down after."""
    c = cli_in(factory.mktemp("run"))
    yield c
    c("down", "--all", timeout=120)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    yield from running_cli(tmp_path_factory)


@pytest.fixture(scope="module")
def hello(cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> dict:
    ensure_example_image()
    port = free_port()
    group = hello_group(tmp_path_factory.mktemp("hello"), port)
    trace = group.parent / "hello.trace"
    t0 = time.monotonic()
    r = cli("--progress", "plain", "up", "-d", "--name", NAME, "--format", "json", "--record-trace", str(trace),
            str(group), timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    return {"port": port, "summary": summary, "up_s": time.monotonic() - t0, "stderr": r.stderr, "trace": trace}


def test_up_detached_serves_the_page_on_loopback(hello: dict) -> None:
    assert hello["summary"]["status"] == "running" and hello["summary"]["tee"] == "emulated"
    assert "auto -> emulated" in hello["stderr"]
    expected = (HELLO / "www" / "index.html").read_bytes()
    assert fetch_page(hello["port"]) == expected


def test_ps_and_inspect_describe_the_sandbox(cli: Cli, hello: dict) -> None:
    rows = json.loads(cli("ps", "--format", "json").stdout)
    row = next(r for r in rows if r["name"] == NAME)
    assert row["status"] == "running" and row["containers"] == ["web", "probe"]
    assert row["ports"] == [f"127.0.0.1:{hello['port']}->8080/tcp"]
    info = json.loads(cli("inspect", NAME, "--format", "json").stdout)
    policy = Path(info["state_dir"], "policy.json").read_bytes()
    assert info["policy_hash"] == hashlib.sha256(policy).hexdigest()
    assert info["tee"] == "emulated" and info["expected_measurement"]
    assert {d["target"] for d in info["devices"]} == {"/run/parma/layers/l0", "/run/parma/volumes/www"}
    assert [(c["name"], c["status"]) for c in info["containers"]] == [("web", "running"), ("probe", "running")]


def test_logs_show_the_containers_output(cli: Cli, hello: dict) -> None:
    deadline = time.monotonic() + 30
    while True:
        r = cli("logs", NAME, "probe")
        if "Hello from a confidential container group" in r.stdout or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert r.returncode == 0 and "<title>parma-sandbox hello</title>" in r.stdout
    r = cli("logs", NAME)
    assert "probe | " in r.stdout and "web   | " in r.stderr  # httpd -v logs requests on stderr


def test_exec_of_a_listed_process_works(cli: Cli, hello: dict) -> None:
    r = cli("exec", NAME, "web", "--", "/bin/cat", "/www/index.html")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (HELLO / "www" / "index.html").read_text()


def test_exec_of_an_unlisted_shell_is_denied_with_the_reason(cli: Cli, hello: dict) -> None:
    r = cli("exec", NAME, "web", "--", "/bin/sh")
    assert r.returncode == 77
    assert "denied by policy" in r.stderr and "not an exec_process" in r.stderr
    assert "/bin/cat" in r.stderr  # the explanation lists what is allowed
    assert cli("exec", NAME, "nope", "--", "/bin/true").returncode == 125


def test_the_launch_trace_replays_offline(cli: Cli, hello: dict, tmp_path: Path) -> None:
    """`up --record-trace` and `inspect --trace`: the requests the launch sent, as the agent checked them
    (docs/policy-trace.md, whose example this run must reproduce). Replayed against the run's policy
    every request is allowed; against the same policy without the probe container, the probe's create
    is the first denial."""
    recorded = hello["trace"].read_text()
    assert cli("inspect", "--trace", NAME).stdout == recorded
    info = json.loads(cli("inspect", NAME, "--format", "json").stdout)
    lines = recorded.splitlines()
    assert lines[0].startswith(f"# set_policy: policy sha256 {info['policy_hash']} installed")
    requests = [json.loads(x) for x in lines if not x.startswith("#")]
    # The device hashes the guest derived are the ones the host computed when it converted the layers.
    assert {r["input"]["target"]: r["input"]["device_hash"] for r in requests if r["ep"] == "mount_device"} == \
        {d["target"]: d["root_hash"] for d in info["devices"]}
    example = next(b for b in blocks(REPO / "docs" / "policy-trace.md") if b.file == "hello.trace")

    def body(text: str) -> list[str]:   # the policy hash names the group's image path, which differs here
        return [x for x in text.splitlines() if not x.startswith("# set_policy:")]

    assert body(recorded) == body(example.text), f"{example.where} is stale; this run recorded:\n{recorded}"

    policy = Path(info["state_dir"]) / "policy.json"
    r = cli("policy", "check", str(policy), str(hello["trace"]))
    assert r.returncode == 0 and "DENIED" not in r.stdout and "REFUSED" not in r.stdout, r.stdout + r.stderr
    doc = json.loads(policy.read_bytes())
    doc["containers"] = [c for c in doc["containers"] if c["name"] != "probe"]
    no_probe = tmp_path / "no-probe.json"
    no_probe.write_text(json.dumps(doc))
    r = cli("policy", "check", "--format", "json", str(no_probe), str(hello["trace"]))
    first = next(o for o in map(json.loads, r.stdout.splitlines()) if not o["allowed"])
    probe_create = next(n for n, x in enumerate(lines, start=1) if x.startswith('{"ep": "create_container", '
                                                                                '"input": {"container_id": "probe"'))
    assert r.returncode == 1 and (first["line"], first["ep"]) == (probe_create, "create_container"), r.stdout
    assert "create_container denied for 'probe'" in first["reason"] and not first["refused_by_agent"]


def test_an_interactive_shell_is_denied_with_the_reason_under_a_normal_policy(cli: Cli, hello: dict) -> None:
    import pexpect

    sh = pexpect.spawn(sys.executable, ["-m", "sandbox", "exec", "-it", NAME, "web", "--", "/bin/sh"], env=cli.env,
                       cwd=str(cli.cwd), dimensions=(24, 80), timeout=120)
    sh.expect(pexpect.EOF)
    sh.close()
    text = sh.before.decode()
    assert sh.exitstatus == 77, text
    assert "denied by policy" in text and "argv ['/bin/sh'] is not an exec_process" in text, text


def test_down_leaves_no_qemu_and_no_state(cli: Cli, hello: dict) -> None:
    info = json.loads(cli("inspect", NAME, "--format", "json").stdout)
    pid = info["vm"]["pid"]
    state_dir = Path(info["state_dir"])
    # Someone following the logs: `down` ends them normally, exit 0 (docs/cli.md, "Exit codes").
    follower = subprocess.Popen([sys.executable, "-m", "sandbox", "logs", "-f", NAME, "probe"], env=cli.env,
                                cwd=cli.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    r = cli("down", NAME)
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stdout
    _, follower_err = follower.communicate(timeout=60)
    assert follower.returncode == 0, follower_err
    assert not Path(f"/proc/{pid}").exists() or "qemu" not in Path(f"/proc/{pid}/cmdline").read_text()
    assert not state_dir.exists()
    assert json.loads(cli("ps", "--format", "json").stdout) == []
