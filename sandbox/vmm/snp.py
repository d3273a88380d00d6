"""SEV-SNP launch parameters: the one place that decides them, reading the host where the host decides.

Every consumer takes them from a `SnpLaunch` built here: the QEMU argv (sandbox/vmm/qemu.py), the
libvirt domain XML (sandbox/vmm/libvirt_xml.py) and the expected launch measurement
(sandbox/uvm/measure.py `launch_request`), so the prediction is computed from the very values that
go on the command line.

- cbitpos and reduced-phys-bits belong to the host CPU: CPUID Fn8000_001F EBX[5:0] and EBX[11:6]
  (AMD64 APM vol. 3, "Function 8000_001Fh: Encrypted Memory Capabilities"). QEMU compares cbitpos
  with the host's and refuses a launch on mismatch. They are read from /dev/cpu/0/cpuid (the `cpuid`
  driver), or else asked from QEMU (`query-sev-capabilities`, the source libvirt's domain
  capabilities also use). They do not enter the measurement.
- The guest CPU model goes into the measurement (CPUID(1).EAX of the model is in every VMSA). The
  default, EPYC-v4, runs on every SNP generation (Milan, Genoa, Turin), so one reference value
  serves a whole lab; PARMA_SANDBOX_SNP_CPU picks another model that QEMU and sev-snp-measure know.
- SEV_FEATURES: 0x1 (SNPActive only), what QEMU >= 9.1 asks KVM for (KVM_SEV_INIT2, no
  vmsa-features); older QEMUs are refused for SEV-SNP by `check`.
- Guest policy 0x30000: SMT allowed, reserved bit 17 set, no debugging, no migration agent.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path

from sandbox.shared.errors import CheckFailed, InputError

SNP_CPU_MODEL = "EPYC-v4"
CPU_MODEL_ENV = "PARMA_SANDBOX_SNP_CPU"
SNP_GUEST_FEATURES = 0x1          # SEV_FEATURES.SNPActive
SNP_POLICY_DEFAULT = 0x30000      # SMT (bit 16) + reserved-must-be-one (bit 17)
CPUID_DEVICE = Path("/dev/cpu/0/cpuid")
SEV_LEAF = 0x8000_001F
ID_BLOCK_SIZE = 0x60              # QEMU checks these lengths when it parses the object
ID_AUTH_SIZE = 0x1000


class SevInfoSource(StrEnum):
    cpuid = "cpuid"              # /dev/cpu/0/cpuid
    qemu = "qemu"                # QMP query-sev-capabilities
    libvirt = "libvirt"          # domain capabilities <sev>
    given = "given"              # passed in (tests, reference values)


@dataclass(frozen=True)
class HostSevInfo:
    """What the host CPU says about memory encryption (CPUID Fn8000_001F)."""

    cbitpos: int
    reduced_phys_bits: int
    source: SevInfoSource
    sev: bool = True
    sev_es: bool = True
    snp: bool = True

    def to_json(self) -> dict[str, object]:
        return {"cbitpos": self.cbitpos, "reduced_phys_bits": self.reduced_phys_bits, "source": self.source.value,
                "sev": self.sev, "sev_es": self.sev_es, "snp": self.snp}


def parse_sev_leaf(eax: int, ebx: int) -> HostSevInfo:
    """CPUID Fn8000_001F: EAX bit 1 SEV, bit 3 SEV-ES, bit 4 SEV-SNP; EBX[5:0] C-bit, EBX[11:6] reduction."""
    return HostSevInfo(cbitpos=ebx & 0x3F, reduced_phys_bits=(ebx >> 6) & 0x3F, source=SevInfoSource.cpuid,
                       sev=bool(eax >> 1 & 1), sev_es=bool(eax >> 3 & 1), snp=bool(eax >> 4 & 1))


def read_cpuid(leaf: int, device: Path = CPUID_DEVICE) -> tuple[int, int, int, int]:
    """EAX, EBX, ECX, EDX of `leaf` through the Linux cpuid driver (the file offset is the leaf)."""
    with open(device, "rb") as f:
        f.seek(leaf)
        data = f.read(16)
    if len(data) != 16:
        raise OSError(f"short read from {device}")
    return struct.unpack("<4I", data)


def parse_domcaps_sev(xml_text: str) -> tuple[HostSevInfo | None, bool]:
    """(the <sev> values, whether <launchSecurity> offers sev-snp) from libvirt's domain capabilities."""
    root = ET.fromstring(xml_text)
    info = None
    sev = root.find("features/sev")
    if sev is not None and sev.get("supported") == "yes" and sev.find("cbitpos") is not None:
        info = HostSevInfo(cbitpos=int(sev.findtext("cbitpos", "0")),
                           reduced_phys_bits=int(sev.findtext("reducedPhysBits", "0")), source=SevInfoSource.libvirt)
    ls = root.find("features/launchSecurity")
    snp = ls is not None and ls.get("supported") == "yes" and any(
        v.text == "sev-snp" for v in ls.findall("enum[@name='sectype']/value"))
    return info, snp


