"""Task events back to containerd: `containerd.services.events.ttrpc.v1.Events/Forward` on its ttrpc socket.

containerd gives the shim that socket's address in $TTRPC_ADDRESS. Events go out in order from one
thread (TaskCreate before TaskStart before TaskExit), each retried a few times, so a slow containerd
never holds up an RPC answer. Topics and payload types are containerd's (runtime/events.go, api/events).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from google.protobuf.message import Message

from sandbox.shim import messages as M
from sandbox.shim.ttrpc import Client, FramingError, RpcError

log = logging.getLogger("parma-sandbox.shim")

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
TOPICS = {
    "TaskCreate": "/tasks/create", "TaskStart": "/tasks/start", "TaskExit": "/tasks/exit",
    "TaskDelete": "/tasks/delete", "TaskExecAdded": "/tasks/exec-added", "TaskExecStarted": "/tasks/exec-started",
}
_ATTEMPTS = 5


def envelope(namespace: str, event: Message, at: float | None = None) -> M.DynamicMessage:
    """The ForwardRequest for one event: topic from its type, the event packed as an Any."""
    name = event.DESCRIPTOR.name
    return M.ForwardRequest(envelope=M.Envelope(timestamp=M.timestamp(at), namespace=namespace,
                                                topic=TOPICS[name], event=M.pack_any(event)))


class Publisher:
    def __init__(self, ttrpc_address: str, namespace: str) -> None:
        self.namespace = namespace
        self._client = Client(ttrpc_address, timeout=5.0) if ttrpc_address else None
        self._queue: queue.Queue[M.DynamicMessage | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="events")
        self._thread.start()

    def publish(self, name: str, **fields: object) -> None:
        self._queue.put(envelope(self.namespace, M.event(name, **fields)))

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (up to `timeout`), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._client is not None:
            self._client.close()

    def _run(self) -> None:
        while (req := self._queue.get()) is not None:
            if self._client is None:
                continue
            for attempt in range(_ATTEMPTS):
                try:
                    self._client.call(EVENTS_SERVICE, "Forward", req.SerializeToString())
                    break
                except (OSError, EOFError, FramingError, RpcError) as e:
                    if attempt + 1 == _ATTEMPTS:
                        log.error("could not publish %s: %s", req.envelope.topic, e)
                    else:
                        time.sleep(0.2 * (attempt + 1))
