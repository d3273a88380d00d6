"""The host relays the key broker's traffic: hostile HTTP against a real broker on 127.0.0.1.

The broker's release checks are tests/tools/test_kbs_broker.py's; these are what comes before them, the
request line, headers and lengths, which the host can shape however it likes.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kbsenv import running_broker

from sandbox.kbs.audit import AuditLog
from sandbox.kbs.server import BrokerHttpServer
from sandbox.kbs.store import KbsStore

pytestmark = pytest.mark.unit

DEADLINE = 1.5
JSON = b"Content-Type: application/json\r\n"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerHttpServer]:
    with running_broker(KbsStore.open(tmp_path / "kbs"), max_connections=3, emulated_ca=lambda: None,
                        read_timeout=1.0, body_deadline=DEADLINE) as server:
        yield server


def exchange(server: BrokerHttpServer, data: bytes) -> bytes:
    """Send one raw request; the status line that comes back."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        s.sendall(data)
        return s.recv(65536).split(b"\r\n")[0]


def test_headers_trickled_a_byte_at_a_time_hold_no_slot_past_the_deadline(broker: BrokerHttpServer) -> None:
    """Each byte inside the read timeout, the whole head never: every slot taken that way is freed once the
    deadline passes, and an honest request is served again."""
    port = broker.server_address[1]
    held: list[float] = []

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            t0 = time.monotonic()
            try:
                for byte in b"GET /kbs/v1/identity HTTP/1.1\r\nX-Slow: " + b"a" * 40:
                    s.sendall(bytes([byte]))
                    time.sleep(0.5)
            except OSError:
                pass
            held.append(time.monotonic() - t0)

    threads = [threading.Thread(target=trickle) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert b" 503 " in exchange(broker, b"GET /kbs/v1/identity HTTP/1.1\r\n\r\n")       # all slots taken ...
    time.sleep(DEADLINE + 0.5)
    assert b" 200 " in exchange(broker, b"GET /kbs/v1/identity HTTP/1.1\r\n\r\n")       # ... and freed
    for t in threads:
        t.join()
    assert len(held) == 3 and max(held) < DEADLINE + 2, held
    reasons = [r["reason"] for r in AuditLog(broker.service.store.audit_path).records() if r["event"] == "refuse"]
    assert sum("did not arrive within" in r for r in reasons) == 3, reasons


@pytest.mark.parametrize("lengths", [[b"2", b"0"], [b"2", b"2"], [b"+2"], [b"0_2"], [b"\xd9\xa2"], [b"-0"], [b"2 2"]])
def test_a_content_length_is_one_plain_number(broker: BrokerHttpServer, lengths: list[bytes]) -> None:
    """Two lengths are how a request is smuggled past a relay; int() would also read '+2', '0_2' and other
    scripts' digits."""
    head = b"".join(b"Content-Length: " + n + b"\r\n" for n in lengths)
    assert b" 400 " in exchange(broker, b"POST /kbs/v1/challenge HTTP/1.1\r\n" + head + b"\r\n{}")
    assert b" 200 " in exchange(broker, b"POST /kbs/v1/challenge HTTP/1.1\r\nContent-Length: 2\r\n" + JSON + b"\r\n{}")


def reply(server: BrokerHttpServer, data: bytes) -> tuple[bytes, bytes]:
    """Send one raw request; (status line, body) of the reply."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


@pytest.mark.parametrize("types", [[], [b"text/plain"], [b"application/x-www-form-urlencoded"],
                                   [b"multipart/form-data; boundary=x"], [b"application/jsonp"],
                                   [b"application/json; charset=latin-1"], [b"application/json", b"application/json"],
                                   [b"text/json"]])
@pytest.mark.parametrize("path", [b"/kbs/v1/challenge", b"/kbs/v1/release"])
def test_a_post_is_json_by_its_content_type_or_refused_with_415(broker: BrokerHttpServer, path: bytes,
                                                                 types: list[bytes]) -> None:
    """A body the broker reads as JSON is declared as JSON: a form or text POST (what a browser page or another
    service can be made to send) is refused before it is parsed, with a message that says what to send."""
    head = b"".join(b"Content-Type: " + t + b"\r\n" for t in types)
    status, body = reply(broker, b"POST " + path + b" HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n" + head
                         + b"\r\n{}")
    assert b" 415 " in status and b"Content-Type: application/json" in body, (status, body)
    reasons = [r["reason"] for r in AuditLog(broker.service.store.audit_path).records() if r["event"] == "refuse"]
    assert any("Content-Type" in r for r in reasons), reasons


@pytest.mark.parametrize("value", [b"application/json", b"Application/JSON", b"application/json; charset=utf-8",
                                   b"application/json;charset=\"UTF-8\"", b"application/json ; charset=utf8"])
def test_application_json_with_utf8_parameters_is_accepted(broker: BrokerHttpServer, value: bytes) -> None:
    status, _ = reply(broker, b"POST /kbs/v1/challenge HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n"
                      b"Content-Type: " + value + b"\r\n\r\n{}")
    assert b" 200 " in status, status
