"""The emulated PSP's port: the host service (sandbox/attest/psp_service.py) and the guest's client
(sandbox/guest/snp_report.py) on a real Unix socket, what each does with a bad peer, and keyless evidence."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox.attest import psp_service
from sandbox.guest import snp_report as g
from sandbox.shared.errors import AttestationError, InputError
from sandbox.shared.snp.evidence import ReportEvidence
from sandbox.shared.snp.psp_port import (
    MAX_LINE,
    PORT_NAME,
    PspReportReply,
    PspReportRequest,
    from_line,
    to_line,
)
from sandbox.shared.snp.report import parse_report
from tests.unit.test_guest_snp_report import material, openssl_verifies, paths

ID = "0123456789abcdef"


@pytest.fixture
def psp() -> psp_service.EmulatedPsp:
    return psp_service.EmulatedPsp(material(), psp_service.vcek_signer(material().vcek_private_key))


@contextlib.contextmanager
def peer(tmp_path: Path, behave: Callable[[socket.socket], None]) -> Iterator[Path]:
    """A Unix socket whose first connection is handled by `behave` (a stand-in for the host's service)."""
    path = tmp_path / "psp.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            behave(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield path
    listener.close()


def read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.strip()


# --- the host's service ------------------------------------------------------------------------------

def test_service_signs_what_the_guest_asks(psp: psp_service.EmulatedPsp) -> None:
    reply = from_line(PspReportReply, psp_service.answer(psp, to_line(PspReportRequest(ID, b"\x07" * 64, 2)).strip()),
                      source="t")
    assert reply.id == ID and reply.error is None
    report = parse_report(reply.report)
    assert (report.report_data, report.vmpl, report.host_data) == (b"\x07" * 64, 2, bytes(range(32)))
    assert openssl_verifies(reply.report) and reply.cert_table


@pytest.mark.parametrize("line", [b"not json", b'{"id": "0123456789abcdef", "report_data": "00", "vmpl": 0}',
                                  b'{"id": "0123456789abcdef", "report_data": "' + b"00" * 64 + b'", "vmpl": 4}',
                                  b'{"id": "x", "report_data": "' + b"00" * 64 + b'", "vmpl": 0}',
                                  b"[" * 1000, b'{"id": "0123456789abcdef", "extra": 1}'])
def test_service_answers_a_bad_request_with_an_error(psp: psp_service.EmulatedPsp, line: bytes) -> None:
    reply = from_line(PspReportReply, psp_service.answer(psp, line).strip(), source="t")
    assert reply.error and not reply.report and reply.id == psp_service.UNKNOWN_ID


def test_service_skips_an_overlong_line_and_goes_on(psp: psp_service.EmulatedPsp) -> None:
    host, guest = socket.socketpair()
    thread = threading.Thread(target=psp_service.serve, args=(host, psp), daemon=True)
    thread.start()
    guest.sendall(b"x" * (MAX_LINE + 10))
    first = from_line(PspReportReply, read_line(guest), source="t")
    assert first.error and "more than" in first.error
    guest.sendall(b"still the long line\n" + to_line(PspReportRequest(ID, bytes(64), 0)))
    second = from_line(PspReportReply, read_line(guest), source="t")
    assert second.id == ID and second.error is None
    guest.close()
    thread.join(5)
    assert not thread.is_alive()    # the other end closed: the service ends (with the VM)


def test_service_process_serves_a_vm_and_ends_with_it(tmp_path: Path) -> None:
    """The real process: it connects to the socket QEMU makes (here: the test's), answers, and exits at EOF."""
    (tmp_path / "psp.json").write_bytes(material().to_bytes())
    sock = tmp_path / "psp.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(1)
    ref = psp_service.spawn(sock, tmp_path / "psp.json", tmp_path / "psp.log")
    listener.settimeout(60)
    conn, _ = listener.accept()
    conn.sendall(to_line(PspReportRequest(ID, b"\x01" * 64, 0)))
    reply = from_line(PspReportReply, read_line(conn), source="t")
    assert reply.id == ID and parse_report(reply.report).report_data == b"\x01" * 64
    conn.close()
    listener.close()
    for _ in range(200):
        if not ref.alive():
            break
        threading.Event().wait(0.05)
    assert not ref.alive()
    assert "signed a report" in (tmp_path / "psp.log").read_text()


# --- the guest's client --------------------------------------------------------------------------------

def guest_paths(tmp_path: Path, port: Path) -> g.GuestPaths:
    return g.GuestPaths(configfs_tsm=tmp_path / "n1", sev_guest=tmp_path / "n2", sev_sysfs=tmp_path / "n3",
                        msr=tmp_path / "n4", kmsg=tmp_path / "n5", psp_port=port)


def test_client_skips_a_stale_reply(tmp_path: Path, psp: psp_service.EmulatedPsp) -> None:
    def behave(conn: socket.socket) -> None:
        line = read_line(conn)
        conn.sendall(to_line(PspReportReply("f" * 16, error="an old request's reply")))
        conn.sendall(psp_service.answer(psp, line))
        read_line(conn)

    with peer(tmp_path, behave) as port:
        result = g.EmulatedPspPort(port, timeout=10).get(b"\x05" * 64, 0)
        assert parse_report(result.report).report_data == b"\x05" * 64


@pytest.mark.parametrize(("reply", "message"), [
    (lambda line: b"", "closed the port"),
    (lambda line: None, "did not answer within"),
    (lambda line: to_line(PspReportReply(from_line(PspReportRequest, line, source="t").id, report=b"short")),
     "1184|-byte report"),
    (lambda line: to_line(PspReportReply(from_line(PspReportRequest, line, source="t").id, error="no such VMPL")),
     "refused the request: no such VMPL"),
    (lambda line: b"{" * 100 + b"\n", "emulated PSP"),
    (lambda line: b"x" * (MAX_LINE + 2), "more than"),
])
def test_client_fails_clearly_on_a_bad_service(tmp_path: Path, reply: Callable[[bytes], bytes | None],
                                               message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(g.EmulatedPspPort, "TIMEOUT", 1.0)
    done = threading.Event()

    def behave(conn: socket.socket) -> None:
        answer = reply(read_line(conn))
        if answer == b"":
            return          # the service goes away
        if answer is not None:
            conn.sendall(answer)
        done.wait(5)        # stays connected (silent when answer is None)

    with peer(tmp_path, behave) as port:
        with pytest.raises(AttestationError, match=message):
            g.get_extended_report(bytes(64), paths=guest_paths(tmp_path, port))
        done.set()


def test_the_port_is_found_by_name(tmp_path: Path) -> None:
    ports = tmp_path / "sys" / "class" / "virtio-ports"
    for entry, name in (("vport0p1", "org.parma.agent.0"), ("vport0p2", PORT_NAME)):
        (ports / entry).mkdir(parents=True)
        (ports / entry / "name").write_text(name + "\n")
    p = g.GuestPaths(virtio_ports=ports, dev=tmp_path / "dev")
    assert g.find_psp_port(p) == tmp_path / "dev" / "vport0p2"
    assert g.find_psp_port(g.GuestPaths(virtio_ports=tmp_path / "none")) is None
    assert g.find_psp_port(g.GuestPaths(psp_port=tmp_path / "absent")) is None


def test_no_port_and_no_tee_means_no_attestation(tmp_path: Path) -> None:
    p = guest_paths(tmp_path, tmp_path / "absent")
    with pytest.raises(AttestationError, match="no attestation interface"):
        g.get_report(bytes(64), paths=p)


# --- keyless evidence (the launch self-check's) ----------------------------------------------------------

def test_keyless_evidence_binds_the_nonce_alone_and_makes_no_key(tmp_path: Path) -> None:
    p = paths(tmp_path, psp=material())
    g.runtime_key.cache_clear()
    nonce = bytes(range(32))
    evidence = g.evidence_for(nonce, paths=p, bind_runtime_key=False)
    assert g.runtime_key.cache_info().currsize == 0         # no key, so no OpenSSL on the launch's path
    assert evidence.runtime_public_key == b""
    assert parse_report(evidence.report).report_data == hashlib.sha512(nonce).digest()
    payload = evidence.to_payload()
    assert ReportEvidence.from_payload(payload, keyless=True).binding_holds()
    # Every other reader, the key broker's included, wants a key to encrypt to.
    with pytest.raises(InputError, match="not a P-384 SubjectPublicKeyInfo"):
        ReportEvidence.from_payload(payload)
