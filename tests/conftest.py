"""Test tiers are directories: tests/unit, tests/tools, tests/vm, tests/snp. Each test gets its tier's marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TIERS = ("unit", "tools", "vm", "snp")


def vectors_dir() -> Path:
    return Path(os.environ.get("PARMA_SANDBOX_VECTORS", REPO.parent / "shared" / "vectors"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(TESTS)
        tier = rel.parts[0] if len(rel.parts) > 1 else None
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


def snp_hardware_reason() -> str | None:
    """None when this machine is an SEV-SNP guest or host that the snp tier can use, else why not."""
    if Path("/dev/sev-guest").exists() or Path("/sys/kernel/config/tsm/report").exists():
        return None
    if Path("/dev/sev").exists():
        return None
    return "no SEV-SNP hardware here: neither /dev/sev (host) nor /dev/sev-guest (guest) exists"


@pytest.fixture(autouse=True)
def _skip_snp_off_hardware(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("snp") and (reason := snp_hardware_reason()):
        pytest.skip(reason)


@pytest.fixture
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the cache and runtime dirs at a temporary place."""
    monkeypatch.setenv("PARMA_SANDBOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PARMA_SANDBOX_RUNTIME", str(tmp_path / "run"))
    return tmp_path


@pytest.fixture(scope="session")
def emulated_ca_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding one emulated test CA, made once per test session (RSA-4096 keygen is slow)."""
    from sandbox.attest.emulated_ca import ensure_emulated_ca
    base = tmp_path_factory.mktemp("emulated-ca-cache")
    ensure_emulated_ca(base)
    return base
