"""glibc reads the /etc/hosts the guest writes: the group's names resolve to 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sandbox.guest.etcfiles import NameFiles, write_files


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("getent") is None,
                    reason="needs root, unshare and getent")
def test_glibc_resolves_the_group_names_from_the_hosts_file(tmp_path: Path) -> None:
    d = tmp_path / "etc"
    write_files(d, NameFiles("grp", ("db", "web")))
    r = subprocess.run(["unshare", "-m", "sh", "-c",
                        f"mount --make-rprivate / && mount --bind {d / 'hosts'} /etc/hosts && "
                        "getent ahostsv4 db && getent hosts grp"], capture_output=True, text=True)
    if r.returncode != 0 and "unshare" in r.stderr:
        pytest.skip(f"no mount namespace here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[0] == "127.0.0.1"
    assert "127.0.0.1       grp" in r.stdout
