"""The broker's audit log: one JSON object per line, append-only and hash-chained.

Every release, every refusal (with its reason) and every change to the store is appended. Each record
carries `prev`, the SHA-256 of the previous line's bytes (64 zeros for the first), so deleting or
editing a line breaks the chain at that point; `kbs audit --verify` checks it. Appends happen under
an flock, so `kbs serve` and `secret put` in other processes keep one chain. Each line is written
with a single write() on an O_APPEND descriptor and fsynced before the request is answered.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.fsutil import file_lock
from sandbox.shared.errors import StateError

GENESIS = "0" * 64
MAX_FIELD = 2000  # characters per string field: a hostile request cannot bloat the log
TAIL_READ = 64 * 1024


class Event:
    RELEASE = "release"
    REFUSE = "refuse"
    PUT = "secret-put"
    REMOVE = "secret-rm"
    SERVE = "serve"


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[:MAX_FIELD] + f"... ({len(value)} characters)"
    if isinstance(value, list):
        return [_clip(v) for v in value[:64]]
    if isinstance(value, dict):
        return {str(k)[:64]: _clip(v) for k, v in list(value.items())[:64]}
    return value


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


@dataclass(frozen=True)
class ChainCheck:
    records: int
    problems: tuple[str, ...]

    @property
    def intact(self) -> bool:
        return not self.problems


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(f".{self.path.name}.lock")
        self._thread_lock = threading.Lock()

    def _last_hash(self) -> str:
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                if size == 0:
                    return GENESIS
                f.seek(max(0, size - TAIL_READ))
                tail = f.read()
        except FileNotFoundError:
            return GENESIS
        lines = tail.rstrip(b"\n").split(b"\n")
        if len(lines) < 2 and size > TAIL_READ:
            raise StateError(f"{self.path}: the last record is longer than {TAIL_READ} bytes")
        return line_hash(lines[-1])

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        record: dict[str, Any] = {"time": now, "event": event}
        record.update({k: _clip(v) for k, v in fields.items() if v is not None})
        with self._thread_lock, file_lock(self._lock_path):
            record["prev"] = self._last_hash()
            data = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        return record

    def records(self) -> Iterator[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                for n, line in enumerate(f, 1):
                    try:
                        yield json.loads(line)
                    except ValueError:
                        yield {"event": "unreadable", "line": n}
        except FileNotFoundError:
            return

    def verify(self) -> ChainCheck:
        problems = []
        prev = GENESIS
        count = 0
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return ChainCheck(0, ())
        with f:
            for n, line in enumerate(f, 1):
                count = n
                try:
                    record = json.loads(line)
                except ValueError:
                    problems.append(f"line {n}: not JSON")
                    prev = line_hash(line)
                    continue
                if not isinstance(record, dict) or record.get("prev") != prev:
                    problems.append(f"line {n}: 'prev' does not match the SHA-256 of line {n - 1} "
                                    "(a record was removed, inserted or edited)")
                prev = line_hash(line)
        return ChainCheck(count, tuple(problems))
