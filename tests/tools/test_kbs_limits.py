"""Every limit docs/kbs.md lists for the broker, driven over real HTTP on 127.0.0.1: body size, required
Content-Length (no chunked bodies) on every POST, the per-read and whole-body time limits (shortened here),
connection slots and the challenge table. Each refusal has the documented status and an honest message,
and is on the audit record."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kbsenv import http_call, running_broker

from sandbox.kbs.audit import AuditLog
from sandbox.kbs.challenges import ChallengeStore
from sandbox.kbs.server import BODY_DEADLINE, READ_TIMEOUT, BrokerHttpServer
from sandbox.kbs.store import KbsStore
from sandbox.shared.kbs_protocol import CHALLENGE_PATH, MAX_REQUEST_BYTES, RELEASE_PATH


@pytest.fixture
def store(tmp_path: Path) -> KbsStore:
    return KbsStore.open(tmp_path / "kbs")


def _raw(server: BrokerHttpServer, request: bytes, *, timeout: float = 30) -> tuple[int, dict]:
    """Send raw bytes, return (status, JSON body) of the reply."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=timeout) as s:
        s.sendall(request)
        return _reply(s)


def _reply(s: socket.socket) -> tuple[int, dict]:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def _last_refusal(store: KbsStore) -> dict:
    return [r for r in AuditLog(store.audit_path).records() if r["event"] == "refuse"][-1]


def test_documented_defaults() -> None:
    assert (MAX_REQUEST_BYTES, READ_TIMEOUT, BODY_DEADLINE) == (64 * 1024, 10.0, 15.0)


@pytest.mark.parametrize("path", [CHALLENGE_PATH, RELEASE_PATH])
def test_every_post_needs_a_content_length(store: KbsStore, path: str) -> None:
    with running_broker(store) as server:
        status, doc = _raw(server, f"POST {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status == 411 and "Content-Length is required" in doc["message"]
        chunked = (f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
                   .encode())
        status, doc = _raw(server, chunked)
        assert status == 411 and "Transfer-Encoding is not accepted" in doc["message"]
        assert _last_refusal(store)["status"] == 411
    assert AuditLog(store.audit_path).verify().intact


def test_a_challenge_request_is_the_empty_object(store: KbsStore) -> None:
    with running_broker(store) as server:
        assert http_call(server.url, "POST", CHALLENGE_PATH, {})[0] == 200
        status, doc = http_call(server.url, "POST", CHALLENGE_PATH, {"nonce": "00"})
        assert status == 400 and "empty JSON object" in doc["message"]
        status, doc = http_call(server.url, "POST", CHALLENGE_PATH, raw_body=b"")
        assert status == 400


def test_bodies_are_bounded_at_64_kib(store: KbsStore) -> None:
    with running_broker(store) as server:
        body = b'{"secret": "x"}'
        status, doc = http_call(server.url, "POST", RELEASE_PATH, raw_body=body.ljust(MAX_REQUEST_BYTES))
        assert status == 400 and "exactly the keys" in doc["message"]  # read and parsed: the limit is allowed
        status, doc = http_call(server.url, "POST", RELEASE_PATH, raw_body=b" " * (MAX_REQUEST_BYTES + 1))
        assert status == 413 and doc["error"] == "too_large" and f"{MAX_REQUEST_BYTES}-byte limit" in doc["message"]


@contextlib.contextmanager
def _quick_broker(store: KbsStore, *, read_timeout: float, body_deadline: float) -> Iterator[BrokerHttpServer]:
    with running_broker(store) as server:
        server.read_timeout, server.body_deadline = read_timeout, body_deadline
        yield server


def test_a_stalled_body_gets_408_naming_the_read_timeout(store: KbsStore) -> None:
    with _quick_broker(store, read_timeout=0.5, body_deadline=5) as server, \
            socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(f"POST {RELEASE_PATH} HTTP/1.1\r\nContent-Length: 100\r\n\r\n{{\"secret\"".encode())
        status, doc = _reply(s)
        elapsed = time.monotonic() - t0
    assert status == 408 and doc["message"] == "no request body data for 0.5 s (9 of 100 bytes came)"
    assert 0.4 < elapsed < 3
    assert _last_refusal(store)["status"] == 408


def test_a_trickled_body_gets_408_naming_the_whole_body_limit(store: KbsStore) -> None:
    with _quick_broker(store, read_timeout=1.0, body_deadline=1.5) as server, \
            socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(f"POST {RELEASE_PATH} HTTP/1.1\r\nContent-Length: 100\r\n\r\n".encode())
        with contextlib.suppress(OSError):  # the broker may hang up while we still trickle
            for _ in range(30):
                s.sendall(b" ")
                time.sleep(0.2)
                if time.monotonic() - t0 > 2.5:
                    break
        status, doc = _reply(s)
        elapsed = time.monotonic() - t0
    assert status == 408 and doc["message"].startswith("the request body did not arrive within 1.5 s")
    assert 1.3 < elapsed < 4


def test_a_body_cut_short_is_refused_on_the_record(store: KbsStore) -> None:
    with running_broker(store) as server:
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
            s.sendall(f"POST {RELEASE_PATH} HTTP/1.1\r\nContent-Length: 40\r\n\r\n{{\"secret\"".encode())
            s.shutdown(socket.SHUT_WR)
            status, doc = _reply(s)
        assert status == 408 and doc["message"] == "the connection closed after 9 of 40 body bytes"


def test_connections_beyond_max_connections_get_503(store: KbsStore) -> None:
    with running_broker(store, max_connections=1) as server:
        port = server.server_address[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as holder:
            holder.sendall(b"POST /kbs/v1/challenge HTTP/1.1\r\n")  # holds the only slot
            time.sleep(0.2)
            status, doc = _raw(server, b"GET /kbs/v1/identity HTTP/1.1\r\n\r\n")
            assert status == 503 and doc["error"] == "busy"
        assert server.busy_refusals == 1
        deadline = time.monotonic() + 15  # the slot comes back once the holder is gone
        while (status := http_call(server.url, "GET", "/kbs/v1/identity")[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status == 200


def test_outstanding_challenges_are_bounded(store: KbsStore) -> None:
    with running_broker(store, challenges=ChallengeStore(ttl=60, capacity=3)) as server:
        for _ in range(3):
            assert http_call(server.url, "POST", CHALLENGE_PATH, {})[0] == 200
        status, doc = http_call(server.url, "POST", CHALLENGE_PATH, {})
        assert status == 503 and doc["error"] == "busy" and "outstanding challenges" in doc["message"]
    assert ChallengeStore(ttl=60).capacity == 4096
