"""Acceptance (issue 16), through the real CLI with one detached sandbox for the module, in order:

- a container whose image has 60 layers (synthetic, each a SCSI LUN) starts with `up -d`;
- `exec -it` runs sh on a terminal in the guest: it sees the TTY and its size, follows a resize, takes
  Ctrl-C, and its exit code is exec's; `logs -f` keeps streaming meanwhile; `exec -i` pipes stdin;
- names resolve: /etc/hosts holds the group's names, and /etc/resolv.conf points at a DNS server this test
  runs on the host's loopback (`up --dns-server`, which slirp relays over TCP);
- the init containers ran in order, each to completion, before the containers;
- restartPolicy OnFailure: a container that exits 1 is restarted (and then exits 0), one that exits 0 is
  not; `ps` and `inspect` show the restarts and the exit codes;
- `down` stops the supervisor first and leaves nothing behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from test_hello import BUSYBOX_LAYOUT, Cli, ensure_example_image, running_cli

sys.path.insert(0, str(Path(__file__).parent))
from harness import busybox_entries, glibc_tools_entries, tar_of, write_image
from tcpdns import tcp_dns_server

NAME = "devloop-vm"
LAYERS = 60
SERVICE, SERVICE_IP = "myservice.test", "10.1.2.3"
GETENT = ["/usr/bin/getent", "hosts", SERVICE]
SHARED = [{"name": "shared", "mountPath": "/shared"}]


def sixty_layer_image(d: Path) -> str:
    """busybox and glibc's getent in the base layer, and 59 layers of one small file each on top."""
    base = tar_of(busybox_entries() + glibc_tools_entries("getent"))
    tops = [tar_of([("layers", None, None, 0o755), (f"layers/f{i:02d}", f"layer {i}\n".encode(), None, 0o644)])
            for i in range(1, LAYERS)]
    return write_image(d / "sixty", [base, *tops])


def group(d: Path, image: str) -> Path:
    busybox = f"oci:{BUSYBOX_LAYOUT}:latest"
    doc = {
        "name": "devloop", "restartPolicy": "OnFailure", "policy": {"debugMode": True},
        "volumes": [{"name": "shared", "emptyDir": {}}],
        "initContainers": [
            {"name": "first", "image": busybox, "command": ["/bin/sh", "-c", "sleep 1; echo first >> /shared/order"],
             "mounts": SHARED},
            {"name": "second", "image": busybox, "command": ["/bin/sh", "-c", "echo second >> /shared/order"],
             "mounts": SHARED}],
        "containers": [
            {"name": "main", "image": image, "mounts": SHARED,
             "command": ["/bin/sh", "-c", "cat /shared/order; ls /layers | wc -l; i=0; "
                                          "while true; do echo tick $i; i=$((i+1)); sleep 1; done"],
             "execProcesses": [{"command": GETENT}, {"command": ["/bin/cat", "/etc/hosts", "/etc/resolv.conf"]},
                               {"command": ["/bin/hostname"]}]},
            {"name": "flaky", "image": busybox, "mounts": SHARED,
             "command": ["/bin/sh", "-c", "echo x >> /shared/flaky; n=$(wc -l < /shared/flaky); echo attempt $n; "
                                          "[ $n -ge 2 ] && exit 0; exit 1"]},
            {"name": "once", "image": busybox, "command": ["/bin/sh", "-c", "echo once; exit 0"]},
        ],
    }
    path = d / "group.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    yield from running_cli(tmp_path_factory)


