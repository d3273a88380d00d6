"""The emulated PSP as a host service: signs an emulation-mode guest's reports, beside its QEMU.

    python -m sandbox.attest.psp_service --socket STATE/psp.sock --material STATE/psp.json

A real PSP is a processor next to the guest, holding the VCEK the guest never sees. In emulation this
process plays it: it reads the launch's emulated PSP material (sandbox/shared/snp/emulated_psp.py: the
values a PSP would report, the emulated VCEK's private key and its certificate chain), connects to the
host end of the guest's `org.parma.psp` port (a QEMU chardev socket) and answers each report request
(sandbox/shared/snp/psp_port.py) with a report in AMD's format, signed by OpenSSL (pyca/cryptography).
It ends when QEMU closes the port, i.e. with the VM; `down` stops it too (it is one of the sandbox's
recorded processes). What it does goes to psp.log in the sandbox's state directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sandbox.run import spawn as spawn_process
from sandbox.shared.errors import InputError, SandboxError
from sandbox.shared.snp.emulated_psp import EmulatedPsp, PspMaterial, Sign
from sandbox.shared.snp.psp_port import MAX_LINE, PspReportReply, PspReportRequest, from_line, to_line
from sandbox.state import ProcessRef

log = logging.getLogger("parma-sandbox.psp")

LOG_FILE = "psp.log"
CONNECT_TIMEOUT_S = 120.0   # QEMU creates the socket as it starts; a VM that never came up ends the wait
UNKNOWN_ID = "0" * 16       # the id of a reply to a line that named none


def vcek_signer(scalar: bytes) -> Sign:
    """ECDSA P-384/SHA-384 under the emulated VCEK's private scalar (OpenSSL, through pyca/cryptography)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    try:
        key = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP384R1())
    except ValueError as e:
        raise InputError(f"the emulated VCEK key is not a P-384 private key: {e}") from None

    def sign(data: bytes) -> tuple[int, int]:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA384())))
        return r, s
    return sign


def load_psp(material_path: Path) -> EmulatedPsp:
    """The emulated PSP of one launch, from its material file (written by sandbox/launch/measured.py)."""
    try:
        raw = material_path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the emulated PSP material {material_path}: {e.strerror}") from None
    material = PspMaterial.from_bytes(raw, source=str(material_path))
    return EmulatedPsp(material, vcek_signer(material.vcek_private_key))


def answer(psp: EmulatedPsp, line: bytes) -> bytes:
    """The reply line to one request line (without its newline). Never raises for what the guest sent."""
    try:
        request = from_line(PspReportRequest, line, source="report request")
    except InputError as e:
        log.warning("refused a request: %s", e.message)
        return to_line(PspReportReply(UNKNOWN_ID, error=e.message[:1000]))
    try:
        report = psp.report(request.report_data, request.vmpl)
    except InputError as e:
        return to_line(PspReportReply(request.id, error=e.message[:1000]))
    log.info("signed a report (VMPL %d)", request.vmpl)
    return to_line(PspReportReply(request.id, report=report, cert_table=psp.cert_table()))


def serve(conn: socket.socket, psp: EmulatedPsp) -> None:
    """Answer request lines on `conn` until the other end closes it. A line longer than MAX_LINE is
    refused and skipped to its end."""
    pending = b""
    skipping = False
    while chunk := conn.recv(65536):
        pending += chunk
        while True:
            end = pending.find(b"\n")
            if end < 0:
                break
            line, pending = pending[:end], pending[end + 1:]
            if skipping:
                skipping = False
                continue
            if line.strip():
                conn.sendall(answer(psp, line.strip()))
        if len(pending) > MAX_LINE:
            if not skipping:
                conn.sendall(to_line(PspReportReply(UNKNOWN_ID, error=f"a line of more than {MAX_LINE} bytes")))
            pending, skipping = b"", True


def connect(path: Path, timeout: float) -> socket.socket:
    """Connect to QEMU's end of the port, waiting for QEMU to create it."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.fspath(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= deadline:
                raise SandboxError(f"{path}: no VM to serve after {timeout:.0f} s") from None
            time.sleep(0.02)


def run(socket_path: Path, material_path: Path, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Serve one VM's port until the VM closes it."""
    psp = load_psp(material_path)
    with connect(socket_path, timeout) as conn:
        log.info("serving %s", socket_path)
        serve(conn, psp)
    log.info("the VM closed the port")


def spawn(socket_path: Path, material_path: Path, log_path: Path) -> ProcessRef:
    """Start the service for one VM, in a session of its own (it outlives `up -d`); its exit is reaped
    here while this process lives, so that a finished service never looks alive."""
    with open(log_path, "ab") as out:
        proc = spawn_process([sys.executable, "-m", "sandbox.attest.psp_service", "--socket", socket_path,
                               "--material", material_path], stdout=out, stderr=out, new_session=True)
    threading.Thread(target=proc.wait, name="psp-service-reaper", daemon=True).start()
    return ProcessRef.of(proc.pid)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sandbox.attest.psp_service", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", type=Path, required=True, help="the host end of the guest's org.parma.psp port")
    ap.add_argument("--material", type=Path, required=True, help="the launch's emulated PSP material (JSON)")
    ap.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT_S, help="seconds to wait for the socket")
    args = ap.parse_args(argv)
    try:
        # Below QEMU: it starts while the guest boots on the host's other core, and has seconds to spare.
        os.nice(10)
    except OSError:
        pass
    logging.basicConfig(level=logging.INFO, format="%(asctime)s psp: %(message)s", stream=sys.stderr)

    def terminate(_signum: int, _frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    try:
        run(args.socket, args.material, timeout=args.timeout)
    except SandboxError as e:
        log.error("%s", e.message)
        return 1
    except OSError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
