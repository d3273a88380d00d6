"""Per-sandbox runtime state: one directory per sandbox holding state.json, written under a lock.

Processes are recorded with their kernel start time, so a recycled PID is never mistaken for ours.
A sandbox whose processes are all gone is 'stale'; list() reports it and cleanup() removes it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sandbox.fsutil import atomic_write, file_lock
from sandbox.paths import check_name, runtime_dir
from sandbox.shared.errors import StateError

STATE_FILE = "state.json"
LOCK_FILE = ".lock"
STATE_VERSION = 1

STATUS_STARTING = "starting"
STATUS_RUNNING = "running"
STATUS_STOPPING = "stopping"


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
class ProcessRef:
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


@dataclass
class SandboxRecord:
    name: str
    status: str = "creating"
    created: float = field(default_factory=time.time)
    processes: dict[str, ProcessRef] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def alive(self) -> bool:
        return any(p.alive() for p in self.processes.values())

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = STATE_VERSION
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SandboxRecord:
        if d.get("version") != STATE_VERSION:
            raise StateError(f"state file of sandbox {d.get('name')!r} has unknown version {d.get('version')!r}")
        procs = {k: ProcessRef(**v) for k, v in d.get("processes", {}).items()}
        return cls(name=d["name"], status=d["status"], created=d["created"], processes=procs,
                   details=d.get("details", {}))


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
        """All sandboxes; those whose processes have all exited are reported with status 'stale'."""
        records = []
        for name in self.names():
            try:
                rec = self.load(name)
            except StateError:
                rec = SandboxRecord(name=name, status="corrupt")
            if rec is None:
                continue
            if rec.status not in ("creating", "corrupt") and rec.processes and not rec.alive():
                rec.status = "stale"
            records.append(rec)
        return records

    def cleanup_stale(self) -> list[str]:
        """Remove the state of sandboxes whose recorded processes are all gone. Returns their names."""
        removed = []
        for rec in self.list():
            if rec.status == "stale":
                with self.lock(rec.name):
                    current = self.load(rec.name)
                    if current is not None and not current.alive():
                        self.remove(rec.name)
                        removed.append(rec.name)
        return removed


def display_status(record: SandboxRecord) -> str:
    """What `ps` shows: a sandbox whose launcher died before it was up is 'failed'."""
    launcher = record.processes.get("launcher")
    vm_alive = any(ref.alive() for key, ref in record.processes.items() if key != "launcher")
    if record.status == STATUS_STARTING and launcher is not None and not launcher.alive():
        return "failed" if vm_alive else "stale"
    if record.status not in ("stale", "corrupt") and not vm_alive and not (launcher and launcher.alive()):
        return "stale"
    return record.status


def list_sandboxes(store: StateStore | None = None) -> list[dict[str, Any]]:
    """What `ps` lists: one summary per sandbox (kept here, beside the records, so `ps` imports nothing else)."""
    store = store or StateStore()
    out = []
    for rec in store.list():
        d = rec.details
        out.append({
            "name": rec.name,
            "status": display_status(rec),
            "tee": d.get("tee"),
            "accel": d.get("accel"),
            "backend": d.get("backend"),
            "containers": [c["name"] for c in d.get("containers", [])],
            "ports": [f"{p['hostAddress']}:{p['hostPort']}->{p['port']}/{p['protocol'].lower()}"
                      for p in d.get("ports", [])],
            "policy_hash": d.get("policy_hash"),
            "created": rec.created,
            "pid": rec.processes["qemu"].pid if "qemu" in rec.processes else None,
        })
    return out
