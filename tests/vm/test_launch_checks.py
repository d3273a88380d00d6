"""The launch checks through the real CLI on the emulated UVM (the same path runs on SEV-SNP hardware).

1. `up --expect-measurement WRONG`: the post-launch self-check finds the report's MEASUREMENT differs,
   `up` fails with the reason, and nothing is left (no QEMU, no state).
2. `up --id-key --author-key --debug`: the (emulated) PSP accepts the ID block, the report carries the
   key digests, `attest verify --id-key-digest/--author-key-digest` passes (and fails for another key),
   and the debug files are kept where the docs say.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEYS = REPO / "tests" / "data" / "snp-id"
sys.path.insert(0, str(Path(__file__).parent))
from test_hello import BUSYBOX_LAYOUT, Cli, cli, ensure_example_image  # noqa: E402, F401 - cli: a fixture


@pytest.fixture(scope="module")
def run(cli: Cli) -> Cli:  # noqa: F811 - the imported fixture, by name
    return cli


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ensure_example_image()
    doc = json.loads((REPO / "examples" / "minimal" / "group.json").read_text())
    doc["containers"][0]["image"] = f"oci:{BUSYBOX_LAYOUT}:latest"
    path = tmp_path_factory.mktemp("group") / "group.json"
    path.write_text(json.dumps(doc))
    return path


def _qemu_pids_of(run_dir: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system-x86_64.*{run_dir}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_wrong_expected_measurement_stops_the_sandbox(run: Cli, group: Path) -> None:
    wrong = "ab" * 48
    r = run("--progress", "plain", "up", "-d", "--name", "wrong-m", "--tee", "emulated",
            "--expect-measurement", wrong, str(group), timeout=600)
    assert r.returncode == 1, r.stderr
    assert "launch self-check failed, the sandbox was stopped" in r.stderr
    assert "report.measurement: " in r.stderr and f"!= expected {wrong}" in r.stderr
    assert "hint: the UVM that started is not the one predicted" in r.stderr
    run_dir = Path(run.env["PARMA_SANDBOX_RUNTIME"])
    assert not (run_dir / "wrong-m").exists()
    assert _qemu_pids_of(run_dir) == []
    assert json.loads(run("ps", "--format", "json").stdout) == []


def test_id_block_up_verify_and_debug_files(run: Cli, group: Path, tmp_path: Path) -> None:
    r = run("--progress", "plain", "up", "-d", "--debug", "--name", "idblock", "--tee", "emulated",
            "--id-key", str(KEYS / "id_key.pem"), "--author-key", str(KEYS / "author_key.pem"), str(group),
            timeout=600)
    try:
        assert r.returncode == 0, r.stderr
        info = json.loads(run("inspect", "idblock", "--format", "json").stdout)
        nonce = secrets.token_hex(32)
        evidence = tmp_path / "evidence.json"
        rr = run("attest", "report", "idblock", "--nonce", nonce, "-o", str(evidence), timeout=300)
        assert rr.returncode == 0, rr.stderr
        base = ["attest", "verify", str(evidence), "--nonce", nonce, "--allow-emulated",
                "--measurement", info["expected_measurement"], "--format", "json"]
        v = run(*base, "--id-key-digest", str(KEYS / "id_key.pem"), "--author-key-digest",
                str(KEYS / "author_key.pem"))
        assert v.returncode == 0, v.stderr
        checks = {c["name"]: c["status"] for c in json.loads(v.stdout)["checks"]}
        assert checks["report.id_key_digest"] == checks["report.author_key_digest"] == "pass"
        wrong = run(*base, "--id-key-digest", str(KEYS / "author_key.pem"))
        assert wrong.returncode == 1 and "report.id_key_digest" in wrong.stderr
        # --debug: the files docs/snp-lab.md lists, in <runtime>/.debug/<name>-<time>/
        line = next(x for x in r.stderr.splitlines() if "debug files for idblock kept in" in x)
        kept = Path(line.rsplit(" in ", 1)[1])
        assert kept.parent == Path(run.env["PARMA_SANDBOX_RUNTIME"]) / ".debug"
        assert {"qemu.sh", "console.log", "qemu.log", "selfcheck.json", "launch.json", "record.json",
                "check.json"} <= {p.name for p in kept.iterdir()}
        assert not (kept / "psp.json").exists()
        launch = json.loads((kept / "launch.json").read_text())
        assert launch["id"]["author_key_enabled"] and launch["predicted_measurement"] == info["expected_measurement"]
        assert json.loads((kept / "selfcheck.json").read_text())["summary"]["verified"]
        assert (kept / "qemu.sh").read_text().startswith("qemu-system-x86_64 ")
    finally:
        run("down", "idblock", timeout=120)
