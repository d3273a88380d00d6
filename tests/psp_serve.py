"""The emulated PSP's host service for tests: sandbox/attest/psp_service.py's serve loop on a Unix socket.

The guest code (sandbox/guest/snp_report.py) connects to it as it opens the virtio-serial port in a UVM, so
a test's guest gets its reports signed exactly as in emulation mode, by the host side, from the material
file a launch writes. The material is read when a connection starts."""

from __future__ import annotations

import atexit
import shutil
import socket
import tempfile
import threading
from pathlib import Path

from sandbox.attest import psp_service

_served: dict[Path, Path] = {}
_lock = threading.Lock()


def _serve_connection(conn: socket.socket, material: Path) -> None:
    with conn:
        try:
            psp = psp_service.load_psp(material)
        except Exception:   # no (or bad) material: the guest sees the port close, as with a dead service
            return
        psp_service.serve(conn, psp)


def psp_socket_for(material: Path) -> Path:
    """The socket of an emulated PSP serving `material` (one per material path, for the test run)."""
    with _lock:
        if material in _served:
            return _served[material]
        directory = Path(tempfile.mkdtemp(prefix="psp-"))    # short: a Unix socket path has 107 bytes at most
        atexit.register(shutil.rmtree, directory, True)
        path = directory / "psp.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(path))
        listener.listen(16)

        def accept() -> None:
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=_serve_connection, args=(conn, material), daemon=True).start()

        threading.Thread(target=accept, name=f"psp {material}", daemon=True).start()
        _served[material] = path
        return path
