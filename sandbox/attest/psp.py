"""Emulated PSP material for one launch, read by the emulated PSP's host service (psp_service.py).

The launcher (emulation mode only) calls `write_launch_material(...)` and starts
`psp_service.spawn(...)` on it; the guest reaches the service through its port org.parma.psp. HOST_DATA is the policy hash, MEASUREMENT the UVM manifest's expected launch
measurement and CHIP_ID the emulated VCEK's hwID, so evidence from an emulated launch has the same
meaning as evidence from SEV-SNP hardware. Format: docs/attestation.md ("The emulated PSP").
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox.attest.amd_certs import to_der
from sandbox.attest.emulated_ca import EmulatedCa, ensure_emulated_ca
from sandbox.fsutil import atomic_write
from sandbox.shared.errors import InputError
from sandbox.shared.snp.cert_table import CertKind
from sandbox.shared.snp.emulated_psp import PspMaterial
from sandbox.shared.snp.policy import GuestPolicy
from sandbox.vmm.snp import SNP_POLICY_DEFAULT

if TYPE_CHECKING:
    from sandbox.attest.id_keys import IdMaterial

# The guest policy of our SEV-SNP launches (sandbox/vmm/snp.py): SMT allowed, reserved bit 17 set,
# no debug, no migration agent.
DEFAULT_POLICY = SNP_POLICY_DEFAULT


def policy_host_data(policy_bytes: bytes) -> bytes:
    """HOST_DATA for an execution policy: SHA-256 of its exact bytes."""
    return hashlib.sha256(policy_bytes).digest()


def launch_material(*, host_data: bytes, measurement: bytes, policy: int = DEFAULT_POLICY,
                    ca: EmulatedCa | None = None, report_id: bytes | None = None,
                    id_material: IdMaterial | None = None) -> PspMaterial:
    """What the emulated PSP reports for a launch; with an (already checked) ID block, its identity fields."""
    if len(host_data) != 32:
        raise InputError(f"HOST_DATA must be 32 bytes, got {len(host_data)}")
    if len(measurement) != 48:
        raise InputError(f"the launch measurement must be 48 bytes, got {len(measurement)}")
    problems = GuestPolicy(policy).reserved_problems()
    if problems:
        raise InputError(f"invalid guest policy 0x{policy:x}: " + "; ".join(problems))
    ca = ca or ensure_emulated_ca()
    block = id_material.block if id_material else None
    return PspMaterial(
        product=ca.product, report_version=ca.report_version, cpuid=ca.cpuid, policy=policy,
        guest_svn=block.guest_svn if block else 0, family_id=block.family_id if block else bytes(16),
        image_id=block.image_id if block else bytes(16), host_data=host_data, measurement=measurement,
        id_key_digest=id_material.id_key_digest if id_material else bytes(48),
        author_key_digest=(id_material.author_key_digest or bytes(48)) if id_material else bytes(48),
        report_id=report_id or secrets.token_bytes(32),
        report_id_ma=b"\xff" * 32, chip_id=ca.chip_id, platform_info=0x1, tcb=ca.tcb.raw, firmware=ca.firmware,
        mit_vector=0, vcek_private_key=ca.vcek_private_key,
        certificates={CertKind.VCEK: to_der(ca.vcek), CertKind.ASK: to_der(ca.ask), CertKind.ARK: to_der(ca.ark)})


def write_psp_material(path: Path, *, host_data: bytes, measurement: bytes, guest_policy: int = DEFAULT_POLICY,
                       ca: EmulatedCa | None = None, id_material: IdMaterial | None = None) -> PspMaterial:
    """Write the fw_cfg file for a launch (0600: it holds the emulated VCEK key) and return its content."""
    material = launch_material(host_data=host_data, measurement=measurement, policy=guest_policy, ca=ca,
                               id_material=id_material)
    atomic_write(path, material.to_bytes(), mode=0o600)
    return material


def write_launch_material(path: Path, *, policy_bytes: bytes, measurement: bytes,
                          guest_policy: int = DEFAULT_POLICY, ca: EmulatedCa | None = None) -> PspMaterial:
    """`write_psp_material` with HOST_DATA computed from the exact policy bytes."""
    return write_psp_material(path, host_data=policy_host_data(policy_bytes), measurement=measurement,
                              guest_policy=guest_policy, ca=ca)
