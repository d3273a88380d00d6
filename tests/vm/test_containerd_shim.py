"""containerd-shim-parma-v2 under Debian's containerd: `ctr run --runtime io.containerd.parma.v2` end to end.

A private containerd (its own root, state and socket under a temp dir; CRI off; no systemd) finds the
shim on PATH (the venv's console script). The example busybox image is imported from an OCI archive
(`ctr images import`); the shim takes the layers from the same image through the project's own image
path (io.parma.image), and the policy from the io.parma.policy annotation. Tests run in order on one
containerd: refusal without a policy, a container's output, exec allowed and denied, a two-container
"pod" (CRI's annotations set by hand), and no leftovers (no QEMU, no sandbox state, no mounts, no socket).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUSYBOX_LAYOUT = REPO / "build" / "images" / "busybox"
IMAGE_NAME = "docker.io/library/busybox:latest"
LOCAL_REF = f"oci:{BUSYBOX_LAYOUT}:latest"
RUNTIME = "io.containerd.parma.v2"
TICKER = "echo started; i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done"

pytestmark = pytest.mark.skipif(shutil.which("containerd") is None or shutil.which("ctr") is None,
                                reason="containerd is not installed (scripts/install-host-packages.sh)")


@dataclass
class Containerd:
    dir: Path
    socket: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]

    def ctr(self, *args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["ctr", "--address", str(self.socket), *args], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=timeout)
        if check:
            assert r.returncode == 0, f"ctr {' '.join(args)}: {r.stderr}"
        return r

    def log(self) -> str:
        return (self.dir / "containerd.log").read_text(errors="replace")


def _policy(tmp: Path, containers: list[dict]) -> str:
    """base64 of the policy `parma-sandbox policy gen` writes for a group of these containers."""
    group = tmp / f"group-{len(list(tmp.glob('group-*')))}.json"
    group.write_text(json.dumps({"name": "shimtest", "containers": containers}))
    out = group.with_suffix(".policy")
    r = subprocess.run([sys.executable, "-m", "sandbox", "policy", "gen", str(group), "-o", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    return base64.b64encode(out.read_bytes()).decode()


def _mounts_under(path: Path) -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(path))]


def _qemu_of(run_dir: Path) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmd and str(run_dir).encode() in cmd:
                pids.append(int(p.name))
    return pids


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    if not (BUSYBOX_LAYOUT / "index.json").exists():
        subprocess.run(["make", "-C", str(REPO), "example-images"], check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
    d = tmp_path_factory.mktemp("ctrd")
    sock = d / "containerd.sock"
    (d / "config.toml").write_text(f"""version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
""")
    (d / "shim.toml").write_text(f"""tee = "emulated"
