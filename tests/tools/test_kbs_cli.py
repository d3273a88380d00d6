"""`secret put|list|rm`, `kbs key|audit` in-process, and `kbs serve` as a real process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import run_cli
from kbsenv import POLICY, POLICY_HASH, http_call

from sandbox.shared.kbs_protocol import CHALLENGE_PATH, IDENTITY_PATH


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "kbs"
    monkeypatch.setenv("PARMA_SANDBOX_KBS_STORE", str(path))
    return path


def test_secret_put_list_rm(tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "policy.json").write_bytes(POLICY)
    (tmp_path / "value").write_bytes(b"s3cret\n")
    code, out, err = run_cli(["--format", "json", "secret", "put", "db", "--file", str(tmp_path / "value"),
                              "--policy", str(tmp_path / "policy.json"), "--measurement", "AA" * 48,
                              "--allow-emulated"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["release_policy"]["host_data"] == [POLICY_HASH] and doc["size"] == 7
    assert "EMULATED" in err
    assert (store / "secrets" / "db.json").stat().st_mode & 0o777 == 0o600

    code, out, err = run_cli(["secret", "put", "db", "--file", str(tmp_path / "value"), "--policy-hash",
                              POLICY_HASH], capsys)
    assert code == 2 and "already exists" in err and "--replace" in err
    code, out, err = run_cli(["secret", "put", "db2", "--file", str(tmp_path / "value")], capsys)
    assert code == 2 and "needs a release policy" in err
    code, out, err = run_cli(["secret", "put", "db2", "--file", str(tmp_path / "value"), "--policy-hash", "12"], capsys)
    assert code == 2 and "host_data" in err and "Traceback" not in err
    code, out, err = run_cli(["secret", "put", "../x", "--file", str(tmp_path / "value"), "--policy-hash",
                              POLICY_HASH], capsys)
    assert code == 2 and "not a valid secret name" in err

    code, out, _ = run_cli(["secret", "list"], capsys)
    assert code == 0 and "db" in out and POLICY_HASH[:16] in out and "s3cret" not in out
    code, out, _ = run_cli(["kbs", "key", "--format", "json"], capsys)
    pin = json.loads(out)["public_key_sha256"]
    assert len(pin) == 64 and "BEGIN PUBLIC KEY" in json.loads(out)["public_key_pem"]

    assert run_cli(["secret", "rm", "db"], capsys)[0] == 0
    code, _, err = run_cli(["secret", "rm", "db"], capsys)
    assert code == 1 and "no secret named 'db'" in err
    code, out, _ = run_cli(["kbs", "audit", "--verify"], capsys)
    assert code == 0 and "2 records, chain intact" in out
    code, out, _ = run_cli(["kbs", "audit", "--format", "json"], capsys)
    assert [r["event"] for r in json.loads(out)] == ["secret-put", "secret-rm"]


def test_kbs_serve_runs_until_sigterm(store: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "sandbox", "--format", "json", "kbs", "serve", "--listen",
                             "127.0.0.1:0", "--challenge-ttl", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PARMA_SANDBOX_KBS_STORE": str(store)})
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, proc.stderr.read()  # type: ignore[union-attr]
        info = json.loads(line)  # one machine-readable line, printed once the broker listens
        assert info["url"].startswith("http://127.0.0.1:")
        status, doc = http_call(info["url"], "GET", IDENTITY_PATH)
        assert status == 200 and doc["public_key_sha256"] == info["public_key_sha256"]
        status, doc = http_call(info["url"], "POST", CHALLENGE_PATH, {})
        assert status == 200 and doc["expires_in"] == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kbs_serve_refuses_bad_listen_addresses(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for listen in ("8300", "localhost:8300", "127.0.0.1:99999"):
        code, _, err = run_cli(["kbs", "serve", "--listen", listen], capsys)
        assert code == 2 and "--listen" in err
