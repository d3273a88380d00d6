"""Fetch an SEV-SNP attestation report from inside the guest.

Order: configfs-tsm (Linux >= 6.7, /sys/kernel/config/tsm/report, when its provider is sev_guest),
then /dev/sev-guest (SNP_GET_REPORT / SNP_GET_EXT_REPORT), then - only when this guest is *not* a confidential guest
and the host launched it in emulation mode - the emulated PSP, a host service reached through the
virtio-serial port org.parma.psp (sandbox/shared/snp/psp_port.py). Whenever the guest shows any sign of
running under a TEE, that port is never used: otherwise a host could answer with HOST_DATA of its choosing.
As on hardware, the guest never holds the key its reports are signed with.

All paths are injectable (GuestPaths) so the logic can be tested against fake trees.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from sandbox.guest.keys import RuntimeKey
from sandbox.guest.server import find_ports
from sandbox.shared.errors import AttestationError, InputError
from sandbox.shared.snp.binding import report_data_for
from sandbox.shared.snp.evidence import ReportEvidence
from sandbox.shared.snp.psp_port import (
    MAX_LINE,
    PORT_NAME,
    PspReportReply,
    PspReportRequest,
    from_line,
    to_line,
)
from sandbox.shared.snp.report import REPORT_SIZE

REPORT_DATA_SIZE = 64


class ReportBackend(StrEnum):
    CONFIGFS_TSM = "configfs-tsm"
    SEV_GUEST = "sev-guest"
    EMULATED = "emulated"


@dataclass(frozen=True)
class GuestPaths:
    configfs_tsm: Path = Path("/sys/kernel/config/tsm/report")
    sev_guest: Path = Path("/dev/sev-guest")
    sev_sysfs: Path = Path("/sys/devices/system/cpu/sev")  # present only in SNP guests (Linux >= 6.11)
    msr: Path = Path("/dev/cpu/0/msr")
    kmsg: Path = Path("/dev/kmsg")
    virtio_ports: Path = Path("/sys/class/virtio-ports")   # the emulated PSP's port is found by name here
    dev: Path = Path("/dev")
    psp_port: Path | None = None    # the emulated PSP's port (a device node or a Unix socket), if not found by name


DEFAULT_PATHS = GuestPaths()


@dataclass(frozen=True)
class ReportResult:
    report: bytes
    cert_table: bytes  # the certificate table (§2.4 of snp.md); b"" when the host supplied none
    backend: ReportBackend


def _pad_report_data(report_data: bytes) -> bytes:
    if len(report_data) > REPORT_DATA_SIZE:
        raise InputError(f"report data must be at most {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    return report_data.ljust(REPORT_DATA_SIZE, b"\0")


def _check_vmpl(vmpl: int) -> None:
    if not 0 <= vmpl <= 3:
        raise InputError(f"VMPL must be 0..3, got {vmpl}")


# --- configfs-tsm (Documentation/ABI/testing/configfs-tsm-report) ---------------------------------

class FsOps(Protocol):
    def mkdir(self, path: Path) -> None: ...
    def rmdir(self, path: Path) -> None: ...
    def read(self, path: Path) -> bytes: ...
    def write(self, path: Path, data: bytes) -> None: ...
    def exists(self, path: Path) -> bool: ...


class OsFsOps:
    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        with open(path, "rb", buffering=0) as f:
            chunks = []
            while chunk := f.read(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    def write(self, path: Path, data: bytes) -> None:
        with open(path, "wb", buffering=0) as f:
            f.write(data)

    def exists(self, path: Path) -> bool:
        return path.exists()


class ConfigfsTsm:
    """One private report instance per request, so no other writer can race us; the generation
    counter is still checked as the kernel documentation asks."""

    PROVIDER = "sev_guest"
    ATTEMPTS = 3

    def __init__(self, root: Path, ops: FsOps | None = None) -> None:
        self.root = root
        self.ops = ops or OsFsOps()

    def provider(self) -> str | None:
        """The registered TSM provider ("sev_guest", "tdx_guest"...), or None. The report directory
        exists whenever the kernel has TSM_REPORTS; without a provider, mkdir fails with ENXIO."""
        if not self.ops.exists(self.root):
            return None
        probe = self.root / f"parma-probe-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            self.ops.mkdir(probe)
        except OSError:
            return None
        try:
            return self.ops.read(probe / "provider").decode(errors="replace").strip() or None
        except OSError:
            return None
        finally:
            try:
                self.ops.rmdir(probe)
            except OSError:
                pass

    def _generation(self, entry: Path) -> int:
        return int(self.ops.read(entry / "generation").strip() or b"0")

    def get(self, report_data: bytes, vmpl: int) -> ReportResult:
        for _ in range(self.ATTEMPTS):
            entry = self.root / f"parma-{os.getpid()}-{os.urandom(4).hex()}"
            try:
                self.ops.mkdir(entry)
            except OSError as e:
                raise AttestationError(f"configfs-tsm: cannot create {entry}: {e.strerror}") from e
            try:
                result = self._request(entry, report_data, vmpl)
            finally:
                try:
                    self.ops.rmdir(entry)
                except OSError:
                    pass  # the kernel removes nothing on its own; a leftover entry is harmless
            if result is not None:
                return result
        raise AttestationError(f"configfs-tsm: report generation kept changing under us ({self.ATTEMPTS} tries)")

    def _request(self, entry: Path, report_data: bytes, vmpl: int) -> ReportResult | None:
        provider = self.ops.read(entry / "provider").decode(errors="replace").strip()
        if provider != self.PROVIDER:
            raise AttestationError(f"configfs-tsm provider is {provider!r}, not {self.PROVIDER!r}",
                                   hint="this guest's TEE is not AMD SEV-SNP")
        before = self._generation(entry)
        writes = 0
        if self.ops.exists(entry / "privlevel"):
            floor_path = entry / "privlevel_floor"
            floor = int(self.ops.read(floor_path).strip() or b"0") if self.ops.exists(floor_path) else 0
            if vmpl < floor:
                raise AttestationError(f"requested VMPL {vmpl} is below this guest's floor {floor}")
            self.ops.write(entry / "privlevel", str(vmpl).encode())
            writes += 1
        elif vmpl:
            raise AttestationError("this kernel's configfs-tsm cannot request a VMPL other than its own")
        self.ops.write(entry / "inblob", report_data)
        writes += 1
        try:
            report = self.ops.read(entry / "outblob")
        except OSError as e:
            raise AttestationError(f"configfs-tsm: reading outblob failed: {e.strerror}",
                                   hint="the kernel log (dmesg) has the firmware's error") from e
        aux = self.ops.read(entry / "auxblob") if self.ops.exists(entry / "auxblob") else b""
        if self._generation(entry) != before + writes:
            return None  # somebody else wrote to this instance between our writes and reads
        if len(report) != REPORT_SIZE:
            raise AttestationError(f"configfs-tsm returned {len(report)} bytes, expected {REPORT_SIZE}")
        return ReportResult(report, aux, ReportBackend.CONFIGFS_TSM)


# --- /dev/sev-guest (include/uapi/linux/sev-guest.h) -----------------------------------------------

# _IOWR('S', n, struct snp_guest_request_ioctl) with a 32-byte argument.
SNP_GET_REPORT = 0xC0205300
SNP_GET_EXT_REPORT = 0xC0205302
GUEST_REQUEST = struct.Struct("<B7xQQQ")  # msg_version, req_data, resp_data, exitinfo2
REPORT_REQ = struct.Struct("<64sI28x")  # snp_report_req: user_data, vmpl, rsvd
EXT_REPORT_REQ = struct.Struct("<64sI28xQI4x")  # snp_ext_report_req: data, certs_address, certs_len
REPORT_RESP_SIZE = 4000  # snp_report_resp: MSG_REPORT_RSP, the report at offset 0x20
REPORT_RESP_HEADER = struct.Struct("<II24x")  # status, report_size, reserved
VMM_ERR_INVALID_LEN = 1
VMM_ERR_BUSY = 2
PAGE = 4096
MAX_CERTS = 0x4000 * 16  # far more than an ARK+ASK+VCEK table needs

IoctlFn = Callable[[int, int, bytearray], int]


class SevGuestDevice:
    def __init__(self, path: Path, ioctl: IoctlFn | None = None,
                 opener: Callable[[Path], int] | None = None) -> None:
        self.path = path
        self.ioctl: IoctlFn = ioctl or (lambda fd, req, buf: fcntl.ioctl(fd, req, buf, True))
        self.opener = opener or (lambda p: os.open(p, os.O_RDWR | os.O_CLOEXEC))

    def available(self) -> bool:
        return self.path.exists()

    def _call(self, fd: int, code: int, req: ctypes.Array[ctypes.c_char],
              resp: ctypes.Array[ctypes.c_char]) -> tuple[int, int, int]:
        """Issue one guest request; returns (errno or 0, fw_error, vmm_error)."""
        arg = bytearray(GUEST_REQUEST.pack(1, ctypes.addressof(req), ctypes.addressof(resp), 0))
        err = 0
        try:
            self.ioctl(fd, code, arg)
        except OSError as e:
            err = e.errno or errno.EIO
        _, _, _, exitinfo2 = GUEST_REQUEST.unpack(bytes(arg))
        return err, exitinfo2 & 0xFFFFFFFF, exitinfo2 >> 32

    def get(self, report_data: bytes, vmpl: int, *, with_certs: bool = True) -> ReportResult:
        try:
            fd = self.opener(self.path)
        except OSError as e:
            raise AttestationError(f"cannot open {self.path}: {e.strerror}") from e
        try:
            return self._get(fd, report_data, vmpl, with_certs)
        finally:
            os.close(fd)

    def _get(self, fd: int, report_data: bytes, vmpl: int, with_certs: bool) -> ReportResult:
        resp = ctypes.create_string_buffer(REPORT_RESP_SIZE)
        certs_len = 4 * PAGE
        for attempt in range(8):
            if with_certs:
                certs = ctypes.create_string_buffer(certs_len)
                req = ctypes.create_string_buffer(
                    EXT_REPORT_REQ.pack(report_data, vmpl, ctypes.addressof(certs), certs_len), EXT_REPORT_REQ.size)
                err, fw_error, vmm_error = self._call(fd, SNP_GET_EXT_REPORT, req, resp)
                if err and vmm_error == VMM_ERR_INVALID_LEN:
                    needed = EXT_REPORT_REQ.unpack(req.raw)[3]  # the kernel wrote back the size it needs
                    if not certs_len < needed <= MAX_CERTS:
                        raise AttestationError(f"{self.path}: the host's certificate table needs {needed} bytes")
                    certs_len = -(-needed // PAGE) * PAGE
                    continue
            else:
                req = ctypes.create_string_buffer(REPORT_REQ.pack(report_data, vmpl), REPORT_REQ.size)
                err, fw_error, vmm_error = self._call(fd, SNP_GET_REPORT, req, resp)
            if err in (errno.EAGAIN, errno.EBUSY) or (err and vmm_error == VMM_ERR_BUSY):
                time.sleep(0.2 * (attempt + 1))  # the kernel throttles guest requests
                continue
            if err:
                raise AttestationError(f"{self.path}: request failed: {os.strerror(err)} "
                                       f"(firmware error 0x{fw_error:x}, VMM error 0x{vmm_error:x})")
            status, size = REPORT_RESP_HEADER.unpack_from(resp.raw)
            if status != 0:
                raise AttestationError(f"{self.path}: firmware returned status 0x{status:x}",
                                       hint="0x16 means invalid parameters (e.g. a VMPL below the guest's own)")
            if size != REPORT_SIZE:
                raise AttestationError(f"{self.path}: firmware returned a {size}-byte report")
            report = resp.raw[REPORT_RESP_HEADER.size:REPORT_RESP_HEADER.size + REPORT_SIZE]
            table = certs.raw if with_certs else b""
            return ReportResult(report, table if table.strip(b"\0") else b"", ReportBackend.SEV_GUEST)
        raise AttestationError(f"{self.path}: the firmware stayed busy", hint="retry in a few seconds")


# --- deciding what this guest is ---------------------------------------------------------------------

MSR_SEV_STATUS = 0xC0010131
SEV_STATUS_SNP = 1 << 2


SNP_KMSG_MARK = b"Memory Encryption Features active:"


def _kmsg_says_snp(path: Path) -> bool:
    """Whether the kernel log has the boot line 'Memory Encryption Features active: AMD SEV SEV-ES
    SEV-SNP' (arch/x86/mm/mem_encrypt.c). Works on kernels that predate /sys/devices/system/cpu/sev."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        for _ in range(100_000):  # one record per read; stop at the end of the buffer
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                return False
            except BrokenPipeError:
                continue  # the record was overwritten while we read: go on with the next
            except OSError:
                return False
            if not record:
                return False
            if SNP_KMSG_MARK in record and b"SEV-SNP" in record:
                return True
        return False
    finally:
        os.close(fd)


