"""Where the agent learns HOST_DATA, the value it compares SHA-256(policy) against: a fresh report.

On SEV-SNP the report comes from the PSP (configfs-tsm or /dev/sev-guest): the host cannot change
HOST_DATA after launch. In emulation it comes from the emulated PSP, whose material the launcher
passes through fw_cfg; snp_report refuses that material whenever the guest shows signs of a TEE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sandbox.shared.errors import AttestationError

HOST_DATA_LEN = 32


class HostDataUnavailable(AttestationError):
    """No report, so no HOST_DATA: the agent stays deny-all."""


@dataclass(frozen=True)
class HostData:
    value: bytes     # the 32 bytes of HOST_DATA
    source: str      # which report interface produced it


def read_host_data() -> HostData:
    # Imported here: the report backends and the SNP structures load with the first policy, not at boot.
    from sandbox.guest import snp_report
    from sandbox.shared.snp.report import parse_report

    try:
        result = snp_report.get_extended_report(bytes(64))
        report = parse_report(result.report)
    except Exception as e:  # no report, for whatever reason, means no HOST_DATA
        raise HostDataUnavailable(f"cannot get an attestation report: {e}") from e
    value = bytes(report.host_data)
    if len(value) != HOST_DATA_LEN:
        raise HostDataUnavailable(f"the report's HOST_DATA is {len(value)} bytes")
    return HostData(value, f"{result.backend.value} report")


def uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return os.times().elapsed
