"""The broker's release decision: never on HOST_DATA alone (issue: trust chain, item 6).

Emulated evidence comes from an emulated guest (tests/kbsenv.py); hardware evidence from the public
SEV-SNP vectors (real Milan reports and VCEK chains; skipped when absent)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kbsenv import MEASUREMENT, POLICY_HASH, emulated_guest, shared_ca
from snpvectors import cert_files, expected_sets, report_bytes

from sandbox.attest.amd_certs import load_certificate_file, role_of, to_der
from sandbox.guest import snp_report
from sandbox.guest.keys import RuntimeKey
from sandbox.kbs.release import evaluate
from sandbox.kbs.store import ReleasePolicy
from sandbox.shared.snp.cert_table import CertKind, build_cert_table, entry
from sandbox.shared.snp.evidence import ReportEvidence

OTHER_UVM = hashlib.sha384(b"the host's own kernel and rootfs").digest()


def _emulated_evidence(tmp_path: Path, measurement: bytes = MEASUREMENT) -> ReportEvidence:
    guest = emulated_guest(tmp_path / "guest", measurement=measurement)
    return snp_report.evidence_for(os.urandom(32), key=RuntimeKey.generate(), paths=guest)


def _decide(policy: ReleasePolicy, evidence: ReportEvidence) -> tuple[bool, str, tuple[str, ...]]:
    decision = evaluate(policy, evidence, emulated_ca=shared_ca())
    return decision.released, decision.reason, decision.failed


def test_a_measurement_bound_secret_goes_to_its_uvm_only(tmp_path: Path) -> None:
    policy = ReleasePolicy((POLICY_HASH,), (MEASUREMENT.hex(),), allow_emulated=True)
    released, reason, _ = _decide(policy, _emulated_evidence(tmp_path / "a"))
    assert released and "HOST_DATA and MEASUREMENT allowed" in reason
    # Same HOST_DATA, different UVM: the host booted its own kernel and rootfs with the right policy hash.
    released, reason, failed = _decide(policy, _emulated_evidence(tmp_path / "b", OTHER_UVM))
    assert not released and failed == ("release.measurement",)
    assert f"MEASUREMENT {OTHER_UVM.hex()} is not an allowed launch measurement" in reason


def test_host_data_alone_releases_nothing(tmp_path: Path) -> None:
    """What older versions stored without --measurement: refused with the way out, for any UVM."""
    legacy = ReleasePolicy((POLICY_HASH,), allow_emulated=True)
    assert legacy.uvm_problem() is not None
    for evidence in (_emulated_evidence(tmp_path / "a"), _emulated_evidence(tmp_path / "b", OTHER_UVM)):
        released, reason, failed = _decide(legacy, evidence)
        assert not released and failed == ("release.measurement",)
        assert "bound to HOST_DATA alone" in reason and "secret put NAME --replace" in reason
        assert "--any-uvm" in reason


def test_any_uvm_is_what_the_owner_said(tmp_path: Path) -> None:
    policy = ReleasePolicy((POLICY_HASH,), allow_emulated=True, any_uvm=True)
    released, reason, _ = _decide(policy, _emulated_evidence(tmp_path, OTHER_UVM))
    assert released and "any UVM (--any-uvm)" in reason


def _hardware_evidence() -> ReportEvidence:
    s = expected_sets()[0]
    vek, chain = cert_files(s)
    kinds = {"VCEK": CertKind.VCEK, "VLEK": CertKind.VLEK, "ASK": CertKind.ASK, "ASVK": CertKind.ASK,
             "ARK": CertKind.ARK}
    certs = load_certificate_file(vek) + load_certificate_file(chain)
    table = build_cert_table([entry(kinds[role_of(c).name], to_der(c)) for c in certs])
    return ReportEvidence(report_bytes(s), table, RuntimeKey.generate().public_der, os.urandom(32), "sev-guest")


def test_hardware_evidence_needs_a_minimum_tcb() -> None:
    evidence = _hardware_evidence()
    measurement = evidence.report[0x90:0xC0].hex()
    without = evaluate(ReleasePolicy((POLICY_HASH,), (measurement,)), evidence, emulated_ca=None)
    assert not without.released and "release.min_tcb" in without.failed
    assert "release.measurement" not in without.failed  # the UVM is the allowed one; the TCB is what is missing
    with_tcb = evaluate(ReleasePolicy((POLICY_HASH,), (measurement,), min_tcb="0"), evidence, emulated_ca=None)
    assert "release.min_tcb" not in with_tcb.failed and not with_tcb.facts["emulated"]
