"""`attest report NAME` against the real agent service (in-process, on the sandbox's agent socket)
whose guest side signs with the emulated PSP; then `attest verify` on what it wrote."""

from __future__ import annotations

import functools
import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from clirun import run_cli

from sandbox.attest.emulated_ca import ensure_emulated_ca
from sandbox.attest.psp import write_launch_material
from sandbox.guest import snp_report
from sandbox.guest.server import serve_fd
from sandbox.guest.service import AgentService
from sandbox.launch.pipeline import agent_sockets
from sandbox.state import SandboxRecord, SandboxStatus, StateStore
from tests.psp_serve import psp_socket_for

POLICY = b'{"policy": "for attest report"}\n'
MEASUREMENT = bytes(range(48))


@pytest.fixture
def running_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emulated_ca_base: Path) -> Iterator[str]:
    monkeypatch.setenv("PARMA_SANDBOX_RUNTIME", str(tmp_path / "run"))
    monkeypatch.setenv("PARMA_SANDBOX_CACHE", str(emulated_ca_base))
    guest = snp_report.GuestPaths(configfs_tsm=tmp_path / "no", sev_guest=tmp_path / "no", sev_sysfs=tmp_path / "no",
                                  msr=tmp_path / "no", kmsg=tmp_path / "no",
                                  psp_port=psp_socket_for(tmp_path / "fw_cfg"))
    write_launch_material(tmp_path / "fw_cfg", policy_bytes=POLICY, measurement=MEASUREMENT, ca=ensure_emulated_ca())
    monkeypatch.setattr(snp_report, "evidence_for", functools.partial(snp_report.evidence_for, paths=guest))
    store = StateStore()
    store.save(SandboxRecord(name="demo", status=SandboxStatus.running, vm={"backend": "test"}))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(agent_sockets(store.dir("demo"))[0]))
    listener.listen(4)
    service = AgentService()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                serve_fd(conn.fileno(), service.handle, reconnecting=False)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield "demo"
    listener.close()


def test_report_then_verify(running_sandbox: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nonce = "5a" * 32
    out = tmp_path / "evidence.json"
    code, stdout, err = run_cli(["attest", "report", running_sandbox, "--nonce", nonce, "-o", str(out),
                                 "--format", "json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["backend"] == "emulated" and summary["host_data"] == hashlib.sha256(POLICY).hexdigest()
    assert summary["measurement"] == MEASUREMENT.hex() and summary["certificates"] == 3
    assert f"--nonce {nonce} --allow-emulated" in err
    policy = tmp_path / "policy.json"
    policy.write_bytes(POLICY)
    verify = ["attest", "verify", str(out), "--policy", str(policy), "--measurement", MEASUREMENT.hex()]
    code, stdout, err = run_cli([*verify, "--nonce", nonce, "--allow-emulated"], capsys)
    assert code == 0 and "verified: EMULATED evidence" in stdout, err
    code, stdout, err = run_cli([*verify, "--nonce", nonce], capsys)
    assert code == 1 and "--allow-emulated" in err
    code, stdout, err = run_cli([*verify, "--nonce", "77" * 32, "--allow-emulated"], capsys)
    assert code == 1 and "report.report_data" in err
    # Without -o the evidence document goes to stdout; a fresh random nonce each time.
    code, stdout, err = run_cli(["attest", "report", running_sandbox], capsys)
    assert code == 0 and json.loads(stdout)["format"] == "parma-sandbox/evidence/v1"


def test_report_input_errors(running_sandbox: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["attest", "report", running_sandbox, "--nonce", "abcd"], capsys)
    assert code == 2 and "16..1024 bytes" in err  # the agent's limits (sandbox/shared/snp/binding.py)
    code, _, err = run_cli(["attest", "report", running_sandbox, "--nonce", "00" * 1025], capsys)
    assert code == 2 and "got 1025" in err
    code, _, err = run_cli(["attest", "report", "nosuch", "--nonce", "00" * 16], capsys)
    assert code == 2 and "no sandbox named 'nosuch'" in err
