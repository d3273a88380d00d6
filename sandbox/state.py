"""Per-sandbox runtime state: one directory per sandbox holding state.json, written under a lock.

Processes are recorded with their kernel start time, so a recycled PID is never mistaken for ours.
A sandbox whose processes are all gone is 'stale' (SandboxRecord.observed decides it, for `ps`,
`inspect` and cleanup_stale alike).
"""

from __future__ import annotations

import builtins
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from sandbox.fsutil import atomic_write, file_lock
from sandbox.paths import check_name, runtime_dir
from sandbox.shared.codec import Convert, FieldError, Message, decode, encode
from sandbox.shared.errors import NotFoundError, StateError

STATE_FILE = "state.json"
LOCK_FILE = ".lock"
STATE_VERSION = 3         # 3: ContainerRun.ready and probe_error (a version 2 file reads as is)
LAUNCHER = "launcher"       # keys of SandboxRecord.processes besides the VM's
SUPERVISOR = "supervisor"
PSP = "psp"                 # the emulated PSP's host service (emulation only; it ends with the VM)


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie is as good as dead
        return None
    return int(fields[19])


@dataclass(frozen=True)
class ProcessRef(Message):
    """A process as the state records it: its PID and kernel start time (a recycled PID is not ours)."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        start = process_start_time(pid)
        if start is None:
            raise StateError(f"process {pid} is not running")
        return cls(pid, start)

    def alive(self) -> bool:
        return process_start_time(self.pid) == self.start_time


class SandboxStatus(StrEnum):
    """A sandbox's status: the launcher writes the first three; `observed()` derives the rest."""

    starting = "starting"   # `up` is launching it (the launcher process is recorded)
    running = "running"     # every container has started
    stopping = "stopping"   # `down` is taking it down
    failed = "failed"       # the launcher died before the sandbox was up, and its VM still runs
    stale = "stale"         # every recorded process is gone: `down` (or cleanup_stale) removes the state
    corrupt = "corrupt"     # the state file cannot be read


WRITTEN_STATUSES = (SandboxStatus.starting, SandboxStatus.running, SandboxStatus.stopping)


def _written_status(raw: Any) -> SandboxStatus:
    try:
        status = SandboxStatus(raw)
    except ValueError:
        raise FieldError(f"{raw!r} is not a sandbox status") from None
    if status not in WRITTEN_STATUSES:
        raise FieldError(f"{raw!r} is derived, never written")
    return status