memory_mib = 256
socket_dir = "{d}/s"
runtime_dir = "{d}/run"
""")
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "containerd-shim-parma-v2").exists(), "run 'make setup' (the shim is a console script)"
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "PARMA_SANDBOX_SHIM_CONFIG": str(d / "shim.toml"),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with open(d / "containerd.log", "wb") as log:
        proc = subprocess.Popen(["containerd", "--config", str(d / "config.toml")], env=env, stdout=log,
                                stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    c = Containerd(d, sock, env, proc)
    try:
        deadline = time.monotonic() + 30
        while c.ctr("version", timeout=10).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, c.log()
            time.sleep(0.2)
        archive = d / "busybox.tar"
        subprocess.run(["tar", "-C", str(BUSYBOX_LAYOUT), "-cf", str(archive), "."], check=True)
        c.ctr("images", "import", "--base-name", "docker.io/library/busybox", str(archive), check=True)
        yield c
    finally:
        for task in c.ctr("tasks", "ls", "-q").stdout.split():
            c.ctr("tasks", "kill", "-s", "SIGKILL", task)
            time.sleep(1)
            c.ctr("tasks", "delete", "--force", task, timeout=120)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run([sys.executable, "-m", "sandbox", "down", "--all"], cwd=REPO, capture_output=True,
                       env={**env, "PARMA_SANDBOX_RUNTIME": str(d / "run")}, timeout=120)
        for mount in reversed(_mounts_under(d)):
            subprocess.run(["umount", "-l", mount], capture_output=True)


def _leftovers(c: Containerd) -> dict[str, list]:
    run_dir = c.dir / "run"
    shims = subprocess.run(["pgrep", "-f", f"sandbox.shim.main.*{c.socket}"], capture_output=True, text=True)
    found = {"qemu": _qemu_of(run_dir),
             "sandbox state": [p.name for p in run_dir.iterdir() if p.is_dir()] if run_dir.exists() else [],
             "shim sockets": list((c.dir / "s").iterdir()) if (c.dir / "s").exists() else [],
             "mounts": _mounts_under(c.dir), "shim processes": shims.stdout.split()}
    return {k: v for k, v in found.items() if v}


def _no_leftovers(c: Containerd) -> None:
    """Nothing of the sandbox is left once the shim has exited (it leaves right after Shutdown)."""
    deadline = time.monotonic() + 15
    while (left := _leftovers(c)) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert left == {}


def _kill_and_delete(c: Containerd, task: str) -> None:
    """SIGKILL a task, wait until it is STOPPED, and delete it."""
    c.ctr("tasks", "kill", "-s", "SIGKILL", task, check=True)
    deadline = time.monotonic() + 60
    while "STOPPED" not in c.ctr("tasks", "ls").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    c.ctr("tasks", "delete", task, check=True, timeout=120)


def test_no_policy_is_refused_before_any_launch(containerd: Containerd) -> None:
    r = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation", f"io.parma.image={LOCAL_REF}",
                       IMAGE_NAME, "nopolicy", "/bin/echo", "hi", timeout=120)
    assert r.returncode != 0
    assert "no io.parma.policy annotation" in r.stderr and "allow_generated_policy" in r.stderr
    containerd.ctr("containers", "rm", "nopolicy")
    _no_leftovers(containerd)


def test_run_streams_the_container_output(containerd: Containerd, tmp_path: Path) -> None:
    policy = _policy(tmp_path, [{"name": "main", "image": LOCAL_REF, "command": ["/bin/sh", "-c", "echo hello from the uvm; echo to stderr >&2"]}])
    t0 = time.monotonic()
    proc = subprocess.Popen(["ctr", "--address", str(containerd.socket), "run", "--rm", "--runtime", RUNTIME,
                             "--annotation", f"io.parma.policy={policy}", "--annotation", f"io.parma.image={LOCAL_REF}",
                             IMAGE_NAME, "hello", "/bin/sh", "-c", "echo hello from the uvm; echo to stderr >&2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    first_output_s = time.monotonic() - t0
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode() + containerd.log()[-3000:]
    assert first == b"hello from the uvm\n"
    assert b"to stderr" in err
    print(f"\nctr run -> first output: {first_output_s:.1f} s; whole run: {time.monotonic() - t0:.1f} s")
    _no_leftovers(containerd)


def test_exec_runs_a_listed_process_and_is_denied_an_unlisted_one(containerd: Containerd, tmp_path: Path) -> None:
    policy = _policy(tmp_path, [{"name": "main", "image": LOCAL_REF, "command": ["/bin/sh", "-c", TICKER],
                                 "execProcesses": [{"command": ["/bin/cat", "/etc/passwd"]}]}])
    containerd.ctr("run", "-d", "--runtime", RUNTIME, "--annotation", f"io.parma.policy={policy}",
                   "--annotation", f"io.parma.image={LOCAL_REF}", IMAGE_NAME, "ticker", "/bin/sh", "-c", TICKER,
                   check=True)
    tasks = containerd.ctr("tasks", "ls", check=True).stdout
    assert "ticker" in tasks and "RUNNING" in tasks
    ok = containerd.ctr("tasks", "exec", "--exec-id", "cat1", "ticker", "/bin/cat", "/etc/passwd", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "root:x:0:0:root" in ok.stdout
    denied = containerd.ctr("tasks", "exec", "--exec-id", "sh1", "ticker", "/bin/sh", "-c", "id", timeout=120)
    assert denied.returncode != 0
    assert "denied by policy" in denied.stderr and "is not an exec_process" in denied.stderr
    # Deny-by-default also covers a command the container itself did not ask for.
    assert containerd.ctr("tasks", "exec", "--exec-id", "cat2", "ticker", "/bin/cat", "/etc/group").returncode != 0
    _kill_and_delete(containerd, "ticker")
    containerd.ctr("containers", "rm", "ticker", check=True)
    _no_leftovers(containerd)


def test_a_pod_is_one_uvm_and_its_containers_join_it(containerd: Containerd, tmp_path: Path) -> None:
    """CRI's flow by hand: the sandbox (pause) container starts the UVM with the pod's policy; containers
    with the same io.kubernetes.cri.sandbox-id are policy-checked creates in it (one shim, one QEMU)."""
    policy = _policy(tmp_path, [
        {"name": "app", "image": LOCAL_REF, "command": ["/bin/sh", "-c", TICKER]},
        {"name": "once", "image": LOCAL_REF, "command": ["/bin/echo", "once-done"]}])
    # CRI sets HOSTNAME in every container; the group's policy does not list it, so the shim leaves it out.
    cri = ["--annotation", "io.kubernetes.cri.sandbox-id=pod1", "--env", "HOSTNAME=pod1"]
    image = ["--annotation", f"io.kubernetes.cri.image-name={LOCAL_REF}"]
    containerd.ctr("run", "-d", "--runtime", RUNTIME, *cri, "--annotation", "io.kubernetes.cri.container-type=sandbox",
                   "--annotation", f"io.parma.policy={policy}", IMAGE_NAME, "pod1", "/pause", check=True)
    containerd.ctr("run", "-d", "--runtime", RUNTIME, *cri, *image, "--annotation",
                   "io.kubernetes.cri.container-type=container", "--annotation", "io.kubernetes.cri.container-name=app",
                   IMAGE_NAME, "app1", "/bin/sh", "-c", TICKER,
                   check=True)
    once = containerd.ctr("run", "--runtime", RUNTIME, *cri, *image, "--annotation",
                          "io.kubernetes.cri.container-type=container", "--annotation",
                          "io.kubernetes.cri.container-name=once", IMAGE_NAME, "once1", "/bin/echo", "once-done")
    assert once.returncode == 0, once.stderr
    assert once.stdout == "once-done\n"
    rogue = containerd.ctr("run", "--runtime", RUNTIME, *cri, *image, "--annotation",
                           "io.kubernetes.cri.container-type=container", IMAGE_NAME, "rogue1", "/bin/sh", "-c", "id")
    assert rogue.returncode != 0 and "denied by policy" in rogue.stderr
    assert len(_qemu_of(containerd.dir / "run")) == 1
    tasks = {line.split()[0]: line.split() for line in containerd.ctr("tasks", "ls").stdout.splitlines()[1:]}
    assert tasks["pod1"][1] == tasks["app1"][1]       # one QEMU holds the pod
    _kill_and_delete(containerd, "app1")
    containerd.ctr("tasks", "kill", "pod1", check=True)
    containerd.ctr("tasks", "delete", "pod1", check=True, timeout=120)
    for c in ("app1", "once1", "rogue1", "pod1"):
        containerd.ctr("containers", "rm", c)
    _no_leftovers(containerd)


HELLO = REPO / "examples" / "hello"
HTTPD = ["/bin/httpd", "-f", "-v", "-p", "8080", "-h", "/www"]     # hello's web container, as its policy pins it


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of the test's own (as CNI makes one per pod), loopback up; removed after."""
    name = f"parma-shimtest-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def _fetch_in(netns: str, url: str, deadline_s: float = 90) -> str:
    """GET url from inside the network namespace (a client on the pod's network), retried while the
    container starts."""
    code = ("import sys, urllib.request\n"
            "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(), end='')")
    deadline = time.monotonic() + deadline_s
    while True:
        r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code, url], capture_output=True,
                           text=True, timeout=30)
        if r.returncode == 0 or time.monotonic() > deadline:
            return r.stdout if r.returncode == 0 else f"FAILED: {r.stderr}"
        time.sleep(1)


