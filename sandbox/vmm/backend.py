"""Run a VmConfig: as a QEMU process we own (with a QMP socket), or as a transient libvirt domain.

A running VM is described by a small JSON-able record (saved in the sandbox state) from which any
later command (`ps`, `down`) can re-attach: the QEMU pid plus its kernel start time (so a recycled
pid is never mistaken for ours), and for libvirt the domain name (and the directory its files were
published in for libvirt's QEMU user, sandbox/vmm/libvirt_share.py).

libvirt: qemu:///system for root, qemu:///session for other users (whose QEMU then runs as
themselves); PARMA_SANDBOX_LIBVIRT_URI overrides.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sandbox.fsutil import atomic_write
from sandbox.log import log
from sandbox.run import command_line, spawn
from sandbox.shared.errors import SandboxError, StateError
from sandbox.state import ProcessRef
from sandbox.vmm import libvirt_share
from sandbox.vmm.config import Accel, Backend, VmConfig
from sandbox.vmm.libvirt_xml import build_domain_xml, domain_name
from sandbox.vmm.qemu import build_argv
from sandbox.vmm.qmp import QmpClient, QmpError, wait_for_socket

URI_ENV = "PARMA_SANDBOX_LIBVIRT_URI"
LIBVIRT_PIDFILE_DIR = Path("/run/libvirt/qemu")
DAEMON_HINT = "start it: 'systemctl start libvirtd', or without systemd 'virtlogd -d; libvirtd -d' (docs/snp-lab.md)"


def default_uri() -> str:
    """$PARMA_SANDBOX_LIBVIRT_URI, else qemu:///system for root and qemu:///session for everyone else."""
    return os.environ.get(URI_ENV) or ("qemu:///system" if os.getuid() == 0 else "qemu:///session")


LIBVIRT_URI = default_uri()


class LaunchError(SandboxError):
    pass


