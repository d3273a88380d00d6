"""The OCI runtime spec (config.json) the agent writes for crun. The host never supplies a spec.

Everything security-relevant comes from the policy engine's decision (env, capabilities) or is fixed
here (namespaces, masked paths, default mounts, no hooks). Containers share the UVM's network
namespace, which is the group's network namespace. Field names follow the OCI runtime spec 1.0.2.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

from sandbox.shared.policy import defaults

OCI_VERSION = "1.0.2"

# The runtime's own lists, shared with the policy engine (which allows exactly these by default).
DEFAULT_CAPABILITIES = defaults.UNPRIVILEGED_CAPABILITIES
CAPABILITY_SETS = defaults.CAPABILITY_SETS

MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


def base_mounts() -> list[dict[str, Any]]:
    """The mounts every container gets (the engine's default mounts; one cgroup entry, which crun maps
    to cgroup2 on the unified hierarchy)."""
    return [{"destination": m["destination"], "type": m["type"], "source": m["source"],
             "options": list(m["options"])} for m in defaults.DEFAULT_MOUNTS if m["type"] != "cgroup2"]


@dataclass(frozen=True)
class BindMount:
    destination: str
    source: str
    options: tuple[str, ...]     # exactly as the policy allowed them

    def to_oci(self) -> dict[str, Any]:
        return {"destination": self.destination, "type": "bind", "source": self.source,
                "options": list(self.options)}


@dataclass(frozen=True)
class ProcessSpec:
    argv: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    umask: int = 0o022
    capabilities: dict[str, tuple[str, ...]] = field(default_factory=dict)
    no_new_privileges: bool = False

    def to_oci(self) -> dict[str, Any]:
        return {
            "terminal": False,
            "user": {"uid": self.uid, "gid": self.gid, "umask": self.umask,
                     "additionalGids": list(self.additional_gids)},
            "args": list(self.argv),
            "env": list(self.env),
            "cwd": self.cwd or "/",
            "capabilities": {s: list(self.capabilities.get(s, ())) for s in CAPABILITY_SETS},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576}],
            "noNewPrivileges": self.no_new_privileges,
        }


@dataclass(frozen=True)
class BundleSpec:
    container_id: str
    rootfs: str
    process: ProcessSpec
    hostname: str
    binds: tuple[BindMount, ...] = ()
    privileged: bool = False


def build_spec(spec: BundleSpec) -> dict[str, Any]:
    mounts = base_mounts() + [b.to_oci() for b in spec.binds]
    linux: dict[str, Any] = {
        # No network namespace: the group shares the UVM's. No user namespace: ids are the guest's.
        "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")],
        "cgroupsPath": f"/parma/{spec.container_id}",
        "resources": {"devices": [{"allow": spec.privileged, "access": "rwm"}]},
    }
    if not spec.privileged:
        linux["maskedPaths"] = list(MASKED_PATHS)
        linux["readonlyPaths"] = list(READONLY_PATHS)
    return {
        "ociVersion": OCI_VERSION,
        "process": spec.process.to_oci(),
        "root": {"path": spec.rootfs, "readonly": False},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": linux,
        # Deliberately no "hooks" and no "annotations": nothing host-controlled runs outside the container.
    }


def clean_container_path(path: str) -> str | None:
    """An absolute, normalised path without '..' components, or None."""
    if not path.startswith("/") or "\0" in path:
        return None
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = norm[1:]
    if any(part == ".." for part in path.split("/")):
        return None
    return norm
