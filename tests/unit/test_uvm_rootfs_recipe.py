"""The rootfs recipe: package list, lock comparison, apt pins, dpkg status, what is dropped, the agent files."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.shared.errors import InputError, StateError
from sandbox.uvm.image import derive_salt, kernel_cmdline
from sandbox.uvm.overlay import DROP, PYC_CHECKED_DIRS, agent_files, agent_modules, check_pyc
from sandbox.uvm.packages import (
    LockedPackage,
    apt_preferences,
    compare_with_lock,
    parse_dpkg_status,
    read_lock,
    read_package_list,
)

P = LockedPackage


def test_package_list_parsing(tmp_path: Path) -> None:
    f = tmp_path / "packages.txt"
    f.write_text("# comment\npython3   # why\n\ncrun\n")
    assert read_package_list(f) == ["python3", "crun"]
    f.write_text("python3\nrm -rf /\n")
    with pytest.raises(InputError, match=r"packages.txt:2"):
        read_package_list(f)


def test_the_repo_lock_covers_the_package_list() -> None:
    lock = read_lock()
    assert lock is not None, "images/uvm/packages.lock.json is missing"
    names = {p.name for p in lock}
    assert set(read_package_list()) <= names
    assert "perl" not in names and "usrmerge" not in names
    assert all(len(p.sha256) == 64 and p.size > 0 for p in lock)


def test_compare_with_lock_names_every_difference() -> None:
    lock = (P("a", "1", "amd64", "aa" * 32, 1), P("b", "2", "all", "bb" * 32, 2), P("c", "3", "amd64", "cc" * 32, 3))
    got = (P("a", "1", "amd64", "aa" * 32, 1), P("b", "2", "all", "ee" * 32, 2), P("d", "4", "amd64", "dd" * 32, 4))
    diffs = compare_with_lock(got, lock)
    assert diffs == [f"b 2: .deb SHA-256 {'ee' * 32} differs from the locked {'bb' * 32}",
                     "c 3: locked but not installed", "d 4: not in the lock"]
    assert compare_with_lock(lock, lock) == []
    newer = (P("a", "1.1", "amd64", "ab" * 32, 1), *lock[1:])
    assert compare_with_lock(newer, lock) == ["a: locked 1, the mirror gave 1.1"]


def test_apt_preferences_pin_exact_versions() -> None:
    text = apt_preferences((P("libc6", "2.36-9+deb12u14", "amd64", "00" * 32, 1),))
    assert text == "Package: libc6\nPin: version 2.36-9+deb12u14\nPin-Priority: 1001\n\n"


def test_dpkg_status_parsing_keeps_installed_packages_only() -> None:
    status = ("Package: a\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1\nInstalled-Size: 10\n"
              "Description: x\n continued: line\n\n"
              "Package: b\nStatus: deinstall ok config-files\nArchitecture: all\nVersion: 2\n")
    (a,) = parse_dpkg_status(status)
    assert (a.name, a.version, a.arch, a.installed_kib) == ("a", "1", "amd64", 10)


@pytest.mark.parametrize(("path", "dropped"), [
    ("dev/null", True), ("dev", False), ("var/cache/ldconfig/aux-cache", True), ("var/lib/apt/lists/x", True),
    ("var/log/dpkg.log", True), ("var/lib/dpkg/status-old", True), ("var/lib/dpkg/status", False),
    ("usr/lib/python3.11/lib2to3/main.py", True), ("usr/lib/python3.11/json/__init__.py", False),
    ("usr/lib/python3.11/pydoc.py", True), ("usr/bin/python3.11", False), ("etc/passwd", False),
])
def test_dropped_paths(path: str, dropped: bool) -> None:
    assert bool(DROP.match(path)) == dropped


def test_agent_files_are_the_guest_and_shared_zones() -> None:
    files = dict(agent_files())
    assert "usr/lib/parma-sandbox/sandbox/__init__.py" in files
    assert "usr/lib/parma-sandbox/sandbox/guest/agent.py" in files
    assert "usr/lib/parma-sandbox/sandbox/shared/verity.py" in files
    assert not any("__pycache__" in d or d.endswith(".pyc") for d in files)
    assert not any(d.startswith("usr/lib/parma-sandbox/sandbox/uvm") for d in files)


def test_agent_modules_are_importable_names() -> None:
    names = agent_modules(agent_files())
    assert {"sandbox", "sandbox.guest", "sandbox.guest.agent", "sandbox.shared.policy.engine"} <= set(names)
    assert not any(n.endswith("__init__") for n in names)


def test_the_base_must_hold_unchecked_hash_pycs_only() -> None:
    """A timestamp .pyc never matches its source on the rootfs (mtimes are clamped): a compile per boot."""
    from importlib.util import MAGIC_NUMBER

    def header(flags: int) -> bytes:
        return MAGIC_NUMBER + flags.to_bytes(4, "little") + bytes(8)

    check_pyc("usr/lib/python3.11/__pycache__/re.cpython-311.pyc", header(0b01))
    for flags, kind in ((0, "timestamp-based"), (0b11, "checked-hash")):
        with pytest.raises(StateError, match=kind):
            check_pyc("usr/lib/python3.11/__pycache__/enum.cpython-311.pyc", header(flags))
    with pytest.raises(StateError, match="malformed"):
        check_pyc("usr/lib/python3.11/__pycache__/x.cpython-311.pyc", b"short")
    assert PYC_CHECKED_DIRS.match("usr/lib/python3.11/json/__pycache__/x.pyc")
    assert PYC_CHECKED_DIRS.match("usr/lib/python3/dist-packages/x/__pycache__/y.pyc")
    assert not PYC_CHECKED_DIRS.match("usr/share/python3/debpython/__pycache__/x.pyc")


def test_salt_is_derived_from_the_tar() -> None:
    a, b = derive_salt("00" * 32), derive_salt("01" + "00" * 31)
    assert len(a) == 32 and a != b and a == derive_salt("00" * 32)


def test_command_line_pins_root_hash_and_salt() -> None:
    from sandbox.uvm.image import RootfsImage

    img = RootfsImage(path=Path("/x"), sha256="", size=0, root_hash="ab" * 32, salt=bytes(range(32)),
                      data_blocks=1000, hash_start_block=1000, tar_sha256="", key="")
    cmd = kernel_cmdline(img)
    table = (f"0 8000 verity 1 /dev/vda /dev/vda 4096 4096 1000 1000 sha256 {'ab' * 32} {bytes(range(32)).hex()}"
             " 1 try_verify_in_tasklet")
    assert f'dm-mod.create="uvm-root,,,ro,{table}"' in cmd
    assert " root=/dev/dm-0 ro " in cmd and "console=ttyS0" in cmd
    assert cmd.endswith("init=/usr/lib/parma-sandbox/init")


def test_the_image_key_is_the_same_in_every_process() -> None:
    """The key names the writer's options without addresses (a function's repr has one), so a second
    `up` finds the image the first one built instead of converting the rootfs again."""
    import json
    import subprocess
    import sys

    from sandbox.uvm.image import EXT4_OPTIONS, options_key

    assert " at 0x" not in json.dumps(options_key(EXT4_OPTIONS))
    code = "import json; from sandbox.uvm.image import EXT4_OPTIONS, options_key; print(json.dumps(options_key(EXT4_OPTIONS)))"
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(keys) == 1
