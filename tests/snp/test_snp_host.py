"""Runs only on SEV-SNP hardware (skips elsewhere with the reason)."""

from __future__ import annotations

from sandbox.hostcheck import check_host


def test_check_finds_snp() -> None:
    report = check_host()
    assert report.item("/dev/sev").status == "ok"
