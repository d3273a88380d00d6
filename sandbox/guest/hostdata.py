"""Where the agent learns HOST_DATA, the value it compares SHA-256(policy) against.

On SEV-SNP HOST_DATA comes from a fresh attestation report (the host cannot change it after launch).
In emulation the launcher hands it over through QEMU fw_cfg, together with the expected measurement;
the emulated PSP (when the attestation module provides one) reports the same values. If the guest
sees SEV-SNP hardware but cannot get a report, it fails closed instead of trusting fw_cfg.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FW_CFG = Path("/sys/firmware/qemu_fw_cfg/by_name")
FW_CFG_HOST_DATA = "opt/parma/host_data"
FW_CFG_MEASUREMENT = "opt/parma/measurement"
# Only an SEV-SNP guest has /dev/sev-guest (the kernel registers the device when SNP is active). The
# configfs-tsm directory exists whenever the kernel has TSM_REPORTS, so it proves nothing.
SNP_DEVICES = (Path("/dev/sev-guest"),)
HOST_DATA_LEN = 32


class HostDataUnavailable(Exception):
    pass


@dataclass(frozen=True)
class HostData:
    value: bytes     # the 32 bytes of HOST_DATA
    source: str      # "sev-snp report", "emulated psp report" or "fw_cfg (emulation)"


def read_fw_cfg(name: str) -> bytes | None:
    path = FW_CFG / name / "raw"
    try:
        return path.read_bytes()
    except OSError:
        return None


def snp_hardware_present() -> bool:
    return any(p.exists() for p in SNP_DEVICES)


def _from_report() -> HostData | None:
    """HOST_DATA from an attestation report, when the attestation module is in this UVM."""
    try:
        from sandbox.guest.snp_report import get_report  # noqa: PLC0415 - optional until attest lands
        from sandbox.shared.snp.report import parse_report  # noqa: PLC0415
    except ImportError:
        return None
    raw = get_report(bytes(64))
    report = parse_report(raw)
    source = "sev-snp report" if snp_hardware_present() else "emulated psp report"
    return HostData(bytes(report.host_data), source)


def read_host_data() -> HostData:
    try:
        from_report = _from_report()
    except Exception as e:  # noqa: BLE001 - any failure to get a report means "no HOST_DATA"
        raise HostDataUnavailable(f"cannot get an attestation report: {e}") from e
    if from_report is not None:
        return from_report
    if snp_hardware_present():
        raise HostDataUnavailable("this guest runs on SEV-SNP but the agent has no report support; "
                                  "refusing to trust HOST_DATA from the host")
    raw = read_fw_cfg(FW_CFG_HOST_DATA)
    if raw is None:
        raise HostDataUnavailable(f"no HOST_DATA: fw_cfg entry {FW_CFG_HOST_DATA} is absent "
                                  f"(is {FW_CFG} available?)")
    text = raw.decode("ascii", "replace").strip()
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != HOST_DATA_LEN:
        raise HostDataUnavailable(f"fw_cfg {FW_CFG_HOST_DATA} is not {HOST_DATA_LEN} bytes of hex")
    return HostData(value, "fw_cfg (emulation)")


def emulation_measurement() -> str | None:
    raw = read_fw_cfg(FW_CFG_MEASUREMENT)
    return raw.decode("ascii", "replace").strip() if raw else None


def uptime() -> float:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return os.times().elapsed
