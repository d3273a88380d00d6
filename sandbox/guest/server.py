"""Serve the protocol on byte streams: virtio-serial ports in the UVM, socket pairs in tests.

One thread per port, one request at a time per port. The agent never dies from input: every
malformed, oversized or failing request gets an error reply and the loop goes on.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox.shared import protocol as P
from sandbox.shared.messages import AgentRequest, Message
from sandbox.shared.protocol import ErrorCode, ProtocolError, Response

VIRTIO_PORTS = Path("/sys/class/virtio-ports")
IDLE_MIN, IDLE_MAX = 0.02, 0.2   # seconds between reads of a port with no host connected

Handler = Callable[[AgentRequest], Message | dict[str, Any]]


def respond(handler: Handler, frame: bytes | P.Oversized) -> bytes:
    """One frame in, one encoded response out. Never raises."""
    try:
        if isinstance(frame, P.Oversized):
            raise P.oversized_error(frame)
        envelope = P.parse_request(frame)
        request = envelope.request
        try:
            result = handler(request)
            payload = result.to_json() if isinstance(result, Message) else result
        except ProtocolError as e:
            e.request_id = envelope.id
            raise
        except Exception as e:  # noqa: BLE001 - a bug must not kill the agent
            traceback.print_exc(file=sys.stderr)
            raise ProtocolError(ErrorCode.internal, f"internal error in {request.op.value}: "
                                f"{type(e).__name__}: {e}", request_id=envelope.id) from None
        response = Response.success(envelope.id, payload)
    except ProtocolError as e:
        response = Response.failure(e)
    try:
        return P.encode_frame(response.to_json())
    except (ValueError, TypeError) as e:
        fallback = ProtocolError(ErrorCode.internal, f"response could not be encoded: {e}",
                                 request_id=response.id)
        return P.encode_frame(Response.failure(fallback).to_json())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        view = view[n:]


def serve_fd(fd: int, handler: Handler, *, reconnecting: bool, stop: threading.Event | None = None) -> None:
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
            print(f"parma-agent: read error on fd {fd}: {e}", file=sys.stderr, flush=True)
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
        for frame in reader.feed(data):
            try:
                _write_all(fd, respond(handler, frame))
            except OSError as e:  # the host went away mid-reply: drop it, keep serving
                print(f"parma-agent: write error on fd {fd}: {e}", file=sys.stderr, flush=True)
                reader.reset()
                break


def find_ports(prefix: str = P.PORT_PREFIX) -> dict[str, Path]:
    """virtio-serial ports whose name starts with prefix: name -> /dev node (no udev here)."""
    found = {}
    try:
        entries = sorted(VIRTIO_PORTS.iterdir())
    except OSError:
        return found
    for entry in entries:
        try:
            name = (entry / "name").read_text().strip()
        except OSError:
            continue
        if name.startswith(prefix):
            found[name] = Path("/dev") / entry.name
    return found


def serve_port(name: str, dev: Path, handler: Handler) -> threading.Thread:
    fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    t = threading.Thread(target=serve_fd, args=(fd, handler), kwargs={"reconnecting": True},
                         name=f"port-{name}", daemon=True)
    t.start()
    return t


def serve_ports(handler: Handler, *, log: Callable[[str], None], poll: float = 1.0) -> dict[str, Path]:
    """Serve the agent ports present now, and any that appear later (port hot-plug), on their own threads."""
    served: dict[str, Path] = {}

    def scan() -> None:
        for name, dev in find_ports().items():
            if name not in served:
                try:
                    serve_port(name, dev, handler)
                    served[name] = dev
                except OSError as e:
                    log(f"cannot open {dev} ({name}): {e}")

    scan()

    def watch() -> None:
        while True:
            time.sleep(poll)
            scan()

    threading.Thread(target=watch, name="port-watch", daemon=True).start()
    return dict(served)