def tee_evidence(paths: GuestPaths = DEFAULT_PATHS, fs_ops: FsOps | None = None) -> list[str]:
    """Every sign that this guest runs under a TEE. Non-empty means: never use emulated material."""
    found = [str(p) for p in (paths.sev_guest, paths.sev_sysfs) if p.exists()]
    if provider := ConfigfsTsm(paths.configfs_tsm, fs_ops).provider():
        found.append(f"configfs-tsm provider {provider!r}")
    if _kmsg_says_snp(paths.kmsg):
        found.append("kernel log: SEV-SNP memory encryption active")
    try:
        fd = os.open(paths.msr, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return found
    try:
        (status,) = struct.unpack("<Q", os.pread(fd, 8, MSR_SEV_STATUS))
        if status & SEV_STATUS_SNP:
            found.append("SEV_STATUS MSR: SNP active")
    except OSError:
        pass  # not an SEV guest: the MSR read faults and the msr driver returns EIO
    finally:
        os.close(fd)
    return found


def select_backend(paths: GuestPaths = DEFAULT_PATHS, fs_ops: FsOps | None = None) -> ReportBackend:
    provider = ConfigfsTsm(paths.configfs_tsm, fs_ops).provider()
    if provider == ConfigfsTsm.PROVIDER:
        return ReportBackend.CONFIGFS_TSM
    if SevGuestDevice(paths.sev_guest).available():
        return ReportBackend.SEV_GUEST
    if evidence := tee_evidence(paths, fs_ops):
        raise AttestationError("this guest runs under a TEE but has no SEV-SNP report interface ("
                               + ", ".join(evidence) + ")",
                               hint="SEV-SNP guests need the sev-guest driver (configfs-tsm on /sys/kernel/config "
                                    "or /dev/sev-guest); emulated material is never used inside a TEE")
    if find_psp_port(paths) is not None:
        return ReportBackend.EMULATED
    raise AttestationError("no attestation interface: not an SEV-SNP guest and no emulated PSP",
                           hint=f"SEV-SNP guests need configfs-tsm or /dev/sev-guest; emulation mode gives the guest "
                                f"the virtio-serial port {PORT_NAME}")


# --- the emulated PSP (emulation mode only) -----------------------------------------------------------

def find_psp_port(paths: GuestPaths = DEFAULT_PATHS) -> Path | None:
    """The emulated PSP's port: paths.psp_port if it exists, else the virtio-serial port named
    org.parma.psp (found as the agent finds its own ports: there is no udev in the UVM)."""
    if paths.psp_port is not None:
        return paths.psp_port if paths.psp_port.exists() else None
    dev = find_ports(PORT_NAME, sys_dir=paths.virtio_ports, dev_dir=paths.dev).get(PORT_NAME)
    return Path(dev) if dev is not None else None


class EmulatedPspPort:
    """MSG_REPORT_REQ to the emulated PSP on the host: one request line, one reply line with its id.

    The port stays open (virtio-serial allows one opener) and requests take turns on it. Until the host's
    service is connected, a virtio-serial port reports POLLHUP and refuses writes: that is waited out, up to
    TIMEOUT. A reply with another id (one a timed-out request left behind) is skipped."""

    TIMEOUT = 30.0
    _lock = threading.Lock()
    _open: tuple[Path, int] | None = None     # the open port, shared by every request of this process

    def __init__(self, path: Path, timeout: float | None = None) -> None:
        self.path = path
        self.timeout = self.TIMEOUT if timeout is None else timeout

    def _fd(self) -> int:
        cls = type(self)
        if cls._open is not None and cls._open[0] == self.path:
            return cls._open[1]
        self._close()
        if self.path.is_socket():   # what tests and host-side harnesses serve the PSP on
            import socket

            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(os.fspath(self.path))
            except OSError as e:
                sock.close()
                raise AttestationError(f"cannot reach the emulated PSP at {self.path}: {e.strerror}") from e
            fd = sock.detach()
            os.set_blocking(fd, False)
        else:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise AttestationError(f"cannot open the emulated PSP port {self.path}: {e.strerror}") from e
        cls._open = (self.path, fd)
        return fd

    @classmethod
    def _close(cls) -> None:
        if cls._open is not None:
            os.close(cls._open[1])
            cls._open = None

    def get(self, report_data: bytes, vmpl: int) -> ReportResult:
        request = PspReportRequest(os.urandom(8).hex(), report_data, vmpl)
        with self._lock:
            try:
                reply = self._exchange(to_line(request), request.id)
            except AttestationError:
                self._close()   # the next request starts on a fresh descriptor, past whatever was half-read
                raise
        if reply.error is not None:
            raise AttestationError(f"the emulated PSP refused the request: {reply.error}")
        if len(reply.report) != REPORT_SIZE:
            raise AttestationError(f"the emulated PSP answered with a {len(reply.report)}-byte report")
        return ReportResult(reply.report, reply.cert_table, ReportBackend.EMULATED)

    def _exchange(self, line: bytes, request_id: str) -> PspReportReply:
        fd = self._fd()
        deadline = time.monotonic() + self.timeout
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLOUT)
        pending = b""
        while line:
            if not self._wait(poller, fd, select.POLLOUT, deadline):
                raise AttestationError(f"the emulated PSP ({self.path}) is not connected after {self.timeout:.0f} s",
                                       hint="the host runs it beside QEMU: see psp.log in the sandbox's state directory")
            try:
                line = line[os.write(fd, line):]
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                raise AttestationError(f"writing to the emulated PSP failed: {e.strerror}") from e
        while True:
            while (end := pending.find(b"\n")) >= 0:
                raw, pending = pending[:end], pending[end + 1:]
                try:
                    reply = from_line(PspReportReply, raw, source="the emulated PSP's reply") if raw.strip() else None
                except InputError as e:
                    raise AttestationError(e.message) from e
                if reply is not None and reply.id == request_id:
                    return reply
            if len(pending) > MAX_LINE:
                raise AttestationError(f"the emulated PSP sent a line of more than {MAX_LINE} bytes")
            if not self._wait(poller, fd, select.POLLIN, deadline):
                raise AttestationError(f"the emulated PSP did not answer within {self.timeout:.0f} s")
            try:
                chunk = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                raise AttestationError(f"reading from the emulated PSP failed: {e.strerror}") from e
            if not chunk:
                raise AttestationError("the emulated PSP closed the port")
            pending += chunk

    @staticmethod
    def _wait(poller: select.poll, fd: int, event: int, deadline: float) -> bool:
        """Until `fd` is ready for `event` (True) or the deadline passes (False). POLLHUP alone means the
        host end is not connected (yet): poll again shortly."""
        poller.modify(fd, event)
        while (left := deadline - time.monotonic()) > 0:
            ready = poller.poll(min(left, 0.05) * 1000)
            if any(mask & event for _, mask in ready):
                return True
            if ready:   # POLLHUP or POLLERR only: the host's service is not there yet
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return False


