"""The broker's audit log: one JSON object per line, append-only, hash-chained and anchored by a head.

Every release, every refusal (with its reason) and every change to the store is appended. Each record
carries `prev`, the SHA-256 of the previous line's bytes (64 zeros for the first), so deleting or
editing a line breaks the chain at that point. A chain alone cannot show that its last records were
cut off, so a separate file, the head (`audit.head` next to `audit.log`), records how many records the
log holds, its size and the SHA-256 of its last line; it is replaced atomically after every append.
`kbs audit --verify` checks the chain and that the log ends exactly where the head says.

Appends happen under an flock, so `kbs serve` and `secret put` in other processes keep one chain and
one head. Each line is written with a single write() on an O_APPEND descriptor and fsynced before the
request is answered; then the head is written (temporary file, fsync, rename). When an append finds
that the log no longer matches its head (cut off or rewritten), it still appends but leaves the head
alone, so the evidence stays for `--verify`.
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
from typing import Any, BinaryIO

from sandbox.fsutil import atomic_write, file_lock
from sandbox.log import log
from sandbox.shared.errors import StateError

GENESIS = "0" * 64
HEAD_FORMAT = "parma-sandbox/kbs-audit-head/v1"
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
class Head:
    """Where the log ended after the last append: `records` lines, `size` bytes, the last line's hash."""

    records: int
    size: int
    last: str

    def to_bytes(self) -> bytes:
        doc = {"format": HEAD_FORMAT, "records": self.records, "size": self.size, "last": self.last}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Head:
        """The head, or ValueError when the file is not one."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != HEAD_FORMAT:
            raise ValueError("not an audit head")
        records, size, last = doc.get("records"), doc.get("size"), doc.get("last")
        if not (isinstance(records, int) and isinstance(size, int) and isinstance(last, str)
                and records >= 0 and size >= 0 and len(last) == 64):
            raise ValueError("malformed audit head")
        return cls(records, size, last)


@dataclass(frozen=True)
class ChainCheck:
    records: int
    problems: tuple[str, ...]
    head: Head | None = None

    @property
    def intact(self) -> bool:
        return not self.problems


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_suffix(".head")
        self._lock_path = self.path.with_name(f".{self.path.name}.lock")
        self._thread_lock = threading.Lock()

    def read_head(self) -> Head | None:
        """The stored head; None when there is none. Raises StateError when it is unreadable."""
        try:
            data = self.head_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return Head.from_bytes(data)
        except ValueError as e:
            raise StateError(f"{self.head_path}: {e}") from None

    def _line_ending_at(self, f: BinaryIO, end: int) -> bytes | None:
        """The line that ends exactly at byte `end` (its newline included), or None."""
        if end == 0:
            return None
        f.seek(max(0, end - TAIL_READ))
        tail = f.read(end - max(0, end - TAIL_READ))
        if not tail.endswith(b"\n"):
            return None
        lines = tail[:-1].split(b"\n")
        if len(lines) < 2 and end > TAIL_READ:
            raise StateError(f"{self.path}: the last record is longer than {TAIL_READ} bytes")
        return lines[-1] + b"\n"

    def _next_head(self, f: BinaryIO, size: int) -> tuple[str, int] | None:
        """(hash of the log's last line, records before the new one), or None when the log does not match
        its head (then the head is left as it is, for --verify to report)."""
        try:
            head = self.read_head()
        except StateError:
            return None  # a damaged head: keep it as evidence
        if head is None:
            if size == 0:
                return GENESIS, 0
            # A log from before heads existed (or a head lost): anchor what is there, once.
            f.seek(0)
            data = f.read()
            log.warning("kbs: %s had no head; anchoring its %d records", self.path, data.count(b"\n"))
            last = self._line_ending_at(f, size)
            return (line_hash(last) if last else GENESIS), data.count(b"\n")
        if size < head.size:
            return None
        last = self._line_ending_at(f, head.size)
        if (line_hash(last) if last else GENESIS) != head.last:
            return None
        if size == head.size:
            return head.last, head.records
        # Records after the head: an append whose head update a crash interrupted.
        f.seek(head.size)
        extra = f.read(size - head.size)
        last = self._line_ending_at(f, size)
        return (line_hash(last) if last else GENESIS), head.records + extra.count(b"\n")

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        record: dict[str, Any] = {"time": now, "event": event}
        record.update({k: _clip(v) for k, v in fields.items() if v is not None})
        with self._thread_lock, file_lock(self._lock_path):
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "r+b", buffering=0) as f:
                size = f.seek(0, os.SEEK_END)
                torn = False
                if size:
                    f.seek(size - 1)
                    torn = f.read(1) != b"\n"
                anchor = None if torn else self._next_head(f, size)
                if anchor is None:
                    log.error("kbs: %s is damaged or does not end where its head says (cut off or rewritten); "
                              "appending without moving the head: run 'kbs audit --verify'", self.path)
                    last = self._line_ending_at(f, size)
                    prev = line_hash(last) if last else GENESIS
                else:
                    prev = anchor[0]
                record["prev"] = prev
                data = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
                os.write(fd, b"\n" + data if torn else data)  # never continue a cut-off line
                os.fsync(fd)
            if anchor is not None:
                atomic_write(self.head_path, Head(anchor[1] + 1, size + len(data), line_hash(data)).to_bytes(),
                             mode=0o600)
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
        """Check the chain line by line, then that the log ends exactly where its head says."""
        problems = []
        prev = GENESIS
        count = 0
        size = 0
        anchored: tuple[str, int] | None = None  # the hash of the head's last record and the offset after it
        try:
            head = self.read_head()
        except StateError as e:
            head = None
            problems.append(f"the head is unreadable ({e}): a cut-off tail cannot be detected")
        try:
            f = open(self.path, "rb")  # closed below
        except FileNotFoundError:
            if head is not None and head.records:
                problems.append(f"the log is missing but its head says it held {head.records} records")
            return ChainCheck(0, tuple(problems), head)
        with f:
            for n, line in enumerate(f, 1):
                count = n
                size += len(line)
                this = line_hash(line)
                if head is not None and n == head.records:
                    anchored = (this, size)
                if not line.endswith(b"\n"):
                    problems.append(f"line {n}: incomplete (no newline): the log was cut off inside a record")
                try:
                    record = json.loads(line)
                except ValueError:
                    problems.append(f"line {n}: not JSON")
                    record = None
                if record is not None and (not isinstance(record, dict) or record.get("prev") != prev):
                    problems.append(f"line {n}: 'prev' does not match the SHA-256 of line {n - 1} "
                                    "(a record was removed, inserted, moved or edited)")
                prev = this
        problems += self._head_problems(head, count, anchored)
        return ChainCheck(count, tuple(problems), head)

    def _head_problems(self, head: Head | None, count: int, anchored: tuple[str, int] | None) -> list[str]:
        if head is None:
            if count and self.head_path.exists():
                return []  # unreadable: reported already
            return [f"no head ({self.head_path.name}) anchors the log's {count} records: a cut-off tail "
                    "cannot be detected"] if count else []
        if count < head.records:
            return [f"the log holds {count} records but its head says {head.records}: "
                    f"{head.records - count} record(s) were removed from the end"]
        if head.records == 0:
            return [] if count == 0 else [f"{count} record(s) after the head, which says the log is empty"]
        if anchored != (head.last, head.size):
            return [f"record {head.records}, the last one the head anchors, is not the one it was when "
                    "written (records were removed, edited or replaced)"]
        if count > head.records:
            return [f"{count - head.records} record(s) after the head (record {head.records}): appended by "
                    "something other than the broker, or an append interrupted before the head was updated"]
        return []