def query_qemu_sev_capabilities(qemu: str, timeout: float = 15.0) -> HostSevInfo:
    """QMP query-sev-capabilities from a machine-less QEMU with KVM (needs /dev/sev and /dev/kvm)."""
    commands = [{"execute": "qmp_capabilities"}, {"execute": "query-sev-capabilities"}, {"execute": "quit"}]
    stdin = "".join(json.dumps(c) + "\n" for c in commands)
    with tempfile.TemporaryDirectory(prefix="parma-sev-caps-") as tmp:
        proc = subprocess.run([qemu, "-machine", "none", "-accel", "kvm", "-nodefaults", "-display", "none",
                               "-qmp", "stdio", "-pidfile", os.path.join(tmp, "pid")],
                              input=stdin.encode(), capture_output=True, timeout=timeout, check=False)
    for line in proc.stdout.decode(errors="replace").splitlines():
        try:
            reply = json.loads(line)
        except ValueError:
            continue
        ret = reply.get("return")
        if isinstance(ret, dict) and "cbitpos" in ret:
            return HostSevInfo(cbitpos=int(ret["cbitpos"]), reduced_phys_bits=int(ret["reduced-phys-bits"]),
                               source=SevInfoSource.qemu)
        if "error" in reply:
            raise OSError(reply["error"].get("desc", "query-sev-capabilities failed"))
    raise OSError(proc.stderr.decode(errors="replace").strip() or "no answer to query-sev-capabilities")


@cache
def host_sev_info(qemu: str = "qemu-system-x86_64") -> HostSevInfo:
    """The host's C-bit position and physical address reduction, from the CPU itself.

    Raises CheckFailed (with what was tried) when neither the cpuid driver nor QEMU can tell.
    """
    problems = []
    try:
        eax, ebx, _, _ = read_cpuid(SEV_LEAF)
        info = parse_sev_leaf(eax, ebx)
        if info.cbitpos:
            return info
        problems.append(f"{CPUID_DEVICE}: CPUID {SEV_LEAF:#x} reports no C-bit (not an SEV-capable CPU)")
    except OSError as e:
        problems.append(f"{CPUID_DEVICE}: {e.strerror or e}")
    t0 = time.monotonic()
    try:
        return query_qemu_sev_capabilities(qemu)
    except (OSError, subprocess.TimeoutExpired) as e:
        problems.append(f"QEMU query-sev-capabilities ({time.monotonic() - t0:.1f} s): {e}")
    raise CheckFailed("cannot read the host's SEV C-bit position and physical address reduction: "
                      + "; ".join(problems),
                      hint="load the cpuid driver ('modprobe cpuid') or make /dev/sev usable by QEMU "
                           "(see docs/snp-lab.md)")


def snp_cpu_model() -> str:
    """The guest CPU model for SEV-SNP launches (measured: see the module docstring)."""
    return os.environ.get(CPU_MODEL_ENV) or SNP_CPU_MODEL


class VmConfigError(InputError):
    """A VM configuration (VmConfig, SnpLaunch) that cannot be launched as asked; the message says why."""


@dataclass(frozen=True)
class SnpLaunch:
    """Everything an SEV-SNP launch adds to a VM; the argv, the XML and the measurement read it from here.

    The vCPU count, kernel, initrd and command line that the measurement also covers are the
    VmConfig's own fields.
    """

    host_data: bytes                 # 32 bytes: SHA-256 of the policy
    firmware: Path                   # the AmdSev OVMF (kernel hashes support), measured whole
    cbitpos: int                     # host CPUID Fn8000_001F EBX[5:0]
    reduced_phys_bits: int           # host CPUID Fn8000_001F EBX[11:6]
    cpu_model: str = SNP_CPU_MODEL
    guest_features: int = SNP_GUEST_FEATURES
    policy: int = SNP_POLICY_DEFAULT
    kernel_hashes: bool = True
    id_block: bytes | None = None    # ID_BLOCK (0x60 bytes): the PSP checks the measurement against it
    id_auth: bytes | None = None     # ID_AUTH_INFO (0x1000 bytes): signatures over the ID block / ID key
    author_key_enabled: bool = False

    def __post_init__(self) -> None:
        if len(self.host_data) != 32:
            raise VmConfigError("SEV-SNP host_data is 32 bytes")
        if (self.id_block is None) != (self.id_auth is None):
            raise VmConfigError("an ID block needs its ID auth structure, and only it")
        if self.id_block is not None and len(self.id_block) != ID_BLOCK_SIZE:
            raise VmConfigError(f"an ID block is {ID_BLOCK_SIZE} bytes")
        if self.id_auth is not None and len(self.id_auth) != ID_AUTH_SIZE:
            raise VmConfigError(f"an ID auth structure is {ID_AUTH_SIZE} bytes")
        if self.author_key_enabled and self.id_block is None:
            raise VmConfigError("author-key-enabled needs an ID block")
        if not (1 <= self.cbitpos <= 63 and 0 <= self.reduced_phys_bits <= 63):
            raise VmConfigError(f"implausible cbitpos {self.cbitpos} / reduced-phys-bits {self.reduced_phys_bits}")

    def host_data_b64(self) -> str:
        return base64.b64encode(self.host_data).decode()

    @staticmethod
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()


def snp_launch(*, host_data: bytes, firmware: Path | None, sev: HostSevInfo,
               id_block: bytes | None = None, id_auth: bytes | None = None,
               author_key_enabled: bool = False) -> SnpLaunch:
    """The SnpLaunch for this host. A missing firmware is an error, never a silent substitute."""
    if firmware is None or not Path(firmware).is_file():
        raise CheckFailed("the AmdSev OVMF (the measured SEV-SNP firmware) is not built"
                          + (f" ({firmware} is missing)" if firmware else ""),
                          hint="run 'make firmware-snp' (or 'parma-sandbox build firmware-snp'); a system "
                               "OVMF would not match the expected measurement")
    try:
        return SnpLaunch(host_data=host_data, firmware=Path(firmware), cbitpos=sev.cbitpos,
                         reduced_phys_bits=sev.reduced_phys_bits, cpu_model=snp_cpu_model(), id_block=id_block,
                         id_auth=id_auth, author_key_enabled=author_key_enabled)
    except ValueError as e:
        raise InputError(f"invalid SEV-SNP launch parameters: {e}") from e
