"""The guest agent outside the UVM: for the malicious-host tests and the frame fuzzer (bench/fuzz_frames.py).

`OfflineAgent.start()` runs the agent in a child process that is PID 1 of its own pid namespace, with
its own mount namespace and a tmpfs on /run (where every guest path lives), so nothing it does is
visible on the machine; the host end talks to it over a socket pair, in frames, exactly as the
launcher talks to a UVM's virtio-serial port.

Real: the frame loop (sandbox.guest.server.serve_fd), the frame parser, the typed requests, the
AgentService and its gate and policy engine, process handles and the reaper (the agent is PID 1 of its
pid namespace, as it can be in the UVM), output capture, and every mount the agent makes itself
(tmpfs scratch and volumes, overlay rootfs, read-only remounts), in the private mount namespace.
Stand-ins: HOST_DATA is the policy's hash (no attestation report); poweroff only logs; a layer "device" is a directory
bind-mounted read-only at the target, with the root hash the test declares (dm-verity and the
device's own root hash are the vm tier's); crun is tests/offline_crun.py (real processes, crun's
process model, no isolation beyond a mount namespace and a chroot). Needs root (namespaces, mounts).

The control channel (a second socket pair) lets a test act inside the namespaces where the host could
not: start a process at a chosen pid (ns_last_pid) to reproduce pid reuse, and check whether it lives.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VICTIM = "offline-victim"       # argv[0] of processes the control channel starts


def available() -> str | None:
    """Why the offline agent cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (pid and mount namespaces)"
    if shutil.which("unshare") is None:
        return "needs util-linux unshare"
    if not Path("/bin/busybox").exists():
        return "needs /bin/busybox for the layer's programs"
    return None


