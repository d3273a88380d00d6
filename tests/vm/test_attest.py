"""Acceptance for issue 6 in an emulated UVM: `up`, then `attest report` with a nonce, then `attest verify`:
it passes with --allow-emulated (host_data == the policy hash, measurement == the UVM manifest's expected
value), fails with a clear message without it, and fails for a report bound to another nonce."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BUSYBOX_LAYOUT = REPO / "build" / "images" / "busybox"
NAME = "attest-vm"
ENV: dict[str, str] = {}


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandbox", *args], env=ENV, cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    ENV.update({**os.environ, "PARMA_SANDBOX_RUNTIME": str(tmp_path_factory.mktemp("run")),
                "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})
    if not (BUSYBOX_LAYOUT / "index.json").exists():
        subprocess.run(["make", "-C", str(REPO), "example-images"], check=True, timeout=600, stdout=subprocess.DEVNULL)
    group = json.loads((REPO / "examples" / "minimal" / "group.json").read_text())
    group["containers"][0]["image"] = f"oci:{BUSYBOX_LAYOUT}:latest"
    path = tmp_path_factory.mktemp("group") / "group.json"
    path.write_text(json.dumps(group))
    r = cli("--progress", "plain", "up", "-d", "--name", NAME, "--tee", "emulated", str(path))
    assert r.returncode == 0, r.stderr
    try:
        info = json.loads(cli("inspect", NAME, "--format", "json").stdout)
        yield info
    finally:
        cli("down", NAME, timeout=120)


@pytest.fixture(scope="module")
def evidence(sandbox: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    nonce = secrets.token_hex(32)
    out = tmp_path_factory.mktemp("evidence") / "evidence.json"
    r = cli("attest", "report", NAME, "--nonce", nonce, "-o", str(out), "--format", "json", timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["backend"] == "emulated"
    return out, nonce


def verify(sandbox: dict[str, Any], evidence: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    policy = Path(sandbox["state_dir"]) / "policy.json"
    return cli("attest", "verify", str(evidence), "--policy", str(policy),
               "--measurement", sandbox["expected_measurement"], "--format", "json", *extra)


def test_verify_with_allow_emulated_shows_policy_hash_and_measurement(sandbox: dict[str, Any],
                                                                      evidence: tuple[Path, str]) -> None:
    path, nonce = evidence
    assert sandbox["tee"] == "emulated" and sandbox["expected_measurement"]
    r = verify(sandbox, path, "--nonce", nonce, "--allow-emulated")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["verified"] and doc["emulated"]
    policy = (Path(sandbox["state_dir"]) / "policy.json").read_bytes()
    assert doc["host_data"] == hashlib.sha256(policy).hexdigest() == sandbox["policy_hash"]
    assert doc["measurement"] == sandbox["expected_measurement"]
    checks = {c["name"]: c["status"] for c in doc["checks"]}
    assert {checks[n] for n in ("report.signature", "report.host_data", "report.measurement",
                                "report.report_data", "vek.hwid", "vek.tcb")} == {"pass"}


def test_without_allow_emulated_it_fails_clearly(sandbox: dict[str, Any], evidence: tuple[Path, str]) -> None:
    path, nonce = evidence
    r = verify(sandbox, path, "--nonce", nonce)
    assert r.returncode == 1
    assert "verification failed: ark.trusted" in r.stderr and "EMULATED test CA" in r.stderr
    assert "--allow-emulated" in r.stderr


def test_a_report_for_another_nonce_fails(sandbox: dict[str, Any], evidence: tuple[Path, str]) -> None:
    path, nonce = evidence
    other = secrets.token_hex(32)
    assert other != nonce
    r = verify(sandbox, path, "--nonce", other, "--allow-emulated")
    assert r.returncode == 1 and "verification failed: report.report_data" in r.stderr
