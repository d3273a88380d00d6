"""Issue 7 end to end in an emulated UVM: examples/secret fetches a secret through the in-guest API and prints
its SHA-256; a policy one byte off is refused with a clear error in the container; evidence taken from the
running guest is refused when it is emulated for a hardware-only secret, replayed, for a nonce the broker never
issued, tampered with, or late. Secrets are stored with `secret put` as users do: bound by default to the
measurements in the UVM manifest, which the emulated PSP's reports must then carry (issue 13, item 6)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kbsenv import http_call, running_broker

from sandbox.attest.emulated_ca import load_emulated_ca
from sandbox.kbs.audit import AuditLog
from sandbox.kbs.challenges import ChallengeStore
from sandbox.kbs.server import BrokerHttpServer
from sandbox.kbs.store import KbsStore
from sandbox.shared.kbs_protocol import CHALLENGE_PATH, RELEASE_PATH

REPO = Path(__file__).resolve().parents[2]
GROUP = REPO / "examples" / "secret" / "group.json"
SECRET = b"correct horse battery staple"
BOOT_TIMEOUT = 600


ENV: dict[str, str] = {}


def cli(*args: str, timeout: float = BOOT_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "sandbox", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=ENV)
    if check and done.returncode != 0:
        raise AssertionError(f"parma-sandbox {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def example_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    ENV.update({**os.environ, "PARMA_SANDBOX_RUNTIME": str(tmp_path_factory.mktemp("run")),
                "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})
    subprocess.run([sys.executable, str(REPO / "examples" / "secret" / "build_image.py")], check=True, timeout=600,
                   stdout=subprocess.DEVNULL)
    yield
    cli("down", "--all", check=False, timeout=120)


@pytest.fixture
def clock() -> list[float]:
    return [0.0]


@pytest.fixture
def broker(tmp_path: Path, clock: list[float]) -> Iterator[tuple[KbsStore, BrokerHttpServer]]:
    store = KbsStore.open(tmp_path / "kbs")
    # The UVM's emulated PSP signs with this installation's emulated CA, as `kbs serve` expects.
    with running_broker(store, challenges=ChallengeStore(60, clock=lambda: clock[0]),
                        emulated_ca=load_emulated_ca) as server:
        yield store, server


def _put(store: KbsStore, tmp_path: Path, name: str, policy_hash: str, *extra: str) -> None:
    """`secret put` with no --measurement: the UVM manifest (build/uvm/manifest.json) binds the secret."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    done = cli("--format", "json", "secret", "put", name, "--file", str(tmp_path / "secret.txt"), "--policy-hash",
               policy_hash, "--store", str(store.root), *extra)
    assert json.loads(done.stdout)["release_policy"]["measurement"], done.stdout


def _policy(tmp_path: Path, store: KbsStore) -> tuple[Path, bytes]:
    out = tmp_path / "policy.json"
    cli("policy", "gen", str(GROUP), "--kbs-key", store.broker_pin(), "-o", str(out))
    return out, out.read_bytes()


def _wait_exited(name: str, container: str, timeout: float = BOOT_TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = json.loads(cli("inspect", name, "--format", "json").stdout)
        c = next(c for c in doc["containers"] if c["name"] == container)
        if c.get("status") in ("exited", "stopped"):
            return c
        time.sleep(2)
    raise AssertionError(f"container {container} of {name} did not finish in {timeout} s")


def _release(url: str, name: str, evidence: dict[str, Any]) -> tuple[int, Any]:
    return http_call(url, "POST", RELEASE_PATH, {"secret": name, "evidence": evidence})


def _guest_evidence(sandbox: str, nonce: bytes, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / f"evidence-{nonce.hex()[:8]}.json"
    cli("attest", "report", sandbox, "--nonce", nonce.hex(), "-o", str(out), timeout=300)
    return json.loads(out.read_text())["evidence"]


def _challenge(url: str) -> bytes:
    status, doc = http_call(url, "POST", CHALLENGE_PATH, {})
    assert status == 200
    return bytes.fromhex(doc["nonce"])


def test_the_example_prints_the_secret_and_bad_evidence_is_refused(
        example_image: None, broker: tuple[KbsStore, BrokerHttpServer], tmp_path: Path, clock: list[float]) -> None:
    store, server = broker
    policy_file, policy = _policy(tmp_path, store)
    policy_hash = hashlib.sha256(policy).hexdigest()
    _put(store, tmp_path, "demo", policy_hash, "--allow-emulated")
    _put(store, tmp_path, "hw-only", policy_hash, "--min-tcb", "0")
    name = f"kbs-{secrets.token_hex(3)}"
    cli("up", "-d", str(GROUP), "--name", name, "--tee", "emulated", "--policy", str(policy_file),
        "--kbs", server.url)
    try:
        state = _wait_exited(name, "app")
        logs = cli("logs", name, "app")
        assert f"secret demo sha256: {hashlib.sha256(SECRET).hexdigest()}" in logs.stdout, (logs.stdout, logs.stderr)
        assert state.get("exit_code") == 0
        released = [r for r in AuditLog(store.audit_path).records() if r["event"] == "release"]
        assert released and released[-1]["host_data"] == policy_hash and released[-1]["emulated"]

        def refused(status: int, doc: Any, reason: str) -> None:
            assert status == 403 and reason in doc["message"], doc
            assert reason in list(AuditLog(store.audit_path).records())[-1]["reason"]

        evidence = _guest_evidence(name, _challenge(server.url), tmp_path)
        refused(*_release(server.url, "hw-only", evidence), "emulated evidence")
        refused(*_release(server.url, "demo", evidence), "already used (replayed evidence)")
        _challenge(server.url)
        refused(*_release(server.url, "demo", _guest_evidence(name, secrets.token_bytes(32), tmp_path)),
                "not issued by this broker")
        tampered = _guest_evidence(name, _challenge(server.url), tmp_path)
        report = bytearray(base64.b64decode(tampered["report"]))
        report[0x50] ^= 0x01  # REPORT_DATA
        refused(*_release(server.url, "demo", {**tampered, "report": base64.b64encode(report).decode()}),
                "report.signature")
        late = _guest_evidence(name, _challenge(server.url), tmp_path)
        clock[0] += 61
        refused(*_release(server.url, "demo", late), "challenge expired")
    finally:
        cli("down", name, check=False, timeout=120)
    assert AuditLog(store.audit_path).verify().intact


def test_a_policy_one_byte_off_gets_a_clear_refusal(example_image: None, broker: tuple[KbsStore, BrokerHttpServer],
                                                    tmp_path: Path) -> None:
    store, server = broker
    _, policy = _policy(tmp_path, store)
    _put(store, tmp_path, "demo", hashlib.sha256(policy).hexdigest(), "--allow-emulated")
    marker = b'secret-client:latest"'
    assert policy.count(marker) == 1
    changed = policy.replace(marker, b'secret-client:latesT"')  # the informational image id: one byte
    (tmp_path / "policy2.json").write_bytes(changed)
    done = cli("up", str(GROUP), "--name", f"kbs-{secrets.token_hex(3)}", "--tee", "emulated",
               "--policy", str(tmp_path / "policy2.json"), "--kbs", server.url, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "parma-secret: demo: HTTP 403: the key broker refused: release.host_data" in output, output
    assert hashlib.sha256(changed).hexdigest() in output
    record = list(AuditLog(store.audit_path).records())[-1]
    assert record["event"] == "refuse" and record["failed"] == ["release.host_data"]