def busybox_layer(path: Path, applets: tuple[str, ...] = ("sh", "sleep", "cat", "echo", "true", "ls", "id",
                                                           "kill", "env")) -> Path:
    """A layer directory with a static busybox and root/nobody in /etc."""
    (path / "bin").mkdir(parents=True, exist_ok=True)
    (path / "etc").mkdir(exist_ok=True)
    (path / "tmp").mkdir(exist_ok=True)
    shutil.copy2("/bin/busybox", path / "bin" / "busybox")
    for a in applets:
        link = path / "bin" / a
        if not link.exists():
            link.symlink_to("busybox")
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
                                         "app:x:1000:1000:app:/:/bin/sh\n")
    (path / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\napp:x:1000:\nwheel:x:10:app\n")
    return path


@dataclass
class OfflineAgent:
    """The host end of an offline agent."""

    proc: subprocess.Popen
    sock: socket.socket
    control: socket.socket
    policy: bytes
    buf: bytes = b""
    cbuf: bytes = b""
    next_id: int = 0
    log_path: Path | None = None
    mounted: set[str] = field(default_factory=set)      # layer targets a test helper mounted already

    @classmethod
    @contextmanager
    def start(cls, workdir: Path, policy: bytes, devices: dict[str, tuple[str, Path]] | None = None,
              *, timeout: float = 20) -> Iterator[OfflineAgent]:
        """devices: serial -> (root hash, layer directory on this machine)."""
        world = workdir / "offline-world.json"
        world.write_text(json.dumps({
            "policy": base64.b64encode(policy).decode(),
            "devices": {s: {"root_hash": h, "dir": str(d)} for s, (h, d) in (devices or {}).items()},
        }))
        host, guest = socket.socketpair()
        chost, cguest = socket.socketpair()
        log_path = workdir / "offline-agent.log"
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount-proc", "--propagation", "private", "--kill-child",
                 sys.executable, "-m", "tests.offline_agent", "--world", str(world), "--fd", str(guest.fileno()),
                 "--control-fd", str(cguest.fileno())],
                pass_fds=(guest.fileno(), cguest.fileno()), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=env, cwd=REPO)
        guest.close()
        cguest.close()
        host.settimeout(timeout)
        chost.settimeout(timeout)
        agent = cls(proc, host, chost, policy, log_path=log_path)
        try:
            agent.ctl("ready")
            yield agent
        finally:
            agent.close()

    def close(self) -> None:
        for s in (self.sock, self.control):
            try:
                s.close()
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    # -- the protocol -------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise AssertionError("the agent closed the port:\n" + self.log()[-4000:])
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, op: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request; the whole reply (ok, result or error)."""
        self.next_id += 1
        frame = {"v": 1, "id": self.next_id, "op": op}
        if payload is not None:
            frame["payload"] = payload
        self.send(json.dumps(frame).encode() + b"\n")
        r = self.reply()
        assert r["id"] == self.next_id, r
        return r

    def ok(self, op: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        r = self.call(op, payload)
        assert r["ok"], f"{op} failed: {r.get('error')}"
        return r["result"]

    def err(self, op: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        r = self.call(op, payload)
        assert not r["ok"], f"{op} unexpectedly succeeded: {r.get('result')}"
        return r["error"]

    def set_policy(self) -> dict[str, Any]:
        return self.ok("set_policy", {"policy": base64.b64encode(self.policy).decode()})

    # -- the control channel -------------------------------------------------------------------------

    def ctl(self, cmd: str, **args: Any) -> Any:
        self.control.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        while b"\n" not in self.cbuf:
            chunk = self.control.recv(65536)
            if not chunk:
                raise AssertionError("the offline agent's control channel closed:\n" + self.log()[-4000:])
            self.cbuf += chunk
        line, self.cbuf = self.cbuf.split(b"\n", 1)
        answer = json.loads(line)
        if "error" in answer:
            raise AssertionError(f"control {cmd}: {answer['error']}")
        return answer["result"]


# ---------------------------------------------------------------------------------------------------------
# Inside the namespaces


def _install_stand_ins(devices: dict[str, dict[str, str]]) -> None:
    from sandbox.guest import blockdev, devmapper, sysapi
    from sandbox.shared.verity import VerityLayout

    def find_by_serial(serial: str) -> Path:
        if serial not in devices:
            raise blockdev.BlockError(f"no disk with serial {serial!r}")
        return Path("/offline/dev") / serial

    def read_layout(node: Path) -> VerityLayout:
        d = devices[node.name]
        return VerityLayout(root_hash=d["root_hash"], salt=b"", data_blocks=1, hash_start_block=1, hash_blocks=1,
                            uuid=b"\0" * 16)

    counter = iter(range(1, 1 << 30))

    def mount_verity(device: Path, dm_name: str, layout: VerityLayout, target: Path) -> blockdev.VerityMount:
        source = devices[device.name]["dir"]
        try:
            target.mkdir(parents=True, exist_ok=True)
            sysapi.mount(source, target, None, sysapi.MS_BIND)
            sysapi.mount("none", target, None, sysapi.MS_REMOUNT | sysapi.MS_BIND | sysapi.MS_RDONLY
                         | sysapi.MS_NODEV | sysapi.MS_NOSUID)
        except OSError as e:
            raise blockdev.BlockError(f"cannot mount {device} at {target}: {e}") from None
        return blockdev.VerityMount(device, devmapper.DmDevice(dm_name, 253, next(counter)), layout.root_hash,
                                    layout.data_blocks, target)

    def unmount_verity(mount: blockdev.VerityMount) -> str | None:
        sysapi.umount(mount.target)
        return None

    blockdev.find_by_serial = find_by_serial
    blockdev.read_layout = read_layout
    blockdev.mount_verity = mount_verity
    blockdev.unmount_verity = unmount_verity


def _crun_wrapper(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "crun"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m tests.offline_crun \"$@\"\n")
    wrapper.chmod(0o755)


def _spawn_at(pid: int) -> int:
    """Start a sleeping process whose pid is `pid` if it is free (ns_last_pid; this pid namespace only)."""
    from sandbox.guest import procs

    with procs.REAPER._cond:        # nothing else of ours starts a process meanwhile
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        return os.posix_spawn("/bin/sleep", [VICTIM, "3600"], {})


def _alive(pid: int) -> bool:
    """Whether `pid` is a running victim (a process just spawned may still be in execve: look again)."""
    deadline = time.monotonic() + 1.0
    while True:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if cmdline[0] == VICTIM.encode() and state != "Z":
            return True
        if state == "Z" or time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _serve_control(fd: int, service: Any) -> None:
    from sandbox.guest import procs

    sock = socket.socket(fileno=fd)
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            try:
                cmd = req["cmd"]
                if cmd == "ready":
                    result: Any = os.getpid()
                elif cmd == "spawn_at":
                    result = _spawn_at(int(req["pid"]))
                elif cmd == "exists":
                    result = Path(f"/proc/{int(req['pid'])}").exists()
                elif cmd == "alive":
                    result = _alive(int(req["pid"]))

                elif cmd == "kill":
                    os.kill(int(req["pid"]), int(req["signal"]))
                    result = True
                elif cmd == "tracked":
                    result = procs.REAPER.tracked()
                elif cmd == "ls":
                    p = Path(req["path"])
                    result = sorted(x.name for x in p.iterdir()) if p.is_dir() else None
                elif cmd == "read":
                    result = base64.b64encode(Path(req["path"]).read_bytes()).decode()
                elif cmd == "mounts":
                    result = Path("/proc/self/mountinfo").read_text()
                else:
                    raise ValueError(f"unknown command {cmd}")
                answer = {"result": result}
            except Exception as e:  # reported to the test
                answer = {"error": f"{type(e).__name__}: {e}"}
            sock.sendall(json.dumps(answer).encode() + b"\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args()
    world = json.loads(Path(args.world).read_text())
    policy = base64.b64decode(world["policy"])

    from sandbox.guest import procs, sysapi
    from sandbox.guest.hostdata import HostData
    from sandbox.guest.server import serve_fd
    from sandbox.guest.service import AgentService

    assert os.getpid() == 1, "run me through `unshare --pid --fork`"
    sysapi.mount("tmpfs", "/run", "tmpfs", sysapi.MS_NODEV | sysapi.MS_NOSUID, "mode=0755")
    _install_stand_ins(world["devices"])
    _crun_wrapper(Path("/run/offline-bin"))
    os.environ["PATH"] = "/run/offline-bin:" + os.environ.get("PATH", "/usr/bin:/bin")
    procs.REAPER.start()
    digest = hashlib.sha256(policy).digest()
    service = AgentService(host_data=lambda: HostData(digest, "offline"), hostname="parma")
    service.attest_api_started.set()
    service.poweroff_hook = lambda: print("offline agent: poweroff asked (ignored)", file=sys.stderr, flush=True)
    threading.Thread(target=_serve_control, args=(args.control_fd, service), daemon=True).start()
    serve_fd(args.fd, service.handle, reconnecting=False)
    time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