def _json_object(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise FieldError(f"expected an object, got {type(raw).__name__}")
    return raw


# JSON that another module defines and reads back (the VMM backend's record, the launch identity...).
OpaqueJson = Annotated[dict[str, Any], Convert(_json_object)]


@dataclass(frozen=True)
class PortRecord(Message):
    """A forwarded port: host_address:host_port on the host to port in the guest."""

    port: int
    host_port: int
    protocol: str
    host_address: str

    def display(self) -> str:
        return f"{self.host_address}:{self.host_port}->{self.port}/{self.protocol.lower()}"


@dataclass(frozen=True)
class DeviceRecord(Message):
    """A read-only disk (a layer or a files volume) and where the agent mounted it."""

    serial: str
    path: str
    root_hash: str
    target: str


@dataclass(frozen=True)
class ContainerRecord(Message):
    """What `up` asked the agent to run; `exec` sends the same env and working directory."""

    name: str
    image: str
    argv: tuple[str, ...]
    env: tuple[str, ...]
    working_dir: str
    stdio: bool
    exec_processes: tuple[tuple[str, ...], ...] = ()
    init: bool = False              # an init container: it ran (or runs) to completion before the others


class RunStatus(StrEnum):
    """Where a container is in the group's lifecycle (sandbox/launch/supervisor.py)."""

    waiting = "waiting"          # not started yet (init containers ahead of it have not completed)
    running = "running"
    restarting = "restarting"    # exited; starts again at `restart_at`
    exited = "exited"            # exited, and will not be started again
    failed = "failed"            # could not be (re)started: `error` says why


@dataclass(frozen=True)
class ContainerRun(Message):
    """One container's lifecycle as the supervisor records it, and `ps` and `inspect` show it."""

    name: str
    init: bool = False
    status: RunStatus = RunStatus.waiting
    restarts: int = 0
    exit_code: int | None = None         # of its last exit (128 + N when signal N killed it)
    started_at: float | None = None      # wall-clock time of its current (or last) start
    finished_at: float | None = None     # of its last exit
    restart_at: float | None = None      # when it starts again (restarting)
    backoff: int = 0                     # restarts since its back-off last started over
    error: str | None = None             # why it could not be (re)started (failed)
    # Probes (state version 3): `ready` as its readiness probe last decided (None: it has none, running is
    # ready); `probe_error` the last probe failure that changed something, or why a probe is not run.
    ready: bool | None = None
    probe_error: str | None = None

    @property
    def completed(self) -> bool:
        """An init container that ran to completion."""
        return self.status == RunStatus.exited and self.exit_code == 0

    @property
    def over(self) -> bool:
        return self.status in (RunStatus.exited, RunStatus.failed)


@dataclass(frozen=True)
class UvmRecord(Message):
    kernel: str
    rootfs: str
    cmdline: str


@dataclass(frozen=True)
class KbsRecord(Message):
    """The key broker for the containers' attestation API: its URL, as the guest sees it, and its pins."""

    url: str
    guest_url: str
    pins: tuple[str, ...] = ()


@dataclass(frozen=True)
class SandboxRecord(Message):
    """One sandbox's state.json: written by the launcher, read by every other verb. Frozen: a change is
    a new record (dataclasses.replace) saved whole. On disk every key is snake_case, with "version"."""

    name: str
    status: Annotated[SandboxStatus, Convert(_written_status)] = SandboxStatus.starting
    created: float = field(default_factory=time.time)
    # "launcher" is the `up` process; "qemu" the VM (whatever the backend); "supervisor" the process that
    # restarts a detached group's containers.
    processes: dict[str, ProcessRef] = field(default_factory=dict)
    group: str = ""                 # the group's name
    group_file: str = ""            # the directory the group file is in
    tee: str = ""
    accel: str = ""
    backend: str = ""
    policy_hash: str = ""
    measurement: str | None = None  # the predicted launch measurement (hex)
    detached: bool = False
    ports: tuple[PortRecord, ...] = ()
    devices: tuple[DeviceRecord, ...] = ()
    containers: tuple[ContainerRecord, ...] = ()
    uvm: UvmRecord | None = None
    kbs: KbsRecord | None = None
    launch: OpaqueJson | None = None      # sandbox.launch.measured.LaunchIdentity.to_json()
    vm: OpaqueJson | None = None          # the VMM backend's record; sandbox.vmm.backend.attach reads it
    selfcheck: OpaqueJson | None = None   # sandbox.launch.selfcheck.SelfCheck.summary()
    startup: OpaqueJson | None = None     # timings and per-container results of `up`
    restart_policy: str = "Always"        # the group's restartPolicy
    runs: tuple[ContainerRun, ...] = ()   # each container's lifecycle, as its supervisor last recorded it
    # The launch's requests as the agent checked them: the lines of a `policy check` trace
    # (sandbox/launch/trace_record.py; `inspect --trace`). Empty until the sandbox is running.
    trace: tuple[str, ...] = ()

    def with_process(self, key: str, ref: ProcessRef) -> SandboxRecord:
        return replace(self, processes={**self.processes, key: ref})

    def container(self, name: str) -> ContainerRecord | None:
        return next((c for c in self.containers if c.name == name), None)

    def run(self, name: str) -> ContainerRun | None:
        return next((r for r in self.runs if r.name == name), None)

    def alive(self) -> bool:
        """Some recorded process still runs."""
        return any(p.alive() for p in self.processes.values())

    def observed(self) -> SandboxStatus:
        """The status as it is now: the one place that decides 'failed' and 'stale' from the processes."""
        if self.status == SandboxStatus.corrupt:
            return self.status
        launcher = self.processes.get("launcher")
        launcher_alive = launcher is not None and launcher.alive()
        vm_alive = any(p.alive() for key, p in self.processes.items() if key not in (LAUNCHER, SUPERVISOR))
        if self.status == SandboxStatus.starting and launcher is not None and not launcher_alive:
            return SandboxStatus.failed if vm_alive else SandboxStatus.stale
        if not vm_alive and not launcher_alive:
            return SandboxStatus.stale
        return self.status

    def to_json(self) -> dict[str, Any]:
        return {**encode(self), "version": STATE_VERSION}

    @classmethod
    def from_json(cls, raw: Any) -> SandboxRecord:
        """A state file's JSON, migrated from older versions; raises FieldError (or StateError for a
        version this parma-sandbox does not know)."""
        if not isinstance(raw, dict):
            raise FieldError("a state file holds a JSON object")
        version = raw.get("version")
        if version == 1:
            raw = _migrate_v1(raw)
        elif version not in (2, STATE_VERSION):
            raise StateError(f"state file of sandbox {raw.get('name')!r} has unknown version {version!r}",
                             hint="it was written by another parma-sandbox version: use that version's 'down', "
                                  "or stop its QEMU and remove the directory")
        return decode(cls, {k: v for k, v in raw.items() if k != "version"})

    @classmethod
    def unreadable(cls, name: str) -> SandboxRecord:
        """What `ps` lists for a state directory whose state file cannot be read."""
        return cls(name=name, status=SandboxStatus.corrupt, created=0.0)


def _migrate_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 1 kept the launch's facts under "details" and its ports in camelCase."""
    details = dict(raw.get("details") or {})
    ports = [{"port": p.get("port"), "host_port": p.get("hostPort"), "protocol": p.get("protocol"),
              "host_address": p.get("hostAddress")} for p in details.pop("ports", None) or ()]
    if details.get("containers") is not None:
        details["containers"] = [{k: v for k, v in c.items() if k in _CONTAINER_KEYS} for c in details["containers"]]
    status = raw.get("status")
    return {"name": raw.get("name"), "status": "starting" if status == "creating" else status,
            "created": raw.get("created"), "processes": raw.get("processes") or {}, "ports": ports,
            **{k: v for k, v in details.items() if v is not None}}


_CONTAINER_KEYS = frozenset(f.name for f in fields(ContainerRecord))


class StateStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else runtime_dir()

    def dir(self, name: str) -> Path:
        return self.root / check_name(name)

    @contextmanager
    def lock(self, name: str, *, blocking: bool = True) -> Iterator[Path]:
        d = self.dir(name)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        with file_lock(d / LOCK_FILE, blocking=blocking):
            yield d

    def load(self, name: str) -> SandboxRecord | None:
        path = self.dir(name) / STATE_FILE
        try:
            raw = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return SandboxRecord.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as e:
            raise StateError(f"state file {path} is corrupt: {e}",
                             hint=f"remove {path.parent} if no qemu process of this sandbox is running") from e

    def require(self, name: str) -> SandboxRecord:
        """The record of sandbox `name`; NotFoundError (an input error, exit 2) when there is none."""
        record = self.load(name)
        if record is None:
            raise NotFoundError(f"no sandbox named {name!r}", hint="'parma-sandbox ps' lists them")
        return record

    def save(self, record: SandboxRecord) -> None:
        d = self.dir(record.name)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(d / STATE_FILE, json.dumps(record.to_json(), indent=2, sort_keys=True).encode(), 0o600)

    def remove(self, name: str) -> None:
        shutil.rmtree(self.dir(name), ignore_errors=True)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def list(self) -> list[SandboxRecord]:
        """Every sandbox's record as saved (SandboxRecord.observed says which are stale); an unreadable
        one as SandboxRecord.unreadable."""
        records = []
        for name in self.names():
            try:
                rec = self.load(name)
            except StateError:
                rec = SandboxRecord.unreadable(name)
            if rec is not None:
                records.append(rec)
        return records

    def cleanup_stale(self) -> builtins.list[str]:      # `list` here is the method above
        """Remove the state of sandboxes whose recorded processes are all gone. Returns their names."""
        removed = []
        for rec in self.list():
            if rec.observed() == SandboxStatus.stale:
                with self.lock(rec.name):
                    current = self.load(rec.name)
                    if current is not None and current.observed() == SandboxStatus.stale:
                        self.remove(rec.name)
                        removed.append(rec.name)
        return removed


def list_sandboxes(store: StateStore | None = None) -> list[dict[str, Any]]:
    """What `ps` lists: one summary per sandbox (here, beside the records, so `ps` imports nothing else)."""
    out = []
    for rec in (store or StateStore()).list():
        qemu = rec.processes.get("qemu")
        out.append({
            "name": rec.name, "status": rec.observed().value, "tee": rec.tee, "accel": rec.accel,
            "backend": rec.backend, "containers": [c.name for c in rec.containers if not c.init],
            # Each container's restarts, and its exit code once it will not run again (the supervisor's record).
            "restarts": {r.name: r.restarts for r in rec.runs if r.restarts},
            "exited": {r.name: r.exit_code for r in rec.runs if r.status == RunStatus.exited and not r.init},
            # Containers a readiness probe says are not ready (while they run).
            "not_ready": [r.name for r in rec.runs if r.ready is False and r.status == RunStatus.running],
            "ports": [p.display() for p in rec.ports], "policy_hash": rec.policy_hash, "created": rec.created,
            "pid": qemu.pid if qemu is not None else None,
        })
    return out
