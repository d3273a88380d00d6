"""A kernel with TSM_REPORTS shows /sys/kernel/config/tsm/report in every guest; only a registered
provider (SEV-SNP active) makes it a report interface. Without one, creating an entry fails with ENXIO."""

from __future__ import annotations

import errno
from pathlib import Path

from sandbox.guest.snp_report import ConfigfsTsm, OsFsOps


class NoProvider(OsFsOps):
    def mkdir(self, path: Path) -> None:
        raise OSError(errno.ENXIO, "No such device or address")


def test_tsm_directory_without_provider_is_not_an_interface(tmp_path: Path) -> None:
    root = tmp_path / "report"
    root.mkdir()
    assert ConfigfsTsm(root, NoProvider()).available() is False
    assert ConfigfsTsm(root).available() is True          # entries can be made: a provider answers
    assert list(root.iterdir()) == []                     # and the probe entry is gone again
    assert ConfigfsTsm(tmp_path / "absent").available() is False
