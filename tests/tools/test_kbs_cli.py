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
                              POLICY_HASH, "--measurement", "AA" * 48, "--min-tcb", "0"], capsys)
    assert code == 2 and "already exists" in err and "--replace" in err
    code, out, err = run_cli(["secret", "put", "db2", "--file", str(tmp_path / "value")], capsys)
    assert code == 2 and "needs a release policy" in err
    code, out, err = run_cli(["secret", "put", "db2", "--file", str(tmp_path / "value"), "--policy-hash", "12"], capsys)
    assert code == 2 and "host_data" in err and "Traceback" not in err
    code, out, err = run_cli(["secret", "put", "../x", "--file", str(tmp_path / "value"), "--policy-hash",
                              POLICY_HASH, "--measurement", "AA" * 48, "--min-tcb", "0"], capsys)
    assert code == 2 and "not a valid secret name" in err

    code, out, _ = run_cli(["secret", "list"], capsys)
    assert code == 0 and "db" in out and POLICY_HASH[:16] in out and "s3cret" not in out
    code, out, _ = run_cli(["kbs", "key", "--format", "json"], capsys)
    pin = json.loads(out)["public_key_sha256"]
    assert len(pin) == 64 and "BEGIN PUBLIC KEY" in json.loads(out)["public_key_pem"]

    assert run_cli(["secret", "rm", "db"], capsys)[0] == 0
    code, _, err = run_cli(["secret", "rm", "db"], capsys)
    assert code == 2 and "no secret named 'db'" in err  # as down of a missing sandbox (docs/cli.md)
    code, out, _ = run_cli(["kbs", "audit", "--verify"], capsys)
    assert code == 0 and "2 records, chain intact" in out
    code, out, _ = run_cli(["kbs", "audit", "--format", "json"], capsys)
    assert [r["event"] for r in json.loads(out)] == ["secret-put", "secret-rm"]


def _manifest(path: Path, measurements: list[str] | None) -> Path:
    snp = None if measurements is None else {"measurements": [
        {"vcpus": i + 1, "cpu_type": "EPYC-v4", "measurement": m} for i, m in enumerate(measurements)]}
    path.write_text(json.dumps({"snp": snp}))
    return path


def test_secret_put_binds_the_uvm_by_default(tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Never HOST_DATA alone: the UVM manifest's measurements by default, explicit ones, or --any-uvm in words."""
    (tmp_path / "value").write_bytes(b"s3cret")
    base = ["secret", "put", "--file", str(tmp_path / "value"), "--policy-hash", POLICY_HASH]
    manifest = _manifest(tmp_path / "manifest.json", ["aa" * 48, "bb" * 48, "aa" * 48])
    monkeypatch.setattr("sandbox.cli.kbs.DEFAULT_MANIFEST", manifest)
    code, out, err = run_cli([*base, "from-manifest", "--min-tcb", "bl=7,tee=0,snp=14,ucode=72"], capsys)
    assert code == 0, err
    assert f"released to 2 UVM measurements (from {manifest})" in out
    record = json.loads((store / "secrets" / "from-manifest.json").read_bytes())
    assert record["format"] == "parma-sandbox/kbs-secret/v2"
    assert record["release_policy"] == {"host_data": [POLICY_HASH], "measurement": ["aa" * 48, "bb" * 48],
                                        "min_tcb": "bl=7,tee=0,snp=14,ucode=72", "allow_emulated": False,
                                        "allow_debug": False, "any_uvm": False}
    code, out, err = run_cli([*base, "explicit", "--measurement", "CC" * 48, "--min-tcb", "0"], capsys)
    assert code == 0 and "released to 1 UVM measurement (from --measurement)" in out

    monkeypatch.setattr("sandbox.cli.kbs.DEFAULT_MANIFEST", tmp_path / "absent.json")
    code, out, err = run_cli([*base, "nothing", "--min-tcb", "0"], capsys)
    assert code == 2 and "must be bound to the UVM it may go to, and no UVM manifest at" in err
    assert "--any-uvm" in err and "build uvm" in err and "Traceback" not in err
    no_snp = _manifest(tmp_path / "no-snp.json", None)
    code, out, err = run_cli([*base, "nothing", "--min-tcb", "0", "--uvm-manifest", str(no_snp)], capsys)
    assert code == 2 and "has no SNP launch measurements" in err
    code, out, err = run_cli([*base, "nothing", "--any-uvm", "--measurement", "CC" * 48, "--min-tcb", "0"], capsys)
    assert code == 2 and "--any-uvm contradicts" in err
    code, out, err = run_cli([*base, "nothing", "--measurement", "CC" * 48], capsys)
    assert code == 2 and "needs --min-tcb" in err
    assert not (store / "secrets" / "nothing.json").exists()

    code, out, err = run_cli([*base, "anywhere", "--any-uvm", "--min-tcb", "0"], capsys)
    assert code == 0 and "released to ANY UVM" in out and "warning: --any-uvm" in err
    code, out, err = run_cli([*base, "lab", "--measurement", "CC" * 48, "--allow-emulated"], capsys)
    assert code == 0 and "emulated evidence only" in err

    legacy = json.loads((store / "secrets" / "explicit.json").read_bytes())
    legacy["format"] = "parma-sandbox/kbs-secret/v1"
    legacy["release_policy"] = {k: v for k, v in legacy["release_policy"].items() if k != "any_uvm"}
    legacy["release_policy"]["measurement"] = []
    (store / "secrets" / "explicit.json").write_text(json.dumps(legacy))
    code, out, _ = run_cli(["secret", "list"], capsys)
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "NONE: re-store (HOST_DATA only)" in rows["explicit"] and "ANY (--any-uvm)" in rows["anywhere"]
    assert rows["from-manifest"].split()[3] == "2"


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