def get_extended_report(report_data: bytes, vmpl: int = 0, *, paths: GuestPaths = DEFAULT_PATHS,
                        fs_ops: FsOps | None = None, ioctl: IoctlFn | None = None) -> ReportResult:
    """A fresh report for `report_data` (at most 64 bytes, zero-padded) plus the certificate table."""
    data = _pad_report_data(report_data)
    _check_vmpl(vmpl)
    backend = select_backend(paths, fs_ops)
    if backend == ReportBackend.CONFIGFS_TSM:
        return ConfigfsTsm(paths.configfs_tsm, fs_ops).get(data, vmpl)
    if backend == ReportBackend.SEV_GUEST:
        return SevGuestDevice(paths.sev_guest, ioctl).get(data, vmpl)
    port = find_psp_port(paths)
    if port is None:
        raise AttestationError(f"the emulated PSP's port {PORT_NAME} went away")
    return EmulatedPspPort(port).get(data, vmpl)


def get_report(report_data: bytes, vmpl: int = 0, *, paths: GuestPaths = DEFAULT_PATHS) -> bytes:
    """The 1184-byte ATTESTATION_REPORT for `report_data` requested at `vmpl`."""
    return get_extended_report(report_data, vmpl, paths=paths).report


# --- the agent's runtime key and the evidence for a verifier's nonce --------------------------------

