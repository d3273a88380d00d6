"""`parma-sandbox check` against the real host."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from sandbox.cli.main import cli


def test_check_json_reports_tee_and_reasons() -> None:
    result = CliRunner().invoke(cli, ["-q", "check", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    names = {c["name"]: c for c in data["checks"]}
    assert {"qemu", "kvm", "/dev/sev", "ovmf (generic)", "libvirtd", "veritysetup"} <= set(names)
    if not Path("/dev/sev").exists():
        assert data["tee"] == "emulated"
        assert any("no SEV-SNP" in r for r in data["reasons"])
    # accel follows the KVM probe, whatever this host can do
    assert data["accel"] == ("kvm" if names["kvm"]["status"] == "ok" else "tcg")
    if names["kvm"]["status"] != "ok":
        assert any(r.startswith("KVM unusable") for r in data["reasons"])


def test_check_table_is_readable() -> None:
    result = CliRunner().invoke(cli, ["-q", "check"])
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0].split() == ["CHECK", "STATUS", "DETAIL"]
    assert "tee: " in result.stdout


def test_global_format_applies() -> None:
    result = CliRunner().invoke(cli, ["-q", "--format", "json", "check"])
    assert json.loads(result.stdout)["tee"] in ("emulated", "sev-snp")
