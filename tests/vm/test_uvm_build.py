"""The UVM build is deterministic, its manifest tells the truth, and the SNP firmware is the right one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from sevsnpmeasure.ovmf import OVMF, SectionType

from sandbox.run import run
from sandbox.uvm.base import build_base
from sandbox.uvm.boot import BootSpec, boot
from sandbox.uvm.build import UvmArtifacts, ensure_uvm
from sandbox.uvm.fetch import sha256_file
from sandbox.uvm.image import convert_rootfs
from sandbox.uvm.overlay import build_rootfs_tar, write_rootfs_tar
from tests.clirun import run_cli


def test_two_conversions_of_the_rootfs_tar_give_identical_images(uvm: UvmArtifacts, tmp_path: Path) -> None:
    tar = build_rootfs_tar(build_base())
    a = convert_rootfs(tar.tar, tmp_path / "a.img", tar_sha256=tar.sha256)
    b = convert_rootfs(tar.tar, tmp_path / "b.img", tar_sha256=tar.sha256)
    assert a == b
    assert a["root_hash"] == uvm.root_hash and a["salt"] == uvm.salt
    assert sha256_file(tmp_path / "a.img") == sha256_file(tmp_path / "b.img") == sha256_file(uvm.rootfs)


def test_build_uvm_answers_from_the_cache(uvm: UvmArtifacts, capsys: pytest.CaptureFixture[str]) -> None:
    """`parma-sandbox build` exits 0 and names the artifacts this tier boots (docs/cli.md, "Exit codes")."""
    code, out, err = run_cli(["build", "uvm", "--format", "json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["kernel"] == str(uvm.kernel) and doc["rootfs"] == str(uvm.rootfs) and doc["root_hash"] == uvm.root_hash


def test_the_agent_overlay_is_reproducible(uvm: UvmArtifacts, tmp_path: Path) -> None:
    base = build_base()
    write_rootfs_tar(base, tmp_path / "again.tar")
    assert sha256_file(tmp_path / "again.tar") == build_rootfs_tar(base).sha256


def test_manifest_records_the_artifacts(uvm: UvmArtifacts) -> None:
    m = json.loads(uvm.manifest_path.read_text())
    assert m["kernel"]["sha256"] == sha256_file(uvm.kernel)
    assert m["rootfs"]["sha256"] == sha256_file(uvm.rootfs)
    assert m["firmware"]["sha256"] == sha256_file(uvm.firmware)
    assert m["cmdline"] == uvm.cmdline
    assert f"sha256 {m['rootfs']['root_hash']} {m['rootfs']['salt']}" in uvm.cmdline
    names = {p["name"] for p in m["packages"]}
    assert {"python3", "crun", "iproute2"} <= names
    assert all(len(p["deb_sha256"]) == 64 for p in m["packages"])
    assert "/usr/lib/parma-sandbox/sandbox/guest/agent.py" in {"/" + k for k in m["agent"]["files"]}


def test_expected_measurement_matches_sev_snp_measure(uvm: UvmArtifacts) -> None:
    """The manifest's table, checked against the sev-snp-measure command itself."""
    m = json.loads(uvm.manifest_path.read_text())
    row = next(r for r in m["snp"]["measurements"] if r["vcpus"] == 2 and r["cpu_type"] == "EPYC-Milan")
    tool = Path(sys.executable).parent / "sev-snp-measure"     # installed with the package, in the venv
    ref = run([tool, "--mode", "snp", "--vcpus", "2", "--vcpu-type", "EPYC-Milan",
               "--ovmf", uvm.firmware, "--kernel", uvm.kernel, "--append", uvm.cmdline,
               "--guest-features", "0x1"])
    assert row["measurement"] == ref.stdout.decode().strip()
    assert uvm.expected_measurement(2, "EPYC-Milan") == row["measurement"]
    assert m["expected_measurement"]["snp"] == uvm.expected_measurement(1, "EPYC-v4")


def test_snp_firmware_measures_kernel_hashes_and_refuses_an_unmeasured_kernel(uvm: UvmArtifacts) -> None:
    assert uvm.firmware is not None
    sections = {d.section_type() for d in OVMF(str(uvm.firmware)).metadata_items()}
    assert SectionType.SNP_KERNEL_HASHES in sections
    # Without SEV there is no hashes table for its blob verifier: the AmdSev OVMF must not boot the kernel.
    result = boot(BootSpec(uvm.kernel, uvm.rootfs, uvm.cmdline, firmware=uvm.firmware), timeout=60,
                  stop_patterns=["No bootable option"])
    assert not result.ready
    assert result.outcome == "stop pattern", result.tail()


@pytest.mark.slow
def test_a_rebuild_from_scratch_gives_the_same_manifest(uvm: UvmArtifacts, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything again (downloads, kernel, Debian base, overlay, image, firmware) in an empty cache."""
    monkeypatch.setenv("PARMA_SANDBOX_CACHE", str(tmp_path / "cache"))
    again = ensure_uvm()
    assert again.manifest_path != uvm.manifest_path
    assert again.manifest_path.read_bytes() == uvm.manifest_path.read_bytes()
