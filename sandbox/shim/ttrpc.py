"""ttrpc, containerd's lightweight RPC protocol: framing, a threaded server and a small unary client.

Wire format (ttrpc PROTOCOL.md): every message is a 10-byte header followed by its data.

    offset 0  uint32 BE  data length (at most 4 MiB; the first byte is therefore always 0)
    offset 4  uint32 BE  stream id (odd: client-initiated)
    offset 8  uint8      message type: 1 request, 2 response, 3 data
    offset 9  uint8      flags: 0x1 remote closed, 0x2 remote open, 0x4 no data

A unary call is one request frame (data: a `ttrpc.Request` protobuf naming service and method, with
the method's own message as payload) answered by one response frame on the same stream (data: a
`ttrpc.Response` with a google.rpc.Status and the result payload). The Task API uses unary calls only,
so the server answers streaming requests (flags set, or data frames) with Unimplemented.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum

from sandbox.shim import messages as M

HEADER = struct.Struct(">IIBB")
HEADER_LEN = HEADER.size            # 10
MAX_DATA = 4 << 20                  # 4 MiB

TYPE_REQUEST = 0x1
TYPE_RESPONSE = 0x2
TYPE_DATA = 0x3
FLAG_REMOTE_CLOSED = 0x1
FLAG_REMOTE_OPEN = 0x2
FLAG_NO_DATA = 0x4


class Code(IntEnum):
    """gRPC status codes (the google.rpc.Status codes ttrpc carries; containerd's errdefs map them)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class RpcError(Exception):
    """An error answer: a status code and a message (what containerd shows the user)."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name.lower()}: {self.message}"


class FramingError(Exception):
    """The byte stream is not ttrpc (or the peer went away mid-frame): the connection must be dropped."""


@dataclass(frozen=True)
class Header:
    length: int
    stream_id: int
    type: int
    flags: int

    def pack(self) -> bytes:
        return HEADER.pack(self.length, self.stream_id, self.type, self.flags)

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) != HEADER_LEN:
            raise FramingError(f"a ttrpc header is {HEADER_LEN} bytes, got {len(raw)}")
        return cls(*HEADER.unpack(raw))


def encode_frame(stream_id: int, msg_type: int, data: bytes, flags: int = 0) -> bytes:
    if len(data) > MAX_DATA:
        raise ValueError(f"ttrpc message of {len(data)} bytes exceeds the {MAX_DATA}-byte limit")
    return Header(len(data), stream_id, msg_type, flags).pack() + data


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            if buf:
                raise FramingError(f"connection closed after {len(buf)} of {n} bytes")
            raise EOFError
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> tuple[Header, bytes | None]:
    """One frame from the socket. Data longer than MAX_DATA is read and dropped (returned as None), so
    the stream stays in step and the caller can answer that stream with ResourceExhausted.
    Raises EOFError on a clean close between frames, FramingError on a close inside one."""
    header = Header.unpack(_read_exact(sock, HEADER_LEN))
    if header.length > MAX_DATA:
        left = header.length
        while left:
            left -= len(_read_exact(sock, min(left, 1 << 20)))
        return header, None
    return header, _read_exact(sock, header.length) if header.length else b""


def status_response(code: Code, message: str) -> bytes:
    return M.TtrpcResponse(status=M.Status(code=int(code), message=message)).SerializeToString()


# A handler gets the request payload and returns the response payload (both serialized messages).
Handler = Callable[[bytes], bytes]


class Server:
    """Serves registered unary methods on a listening unix socket; one thread per connection, one pool
    thread per request in flight (Wait and Create block for long, other calls must not wait on them)."""

    def __init__(self, handlers: dict[tuple[str, str], Handler], *, workers: int = 32,
                 on_error: Callable[[str, BaseException], None] | None = None) -> None:
        self.handlers = handlers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ttrpc")
        self._on_error = on_error or (lambda what, e: None)
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def serve(self, listener: socket.socket) -> None:
        """Accept connections until close() is called."""
        listener.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            conn.settimeout(None)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._connection, args=(conn,), daemon=True, name="ttrpc-conn").start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _connection(self, conn: socket.socket) -> None:
        send_lock = threading.Lock()
        seen: set[int] = set()

        def send(stream_id: int, payload: bytes) -> None:
            try:
                frame = encode_frame(stream_id, TYPE_RESPONSE, payload)
            except ValueError as e:
                frame = encode_frame(stream_id, TYPE_RESPONSE, status_response(Code.RESOURCE_EXHAUSTED, str(e)))
            with send_lock, contextlib.suppress(OSError):
                conn.sendall(frame)

        try:
            while not self._stop.is_set():
                header, data = read_frame(conn)
                sid = header.stream_id
                if header.type != TYPE_REQUEST:
                    if header.type == TYPE_DATA:
                        send(sid, status_response(Code.UNIMPLEMENTED, "ttrpc: streaming is not supported"))
                    continue   # a response or unknown type from a client: nothing to answer
                if sid % 2 == 0:
                    send(sid, status_response(Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"))
                    continue
                if sid in seen:
                    send(sid, status_response(Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"))
                    continue
                seen.add(sid)
                if data is None:
                    send(sid, status_response(Code.RESOURCE_EXHAUSTED,
                                              f"message length {header.length} exceeds maximum message size of {MAX_DATA}"))
                    continue
                if header.flags & (FLAG_REMOTE_OPEN | FLAG_REMOTE_CLOSED):
                    send(sid, status_response(Code.UNIMPLEMENTED, "ttrpc: streaming is not supported"))
                    continue
                try:
                    self._pool.submit(self._dispatch, sid, data, send)
                except RuntimeError:   # shutting down
                    break
        except (EOFError, FramingError, OSError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _dispatch(self, stream_id: int, data: bytes, send: Callable[[int, bytes], None]) -> None:
        try:
            req = M.parse(M.TtrpcRequest, data)
        except ValueError as e:
            send(stream_id, status_response(Code.INVALID_ARGUMENT, f"unmarshal request error: {e}"))
            return
        handler = self.handlers.get((req.service, req.method))
        if handler is None:
            known = {s for s, _ in self.handlers}
            what = f"method {req.method}" if req.service in known else f"service {req.service}"
            send(stream_id, status_response(Code.UNIMPLEMENTED, what))
            return
        try:
            payload = handler(req.payload)
        except RpcError as e:
            send(stream_id, status_response(e.code, e.message))
            return
        except ValueError as e:       # a payload we could not decode
            send(stream_id, status_response(Code.INVALID_ARGUMENT, str(e)))
            return
        except Exception as e:  # a bug in a handler must answer, not hang the caller
            self._on_error(f"{req.service}/{req.method}", e)
            send(stream_id, status_response(Code.INTERNAL, f"{type(e).__name__}: {e}"))
            return
        send(stream_id, M.TtrpcResponse(status=M.Status(code=0), payload=payload).SerializeToString())


class Client:
    """A unary ttrpc client over one unix socket connection (calls are serialised)."""

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1, 2)
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(unix_path(self.path))
            except OSError:
                s.close()
                raise
            self._sock = s
        return self._sock

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def call(self, service: str, method: str, payload: bytes, *, metadata: dict[str, str] | None = None) -> bytes:
        """Send one request; return the response payload or raise RpcError with the server's status."""
        with self._lock:
            sock = self._connect()
            sid = next(self._ids)
            req = M.TtrpcRequest(service=service, method=method, payload=payload,
                                 timeout_nano=int(self.timeout * 1e9),
                                 metadata=[M.message_class("ttrpc.KeyValue")(key=k, value=v)
                                           for k, v in (metadata or {}).items()])
            try:
                sock.sendall(encode_frame(sid, TYPE_REQUEST, req.SerializeToString()))
                while True:
                    header, data = read_frame(sock)
                    if header.stream_id == sid and header.type == TYPE_RESPONSE:
                        break
            except (OSError, EOFError, FramingError):
                self._sock = None
                sock.close()
                raise
        if data is None:
            raise RpcError(Code.RESOURCE_EXHAUSTED, "response exceeds the ttrpc message size limit")
        resp = M.parse(M.TtrpcResponse, data)
        if resp.status.code != 0:
            raise RpcError(Code(resp.status.code) if resp.status.code in Code._value2member_map_ else Code.UNKNOWN,
                           resp.status.message)
        return resp.payload


def unix_path(address: str) -> str:
    """A containerd socket address (`unix:///path`, a plain path, or an abstract name) as a bind/connect path."""
    if address.startswith("unix://"):
        return address.removeprefix("unix://")
    if address.startswith("/"):
        return address
    return "\0" + address


def listen(path: str) -> socket.socket:
    """A listening unix socket at path (mode 0600; its directory is created)."""
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        os.chmod(path, 0o600)
        s.listen(64)
    except OSError:
        s.close()
        raise
    return s
