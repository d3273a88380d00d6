"""Expected AMD SEV(-ES/-SNP) launch measurements, computed with sev-snp-measure as a library.

`MeasureRequest` mirrors sev-snp-measure's command-line options one to one, so `parma-sandbox measure`
accepts the same flags and prints the same hex. `launch_request(cfg)` is the request for an SEV-SNP
VmConfig, every value read from the config that also renders the QEMU argv and the libvirt XML
(firmware, vCPU count, CPU model, SEV features, kernel, initrd, command line), so the prediction
cannot drift from the launch. `expected_snp_measurements` gives the table the UVM manifest records:
the launch digest of our AmdSev OVMF + kernel + command line (kernel-hashes=on, no initrd) for a few
vCPU counts and CPU models.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sevsnpmeasure import guest, vcpu_types
from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vmm_types import VMMType

from sandbox.shared.errors import InputError
from sandbox.vmm.config import VmConfig
from sandbox.vmm.snp import SNP_CPU_MODEL, SNP_GUEST_FEATURES, VmConfigError, snp_cpu_model

# SEV_FEATURES that QEMU >= 9.1 (KVM_SEV_INIT2) gives an SNP guest: SNPActive only.
QEMU_SNP_GUEST_FEATURES = SNP_GUEST_FEATURES
# The manifest's table: vCPU counts and QEMU CPU models (their CPUID(1).EAX goes into every VMSA).
MANIFEST_VCPUS = (1, 2, 4)
MANIFEST_CPU_TYPES = (SNP_CPU_MODEL, "EPYC-Milan", "EPYC-Genoa")
CPU_TYPES = tuple(vcpu_types.CPU_SIGS)


class Mode(StrEnum):
    sev = "sev"
    seves = "seves"
    snp = "snp"
    snp_ovmf_hash = "snp:ovmf-hash"
    snp_svsm = "snp:svsm"


class VmmType(StrEnum):
    QEMU = "QEMU"
    ec2 = "ec2"
    gce = "gce"


class DigestEncoding(StrEnum):
    hex = "hex"
    base64 = "base64"


@dataclass(frozen=True)
class MeasureRequest:
    """One sev-snp-measure invocation (same names and defaults as its CLI)."""

    mode: Mode
    ovmf: Path
    vcpus: int | None = None
    vcpu_type: str | None = None
    vcpu_sig: int | None = None
    vcpu_family: int | None = None
    vcpu_model: int | None = None
    vcpu_stepping: int | None = None
    vmm_type: VmmType = VmmType.QEMU
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    guest_features: int = 0x1
    snp_ovmf_hash: str | None = None
    dump_vmsa: bool = False
    svsm: Path | None = None
    vars_size: int | None = None
    vars_file: Path | None = None


def cpu_signature(req: MeasureRequest) -> int | None:
    """CPUID(1).EAX of the guest CPU, chosen the way sev-snp-measure chooses it."""
    if req.mode == Mode.sev:
        return 0
    if req.vcpu_family:
        if req.vcpu_model is None or req.vcpu_stepping is None:
            raise InputError("--vcpu-family needs --vcpu-model and --vcpu-stepping too")
        return vcpu_types.cpu_sig(req.vcpu_family, req.vcpu_model, req.vcpu_stepping)
    if req.vcpu_sig:
        return req.vcpu_sig
    if req.vcpu_type:
        if req.vcpu_type not in vcpu_types.CPU_SIGS:
            raise InputError(f"unknown --vcpu-type {req.vcpu_type!r}", hint=f"one of: {', '.join(CPU_TYPES)}")
        return vcpu_types.CPU_SIGS[req.vcpu_type]
    if req.vmm_type == VmmType.QEMU:
        raise InputError(f"missing --vcpu-type or --vcpu-sig or --vcpu-family in guest mode '{req.mode}'")
    return None


def _validate(req: MeasureRequest) -> None:
    for flag, path in (("--ovmf", req.ovmf), ("--kernel", req.kernel), ("--initrd", req.initrd),
                       ("--svsm", req.svsm), ("--vars-file", req.vars_file)):
        if path is not None and not Path(path).exists():
            raise InputError(f"{flag} {path}: no such file")
    if req.initrd is not None and req.kernel is None:
        raise InputError("--kernel required when using --initrd")
    if req.append is not None and req.kernel is None:
        raise InputError("--kernel required when using --append")
    if req.mode not in (Mode.sev, Mode.snp_ovmf_hash) and req.vcpus is None:
        raise InputError(f"missing --vcpus N in guest mode '{req.mode}'")
    if req.vcpus is not None and req.vcpus < 1:
        raise InputError(f"--vcpus must be at least 1, got {req.vcpus}")
    if req.snp_ovmf_hash is not None and req.mode != Mode.snp:
        raise InputError("--snp-ovmf-hash only works with --mode snp")
    if req.dump_vmsa and req.mode not in (Mode.seves, Mode.snp, Mode.snp_svsm):
        raise InputError("--dump-vmsa is only available in the seves, snp and snp:svsm modes")
    if req.mode == Mode.snp_svsm:
        if req.svsm is None:
            raise InputError("snp:svsm mode requires --svsm")
        if (req.vars_size is None) == (req.vars_file is None):
            raise InputError("snp:svsm mode requires exactly one of --vars-size or --vars-file")
        if req.vmm_type != VmmType.QEMU:
            raise InputError("snp:svsm mode is only implemented for QEMU")


@contextlib.contextmanager
def _cwd(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def launch_digest(req: MeasureRequest, *, vmsa_dir: Path | None = None) -> bytes:
    """The launch digest (or, in snp:ovmf-hash mode, the OVMF pre-hash). Bad combinations are InputErrors."""
    _validate(req)
    if req.mode == Mode.snp_ovmf_hash:
        return guest.calc_snp_ovmf_hash(str(req.ovmf))
    vars_size = 0
    if req.mode == Mode.snp_svsm:
        vars_size = Path(req.vars_file).stat().st_size if req.vars_file else int(req.vars_size or 0)
    sig = cpu_signature(req)
    opt = lambda p: None if p is None else str(p)  # noqa: E731 - sev-snp-measure takes str paths or None
    try:
        # sev-snp-measure writes --dump-vmsa files into the working directory.
        with _cwd(vmsa_dir if req.dump_vmsa else None):
            return guest.calc_launch_digest(
                SevMode.from_str(req.mode.value), req.vcpus, sig, str(req.ovmf), opt(req.kernel),
                opt(req.initrd), req.append, req.guest_features, req.snp_ovmf_hash or "",
                VMMType[req.vmm_type.value], req.dump_vmsa, opt(req.svsm) or "", vars_size)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"cannot compute the measurement: {e}") from e


def format_digest(digest: bytes, fmt: DigestEncoding = DigestEncoding.hex) -> str:
    return digest.hex() if fmt == DigestEncoding.hex else base64.b64encode(digest).decode()


def expected_snp_measurements(ovmf: Path, kernel: Path, cmdline: str, *,
                              vcpus: Iterable[int] = MANIFEST_VCPUS,
                              cpu_types: Iterable[str] = MANIFEST_CPU_TYPES,
                              guest_features: int = QEMU_SNP_GUEST_FEATURES) -> list[dict[str, object]]:
    """SNP launch digests of the UVM (kernel-hashes=on, no initrd) for each vCPU count and CPU model."""
    ovmf_hash = guest.calc_snp_ovmf_hash(str(ovmf)).hex()
    table = []
    for cpu in cpu_types:
        for n in vcpus:
            req = MeasureRequest(mode=Mode.snp, ovmf=ovmf, vcpus=n, vcpu_type=cpu, kernel=kernel, append=cmdline,
                                 guest_features=guest_features, snp_ovmf_hash=ovmf_hash)
            table.append({"vcpus": n, "cpu_type": cpu, "guest_features": hex(guest_features),
                          "measurement": launch_digest(req).hex()})
    return table


def snp_request(*, firmware: Path, vcpus: int, cpu_model: str, guest_features: int, kernel: Path | None,
                initrd: Path | None, cmdline: str | None, ovmf_hash: str | None = None) -> MeasureRequest:
    """An SNP measurement request for a QEMU launch with kernel hashes (kernel None: no kernel hashes)."""
    return MeasureRequest(mode=Mode.snp, ovmf=firmware, vcpus=vcpus, vcpu_type=cpu_model, kernel=kernel,
                          initrd=initrd if kernel is not None else None,
                          append=cmdline if kernel is not None else None, guest_features=guest_features,
                          snp_ovmf_hash=ovmf_hash)


def launch_request(cfg: VmConfig) -> MeasureRequest:
    """The measurement request for an SEV-SNP VmConfig, read from the same fields the argv and XML use."""
    if cfg.snp is None:
        raise VmConfigError("only an SEV-SNP VM has a launch measurement")
    hashed = cfg.snp.kernel_hashes
    return snp_request(firmware=cfg.snp.firmware, vcpus=cfg.vcpus, cpu_model=cfg.snp.cpu_model,
                       guest_features=cfg.snp.guest_features, kernel=cfg.kernel if hashed else None,
                       initrd=cfg.initrd, cmdline=cfg.cmdline)


def launch_measurement(cfg: VmConfig) -> bytes:
    """The expected MEASUREMENT of an SEV-SNP VmConfig."""
    return launch_digest(launch_request(cfg))


def reference_measurement(*, firmware: Path, kernel: Path, initrd: Path | None, cmdline: str, vcpus: int) -> bytes:
    """The MEASUREMENT this UVM has on SEV-SNP with this host's CPU model: what the emulated PSP reports."""
    return launch_digest(snp_request(firmware=firmware, vcpus=vcpus, cpu_model=snp_cpu_model(),
                                     guest_features=SNP_GUEST_FEATURES, kernel=kernel, initrd=initrd,
                                     cmdline=cmdline))
