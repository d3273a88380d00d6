"""A stand-in for crun, for the offline agent (tests/offline_agent.py): real processes, no isolation.

It speaks the subset of crun's command line that sandbox/guest/runtime.py uses (create, start, exec
--detach, delete --force, with --root, --log, --bundle, --pid-file, --process) and keeps crun's process
model, which is what the agent's process handling depends on: `create` forks the container's init,
which waits on a FIFO until `start`; `exec --detach` forks the process and exits; both write the pid
to --pid-file and exit, leaving the process re-parented to the agent. The container's process gets
its own mount namespace with the spec's bind mounts, a chroot into root.path, the spec's cwd, ids,
umask and env. What it does not do: pid/ipc/uts/cgroup namespaces, capabilities, seccomp, masked
paths, the non-bind mounts. Those are crun's, and the vm tier tests them with the real one.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


class Fail(Exception):
    pass


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc: ctypes.CDLL, source: str | None, target: str, flags: int) -> None:
    _check(libc.mount(source.encode() if source else None, target.encode(), None, flags, None),
           f"mount {source} on {target}")


def _resolve(rootfs: Path, argv0: str, env: list[str]) -> str:
    """argv[0] as crun finds it: a path inside the rootfs, or searched on the spec's PATH."""
    if "/" in argv0:
        candidates = [argv0]
    else:
        path = next((e[5:] for e in env if e.startswith("PATH=")), "/usr/bin:/bin")
        candidates = [f"{d.rstrip('/')}/{argv0}" for d in path.split(":") if d.startswith("/")]
    for c in candidates:
        host = rootfs / c.lstrip("/")
        if os.path.exists(host) and os.access(host, os.X_OK):
            return c
    raise Fail(f"executable file `{argv0}` not found in $PATH: No such file or directory")


def _become(process: dict[str, Any], root: str, mounts: list[dict[str, Any]] | None) -> NoReturn:
    """In the forked child: the spec's mounts and chroot, ids, cwd and umask; then exec. Never returns."""
    try:
        libc = _libc()
        if mounts is not None:
            _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            _mount(libc, None, "/", MS_REC | MS_PRIVATE)
            for m in mounts:
                if m.get("type") != "bind":
                    continue
                dest = os.path.join(root, m["destination"].lstrip("/"))
                if os.path.isdir(m["source"]):
                    os.makedirs(dest, exist_ok=True)
                else:       # a file (the container's /etc/hostname, hosts, resolv.conf): crun makes one
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    if not os.path.lexists(dest):
                        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
                _mount(libc, m["source"], dest, MS_BIND | MS_REC)
                if "ro" in m.get("options", []):
                    _mount(libc, None, dest, MS_BIND | MS_REMOUNT | MS_RDONLY)
        os.chroot(root)
        os.chdir(process.get("cwd") or "/")
        user = process.get("user", {})
        os.setgroups(list(user.get("additionalGids", [])))
        os.setgid(int(user.get("gid", 0)))
        os.setuid(int(user.get("uid", 0)))
        os.umask(int(user.get("umask", 0o022)))
        env = dict(e.split("=", 1) for e in process.get("env", []) if "=" in e)
        args = process["args"]
        os.execve(_resolve(Path("/"), args[0], process.get("env", [])), args, env)
    except BaseException as e:  # a failed exec ends the child, like a runtime's
        print(f"offline crun: {e}", file=sys.stderr, flush=True)
    os._exit(127)


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): with the pid, names one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _state_dir(root: Path, cid: str) -> Path:
    return root / cid


def _load(root: Path, cid: str) -> dict[str, Any]:
    try:
        return json.loads((_state_dir(root, cid) / "state.json").read_text())
    except OSError:
        raise Fail(f"container `{cid}` does not exist") from None


def _save(root: Path, cid: str, state: dict[str, Any]) -> None:
    tmp = _state_dir(root, cid) / ".state.json"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, _state_dir(root, cid) / "state.json")


def create(root: Path, bundle: Path, pid_file: Path, cid: str) -> None:
    spec = json.loads((bundle / "config.json").read_text())
    rootfs = Path(spec["root"]["path"])
    if not rootfs.is_absolute():
        rootfs = bundle / rootfs
    process = spec["process"]
    _resolve(rootfs, process["args"][0], process.get("env", []))
    state_dir = _state_dir(root, cid)
    try:
        state_dir.mkdir(parents=True)
    except FileExistsError:
        raise Fail(f"container `{cid}` already exists") from None
    fifo = state_dir / "exec.fifo"
    os.mkfifo(fifo, 0o600)
    pid = os.fork()
    if pid == 0:
        fd = os.open(fifo, os.O_RDONLY)       # blocks until `start` opens it for writing
        os.read(fd, 1)
        os.close(fd)
        _become(process, str(rootfs), spec.get("mounts", []))
    pid_file.write_text(str(pid))
    _save(root, cid, {"pid": [pid, _start_time(pid)], "rootfs": str(rootfs), "execs": []})


def start(root: Path, cid: str) -> None:
    _load(root, cid)
    try:
        fd = os.open(_state_dir(root, cid) / "exec.fifo", os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        raise Fail(f"container `{cid}` is not in created state") from None
    os.write(fd, b"0")
    os.close(fd)
    (_state_dir(root, cid) / "exec.fifo").unlink()


def exec_detached(root: Path, process_file: Path, pid_file: Path, cid: str) -> None:
    state = _load(root, cid)
    init, started = state["pid"]
    if _start_time(init) != started:
        raise Fail(f"container `{cid}` is not running")
    process = json.loads(process_file.read_text())
    container_root = f"/proc/{init}/root"
    _resolve(Path(container_root), process["args"][0], process.get("env", []))
    pid = os.fork()
    if pid == 0:
        _become(process, container_root, None)
    pid_file.write_text(str(pid))
    state["execs"].append([pid, _start_time(pid)])
    _save(root, cid, state)


def delete(root: Path, cid: str) -> None:
    state = _load(root, cid)
    for pid, started in [state["pid"], *state["execs"]]:
        # Like crun, which records the init's start time: never a process that only has its pid now.
        if started is not None and _start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for entry in _state_dir(root, cid).iterdir():
        entry.unlink()
    _state_dir(root, cid).rmdir()


def main(argv: list[str]) -> int:
    root = Path("/run/crun")
    log: Path | None = None
    args = list(argv)
    while args and args[0].startswith("--"):
        opt = args.pop(0)
        if opt == "--root":
            root = Path(args.pop(0))
        elif opt.startswith("--log="):
            log = Path(opt.split(":", 1)[1]) if ":" in opt else None
    try:
        cmd = args.pop(0)
        opts: dict[str, str] = {}
        flags: set[str] = set()
        while args and args[0].startswith("--"):
            opt = args.pop(0)
            if opt in ("--detach", "--force"):
                flags.add(opt)
            else:
                opts[opt] = args.pop(0)
        cid = args[0]
        if cmd == "create":
            create(root, Path(opts["--bundle"]), Path(opts["--pid-file"]), cid)
        elif cmd == "start":
            start(root, cid)
        elif cmd == "exec":
            exec_detached(root, Path(opts["--process"]), Path(opts["--pid-file"]), cid)
        elif cmd == "delete":
            delete(root, cid)
        else:
            raise Fail(f"unknown command {cmd}")
    except (Fail, OSError, KeyError, IndexError, ValueError) as e:
        if log is not None:
            with open(log, "a") as f:
                f.write(f"{e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
