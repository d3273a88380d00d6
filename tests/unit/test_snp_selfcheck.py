"""The post-launch self-check and the ID block on the emulated path, with the real guest report code.

`measured.prepare` predicts the launch, `measured.write_emulated_psp` is the emulated PSP's launch
(with its SNP_LAUNCH_FINISH checks of an ID block), the guest's own report code (sandbox.guest,
in-process, reading the material where fw_cfg puts it) answers get_report, and `selfcheck.run`
verifies the answer, here also with deliberately wrong expectations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from clirun import run_cli
from snpvectors import snp_dir
from test_emulated_attestation import ca  # noqa: F401 - a fixture: this installation's emulated CA

from sandbox.attest.evidence import evidence_document
from sandbox.attest.id_keys import key_digest, load_private_key
from sandbox.guest import snp_report
from sandbox.guest.keys import RuntimeKey
from sandbox.hostcheck import Tee
from sandbox.launch import measured, selfcheck
from sandbox.shared.errors import CheckFailed, InputError
from sandbox.shared.messages import GetReportRequest
from sandbox.shared.snp.report import parse_report
from tests.psp_serve import psp_socket_for

pytestmark = pytest.mark.usefixtures("ca")
KEYS = Path(__file__).parents[1] / "data" / "snp-id"
POLICY = b'{"version": "selfcheck test"}\n'


@pytest.fixture
def uvm(tmp_path: Path) -> SimpleNamespace:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"not really a kernel" * 100)
    return SimpleNamespace(kernel=kernel, cmdline="console=ttyS0", initrd=None,
                           firmware=snp_dir() / "sev-snp-measure/fixtures/ovmf_AmdSev_suffix.bin")


class GuestAgent:
    """Answers get_report exactly as the agent does (sandbox.guest.snp_report.evidence_for)."""

    def __init__(self, paths: snp_report.GuestPaths) -> None:
        self.paths = paths
        self.key = RuntimeKey.generate()

    def call(self, request: GetReportRequest, timeout: float = 0) -> dict[str, Any]:
        assert isinstance(request, GetReportRequest)
        return snp_report.evidence_for(request.nonce, key=self.key, paths=self.paths,
                                       bind_runtime_key=request.runtime_key).to_payload()


def launch(identity: measured.LaunchIdentity, tmp_path: Path) -> GuestAgent:
    fw_cfg = tmp_path / "fw_cfg" / "psp"
    measured.write_emulated_psp(identity, fw_cfg)
    return GuestAgent(snp_report.GuestPaths(configfs_tsm=tmp_path / "n1", sev_guest=tmp_path / "n2",
                                            sev_sysfs=tmp_path / "n3", msr=tmp_path / "n4",
                                            psp_port=psp_socket_for(fw_cfg)))


def test_self_check_passes_and_records_the_evidence(uvm: SimpleNamespace, tmp_path: Path) -> None:
    identity = measured.prepare(Tee.emulated, uvm, POLICY, 1)
    check = selfcheck.run(launch(identity, tmp_path), identity, record_to=tmp_path / "selfcheck.json")  # type: ignore[arg-type]
    assert check.result.verified and check.result.emulated
    assert check.result.report.measurement == identity.measurement
    assert check.result.report.host_data == hashlib.sha256(POLICY).digest()
    doc = json.loads((tmp_path / "selfcheck.json").read_text())
    assert doc["summary"]["verified"] and doc["evidence"]["backend"] == "emulated"
    assert {c["name"] for c in doc["result"]["checks"]} >= {"report.measurement", "report.host_data",
                                                          "report.report_data", "ark.trusted"}


def test_a_wrong_expectation_stops_the_launch(uvm: SimpleNamespace, tmp_path: Path) -> None:
    wrong = bytes.fromhex("ab" * 48)
    identity = measured.prepare(Tee.emulated, uvm, POLICY, 1, measured.IdentityOptions(expect_measurement=wrong))
    assert identity.expected_measurement == wrong != identity.measurement
    with pytest.raises(CheckFailed, match="report.measurement") as e:
        selfcheck.run(launch(identity, tmp_path), identity, record_to=tmp_path / "sc.json")  # type: ignore[arg-type]
    assert f"!= expected {wrong.hex()}" in e.value.message and "not the one predicted" in (e.value.hint or "")
    assert not json.loads((tmp_path / "sc.json").read_text())["summary"]["verified"]
    # HOST_DATA of another policy is caught the same way.
    other = dataclasses.replace(measured.prepare(Tee.emulated, uvm, POLICY, 1),
                                host_data=hashlib.sha256(b"another policy").digest())
    agent = launch(measured.prepare(Tee.emulated, uvm, POLICY, 1), tmp_path)
    with pytest.raises(CheckFailed, match="report.host_data"):
        selfcheck.run(agent, other)  # type: ignore[arg-type]


def test_emulation_never_accepts_hardware_expectations(uvm: SimpleNamespace, tmp_path: Path) -> None:
    """An SEV-SNP launch must not be satisfied by emulated evidence."""
    identity = measured.prepare(Tee.emulated, uvm, POLICY, 1)
    agent = launch(identity, tmp_path)
    snp_identity = dataclasses.replace(identity, tee=Tee.sev_snp)
    with pytest.raises(CheckFailed, match="EMULATED evidence"):
        selfcheck.run(agent, snp_identity)  # type: ignore[arg-type]


def test_id_block_reaches_the_report_and_attest_verify(uvm: SimpleNamespace, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    opts = measured.IdentityOptions(id_key=KEYS / "id_key.pem", author_key=KEYS / "author_key.pem",
                                    family_id=b"\x11" * 16, image_id=b"\x22" * 16, guest_svn=9)
    identity = measured.prepare(Tee.emulated, uvm, POLICY, 1, opts)
    agent = launch(identity, tmp_path)
    check = selfcheck.run(agent, identity)  # type: ignore[arg-type]
    report = check.result.report
    id_digest, author_digest = key_digest(load_private_key(KEYS / "id_key.pem")), \
        key_digest(load_private_key(KEYS / "author_key.pem"))
    assert (report.id_key_digest, report.author_key_digest) == (id_digest, author_digest)
    assert report.key_info.author_key_en and report.guest_svn == 9 and report.family_id == b"\x11" * 16
    assert {c.name: c.status.value for c in check.result.checks}["report.author_key_digest"] == "pass"

    nonce = "5a" * 32
    evidence = snp_report.evidence_for(bytes.fromhex(nonce), key=agent.key, paths=agent.paths)
    doc = tmp_path / "ev.json"
    doc.write_bytes(evidence_document(evidence, "t"))
    base = ["attest", "verify", str(doc), "--nonce", nonce, "--allow-emulated"]
    code, out, err = run_cli([*base, "--id-key-digest", id_digest.hex(), "--author-key-digest",
                              str(KEYS / "author_key.pem"), "--format", "json"], capsys)
    assert code == 0, err
    assert json.loads(out)["id_key_digest"] == id_digest.hex()
    code, out, err = run_cli([*base, "--id-key-digest", author_digest.hex()], capsys)
    assert code == 1 and "report.id_key_digest" in err
    # A launch without an ID block: the digest is zero and the check says why.
    plain = measured.prepare(Tee.emulated, uvm, POLICY, 1)
    plain_agent = launch(plain, tmp_path / "plain")
    ev2 = snp_report.evidence_for(bytes.fromhex(nonce), key=plain_agent.key, paths=plain_agent.paths)
    doc.write_bytes(evidence_document(ev2, "t"))
    code, out, err = run_cli([*base, "--id-key-digest", id_digest.hex()], capsys)
    assert code == 1 and "launched without an ID block" in out
    assert not parse_report(ev2.report).key_info.author_key_en


def test_the_emulated_psp_refuses_an_id_block_for_another_launch(uvm: SimpleNamespace,
                                                                 tmp_path: Path) -> None:
    identity = measured.prepare(Tee.emulated, uvm, POLICY, 1, measured.IdentityOptions(id_key=KEYS / "id_key.pem"))
    stale = dataclasses.replace(identity, measurement=bytes(48))
    with pytest.raises(InputError, match="LD .* is not the launch digest"):
        measured.write_emulated_psp(stale, tmp_path / "psp")
    assert not (tmp_path / "psp").exists()


def test_id_block_file_from_measure(uvm: SimpleNamespace, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`measure --id-key ... --id-out FILE` on one machine, `up --id-block FILE` on the lab host."""
    out_file = tmp_path / "id.json"
    code, out, err = run_cli(["measure", "--mode", "snp", "--vcpus", "2", "--vcpu-type", "EPYC-v4", "--ovmf",
                              str(uvm.firmware), "--kernel", str(uvm.kernel), "--append", uvm.cmdline,
                              "--id-key", str(KEYS / "id_key.pem"), "--id-out", str(out_file)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].startswith("id-block=") and ",id-auth=" in lines[1] and lines[2].startswith("id-key-digest: ")
    assert "--id-key-digest" in err
    good = measured.prepare(Tee.emulated, uvm, POLICY, 2, measured.IdentityOptions(id_block=out_file))
    assert good.id_material is not None and good.id_material.block.launch_digest == good.measurement
    assert good.id_material.block.launch_digest.hex() == lines[0]
    with pytest.raises(InputError, match="not the launch digest") as e:
        measured.prepare(Tee.emulated, uvm, POLICY, 1, measured.IdentityOptions(id_block=out_file))   # 1 vCPU
    assert "re-create it" in (e.value.hint or "")
    out_file.write_text("{}")
    with pytest.raises(InputError, match="not an ID block file"):
        measured.prepare(Tee.emulated, uvm, POLICY, 2, measured.IdentityOptions(id_block=out_file))


def test_measure_id_options_need_snp(capsys: pytest.CaptureFixture[str], uvm: SimpleNamespace) -> None:
    base = ["measure", "--vcpus", "1", "--vcpu-type", "EPYC-v4", "--ovmf", str(uvm.firmware)]
    assert run_cli([*base, "--mode", "seves", "--id-key", str(KEYS / "id_key.pem")], capsys)[0] == 2
    assert run_cli([*base, "--mode", "snp", "--author-key", str(KEYS / "author_key.pem")], capsys)[0] == 2
    code, out, _ = run_cli([*base, "--mode", "snp", "--id-key", str(KEYS / "id_key.pem"), "--family-id", "0102",
                            "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["id"]["family_id"] == "0102" + "00" * 14


def test_debug_files_are_kept_only_under_debug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.launch import diagnostics
    from sandbox.launch.diagnostics import keep_diagnostics
    from sandbox.log import DEBUG
    from sandbox.state import SandboxRecord

    # The host probe is the tools tier's business; here only the bundle's layout matters.
    monkeypatch.setattr(diagnostics, "check_host", lambda: SimpleNamespace(to_json=lambda: {"tee": "emulated"}))
    monkeypatch.setattr(diagnostics, "with_libvirt", lambda report: report)

    state = tmp_path / "state"
    state.mkdir()
    for name in ("qemu.sh", "console.log", "selfcheck.json", "psp.json"):
        (state / name).write_text(name)
    record = SandboxRecord(name="dbg", launch={"predicted_measurement": "00" * 48})
    monkeypatch.setenv("PARMA_SANDBOX_RUNTIME", str(tmp_path / "run"))
    token = DEBUG.set(False)
    try:
        assert keep_diagnostics(state, record) is None
        DEBUG.set(True)
        kept = keep_diagnostics(state, record, error=CheckFailed("launch self-check failed"))
    finally:
        DEBUG.reset(token)
    assert kept is not None and kept.parent == tmp_path / "run" / ".debug" and kept.name.startswith("dbg-")
    names = {p.name for p in kept.iterdir()}
    assert {"qemu.sh", "console.log", "selfcheck.json", "launch.json", "record.json", "check.json",
            "error.txt"} <= names and "psp.json" not in names
    assert "launch self-check failed" in (kept / "error.txt").read_text()


def test_a_launch_failing_before_its_state_dir_keeps_debug_files(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`up --debug` keeps the error, the host check and the steps reached even when no VM was prepared."""
    from sandbox.group import validate_group
    from sandbox.launch import diagnostics, pipeline
    from sandbox.log import DEBUG
    from sandbox.shared.errors import InputError

    monkeypatch.setattr(diagnostics, "check_host", lambda: SimpleNamespace(to_json=lambda: {"tee": "emulated"}))
    monkeypatch.setattr(diagnostics, "with_libvirt", lambda report: report)

    def no_images(spec: object) -> None:
        raise InputError("image busybox:none not found in the local store")

    monkeypatch.setattr(pipeline, "resolve_group_images", no_images)
    monkeypatch.setenv("PARMA_SANDBOX_RUNTIME", str(tmp_path / "run"))
    spec = validate_group({"name": "early", "containers": [{"name": "c", "image": "busybox:none"}]}, base_dir=tmp_path)
    token = DEBUG.set(True)
    try:
        with pytest.raises(InputError):
            pipeline.up(spec, pipeline.UpOptions())
    finally:
        DEBUG.reset(token)
    (kept,) = (tmp_path / "run" / ".debug").iterdir()
    assert kept.name.startswith("early-")
    assert "busybox:none not found" in (kept / "error.txt").read_text()
    assert "probed" in json.loads((kept / "reached.json").read_text())
    assert json.loads((kept / "check.json").read_text()) == {"tee": "emulated"}