class Vm(Protocol):
    backend: Backend

    def process(self) -> ProcessRef | None: ...
    def alive(self) -> bool: ...
    def wait(self, timeout: float) -> bool: ...
    def stop(self, timeout: float = 5.0) -> None: ...
    def record(self) -> dict[str, Any]: ...


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _gone(ref: ProcessRef) -> bool:
    """Fully exited. /proc/PID/stat shows a zombie leader while other threads still run, so wait for those."""
    if ref.alive():
        return False
    try:
        stat = Path(f"/proc/{ref.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[19]) != ref.start_time:
            return True   # the pid was recycled
        return len(os.listdir(f"/proc/{ref.pid}/task")) <= 1
    except (OSError, ValueError, IndexError):
        return True


def _wait_dead(ref: ProcessRef, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(ref):
            return True
        time.sleep(0.02)
    return _gone(ref)


def _kill(ref: ProcessRef, sig: int) -> None:
    if ref.alive():
        try:
            os.kill(ref.pid, sig)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------
# QEMU process


@dataclass
class QemuVm:
    ref: ProcessRef
    qmp_socket: Path
    popen: subprocess.Popen[bytes] | None = None   # only in the process that launched it
    backend: Backend = Backend.qemu

    def process(self) -> ProcessRef:
        return self.ref

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return not _gone(self.ref)

    def wait(self, timeout: float) -> bool:
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        return _wait_dead(self.ref, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """QMP quit, then SIGTERM, then SIGKILL: QEMU is gone when this returns."""
        if not self.alive():
            self.wait(0)
            return
        try:
            with QmpClient(self.qmp_socket, timeout=2) as qmp:
                qmp.execute("quit")
        except (QmpError, OSError):
            pass
        if self.wait(timeout):
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            _kill(self.ref, sig)
            if self.wait(timeout):
                return
        raise StateError(f"QEMU (pid {self.ref.pid}) did not exit")

    def record(self) -> dict[str, Any]:
        return {"backend": self.backend.value, "pid": self.ref.pid, "start_time": self.ref.start_time,
                "qmp_socket": str(self.qmp_socket)}

    def status(self) -> str:
        with QmpClient(self.qmp_socket, timeout=2) as qmp:
            return str(qmp.execute("query-status").get("status"))


def launch_qemu(cfg: VmConfig, *, log_file: Path, attached: bool, qemu: str = "qemu-system-x86_64",
                timeout: float = 30.0) -> QemuVm:
    argv = build_argv(cfg, qemu)
    # Keep the exact command next to the state: `sh qemu.sh` replays a failed launch.
    atomic_write(log_file.with_name("qemu.sh"), (command_line(argv) + "\n").encode(), 0o700)
    with open(log_file, "ab") as out:
        popen = spawn(argv, stdout=out, stderr=out, new_session=True, die_with_parent=attached)
    try:
        ref = ProcessRef.of(popen.pid)
    except StateError as e:
        raise LaunchError(f"QEMU exited immediately: {_tail(log_file) or 'no output'}",
                          hint=f"command: {log_file.with_name('qemu.sh')}") from e
    vm = QemuVm(ref, cfg.qmp_socket, popen)
    # The QMP socket exists before QEMU has opened its devices; the greeting and a status answer
    # come only once the machine is built, so they prove the launch.
    status = None
    if wait_for_socket(cfg.qmp_socket, timeout, vm.alive):
        try:
            status = vm.status()
        except (QmpError, OSError):
            status = None
    if status is None or not vm.alive():
        vm.wait(2)
        tail = _tail(log_file) or f"no QMP answer after {timeout:g} s"
        vm.stop(2)
        raise LaunchError(f"QEMU did not start: {tail}",
                          hint=f"the command is in {log_file.with_name('qemu.sh')}; its output in {log_file}")
    return vm


def attach_qemu(record: dict[str, Any]) -> QemuVm:
    return QemuVm(ProcessRef(int(record["pid"]), int(record["start_time"])), Path(record["qmp_socket"]))


# ---------------------------------------------------------------------------------------------
# libvirt


def libvirt_module() -> Any:
    """The libvirt-python module (a LaunchError with a hint when it is missing), errors not printed."""
    try:
        import libvirt  # optional at import time: only --backend libvirt needs it
    except ImportError as e:
        raise LaunchError("libvirt-python is not installed", hint="run 'make setup'") from e
    # libvirt prints every error to stderr by default ("Domain not found" for each lookup); they are
    # raised as libvirtError and reported by us instead.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def _open(uri: str) -> Any:
    lv = libvirt_module()
    try:
        return lv.open(uri)
    except lv.libvirtError as e:
        raise LaunchError(f"cannot connect to libvirt at {uri}: {e.get_error_message()}", hint=DAEMON_HINT) from e


def _pidfile(uri: str, name: str) -> Path:
    if uri.endswith("/session"):
        runtime = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(Path.home(), ".cache")
        return Path(runtime) / "libvirt" / "qemu" / "run" / f"{name}.pid"
    return LIBVIRT_PIDFILE_DIR / f"{name}.pid"


def _qemu_pid(uri: str, name: str) -> ProcessRef | None:
    try:
        pid = int(_pidfile(uri, name).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        return ProcessRef.of(pid)
    except StateError:
        return None


@dataclass
class LibvirtVm:
    name: str
    uri: str
    ref: ProcessRef | None
    share: Path | None = None        # the domain's published files (removed when it stops)
    backend: Backend = Backend.libvirt

    def _domain(self) -> Any:
        lv = libvirt_module()
        conn = _open(self.uri)
        try:
            return conn, conn.lookupByName(self.name)
        except lv.libvirtError:
            conn.close()
            return None, None

    def process(self) -> ProcessRef | None:
        return self.ref

    def alive(self) -> bool:
        if self.ref is not None:
            return self.ref.alive()
        conn, dom = self._domain()
        if dom is None:
            return False
        try:
            return bool(dom.isActive())
        finally:
            conn.close()

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(0.05)
        return not self.alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Destroy the transient domain (libvirt terminates QEMU, SIGKILL after its own grace period)."""
        lv = libvirt_module()
        conn, dom = self._domain()
        if dom is not None:
            try:
                dom.destroy()
            except lv.libvirtError as e:
                log.debug("libvirt destroy %s: %s", self.name, e)
            finally:
                conn.close()
        if self.ref is not None and not _wait_dead(self.ref, timeout):
            _kill(self.ref, signal.SIGKILL)
            if not _wait_dead(self.ref, timeout):
                raise StateError(f"QEMU of libvirt domain {self.name} (pid {self.ref.pid}) did not exit")
        libvirt_share.remove(self.share)

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"backend": self.backend.value, "domain": self.name, "uri": self.uri}
        if self.ref is not None:
            rec.update(pid=self.ref.pid, start_time=self.ref.start_time)
        if self.share is not None:
            rec["share"] = str(self.share)
        return rec


def qemu_user(conn: Any, accel: Accel) -> libvirt_share.QemuUser | None:
    """Who libvirt runs this domain's QEMU as (None: no DAC security model, i.e. as libvirtd itself)."""
    return libvirt_share.parse_dac_label(conn.getCapabilities(), "kvm" if accel == Accel.kvm else "qemu")


def _log_hint(uri: str, name: str) -> str:
    if uri.endswith("/session"):
        return f"see ~/.cache/libvirt/qemu/log/{name}.log"
    return f"see /var/log/libvirt/qemu/{name}.log"


def launch_libvirt(cfg: VmConfig, *, log_file: Path, uri: str | None = None, timeout: float = 30.0) -> LibvirtVm:
    """Start `cfg` as a transient domain; its files are published for libvirt's QEMU user first."""
    lv = libvirt_module()
    uri = uri or default_uri()
    name = domain_name(cfg)
    xml_path = log_file.with_name("domain.xml")
    conn = _open(uri)
    published = None
    try:
        stale = None
        try:
            stale = conn.lookupByName(name)
        except lv.libvirtError:
            pass
        if stale is not None:
            raise LaunchError(f"libvirt domain {name} already exists",
                              hint=f"'parma-sandbox down {cfg.name}' removes it")
        published = libvirt_share.publish(cfg, name, qemu_user(conn, cfg.accel))
        xml = build_domain_xml(published.config)
        atomic_write(xml_path, xml.encode(), 0o600)
        try:
            conn.createXML(xml, 0)
        except lv.libvirtError as e:
            raise LaunchError(f"libvirt could not start the domain: {e.get_error_message()}",
                              hint=f"the domain XML is in {xml_path}; {_log_hint(uri, name)}") from e
    except BaseException:
        if published is not None:
            libvirt_share.remove(published.directory)
        raise
    finally:
        conn.close()
    vm = LibvirtVm(name, uri, _qemu_pid(uri, name), published.directory)
    if not wait_for_socket(cfg.agent_sockets[0], timeout, vm.alive):
        vm.stop(2)
        raise LaunchError("the libvirt domain did not come up", hint=_log_hint(uri, name))
    return vm


def attach_libvirt(record: dict[str, Any]) -> LibvirtVm:
    ref = ProcessRef(int(record["pid"]), int(record["start_time"])) if "pid" in record else None
    share = Path(record["share"]) if record.get("share") else None
    return LibvirtVm(record["domain"], record.get("uri") or default_uri(), ref, share)


def launch(cfg: VmConfig, backend: Backend, *, log_file: Path, attached: bool) -> Vm:
    if backend == Backend.libvirt:
        return launch_libvirt(cfg, log_file=log_file)
    return launch_qemu(cfg, log_file=log_file, attached=attached)


def attach(record: dict[str, Any]) -> Vm:
    try:
        backend = Backend(record["backend"])
        return attach_libvirt(record) if backend == Backend.libvirt else attach_qemu(record)
    except (KeyError, ValueError, TypeError) as e:
        raise StateError(f"unreadable VM record: {e}") from e

