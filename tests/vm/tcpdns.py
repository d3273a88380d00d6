"""A DNS server on the host's loopback for vm tests, over TCP (slirp relays only TCP to the host): it
answers A queries from a fixed table, NXDOMAIN otherwise, and records what it was asked."""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

NXDOMAIN = 3


def question(msg: bytes) -> tuple[str, int, bytes]:
    """(name, qtype, the question section as sent) of a query (RFC 1035 4.1.2)."""
    pos, labels = 12, []
    while msg[pos]:
        n = msg[pos]
        labels.append(msg[pos + 1:pos + 1 + n].decode("ascii"))
        pos += 1 + n
    qtype, _qclass = struct.unpack("!HH", msg[pos + 1:pos + 5])
    return ".".join(labels).lower(), qtype, msg[12:pos + 5]


def reply(msg: bytes, records: dict[str, str]) -> bytes:
    ident, flags = struct.unpack("!HH", msg[:4])
    name, qtype, asked = question(msg)
    address = records.get(name)
    head = 0x8080 | (flags & 0x0100)           # a response, recursion available, RD echoed
    if address is None:
        return struct.pack("!HHHHHH", ident, head | NXDOMAIN, 1, 0, 0, 0) + asked
    if qtype != 1:                              # only A records: an empty answer for AAAA and the rest
        return struct.pack("!HHHHHH", ident, head, 1, 0, 0, 0) + asked
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(address)
    return struct.pack("!HHHHHH", ident, head, 1, 1, 0, 0) + asked + answer


class _Handler(socketserver.BaseRequestHandler):
    def _exactly(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = self.request.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def handle(self) -> None:
        while (head := self._exactly(2)) is not None:
            msg = self._exactly(struct.unpack("!H", head)[0])
            if msg is None:
                return
            self.server.queries.append(question(msg)[0])   # type: ignore[attr-defined]
            out = reply(msg, self.server.records)           # type: ignore[attr-defined]
            self.request.sendall(struct.pack("!H", len(out)) + out)


@contextmanager
def tcp_dns_server(records: dict[str, str]) -> Iterator[socketserver.ThreadingTCPServer]:
    """A server on 127.0.0.1 and a free port (server.server_address); server.queries lists the names asked."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.records = records          # type: ignore[attr-defined]
    server.queries = []               # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
