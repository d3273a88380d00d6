"""The post-launch self-check: right after the agent answers, `up` verifies a fresh report of the guest.

It asks the agent for a report bound to a fresh 32-byte nonce and verifies it the way `attest
verify` does (sandbox/attest/verify.py): the certificate chain to a pinned AMD root (on SEV-SNP) or
to this installation's emulated CA (in emulation, and only then), the signature, REPORT_DATA =
SHA-512(nonce) (keyless evidence: the check needs no runtime key, so the guest makes none), MEASUREMENT = the expected measurement (the prediction, or
the user's --expect-measurement), HOST_DATA = SHA-256 of the policy, VMPL 0, no debug policy, and
the ID and author key digests when the launch carried an ID block. Any failure is a CheckFailed
naming the check; `up` then stops the VM and removes the sandbox, so nothing runs on a UVM that is
not the one predicted.

This is a check for the person running `up` (it trusts this host's view of the guest); relying
parties verify evidence themselves (`attest report` / `attest verify`, the key broker).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.attest.emulated_ca import load_emulated_ca
from sandbox.attest.evidence import certificates_from_table, complete_from_kds, product_hint
from sandbox.attest.kds import KdsClient
from sandbox.attest.verify import Expectations, VerificationResult, verify_report
from sandbox.fsutil import atomic_write
from sandbox.hostcheck import Tee
from sandbox.launch.agent_client import AgentClient
from sandbox.launch.measured import LaunchIdentity
from sandbox.shared.errors import CheckFailed, GuestError, InputError
from sandbox.shared.messages import GetReportRequest
from sandbox.shared.snp.binding import report_data_for
from sandbox.shared.snp.evidence import ReportEvidence
from sandbox.shared.snp.report import ReportFormatError, parse_report

NONCE_SIZE = 32
EMULATED_BACKEND = "emulated"


@dataclass(frozen=True)
class SelfCheck:
    evidence: ReportEvidence
    result: VerificationResult

    def summary(self) -> dict[str, Any]:
        r = self.result
        return {"verified": r.verified, "emulated": r.emulated, "backend": self.evidence.backend,
                "nonce": self.evidence.nonce.hex(), "measurement": r.report.measurement.hex(),
                "host_data": r.report.host_data.hex(), "signer": r.signer.value if r.signer else None,
                "product": r.product.value if r.product else None, "failed": [c.name for c in r.failed()]}


def expectations(identity: LaunchIdentity, nonce: bytes, runtime_key: bytes) -> Expectations:
    material = identity.id_material
    return Expectations(
        measurement=identity.expected_measurement, host_data=identity.host_data,
        report_data=report_data_for(nonce, runtime_key), vmpl=0,
        allow_emulated=identity.tee == Tee.emulated,
        id_key_digest=material.id_key_digest if material else None,
        author_key_digest=material.author_key_digest if material else None)


def _certificates(evidence: ReportEvidence, tee: Tee, kds: KdsClient | None) -> list[Any]:
    certs = certificates_from_table(evidence.cert_table, source="the guest's certificate table") \
        if evidence.cert_table else []
    if tee == Tee.sev_snp:
        # Hardware: the VCEK from the host's certificate table, else the KDS cache, else AMD's KDS.
        report = parse_report(evidence.report)
        certs = complete_from_kds(report, certs, product_hint(report, certs, None), kds or KdsClient(), fetch=True)
    return certs


def verify_evidence(evidence: ReportEvidence, identity: LaunchIdentity, *,
                    kds: KdsClient | None = None) -> VerificationResult:
    """Verify a fresh report against the launch's identity (no exception for failed checks)."""
    if identity.tee == Tee.sev_snp and evidence.backend == EMULATED_BACKEND:
        raise CheckFailed("the guest answered with EMULATED evidence on an SEV-SNP launch")
    try:
        certs = _certificates(evidence, identity.tee, kds)
        return verify_report(evidence.report, certs, expectations(identity, evidence.nonce,
                                                                  evidence.runtime_public_key),
                             emulated_ca=load_emulated_ca() if identity.tee == Tee.emulated else None)
    except (InputError, ReportFormatError) as e:
        raise CheckFailed(f"launch self-check: the guest's evidence cannot be verified: {e.message}",
                          hint=e.hint) from e


