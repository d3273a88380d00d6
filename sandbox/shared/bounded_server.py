"""A thread-per-connection socket server that handles at most N connections at once.

Used by the key broker (host) and the in-guest attestation API: both face clients that may be
hostile, so a flood of connections gets an immediate "busy" reply from the accepting thread instead
of one thread (and its memory) each.
"""

from __future__ import annotations

import json
import socketserver
import threading
from typing import Any


def busy_reply(message: str = "too many concurrent requests", error: str = "busy") -> bytes:
    body = json.dumps({"error": error, "message": message}).encode() + b"\n"
    return (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


class BoundedThreadingMixIn(socketserver.ThreadingMixIn):
    daemon_threads = True
    max_connections = 64
    busy_reply = busy_reply()

    def _slots(self) -> threading.BoundedSemaphore:
        slots: threading.BoundedSemaphore | None = self.__dict__.get("_bounded_slots")
        if slots is None:
            slots = self.__dict__.setdefault("_bounded_slots", threading.BoundedSemaphore(self.max_connections))
        return slots

    def on_busy(self, client_address: Any) -> None:
        """Called (in the accepting thread) for each connection turned away."""

    def process_request(self, request: Any, client_address: Any) -> None:
        slots = self._slots()
        if not slots.acquire(blocking=False):
            self.on_busy(client_address)
            try:
                request.settimeout(1.0)
                request.sendall(self.busy_reply)
            except OSError:
                pass
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots().release()
