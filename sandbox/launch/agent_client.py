"""The host end of the agent protocol: one client holds one of the sandbox's agent ports.

Ports are taken with an flock on `agent-<i>.lock` next to the socket, so concurrent commands (`logs -f`,
`exec`, `down`) never share a port. Requests go out typed (sandbox/shared/messages.py) and `call`
returns their typed result. Errors come back typed: `policy_denied` as PolicyDenied with the engine's
explanation, everything else as AgentError carrying the protocol error code. A client given a recorder
(sandbox/launch/trace_record.py) hands it every request and reply: the launch's `policy check` trace.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import secrets
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sandbox.shared import protocol as P
from sandbox.shared.codec import FieldError, Message, decode
from sandbox.shared.errors import GuestError, PolicyDenied
from sandbox.shared.messages import PingRequest, PingResult, Request
from sandbox.shared.protocol import ErrorCode, Op

if TYPE_CHECKING:
    from sandbox.launch.trace_record import TraceRecorder

R = TypeVar("R")


class AgentError(GuestError):
    def __init__(self, message: str, *, code: str, details: dict[str, Any] | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.code = code
        self.details = details or {}


class AgentDenied(PolicyDenied):
    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, hint="the execution policy decides what the host may ask; "
                                       "see 'parma-sandbox policy show' for what it allows")
        self.code = ErrorCode.policy_denied.value
        self.details = details or {}


class AgentUnreachable(GuestError):
    pass


def _lock_path(sock: Path) -> Path:
    return sock.with_suffix(".lock")


class AgentClient:
    def __init__(self, sock: socket.socket, lock_fd: int, path: Path, timeout: float,
                 recorder: TraceRecorder | None = None) -> None:
        self.sock = sock
        self._lock_fd = lock_fd
        self.path = path
        self.timeout = timeout
        self.recorder = recorder
        self._buf = b""
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)
        # A bare newline ends any partial frame a previous client may have left in the guest.
        self.sock.sendall(b"\n")

    @classmethod
    def connect(cls, sockets: Sequence[Path], *, timeout: float = 60.0, wait: float = 30.0,
                recorder: TraceRecorder | None = None) -> AgentClient:
        """Take the first free port; wait up to `wait` seconds for one to become free or to appear.
        With a recorder, every request and reply is also written to its trace."""
        deadline = time.monotonic() + wait
        last_error = "no agent socket"
        while True:
            for path in sockets:
                fd = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    last_error = "all agent ports are in use"
                    continue
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(path))
                except OSError as e:
                    s.close()
                    os.close(fd)
                    last_error = f"{path}: {e.strerror or e}"
                    continue
                s.settimeout(timeout)
                return cls(s, fd, path, timeout, recorder)
            if time.monotonic() >= deadline:
                raise AgentUnreachable(f"cannot reach the guest agent: {last_error}",
                                       hint="is the sandbox running? see 'parma-sandbox ps'")
            time.sleep(0.1)

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_frame(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AgentUnreachable("the guest agent closed the connection (did the VM stop?)")
            self._buf += chunk
            if len(self._buf) > P.MAX_FRAME_BYTES and b"\n" not in self._buf:
                raise AgentError("the agent sent an oversized frame", code=ErrorCode.frame_too_large.value)
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def request(self, request: Request[Any], *, timeout: float | None = None) -> P.Response:
        """Send one typed request and return the agent's response (ok or not)."""
        return self.send(request.op, request.to_json(), timeout=timeout)

    def send(self, op: Op | str, payload: Any, *, timeout: float | None = None) -> P.Response:
        """Send a payload as is (tests play the malicious host with it) and return the response."""
        rid = f"{self._prefix}-{next(self._ids)}"
        data = P.encode_frame({"v": P.PROTOCOL_VERSION, "id": rid, "op": str(op), "payload": payload})
        deadline = time.monotonic() + (timeout or self.timeout)
        try:
            self.sock.settimeout(timeout or self.timeout)
            self.sock.sendall(data)
            while True:
                line = self._read_frame(deadline)
                if not line.strip():
                    continue
                try:
                    resp = P.parse_response(line)
                except P.ProtocolError:
                    continue  # garbage or a reply meant for an earlier client of this port
                if resp.id == rid:
                    if self.recorder is not None:
                        self.recorder.observe(str(op), payload, resp)
                    return resp
        except TimeoutError:
            raise AgentUnreachable(f"the guest agent did not answer {op} within "
                                   f"{timeout or self.timeout:g} s") from None
        except OSError as e:
            raise AgentUnreachable(f"lost the connection to the guest agent: {e}") from None

    def call(self, request: Request[R], *, timeout: float | None = None) -> R:
        """Send a typed request and return its typed result, raising the typed error when the agent refused."""
        op = request.op
        resp = self.request(request, timeout=timeout)
        if not resp.ok:
            assert resp.error is not None
            code = resp.error.code
            code_text = code.value if isinstance(code, ErrorCode) else str(code)
            if code == ErrorCode.policy_denied:
                raise AgentDenied(f"denied by policy: {resp.error.message}", details=resp.error.details)
            raise AgentError(f"{op.value}: {resp.error.message}", code=code_text, details=resp.error.details)
        # R's class at run time (Request.__init_subclass__ reads it from `Request[R]`), hence the casts:
        # the type system cannot tie this ClassVar to R.
        result_type = request.result_type
        if not (isinstance(result_type, type) and issubclass(result_type, Message)):
            return cast(R, resp.result)  # a JSON object result
        try:
            # Fields a newer agent added are ignored; missing or mistyped ones are the agent's error.
            return cast(R, decode(result_type, resp.result, ignore_unknown=True))
        except FieldError as e:
            raise AgentError(f"{op.value}: the agent sent a malformed result: {e}", code="malformed_result") from None


def wait_for_agent(sockets: Sequence[Path], *, timeout: float, alive: Any = None,
                   console: Path | None = None) -> PingResult:
    """Ping the agent until it answers (the guest is booting meanwhile). Returns the ping result."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            break
        try:
            with AgentClient.connect(sockets, timeout=2, wait=1) as client:
                left = max(0.5, deadline - time.monotonic())
                return client.call(PingRequest(), timeout=min(left, 5.0))
        except (AgentUnreachable, AgentError) as e:
            last = e
            time.sleep(0.1)
    tail = ""
    if console is not None:
        try:
            tail = "\n".join(console.read_text(errors="replace").strip().splitlines()[-10:])
        except OSError:
            pass
    what = "the VM stopped" if alive is not None and not alive() else f"no answer within {timeout:g} s"
    raise AgentUnreachable(f"the guest agent did not come up: {what}" + (f" ({last})" if last else ""),
                           hint=f"last console lines:\n{tail}" if tail else None)
