"""Guest-side report fetch: configfs-tsm and /dev/sev-guest against fakes that follow the kernel ABI,
the emulated PSP end to end, and the rule that a TEE guest never uses emulated material."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sandbox.attest.psp_service import vcek_signer
from sandbox.guest import snp_report as g
from sandbox.shared.errors import AttestationError, InputError
from sandbox.shared.snp.cert_table import CertKind, parse_cert_table
from sandbox.shared.snp.emulated_psp import EmulatedPsp, PspMaterial
from sandbox.shared.snp.product import Cpuid, Product, TcbLayout
from sandbox.shared.snp.report import FirmwareVersion, parse_report
from sandbox.shared.snp.tcb import TcbVersion
from tests.psp_serve import psp_socket_for

KEY_D = 0x1234567890ABCDEF
KEY = KEY_D.to_bytes(48, "big")
SIGN = vcek_signer(KEY)


def material(**overrides: object) -> PspMaterial:
    base = PspMaterial(
        product=Product.GENOA, report_version=5, cpuid=Cpuid(0x19, 0x11, 1), policy=0x30000, guest_svn=0,
        family_id=bytes(16), image_id=bytes(16), host_data=bytes(range(32)), measurement=b"\x11" * 48,
        id_key_digest=bytes(48), author_key_digest=bytes(48), report_id=b"\x22" * 32, report_id_ma=b"\xff" * 32,
        chip_id=b"\x33" * 64, platform_info=0x1,
        tcb=TcbVersion.from_parts(TcbLayout.LEGACY, bl=9, tee=0, snp=23, ucode=72).raw,
        firmware=FirmwareVersion(1, 55, 40), mit_vector=0, vcek_private_key=KEY,
        certificates={CertKind.VCEK: b"vcek", CertKind.ASK: b"ask", CertKind.ARK: b"ark"})
    return replace(base, **overrides)


def openssl_verifies(report: bytes) -> bool:
    pub = ec.derive_private_key(KEY_D, ec.SECP384R1()).public_key()
    r = int.from_bytes(report[0x2A0:0x2E8], "little")
    s = int.from_bytes(report[0x2E8:0x330], "little")
    try:
        pub.verify(encode_dss_signature(r, s), report[:0x2A0], ec.ECDSA(hashes.SHA384()))
    except Exception:  # InvalidSignature
        return False
    return True


def paths(tmp_path: Path, psp: PspMaterial | None = None, **present: bytes | None) -> g.GuestPaths:
    """GuestPaths under tmp_path; each name given in `present` is created (file content or a dir); with
    `psp`, the emulated PSP serves that material on the guest's port."""
    port = None
    if psp is not None:
        (tmp_path / "psp.json").write_bytes(psp.to_bytes())
        port = psp_socket_for(tmp_path / "psp.json")
    p = g.GuestPaths(configfs_tsm=tmp_path / "tsm" / "report", sev_guest=tmp_path / "dev" / "sev-guest",
                     sev_sysfs=tmp_path / "sys" / "sev", msr=tmp_path / "dev" / "msr",
                     kmsg=tmp_path / "dev" / "kmsg", virtio_ports=tmp_path / "sys" / "class" / "virtio-ports",
                     psp_port=port)
    for name, content in present.items():
        path: Path = getattr(p, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
    return p


# --- emulated PSP ----------------------------------------------------------------------------------

def test_material_round_trips_and_is_strict() -> None:
    m = material()
    assert PspMaterial.from_bytes(m.to_bytes()) == m
    with pytest.raises(InputError, match="not JSON"):
        PspMaterial.from_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="missing keys"):
        PspMaterial.from_bytes(m.to_bytes().replace(b'"guest_svn"', b'"guest_svm"'))


@pytest.mark.parametrize("version", [2, 3, 5])
def test_emulated_report_is_exact_format_and_openssl_verifies_it(version: int) -> None:
    psp = EmulatedPsp(material(report_version=version), SIGN)
    raw = psp.report(b"\xab" * 64, vmpl=1)
    report = parse_report(raw, product=Product.GENOA)
    assert (report.version, report.vmpl, report.report_data) == (version, 1, b"\xab" * 64)
    assert report.host_data == bytes(range(32)) and report.measurement == b"\x11" * 48
    assert report.reported_tcb.spls() == {"bl": 9, "tee": 0, "snp": 23, "ucode": 72}
    assert openssl_verifies(raw)
    tampered = bytearray(raw)
    tampered[0x90] ^= 1
    assert not openssl_verifies(bytes(tampered))


def test_emulated_backend_through_the_psp_port(tmp_path: Path) -> None:
    p = paths(tmp_path, psp=material())
    assert g.select_backend(p) == g.ReportBackend.EMULATED
    result = g.get_extended_report(b"nonce-hash", paths=p)
    assert result.backend == g.ReportBackend.EMULATED
    assert parse_report(result.report).report_data == b"nonce-hash".ljust(64, b"\0")
    assert [e.kind for e in parse_cert_table(result.cert_table)] == [CertKind.VCEK, CertKind.ASK, CertKind.ARK]
    with pytest.raises(InputError, match="at most 64"):
        g.get_report(bytes(65), paths=p)


