"""Kernel config fragments: parsing, the did-it-stick check, the cache key, and the documentation rule."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from sandbox.shared.errors import InputError
from sandbox.uvm.kernel import fragment_files, kernel_key, missing_options, parse_config, requested_options
from sandbox.uvm.source_tree import KERNEL_CONFIGS


def test_parse_config_reads_set_and_unset_options() -> None:
    text = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=64\nCONFIG_D=\"x y\"\n# a comment\n\n"
    assert parse_config(text) == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "64", "CONFIG_D": '"x y"'}


def test_strict_parsing_names_the_bad_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"frag.config:2: not a kernel config line"):
        parse_config("CONFIG_A=y\nDM_VERITY=y\n", source="frag.config", strict=True)


def test_fragments_may_not_contradict_each_other(tmp_path: Path) -> None:
    (tmp_path / "a.config").write_text("# why\nCONFIG_X=y\n")
    (tmp_path / "b.config").write_text("# why not\n# CONFIG_X is not set\n")
    with pytest.raises(InputError, match="contradicts"):
        requested_options(fragment_files(tmp_path))


def test_missing_options_reports_what_did_not_stick() -> None:
    wanted = {"CONFIG_DM_INIT": "y", "CONFIG_VT": "n", "CONFIG_NR_CPUS": "64", "CONFIG_MODULES": "n"}
    final = {"CONFIG_DM_INIT": "n", "CONFIG_NR_CPUS": "8", "CONFIG_MODULES": "n"}  # VT absent == not set
    assert missing_options(wanted, final) == ["CONFIG_DM_INIT: wanted y, got n", "CONFIG_NR_CPUS: wanted 64, got 8"]
    assert missing_options(wanted, {**final, "CONFIG_DM_INIT": "y", "CONFIG_NR_CPUS": "64"}) == []


def test_the_contract_options_are_requested() -> None:
    wanted = requested_options(fragment_files())
    for opt in ("FW_CFG_SYSFS", "VIRTIO_CONSOLE", "VIRTIO_BLK", "SCSI_VIRTIO", "VIRTIO_NET", "HW_RANDOM_VIRTIO",
                "VIRTIO_VSOCKETS", "DM_VERITY", "DM_CRYPT", "DM_INTEGRITY", "DM_INIT", "OVERLAY_FS", "EXT4_FS",
                "TMPFS", "MISC_FILESYSTEMS", "CGROUPS", "MEMCG", "NAMESPACES", "SECCOMP_FILTER", "INET",
                "AMD_MEM_ENCRYPT", "SEV_GUEST", "TSM_REPORTS", "EFI_STUB", "SERIAL_8250_CONSOLE"):
        assert wanted.get(f"CONFIG_{opt}") == "y", opt
    assert wanted["CONFIG_MODULES"] == "n" and wanted["CONFIG_BLK_DEV_INITRD"] == "n"


def test_every_option_is_explained() -> None:
    """Each block of options in a fragment starts with a comment saying why."""
    for f in fragment_files():
        block_has_reason = False
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                block_has_reason = False
            elif line.startswith("#") and not re.match(r"# CONFIG_\w+ is not set", line):
                block_has_reason = True
            else:
                assert block_has_reason, f"{f.name}:{lineno}: {line} has no comment above it"


def test_cache_key_follows_the_fragments(tmp_path: Path) -> None:
    copy = tmp_path / "configs"
    shutil.copytree(KERNEL_CONFIGS, copy)
    before = kernel_key(files=fragment_files(copy))
    assert before == kernel_key(files=fragment_files(copy))
    with open(copy / "00-base.config", "a") as f:
        f.write("# more\nCONFIG_EXTRA=y\n")
    assert kernel_key(files=fragment_files(copy)) != before