def _listening_everywhere(pid: int, port: int) -> bool:
    """A TCP socket of the process's network namespace listens on 0.0.0.0:port (the pod IP and loopback)."""
    rows = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    return any(r.split()[1] == f"00000000:{port:04X}" and r.split()[3] == "0A" for r in rows)


def test_hello_web_serves_its_files_volume_on_the_pod_network(containerd: Containerd, tmp_path: Path,
                                                             netns: str) -> None:
    """examples/hello's web container under ctr as kubelet would hand it: its www volume as a bind mount of a
    host directory, the pod's network namespace, the container port. The policy is hello's own: the www
    device must hash to its pin, and a client in the namespace gets the page from the UVM."""
    out = tmp_path / "hello.policy"
    r = subprocess.run([sys.executable, "-m", "sandbox", "policy", "gen", str(HELLO / "group.json"), "-o", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    policy = base64.b64encode(out.read_bytes()).decode()
    common = ["--runtime", RUNTIME, "--annotation", f"io.parma.policy={policy}", "--annotation",
              f"io.parma.image={LOCAL_REF}", "--env", "GREETING=hello"]
    # A bind the policy does not describe is refused in Create, before any UVM starts.
    stray = containerd.ctr("run", "--rm", *common, "--mount", f"type=bind,src={tmp_path},dst=/data,options=rbind:ro",
                           IMAGE_NAME, "hello-stray", *HTTPD, timeout=120)
    assert stray.returncode != 0 and "where the policy binds no volume" in stray.stderr, stray.stderr
    containerd.ctr("containers", "rm", "hello-stray")
    assert _qemu_of(containerd.dir / "run") == []

    t0 = time.monotonic()
    containerd.ctr("run", "-d", *common, "--annotation", "io.parma.ports=8080/tcp",
                   "--with-ns", f"network:/var/run/netns/{netns}",
                   "--mount", f"type=bind,src={HELLO / 'www'},dst=/www,options=rbind:ro",
                   IMAGE_NAME, "hello-web", *HTTPD, check=True)
    page = _fetch_in(netns, "http://127.0.0.1:8080/")
    print(f"\nctr run -d -> page fetched in the netns after {time.monotonic() - t0:.1f} s")
    assert page == (HELLO / "www" / "index.html").read_text(), page + containerd.log()[-3000:]
    (qemu,) = _qemu_of(containerd.dir / "run")
    assert _listening_everywhere(qemu, 8080)
    assert "00000000:1F90" not in Path("/proc/self/net/tcp").read_text()     # nothing on the node's own network
    cat = containerd.ctr("tasks", "exec", "--exec-id", "cat1", "hello-web", "/bin/cat", "/www/index.html", timeout=120)
    assert cat.returncode == 0 and cat.stdout == page, cat.stderr
    _kill_and_delete(containerd, "hello-web")
    containerd.ctr("containers", "rm", "hello-web", check=True)
    _no_leftovers(containerd)

    # The same bind with one changed byte: the guest hashes the device and the policy denies it.
    tampered = tmp_path / "www"
    shutil.copytree(HELLO / "www", tampered)
    (tampered / "index.html").write_text((HELLO / "www" / "index.html").read_text().replace("Hello", "Pwned"))
    bad = containerd.ctr("run", "--rm", *common, "--mount", f"type=bind,src={tampered},dst=/www,options=rbind:ro",
                         IMAGE_NAME, "hello-tampered", *HTTPD, timeout=300)
    assert bad.returncode != 0
    assert "denied by policy" in bad.stderr and "not the hash pinned for volume 'www'" in bad.stderr, bad.stderr
    containerd.ctr("containers", "rm", "hello-tampered")
    _no_leftovers(containerd)
