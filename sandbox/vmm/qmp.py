"""A minimal QMP client (QEMU Machine Protocol: JSON over a unix socket), enough to query and stop a VM."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from sandbox.shared.errors import SandboxError


class QmpError(SandboxError):
    pass


class QmpClient:
    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._buf = b""
        try:
            self.sock.connect(str(self.path))
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmpError(f"{self.path} did not greet with QMP")
            self.execute("qmp_capabilities")
        except OSError as e:
            self.sock.close()
            raise QmpError(f"cannot talk QMP on {self.path}: {e}") from e
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError(f"QMP connection {self.path} closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
            # anything else is an asynchronous event; skip it


def wait_for_socket(path: Path, timeout: float, alive: Any = None) -> bool:
    """Wait until a unix socket accepts connections (QEMU creates it before the guest runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        if path.exists():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                return True
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    return False