@pytest.mark.parametrize(("tee_sign", "content"), [
    ("sev_sysfs", None), ("sev_guest", b""),
    ("kmsg", b"6,123,456,-;Memory Encryption Features active: AMD SEV SEV-ES SEV-SNP\n")])
def test_tee_guest_never_uses_the_emulated_psp(tmp_path: Path, tee_sign: str, content: bytes | None) -> None:
    p = paths(tmp_path, psp=material())
    assert g.select_backend(p) == g.ReportBackend.EMULATED
    path: Path = getattr(p, tee_sign)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if content is None else path.write_bytes(content)
    if tee_sign == "sev_guest":
        assert g.select_backend(p) == g.ReportBackend.SEV_GUEST
    else:  # SNP is active but neither report interface is there: refuse, never emulate
        with pytest.raises(AttestationError, match="runs under a TEE but has no SEV-SNP report interface"):
            g.get_report(bytes(64), paths=p)


def test_configfs_tsm_counts_only_with_a_provider(tmp_path: Path) -> None:
    p = paths(tmp_path, psp=material(), configfs_tsm=None)
    psp = EmulatedPsp(material(), SIGN)
    # TSM_REPORTS=y without a provider (an ordinary guest): mkdir fails with ENXIO; emulation is fine.
    assert g.select_backend(p, FakeTsm(p.configfs_tsm, psp, provider=None)) == g.ReportBackend.EMULATED
    assert g.select_backend(p, FakeTsm(p.configfs_tsm, psp)) == g.ReportBackend.CONFIGFS_TSM
    with pytest.raises(AttestationError, match="provider 'tdx_guest'"):
        g.select_backend(p, FakeTsm(p.configfs_tsm, psp, provider=b"tdx_guest\n"))


def test_no_interface_at_all(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="no attestation interface"):
        g.get_report(bytes(64), paths=paths(tmp_path))


# --- configfs-tsm ------------------------------------------------------------------------------------

class FakeTsm:
    """In-memory configfs-tsm with the kernel's semantics: per-entry attributes, a generation counter
    bumped on each write, outblob generated from inblob/privlevel on read."""

    def __init__(self, root: Path, psp: EmulatedPsp, provider: bytes | None = b"sev_guest\n",
                 floor: int = 0) -> None:
        self.root, self.psp, self.provider, self.floor = root, psp, provider, floor
        self.entries: dict[Path, dict[str, object]] = {}
        self.meddle = False  # simulate a concurrent writer

    def exists(self, path: Path) -> bool:
        if path == self.root:
            return True
        return path.parent in self.entries and path.name in (
            "inblob", "outblob", "auxblob", "provider", "generation", "privlevel", "privlevel_floor")

    def mkdir(self, path: Path) -> None:
        assert path.parent == self.root
        if self.provider is None:
            raise OSError(errno.ENXIO, "No such device or address")
        self.entries[path] = {"generation": 0, "inblob": bytes(64), "privlevel": self.floor}

    def rmdir(self, path: Path) -> None:
        del self.entries[path]

    def write(self, path: Path, data: bytes) -> None:
        e = self.entries[path.parent]
        if path.name == "privlevel":
            level = int(data)
            if level < self.floor:
                raise OSError(errno.EINVAL, "Invalid argument")
            e["privlevel"] = level
        elif path.name == "inblob":
            e["inblob"] = data.ljust(64, b"\0")
        else:
            raise OSError(errno.EACCES, "read-only")
        e["generation"] = int(e["generation"]) + 1  # type: ignore[call-overload]
        if self.meddle:
            e["generation"] = int(e["generation"]) + 1  # type: ignore[call-overload]

    def read(self, path: Path) -> bytes:
        e = self.entries[path.parent]
        if path.name == "provider":
            return self.provider or b""
        if path.name == "generation":
            return f"{e['generation']}\n".encode()
        if path.name == "privlevel_floor":
            return f"{self.floor}\n".encode()
        if path.name == "outblob":
            return self.psp.report(e["inblob"], e["privlevel"])  # type: ignore[arg-type]
        if path.name == "auxblob":
            return self.psp.cert_table()
        raise OSError(errno.EACCES, "write-only")


def test_configfs_tsm_path(tmp_path: Path) -> None:
    p = paths(tmp_path, configfs_tsm=None)
    fake = FakeTsm(p.configfs_tsm, EmulatedPsp(material(), SIGN))
    result = g.get_extended_report(b"\x07" * 64, vmpl=2, paths=p, fs_ops=fake)
    assert result.backend == g.ReportBackend.CONFIGFS_TSM
    report = parse_report(result.report)
    assert report.report_data == b"\x07" * 64 and report.vmpl == 2 and openssl_verifies(result.report)
    assert len(parse_cert_table(result.cert_table)) == 3
    assert fake.entries == {}  # the instance was removed