def run(client: AgentClient, identity: LaunchIdentity, *, kds: KdsClient | None = None,
        record_to: Path | None = None) -> SelfCheck:
    """Ask for a fresh report and verify it; raise CheckFailed with the reason on any mismatch.

    `record_to` receives the evidence and every check (JSON) before the verdict, pass or fail.
    """
    nonce = secrets.token_bytes(NONCE_SIZE)
    # Keyless: the check is about which UVM answers, and the guest need not make its runtime key (nor load
    # OpenSSL) on the launch's critical path for it.
    payload = client.call(GetReportRequest(nonce, runtime_key=False), timeout=120)
    evidence = ReportEvidence.from_payload(payload, source="the agent's get_report answer", keyless=True)
    if record_to is not None:
        atomic_write(record_to, json.dumps({"evidence": evidence.to_payload()}, indent=2).encode() + b"\n", 0o600)
    if evidence.nonce != nonce:
        raise GuestError(f"launch self-check: the agent answered for another nonce ({evidence.nonce.hex()})")
    check = SelfCheck(evidence, verify_evidence(evidence, identity, kds=kds))
    if record_to is not None:
        doc = {"evidence": evidence.to_payload(), "summary": check.summary(), "result": check.result.to_dict()}
        atomic_write(record_to, json.dumps(doc, indent=2).encode() + b"\n", 0o600)
    if not check.result.verified:
        failed = check.result.failed()
        reasons = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        hint = ("the UVM that started is not the one predicted for this launch (firmware, kernel, command "
                "line, vCPUs or CPU model differ), or --expect-measurement is wrong"
                if any(c.name == "report.measurement" for c in failed) else
                "see 'parma-sandbox --debug up' for the evidence (docs/snp-lab.md)")
        raise CheckFailed(f"launch self-check failed, the sandbox was stopped: {reasons}", hint=hint)
    return check


class PendingSelfCheck:
    """run() on a port of its own, on a thread, while `up` sets the guest up (sandbox/launch/pipeline.py).

    `result()` waits for the verdict and raises what run() raised. The caller must call it before it starts
    a container or hands the guest a secret: that ordering, not this class, is the security rule."""

    def __init__(self, sockets: Sequence[Path], identity: LaunchIdentity, *, kds: KdsClient | None = None,
                 record_to: Path | None = None, on_pass: Callable[[], None] = lambda: None) -> None:
        self._check: SelfCheck | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()

        def verify() -> None:
            try:
                with AgentClient.connect(sockets) as client:
                    self._check = run(client, identity, kds=kds, record_to=record_to)
                on_pass()
            except BaseException as e:  # handed to whoever waits for the verdict
                self._error = e
            finally:
                self._done.set()

        self._thread = threading.Thread(target=verify, name="launch-self-check", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> SelfCheck:
        """The passed check; raises the check's failure (CheckFailed, GuestError, AgentUnreachable...)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._check is not None
        return self._check

    def abandon(self, timeout: float) -> None:
        """After a failed set-up (the VM is being stopped): give the thread `timeout` seconds to end."""
        self._done.wait(timeout)


def start(sockets: Sequence[Path], identity: LaunchIdentity, *, kds: KdsClient | None = None,
          record_to: Path | None = None, on_pass: Callable[[], None] = lambda: None) -> PendingSelfCheck:
    """Start the self-check on its own agent port; see PendingSelfCheck."""
    return PendingSelfCheck(sockets, identity, kds=kds, record_to=record_to, on_pass=on_pass)