@functools.cache
def runtime_key() -> RuntimeKey:
    """The agent's runtime P-384 key pair: made in memory (by OpenSSL) once per boot, on first use;
    never leaves the guest. Verifiers (and the key broker) encrypt to its public key; REPORT_DATA
    binds it to the report."""
    return RuntimeKey.generate()


def evidence_for(nonce: bytes, *, key: RuntimeKey | None = None, paths: GuestPaths = DEFAULT_PATHS,
                 fs_ops: FsOps | None = None, ioctl: IoctlFn | None = None,
                 bind_runtime_key: bool = True) -> ReportEvidence:
    """A fresh report with REPORT_DATA = SHA-512(nonce || runtime public key DER), plus what a
    verifier needs to check it. This is the agent's `get_report` result (`.to_payload()`).

    With bind_runtime_key=False the report binds the nonce alone (REPORT_DATA = SHA-512(nonce)) and the
    evidence names no key: enough to show which UVM answered (the launch self-check), never enough to
    release a secret (no broker accepts evidence without a key), and no key is made for it."""
    public_der = (key or runtime_key()).public_der if bind_runtime_key else b""
    result = get_extended_report(report_data_for(nonce, public_der), paths=paths, fs_ops=fs_ops, ioctl=ioctl)
    return ReportEvidence(result.report, result.cert_table, public_der, nonce, result.backend.value)
