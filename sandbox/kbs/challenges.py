"""Challenges: random nonces with a short life, each good for exactly one release attempt.

A nonce is consumed by the first release request that names it, whatever the outcome, so evidence
can never be presented twice. Consumed and expired nonces are remembered for one more lifetime so
that a replay is reported as a replay rather than as an unknown nonce. The table is bounded: when it
is full of live challenges, new ones are refused (the host can always deny service; it must not be
able to exhaust the broker's memory).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from sandbox.shared.kbs_protocol import NONCE_SIZE


class NonceStatus(StrEnum):
    OK = "ok"
    UNKNOWN = "unknown"    # never issued by this broker (or forgotten long ago)
    EXPIRED = "expired"    # issued, but its lifetime ended before it was used
    USED = "used"          # already presented once: replayed evidence


@dataclass
class _Entry:
    expires: float
    used: bool = False


class ChallengesFull(Exception):
    pass


class ChallengeStore:
    def __init__(self, ttl: float = 60.0, *, capacity: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._clock = clock
        self._entries: dict[bytes, _Entry] = {}
        self._lock = threading.Lock()

    def _purge(self, now: float) -> None:
        # Keep expired/used entries for one more ttl so that replays are named as such.
        stale = [n for n, e in self._entries.items() if now > e.expires + self.ttl]
        for n in stale:
            del self._entries[n]

    def issue(self) -> bytes:
        nonce = secrets.token_bytes(NONCE_SIZE)
        with self._lock:
            now = self._clock()
            if len(self._entries) >= self.capacity:
                self._purge(now)
                if len(self._entries) >= self.capacity:
                    raise ChallengesFull(f"{len(self._entries)} challenges are outstanding")
            self._entries[nonce] = _Entry(now + self.ttl)
        return nonce

    def consume(self, nonce: bytes) -> tuple[NonceStatus, float]:
        """Use up `nonce`; returns its status and how many seconds ago it expired (0 if it had not)."""
        with self._lock:
            now = self._clock()
            entry = self._entries.get(nonce)
            if entry is None:
                return NonceStatus.UNKNOWN, 0.0
            if entry.used:
                return NonceStatus.USED, 0.0
            entry.used = True
            if now > entry.expires:
                return NonceStatus.EXPIRED, now - entry.expires
            return NonceStatus.OK, 0.0

    def __len__(self) -> int:
        return len(self._entries)