@pytest.fixture(scope="module")
def sandbox(cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    ensure_example_image()
    d = tmp_path_factory.mktemp("devloop")
    path = group(d, sixty_layer_image(d))
    with tcp_dns_server({SERVICE: SERVICE_IP}) as dns:
        host, port = dns.server_address
        t0 = time.monotonic()
        r = cli("--progress", "plain", "up", "-d", "--name", NAME, "--format", "json", "--dns-server",
                f"{host}:{port}", str(path), timeout=900)
        assert r.returncode == 0, r.stderr
        yield {"summary": json.loads(r.stdout), "up_s": time.monotonic() - t0, "dns": dns, "stderr": r.stderr}


def info(cli: Cli) -> dict:
    r = cli("inspect", NAME, "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_sixty_layers_are_scsi_disks_and_the_container_sees_them_all(cli: Cli, sandbox: dict) -> None:
    d = info(cli)
    assert len(d["devices"]) == LAYERS + 1                    # and busybox's one layer
    argv = Path(f"/proc/{d['vm']['pid']}/cmdline").read_bytes().split(b"\0")
    assert sum(a.startswith(b"scsi-hd,") for a in argv) == LAYERS + 1
    deadline = time.monotonic() + 60
    while b"tick" not in (out := cli("logs", NAME, "main").stdout.encode()) and time.monotonic() < deadline:
        time.sleep(1)
    lines = out.decode().splitlines()
    assert lines[:3] == ["first", "second", str(LAYERS - 1)], lines[:5]   # init containers in order, all layers
    print(f"\nup -d with {LAYERS + 1} SCSI layers, 2 init containers, 3 containers: {sandbox['up_s']:.1f} s")


def test_exec_it_runs_a_shell_on_a_terminal_while_logs_follow(cli: Cli, sandbox: dict) -> None:
    follow = subprocess.Popen([sys.executable, "-m", "sandbox", "logs", "-f", NAME, "main"], env=cli.env, cwd=cli.cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen: list[tuple[float, bytes]] = []
    reader = threading.Thread(target=lambda: [seen.append((time.monotonic(), line)) for line in follow.stdout],  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    try:
        t0 = time.monotonic()
        sh = pexpect.spawn(sys.executable, ["-m", "sandbox", "exec", "-it", NAME, "main", "--", "/bin/sh"],
                           env=cli.env, cwd=str(cli.cwd), dimensions=(24, 80), timeout=120)
        sh.expect(r"# ")
        sh.sendline("tty; stty size")
        sh.expect(r"(/dev/pts/\d+)\r\n(\d+) (\d+)\r\n")
        assert sh.match.group(2, 3) == (b"24", b"80")
        sh.setwinsize(40, 132)          # SIGWINCH to exec, which resizes the guest's terminal
        time.sleep(1)
        sh.sendline("stty size")
        sh.expect(r"(\d+) (\d+)\r\n")
        assert sh.match.group(1, 2) == (b"40", b"132")
        sh.sendline("sleep 600")
        time.sleep(2)
        sh.sendcontrol("c")             # a key like any other: the guest's terminal makes it SIGINT
        sh.expect(r"# ")
        sh.sendline("echo status=$?")
        sh.expect(r"status=(\d+)")
        assert sh.match.group(1) == b"130"
        sh.sendline("exit 7")
        sh.expect(pexpect.EOF)
        sh.close()
        t1 = time.monotonic()
        assert sh.exitstatus == 7
    finally:
        follow.terminate()
        follow.wait(10)
    during = [line for t, line in seen if t0 < t < t1 and line.startswith(b"tick")]
    assert len(during) >= 3, seen[-5:]          # logs -f streamed on while the session ran
    print(f"\nexec -it session {t1 - t0:.1f} s; logs -f printed {len(during)} ticks meanwhile")


def test_exec_i_pipes_stdin_and_returns_the_exit_code(cli: Cli, sandbox: dict) -> None:
    r = subprocess.run([sys.executable, "-m", "sandbox", "exec", "-i", NAME, "main", "--", "/bin/sh"],
                       input="echo from stdin $((6*7))\nexit 5\n", env=cli.env, cwd=cli.cwd, text=True,
                       capture_output=True, timeout=120)
    assert r.returncode == 5, r.stderr
    assert r.stdout == "from stdin 42\n"


def test_names_resolve_through_the_groups_files_and_the_hosts_dns_server(cli: Cli, sandbox: dict) -> None:
    r = cli("exec", NAME, "main", "--", *GETENT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [SERVICE_IP, SERVICE]
    assert SERVICE in sandbox["dns"].queries                  # the answer came from our server
    r = cli("exec", NAME, "main", "--", "/bin/cat", "/etc/hosts", "/etc/resolv.conf")
    assert r.returncode == 0, r.stderr
    assert "127.0.0.1\tdevloop first second main flaky once\n" in r.stdout
    assert r.stdout.endswith("nameserver 10.0.2.53\noptions use-vc\n")
    assert cli("exec", NAME, "main", "--", "/bin/hostname").stdout == "devloop\n"


def test_on_failure_restarts_the_failed_container_and_not_the_successful_one(cli: Cli, sandbox: dict) -> None:
    deadline = time.monotonic() + 180
    while True:
        row = next(r for r in json.loads(cli("ps", "--format", "json").stdout) if r["name"] == NAME)
        if "flaky" in row["exited"] or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert row["exited"] == {"flaky": 0, "once": 0} and row["restarts"] == {"flaky": 1}
    assert "flaky (1 restarts, exited 0)" in cli("ps").stdout
    containers = {c["name"]: c for c in info(cli)["containers"]}
    assert (containers["flaky"]["status"], containers["flaky"]["restarts"], containers["flaky"]["exit_code"]) == (
        "exited", 1, 0)
    assert (containers["once"]["status"], containers["once"]["restarts"]) == ("exited", 0)
    assert (containers["main"]["status"], containers["main"]["restarts"]) == ("running", 0)
    assert [containers[n]["init"] for n in ("first", "second")] == [True, True]
    assert cli("logs", NAME, "flaky").stdout == "attempt 1\nattempt 2\n"   # both runs, one log


def test_down_stops_the_supervisor_and_leaves_nothing(cli: Cli, sandbox: dict) -> None:
    d = info(cli)
    state = json.loads(Path(d["state_dir"], "state.json").read_text())
    supervisor = state["processes"]["supervisor"]["pid"]
    assert Path(f"/proc/{supervisor}").exists()
    r = cli("down", NAME, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not Path(f"/proc/{supervisor}/cmdline").exists() or \
        b"supervisor_process" not in Path(f"/proc/{supervisor}/cmdline").read_bytes()
    assert not Path(d["state_dir"]).exists()