def test_configfs_tsm_refusals(tmp_path: Path) -> None:
    root = tmp_path / "report"
    psp = EmulatedPsp(material(), SIGN)
    with pytest.raises(AttestationError, match="provider is 'tdx_guest'"):
        g.ConfigfsTsm(root, FakeTsm(root, psp, provider=b"tdx_guest\n")).get(bytes(64), 0)
    with pytest.raises(AttestationError, match="below this guest's floor 2"):
        g.ConfigfsTsm(root, FakeTsm(root, psp, floor=2)).get(bytes(64), 0)
    racy = FakeTsm(root, psp)
    racy.meddle = True
    with pytest.raises(AttestationError, match="kept changing"):
        g.ConfigfsTsm(root, racy).get(bytes(64), 0)
    assert racy.entries == {}


# --- /dev/sev-guest -----------------------------------------------------------------------------------

class FakeSevGuest:
    """Implements SNP_GET_REPORT / SNP_GET_EXT_REPORT on the caller's memory like the driver does."""

    def __init__(self, psp: EmulatedPsp, certs: bytes) -> None:
        self.psp, self.certs, self.calls = psp, certs, []

    def __call__(self, fd: int, code: int, arg: bytearray) -> int:
        version, req_addr, resp_addr, _ = g.GUEST_REQUEST.unpack(bytes(arg))
        assert version == 1
        self.calls.append(code)
        if code == g.SNP_GET_REPORT:
            user_data, vmpl = g.REPORT_REQ.unpack(ctypes.string_at(req_addr, g.REPORT_REQ.size))
        elif code == g.SNP_GET_EXT_REPORT:
            user_data, vmpl, certs_addr, certs_len = g.EXT_REPORT_REQ.unpack(
                ctypes.string_at(req_addr, g.EXT_REPORT_REQ.size))
            assert certs_len % g.PAGE == 0
            needed = -(-len(self.certs) // g.PAGE) * g.PAGE
            if certs_len < needed:
                ctypes.memmove(req_addr + 0x68, struct.pack("<I", needed), 4)
                arg[24:32] = struct.pack("<II", 0, g.VMM_ERR_INVALID_LEN)
                raise OSError(errno.EIO, "Input/output error")
            ctypes.memmove(certs_addr, self.certs, len(self.certs))
        else:
            raise OSError(errno.ENOTTY, "bad ioctl")
        report = self.psp.report(user_data, vmpl)
        resp = struct.pack("<II24x", 0, len(report)) + report
        ctypes.memmove(resp_addr, resp, len(resp))
        return 0


def test_sev_guest_ext_report_grows_the_certs_buffer(tmp_path: Path) -> None:
    psp = EmulatedPsp(material(certificates={CertKind.VCEK: b"v" * 9000, CertKind.ASK: b"a" * 5000,
                                             CertKind.ARK: b"r" * 5000}), SIGN)
    fake = FakeSevGuest(psp, psp.cert_table())
    p = paths(tmp_path, sev_guest=b"")
    result = g.get_extended_report(b"\x05" * 64, paths=p, ioctl=fake)
    assert result.backend == g.ReportBackend.SEV_GUEST
    assert fake.calls == [g.SNP_GET_EXT_REPORT, g.SNP_GET_EXT_REPORT]  # 16 KiB was too small
    assert parse_report(result.report).report_data == b"\x05" * 64 and openssl_verifies(result.report)
    assert [len(e.data) for e in parse_cert_table(result.cert_table)] == [9000, 5000, 5000]


def test_sev_guest_plain_report_and_errors(tmp_path: Path) -> None:
    psp = EmulatedPsp(material(), SIGN)
    dev = tmp_path / "sev-guest"
    dev.write_bytes(b"")
    fake = FakeSevGuest(psp, b"")
    result = g.SevGuestDevice(dev, fake).get(b"\x01" * 64, 0, with_certs=False)
    assert fake.calls == [g.SNP_GET_REPORT] and result.cert_table == b""

    def firmware_says_no(fd: int, code: int, arg: bytearray) -> int:
        arg[24:32] = struct.pack("<II", 0x16, 0)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.raises(AttestationError, match="firmware error 0x16"):
        g.SevGuestDevice(dev, firmware_says_no).get(bytes(64), 0)


def test_evidence_for_a_nonce_binds_the_runtime_key(tmp_path: Path) -> None:
    from sandbox.shared.snp.evidence import ReportEvidence
    p = paths(tmp_path, psp=material())
    assert g.runtime_key() is g.runtime_key()  # one key per agent process
    evidence = g.evidence_for(bytes(range(16)), paths=p)
    payload = evidence.to_payload()
    assert set(payload) == {"report", "cert_table", "runtime_public_key", "nonce", "backend"}
    back = ReportEvidence.from_payload(payload)
    assert back == evidence and back.binding_holds() and back.backend == "emulated"
    assert back.runtime_public_key == g.runtime_key().public_der
    assert not ReportEvidence.from_payload({**payload, "nonce": "ff" * 16}).binding_holds()
    with pytest.raises(InputError, match="exactly the keys"):
        ReportEvidence.from_payload({**payload, "extra": 1})
    with pytest.raises(InputError, match="nonce must be"):
        g.evidence_for(b"short", paths=p)
