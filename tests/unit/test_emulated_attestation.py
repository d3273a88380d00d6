"""Emulated attestation end to end on the host: the emulated CA and launch material, the guest-side
emulated PSP (run in-process, reading the material through a fake fw_cfg path), then the verifier."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest
from clirun import run_cli

from sandbox.attest.amd_certs import has_amd_signature_profile, to_der, vek_extensions
from sandbox.attest.emulated_ca import EMULATED_ORG, EmulatedCa, ensure_emulated_ca, load_emulated_ca
from sandbox.attest.evidence import (
    certificates_from_table,
    evidence_document,
    read_report_file,
    write_certs_dir,
)
from sandbox.attest.psp import write_launch_material
from sandbox.attest.verify import Expectations, verify_report
from sandbox.guest import snp_report
from sandbox.guest.keys import RuntimeKey
from sandbox.shared.snp.binding import report_data_for
from sandbox.shared.snp.report import parse_report
from tests.psp_serve import psp_socket_for

POLICY = b'{"version": "test", "containers": []}\n'
MEASUREMENT = bytes.fromhex("6d287813eb5222d770f75005c664e34c204f385ce832cc2ce7d0d6f354454362"
                            "f390ef83a92046c042e706363b4b08fa")


@pytest.fixture
def ca(emulated_ca_base: Path, monkeypatch: pytest.MonkeyPatch) -> EmulatedCa:
    monkeypatch.setenv("PARMA_SANDBOX_CACHE", str(emulated_ca_base))
    loaded = load_emulated_ca()
    assert loaded is not None
    return loaded


@pytest.fixture
def guest(ca: EmulatedCa, tmp_path: Path) -> snp_report.GuestPaths:
    """A guest launched in emulation mode: the emulated PSP serves this material."""
    fw_cfg = tmp_path / "fw_cfg" / "opt" / "parma" / "psp" / "raw"
    write_launch_material(fw_cfg, policy_bytes=POLICY, measurement=MEASUREMENT, ca=ca)
    assert fw_cfg.stat().st_mode & 0o777 == 0o600
    return snp_report.GuestPaths(configfs_tsm=tmp_path / "none1", sev_guest=tmp_path / "none2",
                                 sev_sysfs=tmp_path / "none3", msr=tmp_path / "none4",
                                 psp_port=psp_socket_for(fw_cfg))



def test_emulated_ca_has_amds_profile_and_says_emulated(ca: EmulatedCa) -> None:
    for cert in (ca.ark, ca.ask, ca.vcek):
        assert has_amd_signature_profile(cert)
        assert EMULATED_ORG in cert.subject.rfc4514_string() and "EMULATED" in cert.subject.rfc4514_string()
    ext = vek_extensions(ca.vcek)
    assert ext.product_name == "Genoa" and ext.hwid == ca.chip_id and ext.hwid_encoding == "raw"
    assert {k: ext.spls[k] for k in ("bl", "tee", "snp", "ucode")} == ca.tcb.spls()
    assert (ca.directory / "vcek.key").stat().st_mode & 0o777 == 0o600
    assert ensure_emulated_ca(ca.directory.parent.parent).ark_fingerprint == ca.ark_fingerprint


def _make_ca(base: str, queue: multiprocessing.Queue) -> None:
    queue.put(ensure_emulated_ca(Path(base)).ark_fingerprint)


def test_concurrent_first_use_creates_one_ca(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_make_ca, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert queue.get(timeout=5) == queue.get(timeout=5)
    assert sorted(p.name for p in (tmp_path / "attest").iterdir()) == ["emulated-ca-v1", "emulated-ca-v1.lock"]


def test_guest_report_verifies_only_with_allow_emulated(ca: EmulatedCa, guest: snp_report.GuestPaths) -> None:
    runtime_key = RuntimeKey.generate()
    nonce = bytes(range(32))
    result = snp_report.get_extended_report(report_data_for(nonce, runtime_key.public_der), paths=guest)
    assert result.backend == snp_report.ReportBackend.EMULATED
    report = parse_report(result.report)
    assert report.host_data == hashlib.sha256(POLICY).digest() and report.measurement == MEASUREMENT
    assert report.chip_id == ca.chip_id and report.version == 5
    certs = certificates_from_table(result.cert_table)
    expect = dict(host_data=hashlib.sha256(POLICY).digest(), measurement=MEASUREMENT,
                  report_data=report_data_for(nonce, runtime_key.public_der))
    refused = verify_report(result.report, certs, Expectations(**expect), emulated_ca=ca)
    assert [c.name for c in refused.failed()] == ["ark.trusted"] and refused.emulated
    assert "--allow-emulated" in refused.failed()[0].detail
    accepted = verify_report(result.report, certs, Expectations(allow_emulated=True, **expect), emulated_ca=ca)
    assert accepted.verified and accepted.emulated
    other_nonce = dict(expect, report_data=report_data_for(b"\xee" * 32, runtime_key.public_der))
    wrong = verify_report(result.report, certs, Expectations(allow_emulated=True, **other_nonce), emulated_ca=ca)
    assert [c.name for c in wrong.failed()] == ["report.report_data"]


def test_emulated_evidence_through_the_cli(ca: EmulatedCa, guest: snp_report.GuestPaths, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    key = RuntimeKey.generate()
    nonce = "00112233445566778899aabbccddeeff"
    result = snp_report.get_extended_report(report_data_for(bytes.fromhex(nonce), key.public_der),
                                            paths=guest)
    (tmp_path / "report.bin").write_bytes(result.report)
    (tmp_path / "runtime.der").write_bytes(key.public_der)
    write_certs_dir(tmp_path / "certs", certificates_from_table(result.cert_table))
    policy = tmp_path / "policy.json"
    policy.write_bytes(POLICY)
    base = ["attest", "verify", str(tmp_path / "report.bin"), "--certs", str(tmp_path / "certs"),
            "--policy", str(policy), "--measurement", MEASUREMENT.hex(),
            "--runtime-key", str(tmp_path / "runtime.der")]
    code, out, err = run_cli([*base, "--nonce", nonce], capsys)
    assert code == 1 and "FAIL    ark.trusted" in out and "--allow-emulated" in err
    code, out, err = run_cli([*base, "--nonce", nonce, "--allow-emulated", "--format", "json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["verified"] and doc["emulated"] and doc["host_data"] == hashlib.sha256(POLICY).hexdigest()
    assert "EMULATED" in err
    code, out, err = run_cli([*base, "--nonce", "ff" * 16, "--allow-emulated"], capsys)
    assert code == 1 and "report.report_data" in err
    # Another installation's emulated CA is never trusted, even with --allow-emulated.
    other = ensure_emulated_ca(tmp_path / "other-install")
    assert to_der(other.ark) != to_der(ca.ark)
    monkeypatch.setenv("PARMA_SANDBOX_CACHE", str(tmp_path / "other-install"))
    code, out, err = run_cli([*base, "--nonce", nonce, "--allow-emulated"], capsys)
    assert code == 1 and "is not a pinned AMD ARK" in out


def test_evidence_document_from_the_agent_verifies(ca: EmulatedCa, guest: snp_report.GuestPaths, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """What `attest report` writes: the agent's evidence (report, certificate table, runtime key, nonce)."""
    nonce = "a1" * 32
    evidence = snp_report.evidence_for(bytes.fromhex(nonce), key=RuntimeKey.generate(), paths=guest)
    doc = tmp_path / "ev.json"
    doc.write_bytes(evidence_document(evidence, "hello"))
    assert read_report_file(doc).sandbox == "hello"
    code, out, _ = run_cli(["attest", "display", str(doc), "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["host_data"] == hashlib.sha256(POLICY).hexdigest()
    base = ["attest", "verify", str(doc), "--measurement", MEASUREMENT.hex(), "--host-data",
            hashlib.sha256(POLICY).hexdigest()]
    code, out, err = run_cli([*base, "--nonce", nonce], capsys)
    assert code == 1 and "ark.trusted" in err and "--allow-emulated" in err
    code, out, err = run_cli([*base, "--nonce", nonce, "--allow-emulated"], capsys)
    assert code == 0 and "verified: EMULATED evidence" in out, err
    code, out, err = run_cli([*base, "--nonce", "b2" * 32, "--allow-emulated"], capsys)
    assert code == 1 and "verification failed: report.report_data" in err
    code, out, err = run_cli([*base, "--allow-emulated"], capsys)
    assert code == 0 and "nonce recorded in the evidence" in err
    doc.write_text('{"format": "something else"}')
    assert run_cli(["attest", "verify", str(doc)], capsys)[0] == 2
