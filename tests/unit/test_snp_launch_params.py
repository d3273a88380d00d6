"""One source of SEV-SNP launch parameters: the argv, the libvirt XML and the measurement agree.

The QEMU argv and the domain XML are parsed back, a measurement request is rebuilt from each (CPU
model, vCPU count, firmware, kernel, initrd, command line) and compared with the one computed from
the VmConfig, then all three are measured with sev-snp-measure on the AmdSev OVMF fixture. The host
values (cbitpos, reduced-phys-bits) come from CPUID Fn8000_001F, parsed here from register values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
from snpvectors import snp_dir

from sandbox.hostcheck import Tee
from sandbox.launch import measured
from sandbox.shared.errors import CheckFailed, InputError, StateError
from sandbox.uvm.measure import (
    MeasureRequest,
    launch_digest,
    launch_measurement,
    launch_request,
    snp_request,
)
from sandbox.vmm import snp as snp_mod
from sandbox.vmm.config import Accel, Disk, VmConfig
from sandbox.vmm.libvirt_xml import build_domain_xml
from sandbox.vmm.qemu import build_argv
from sandbox.vmm.snp import (
    SNP_GUEST_FEATURES,
    HostSevInfo,
    SevInfoSource,
    SnpLaunch,
    VmConfigError,
    parse_domcaps_sev,
    parse_sev_leaf,
)

HOST = HostSevInfo(cbitpos=51, reduced_phys_bits=1, source=SevInfoSource.given)


def _files(tmp: Path, ovmf: Path, *, initrd: bool) -> dict[str, Path | None]:
    kernel = tmp / "bzImage"
    kernel.write_bytes(hashlib.sha512(b"kernel").digest() * 64)
    rd = None
    if initrd:
        rd = tmp / "initrd.img"
        rd.write_bytes(b"initrd contents")
    disk = tmp / "rootfs.img"
    disk.write_bytes(bytes(4096))
    return {"kernel": kernel, "initrd": rd, "disk": disk, "ovmf": ovmf}


def _config(files: dict[str, Path | None], vcpus: int, cpu_model: str = "EPYC-v4") -> VmConfig:
    snp = SnpLaunch(host_data=bytes(32), firmware=files["ovmf"], cbitpos=51, reduced_phys_bits=1,  # type: ignore[arg-type]
                    cpu_model=cpu_model)
    run = Path("/run/x")
    return VmConfig(name="t", tee=Tee.sev_snp, accel=Accel.kvm, vcpus=vcpus, memory_mib=512,
                    kernel=files["kernel"], cmdline="console=ttyS0 root=/dev/dm-0", initrd=files["initrd"],  # type: ignore[arg-type]
                    disks=(Disk(files["disk"], "parma-root"),), agent_sockets=(run / "a.sock",),  # type: ignore[arg-type]
                    console_log=run / "c.log", qmp_socket=run / "q.sock", snp=snp)


def _from_argv(argv: list[str]) -> MeasureRequest:
    def opt(flag: str) -> str | None:
        return argv[argv.index(flag) + 1] if flag in argv else None

    initrd = opt("-initrd")
    return snp_request(firmware=Path(opt("-bios") or ""), vcpus=int(opt("-smp") or 0), cpu_model=opt("-cpu") or "",
                       guest_features=SNP_GUEST_FEATURES, kernel=Path(opt("-kernel") or ""),
                       initrd=Path(initrd) if initrd else None, cmdline=opt("-append"))


def _from_xml(xml: str) -> MeasureRequest:
    dom = ET.fromstring(xml)
    initrd = dom.findtext("os/initrd")
    return snp_request(firmware=Path(dom.findtext("os/loader") or ""), vcpus=int(dom.findtext("vcpu") or 0),
                       cpu_model=dom.findtext("cpu/model") or "", guest_features=SNP_GUEST_FEATURES,
                       kernel=Path(dom.findtext("os/kernel") or ""), initrd=Path(initrd) if initrd else None,
                       cmdline=dom.findtext("os/cmdline"))


@pytest.mark.parametrize(("vcpus", "initrd", "cpu"), [(1, False, "EPYC-v4"), (4, True, "EPYC-v4"),
                                                      (2, False, "EPYC-Milan")])
def test_argv_xml_and_measurement_use_the_same_parameters(tmp_path: Path, vcpus: int, initrd: bool, cpu: str) -> None:
    ovmf = snp_dir() / "sev-snp-measure/fixtures/ovmf_AmdSev_suffix.bin"
    cfg = _config(_files(tmp_path, ovmf, initrd=initrd), vcpus, cpu)
    want = launch_request(cfg)
    assert want.vcpus == vcpus and want.vcpu_type == cpu and want.initrd == cfg.initrd
    argv_req, xml_req = _from_argv(build_argv(cfg)), _from_xml(build_domain_xml(cfg))
    assert argv_req == want == xml_req
    digest = launch_measurement(cfg)
    assert launch_digest(argv_req) == digest == launch_digest(xml_req)
    # The measurement really depends on each of them (so the comparison above means something).
    if cfg.initrd is not None:                     # an initrd is measured, not ignored
        assert launch_measurement(dataclasses.replace(cfg, initrd=None)) != digest
    others = {launch_measurement(dataclasses.replace(cfg, vcpus=vcpus + 1)),
              launch_measurement(dataclasses.replace(cfg, snp=dataclasses.replace(cfg.snp, cpu_model="EPYC-Genoa"))),
              launch_measurement(dataclasses.replace(cfg, cmdline=cfg.cmdline + " quiet"))}
    assert digest not in others and len(others) == 3


def test_prepare_predicts_what_the_config_measures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's prediction (measured.prepare) and the finished VmConfig measure the same."""
    ovmf = snp_dir() / "sev-snp-measure/fixtures/ovmf_AmdSev_suffix.bin"
    files = _files(tmp_path, ovmf, initrd=True)
    monkeypatch.setattr(measured, "host_sev_info", lambda: HostSevInfo(47, 5, SevInfoSource.given))
    uvm = SimpleNamespace(kernel=files["kernel"], cmdline="console=ttyS0 root=/dev/dm-0", initrd=files["initrd"],
                          firmware=ovmf)
    identity = measured.prepare(Tee.sev_snp, uvm, b'{"policy": 1}', 2)
    assert identity.snp is not None and (identity.snp.cbitpos, identity.snp.reduced_phys_bits) == (47, 5)
    assert identity.host_data == hashlib.sha256(b'{"policy": 1}').digest()
    cfg = dataclasses.replace(_config(files, 2), snp=identity.snp)
    measured.check_config(identity, cfg)          # the same
    assert identity.measurement == launch_measurement(cfg)
    with pytest.raises(StateError, match="drifted"):
        measured.check_config(identity, dataclasses.replace(cfg, vcpus=3))
    # Emulation reports what the same UVM measures on SEV-SNP with the default model.
    emulated = measured.prepare(Tee.emulated, uvm, b'{"policy": 1}', 2)
    assert emulated.snp is None and emulated.measurement == identity.measurement


