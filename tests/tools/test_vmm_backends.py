"""The VM backends against a real QEMU and a real libvirtd, with a tiny multiboot guest."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.state import process_start_time
from sandbox.vmm import backend as vmm
from sandbox.vmm import libvirt_share
from sandbox.vmm.config import Backend
from sandbox.vmm.qmp import QmpClient

sys.path.insert(0, str(Path(__file__).parent))
from tinyguest import MARKER, tiny_config

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed")


def wait_marker(console: Path, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if console.exists() and MARKER in console.read_bytes():
            return True
        time.sleep(0.05)
    return False


def test_qemu_backend_launches_reports_and_stops(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    vm = vmm.launch(cfg, Backend.qemu, log_file=tmp_path / "qemu.log", attached=True)
    try:
        assert vm.alive()
        assert wait_marker(cfg.console_log), (tmp_path / "qemu.log").read_text()
        with QmpClient(cfg.qmp_socket) as qmp:
            assert qmp.execute("query-status")["status"] == "running"
        assert int(cfg.pidfile.read_text()) == vm.process().pid
        assert (tmp_path / "qemu.sh").read_text().startswith("qemu-system-x86_64 -name guest=tiny")
        # A later command re-attaches from the saved record and stops it.
        again = vmm.attach(vm.record())
        assert again.alive()
        again.stop(5)
        assert not again.alive() and not vm.alive()
    finally:
        vm.stop(2)


def test_qemu_start_failure_is_reported_with_qemu_output(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    cfg.disks[0].path.unlink()  # QEMU refuses a missing drive file
    with pytest.raises(vmm.LaunchError) as exc:
        vmm.launch(cfg, Backend.qemu, log_file=tmp_path / "qemu.log", attached=True)
    assert "disk.img" in exc.value.message


LAUNCHER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from tinyguest import tiny_config
from sandbox.vmm import backend as vmm
from sandbox.vmm import libvirt_share
from sandbox.vmm.config import Backend
cfg = tiny_config(Path({tmp!r}))
vm = vmm.launch(cfg, Backend.qemu, log_file=Path({tmp!r}) / "qemu.log", attached={attached})
print(vm.process().pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("attached", [True, False])
def test_attached_qemu_dies_with_its_launcher_detached_survives(tmp_path: Path, attached: bool) -> None:
    code = LAUNCHER.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), attached=attached)
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        qemu_pid = int(launcher.stdout.readline())
        assert process_start_time(qemu_pid) is not None
        launcher.kill()   # SIGKILL: no cleanup code runs in the launcher
        launcher.wait()
        deadline = time.monotonic() + 5
        while process_start_time(qemu_pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (process_start_time(qemu_pid) is None) == attached
    finally:
        launcher.kill()
        if process_start_time(qemu_pid) is not None:
            os.kill(qemu_pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# libvirt: a real, stock libvirtd (unmodified qemu.conf: QEMU runs as libvirt-qemu), shared by the
# fixture and stopped by its last user.

from libvirt_daemon import libvirtd  # noqa: E402, F401 - a fixture


def _qemu_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


@pytest.mark.usefixtures("libvirtd")
def test_libvirt_backend_runs_the_same_config_on_a_stock_daemon(tmp_path: Path) -> None:
    import libvirt

    from sandbox.vmm.config import FwCfgFile

    # A private state directory, as under ~/.cache or /run/user: libvirt's QEMU user cannot enter it.
    state = tmp_path / "private"
    state.mkdir(mode=0o700)
    cfg = tiny_config(state, name=f"tiny-{os.getpid()}")
    fw = state / "psp.json"
    fw.write_bytes(b"secret material")
    fw.chmod(0o600)
    cfg = dataclasses.replace(cfg, fw_cfg=(FwCfgFile("opt/parma/test", fw),))
    uri = vmm.default_uri()
    assert uri == "qemu:///system"          # root's default; other users get qemu:///session
    conn = libvirt.open(uri)
    try:
        user = vmm.qemu_user(conn, cfg.accel)
    finally:
        conn.close()
    t0 = time.monotonic()
    vm = vmm.launch(cfg, Backend.libvirt, log_file=state / "qemu.log", attached=False)
    try:
        started = time.monotonic() - t0
        assert started < 30, f"libvirt took {started:.1f} s: is QEMU re-probed on every call (/dev/kvm 0600)?"
        assert vm.alive()
        assert wait_marker(cfg.console_log), "the guest's serial output did not reach the console file"
        if user is not None and not user.is_caller():
            # QEMU really runs as libvirt's user, from the published copies; the cache files stay ours.
            assert vm.ref is not None and _qemu_uid(vm.ref.pid) == user.uid
            assert vm.share is not None and vm.share.parent == libvirt_share.share_root()
            assert (vm.share / "disk0.img").stat().st_ino == cfg.disks[0].path.stat().st_ino   # a hard link
            assert cfg.disks[0].path.stat().st_uid == os.getuid()                           # never chowned
            assert (vm.share / "fwcfg0").stat().st_mode & 0o777 == 0o640
        conn = libvirt.open(uri)
        try:
            xml = conn.lookupByName(f"parma-sandbox-{cfg.name}").XMLDesc()
            assert "org.parma.agent.0" in xml and "<serial>parma-root</serial>" in xml
        finally:
            conn.close()
        rec = vm.record()
        assert rec["backend"] == "libvirt" and rec["domain"] == f"parma-sandbox-{cfg.name}"
        vmm.attach(rec).stop(5)
        assert not vm.alive()
        assert vm.share is None or not vm.share.exists()
        conn = libvirt.open(uri)
        try:
            assert f"parma-sandbox-{cfg.name}" not in [d.name() for d in conn.listAllDomains()]
        finally:
            conn.close()
        print(f"libvirt domain start with a stock libvirtd: {started:.2f} s")
    finally:
        vm.stop(2)


@pytest.mark.usefixtures("libvirtd")
def test_libvirt_start_failure_names_the_xml_and_cleans_up(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, name=f"bad-{os.getpid()}")
    cfg = dataclasses.replace(cfg, memory_mib=1 << 30)      # 1 PiB: libvirt/QEMU refuse it
    with pytest.raises(vmm.LaunchError) as exc:
        vmm.launch(cfg, Backend.libvirt, log_file=tmp_path / "qemu.log", attached=False)
    assert "domain.xml" in (exc.value.hint or "")
    assert not (libvirt_share.share_root() / f"parma-sandbox-{cfg.name}").exists()
