"""Serve the protocol on byte streams: virtio-serial ports in the UVM, socket pairs in tests.

One thread per port, one request at a time per port. The agent never dies from input: every frame
gets exactly one reply, whatever it contains (an error reply when it is malformed, oversized or
fails, `internal` when the agent itself fails), and the port's loop goes on. Should a port's thread
die anyway, the port watcher starts it again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sandbox.shared import protocol as P
from sandbox.shared.codec import Message, shown
from sandbox.shared.messages import AgentRequest, JsonObject
from sandbox.shared.protocol import ErrorCode, ProtocolError, Response

if TYPE_CHECKING:
    PortDevice = str | os.PathLike[str]    # a port's /dev node

# Plain os calls for the ports, not pathlib: they are opened before the agent is ready (agent.py).
VIRTIO_PORTS = "/sys/class/virtio-ports"
IDLE_MIN, IDLE_MAX = 0.02, 0.2   # seconds between reads of a port with no host connected
MAX_ERROR_MESSAGE = 4096         # characters of an error message that are sure to fit in a frame

# A handler returns the result, or a CheckedResult with the result and the policy checks behind it.
RequestHandler = Callable[[AgentRequest], Message | JsonObject | P.CheckedResult]

# The reply of last resort, when not even an `internal` error with the request's id could be encoded.
LAST_RESORT = (json.dumps({"v": P.PROTOCOL_VERSION, "id": None, "ok": False,
                           "error": {"code": ErrorCode.internal.value, "message": "the reply could not be encoded",
                                     "details": {}}}, separators=(",", ":")) + "\n").encode()


def log(message: str) -> None:
    """A line on the console. Never raises: a port thread must not die of a log line."""
    try:
        print(f"parma-agent: {message}", file=sys.stderr, flush=True)
    except Exception:  # the console may be gone; the agent goes on without it
        pass


def _log_traceback() -> None:
    try:
        import traceback  # only when something failed: traceback pulls in linecache and tokenize

        traceback.print_exc(file=sys.stderr)
    except Exception:  # as log()
        pass


def respond(handler: RequestHandler, frame: bytes | P.Oversized) -> bytes:
    """One frame in, one encoded response out. Never raises (short of the interpreter's own exits)."""
    request_id: P.RequestId = None
    try:
        response, request_id = _answer(handler, frame)
        return _encode(response)
    except Exception as e:  # a bug in the frame layer itself: answer anyway
        _log_traceback()
        return _encode(Response.failure(ProtocolError(ErrorCode.internal, f"internal error: {type(e).__name__}",
                                                      request_id=request_id)))


def _answer(handler: RequestHandler, frame: bytes | P.Oversized) -> tuple[Response, P.RequestId]:
    try:
        if isinstance(frame, P.Oversized):
            raise P.oversized_error(frame)
        envelope = P.parse_request(frame)
    except ProtocolError as e:
        return Response.failure(e), e.request_id
    request = envelope.request
    try:
        result = handler(request)
        policy = result.policy if isinstance(result, P.CheckedResult) else ()
        result = result.result if isinstance(result, P.CheckedResult) else result
        payload = result.to_json() if isinstance(result, Message) else result
    except ProtocolError as e:
        e.request_id = envelope.id
        return Response.failure(e), envelope.id
    except BaseException as e:  # a bug (even a stray SystemExit) must not kill the port
        _log_traceback()
        return Response.failure(ProtocolError(ErrorCode.internal, f"internal error in {request.op.value}: "
                                              f"{_describe(e)}", request_id=envelope.id)), envelope.id
    return Response.success(envelope.id, payload, policy), envelope.id


def _describe(e: BaseException) -> str:
    """An exception's type and text, cut short; its text may itself fail."""
    try:
        return f"{type(e).__name__}: {shown(str(e))}"
    except Exception:  # even __str__ can be a bug
        return type(e).__name__


def _encode(response: Response) -> bytes:
    """The response's frame; when it cannot be encoded, the same error cut short, or an internal error."""
    try:
        return P.encode_frame(response.to_json())
    except (ValueError, TypeError) as e:
        problem = _describe(e)
    if response.policy:
        # The echoed policy inputs are what made it too large (a request near the frame limit comes back
        # twice): send the reply without them, saying so, rather than lose the reply.
        trimmed = dataclasses.replace(response, policy=tuple(c.without_input() for c in response.policy))
        try:
            return P.encode_frame(trimmed.to_json())
        except (ValueError, TypeError):
            pass
    if not response.ok and response.error is not None:
        # An error whose message or details do not fit (or hold what JSON cannot): keep its code.
        error = response.error
        code = error.code if isinstance(error.code, ErrorCode) else ErrorCode.internal
        shortened = ProtocolError(code, error.message[:MAX_ERROR_MESSAGE], request_id=response.id)
        try:
            return P.encode_frame(Response.failure(shortened).to_json())
        except (ValueError, TypeError):
            pass
    try:
        return P.encode_frame(Response.failure(ProtocolError(
            ErrorCode.internal, f"the reply could not be encoded ({problem})", request_id=response.id)).to_json())
    except (ValueError, TypeError):
        return LAST_RESORT


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        view = view[n:]


def serve_fd(fd: int, handler: RequestHandler, *, reconnecting: bool, stop: threading.Event | None = None) -> None:
    """Read frames from fd and answer each. With `reconnecting`, EOF means the host went away for now
    (virtio-serial returns 0 while no host is connected): drop any partial frame and poll again."""
    reader = P.FrameReader()
    idle = IDLE_MIN
    while stop is None or not stop.is_set():
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        except OSError as e:
            log(f"read error on fd {fd}: {e}")
            time.sleep(0.5)
            continue
        if not data:
            if not reconnecting:
                return
            # No host on this port. virtio-serial cannot block until one connects (read and poll
            # return at once), so back off: an idle port costs a few wakeups a second, not fifty.
            reader.reset()
            time.sleep(idle)
            idle = min(idle * 2, IDLE_MAX)
            continue
        idle = IDLE_MIN
        try:
            frames = reader.feed(data)
        except Exception:  # a bug in the framing: drop what was buffered, keep serving
            _log_traceback()
            reader.reset()
            continue
        for frame in frames:
            reply = respond(handler, frame)
            try:
                _write_all(fd, reply)
            except OSError as e:  # the host went away mid-reply: drop it, keep serving
                log(f"write error on fd {fd}: {e}")
                reader.reset()
                break


def find_ports(prefix: str = P.PORT_PREFIX, *, sys_dir: str | os.PathLike[str] = VIRTIO_PORTS,
               dev_dir: str | os.PathLike[str] = "/dev") -> dict[str, PortDevice]:
    """virtio-serial ports whose name starts with prefix: name -> /dev node (no udev here)."""
    found: dict[str, PortDevice] = {}
    try:
        entries = sorted(os.listdir(sys_dir))
    except OSError:
        return found
    for entry in entries:
        try:
            with open(os.path.join(sys_dir, entry, "name")) as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith(prefix):
            found[name] = os.path.join(dev_dir, entry)
    return found


def open_port(dev: PortDevice) -> int:
    return os.open(dev, os.O_RDWR | os.O_CLOEXEC)


class PortWatcher:
    """Serves every agent port on its own thread: the ports present now, any that appear later (port
    hot-plug), and again any whose thread died (it keeps its open descriptor: virtio-serial lets one
    open at a time)."""

    def __init__(self, handler: RequestHandler, *, log: Callable[[str], None] = log,
                 find: Callable[[], dict[str, PortDevice]] = find_ports,
                 open_port: Callable[[PortDevice], int] = open_port,
                 serve: Callable[[int, RequestHandler], None] | None = None) -> None:
        self.handler = handler
        self.log = log
        self.find = find
        self.open_port = open_port
        self.serve = serve or (lambda fd, h: serve_fd(fd, h, reconnecting=True))
        self.devices: dict[str, PortDevice] = {}
        self.fds: dict[str, int] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.restarts: dict[str, int] = {}

    def scan(self) -> None:
        """Start a thread for each new port and for each port whose thread has died."""
        for name, dev in self.find().items():
            if name in self.fds:
                continue
            try:
                self.fds[name] = self.open_port(dev)
                self.devices[name] = dev
            except OSError as e:
                self.log(f"cannot open {dev} ({name}): {e}")
                continue
            self._start(name)
        for name, thread in list(self.threads.items()):
            if not thread.is_alive():
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self.log(f"port {name}: its thread stopped; serving it again (restart {self.restarts[name]})")
                self._start(name)

    def _start(self, name: str) -> None:
        fd = self.fds[name]

        def run() -> None:
            try:
                self.serve(fd, self.handler)
            except BaseException as e:  # say why the port stopped; the watcher restarts it
                self.log(f"port {name} stopped: {_describe(e)}")

        thread = threading.Thread(target=run, name=f"port-{name}", daemon=True)
        self.threads[name] = thread
        thread.start()

    def watch(self, poll: float) -> None:
        while True:
            time.sleep(poll)
            try:
                self.scan()
            except Exception as e:  # the watcher must outlive any one scan
                self.log(f"port scan failed: {_describe(e)}")


def serve_ports(handler: RequestHandler, *, log: Callable[[str], None],
                poll: float = 1.0) -> dict[str, PortDevice]:
    """Serve the agent ports present now, and any that appear later or whose thread died, on their own
    threads. Returns the ports served at once."""
    watcher = start_ports(handler, log=log)
    watch_ports(watcher, poll)
    return dict(watcher.devices)


def start_ports(handler: RequestHandler, *, log: Callable[[str], None]) -> PortWatcher:
    """Serve the agent ports present now, each on its own thread (serve_ports() without the watcher)."""
    watcher = PortWatcher(handler, log=log)
    watcher.scan()
    return watcher


def watch_ports(watcher: PortWatcher, poll: float = 1.0) -> None:
    """Serve, from now on, the ports that appear later or whose thread died (on a thread of its own)."""
    threading.Thread(target=watcher.watch, args=(poll,), name="port-watch", daemon=True).start()