def test_missing_firmware_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    with pytest.raises(CheckFailed, match="AmdSev OVMF") as e:
        snp_mod.snp_launch(host_data=bytes(32), firmware=None, sev=HOST)
    assert "make firmware-snp" in (e.value.hint or "")
    with pytest.raises(CheckFailed, match="is missing"):
        snp_mod.snp_launch(host_data=bytes(32), firmware=tmp_path / "nope.fd", sev=HOST)


def test_cpuid_leaf_8000001f() -> None:
    eax = 1 << 1 | 1 << 3 | 1 << 4                 # SEV, SEV-ES, SEV-SNP
    ebx = 4 << 12 | 1 << 6 | 51                     # NumVMPL 4, PhysAddrReduction 1, C-bit 51
    info = parse_sev_leaf(eax, ebx)
    assert (info.cbitpos, info.reduced_phys_bits, info.sev, info.sev_es, info.snp) == (51, 1, True, True, True)
    other = parse_sev_leaf(1 << 1, 5 << 6 | 47)
    assert (other.cbitpos, other.reduced_phys_bits, other.snp) == (47, 5, False)


DOMCAPS = (Path(__file__).parents[1] / "data" / "libvirt" / "domcaps-sev-snp.xml").read_text()   # schema-checked


def test_domain_capabilities() -> None:
    info, snp = parse_domcaps_sev(DOMCAPS)
    assert snp and info is not None and (info.cbitpos, info.reduced_phys_bits) == (51, 1)
    assert parse_domcaps_sev(DOMCAPS.replace("<value>sev-snp</value>", "")) == (info, False)
    none, no_snp = parse_domcaps_sev("<domainCapabilities><features><sev supported='no'/>"
                                     "<launchSecurity supported='no'/></features></domainCapabilities>")
    assert none is None and not no_snp


def test_snp_launch_refuses_inconsistent_id_material() -> None:
    base = dict(host_data=bytes(32), firmware=Path("/x.fd"), cbitpos=51, reduced_phys_bits=1)
    with pytest.raises(VmConfigError, match="ID auth"):
        SnpLaunch(**base, id_block=bytes(0x60))    # type: ignore[arg-type]
    with pytest.raises(VmConfigError, match="0x60|96"):
        SnpLaunch(**base, id_block=bytes(95), id_auth=bytes(0x1000))  # type: ignore[arg-type]
    with pytest.raises(VmConfigError, match="author-key-enabled"):
        SnpLaunch(**base, author_key_enabled=True)  # type: ignore[arg-type]
    with pytest.raises(VmConfigError, match="cbitpos"):
        SnpLaunch(**{**base, "cbitpos": 0})  # type: ignore[arg-type]


def test_identity_options_are_checked() -> None:
    with pytest.raises(InputError, match="not both"):
        measured.IdentityOptions(id_key=Path("a"), id_block=Path("b"))
    with pytest.raises(InputError, match="needs --id-key"):
        measured.IdentityOptions(author_key=Path("a"))
