"""Access to the public SEV-SNP vectors (read at test time from ../shared/vectors/snp, never copied)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import vectors_dir


def snp_dir() -> Path:
    path = vectors_dir() / "snp"
    if not (path / "expected_values.json").is_file():
        pytest.skip(f"SEV-SNP vectors not present at {path} (set PARMA_SANDBOX_VECTORS)")
    return path


def expected_sets() -> list[dict[str, Any]]:
    return json.loads((snp_dir() / "expected_values.json").read_text())


def set_ids() -> list[str]:
    """Parametrisation ids; read without skipping so collection works when vectors are absent."""
    path = vectors_dir() / "snp" / "expected_values.json"
    if not path.is_file():
        return ["vectors-absent"]
    return [s["id"] for s in json.loads(path.read_text())]


def get_set(set_id: str) -> dict[str, Any]:
    for s in expected_sets():
        if s["id"] == set_id:
            return s
    pytest.skip(f"vector set {set_id} not present")


def report_bytes(s: dict[str, Any]) -> bytes:
    from sandbox.shared.snp.report import decode_report_file
    return decode_report_file((snp_dir() / s["files"]["report"]).read_bytes())


def cert_files(s: dict[str, Any]) -> tuple[Path, Path]:
    """(VEK file, chain file). Some sets ship VCEK+ASK+ARK in one PEM; then both are that file."""
    d = snp_dir()
    vek = d / s["files"]["vek"]
    chain_name = s["files"]["ask_ark"].split(" (")[0]
    return vek, d / chain_name
