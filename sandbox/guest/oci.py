"""The OCI runtime spec (config.json) the agent writes for crun. The host never supplies a spec.

Everything security-relevant comes from the policy engine's decision (env, capabilities), from what
the guest measured and the engine checked (the seccomp profile), or is fixed here (namespaces, masked
paths, default mounts, no hooks). Containers share the UVM's network
namespace, which is the group's network namespace. Field names follow the OCI runtime spec 1.0.2.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sandbox.shared.policy import defaults

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import TypedDict

    class OciMount(TypedDict):
        """An entry of the spec's `mounts`."""

        destination: str
        type: str
        source: str
        options: list[str]

OCI_VERSION = "1.0.2"

# The runtime's own lists, shared with the policy engine (which allows exactly these by default).
DEFAULT_CAPABILITIES = defaults.UNPRIVILEGED_CAPABILITIES
CAPABILITY_SETS = defaults.CAPABILITY_SETS

MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


def base_mounts() -> list[OciMount]:
    """The mounts every container gets (the engine's default mounts; one cgroup entry, which crun maps
    to cgroup2 on the unified hierarchy)."""
    return [{"destination": m["destination"], "type": m["type"], "source": m["source"],
             "options": list(m["options"])} for m in defaults.DEFAULT_MOUNTS if m["type"] != "cgroup2"]


# Options every bind of a group volume gets, whatever the request and policy list: a volume's content
# comes from the host (secret), another container (emptyDir) or the group's files, and must never carry
# set-uid programs or device nodes into a container. crun remounts a bind with exactly its options
# (for `ro`), so the source mount's own nosuid/nodev are not enough.
BIND_HARDENING = ("nosuid", "nodev")


@dataclass(frozen=True)
class BindMount:
    destination: str
    source: str
    options: tuple[str, ...]     # as the policy allowed them; BIND_HARDENING is added

    def to_oci(self) -> OciMount:
        return {"destination": self.destination, "type": "bind", "source": self.source,
                "options": [*self.options, *(o for o in BIND_HARDENING if o not in self.options)]}


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

    def to_oci(self) -> dict[str, object]:
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
    seccomp: Mapping[str, object] | None = None    # linux.seccomp exactly as measured (sandbox/shared/seccomp.py)


def build_spec(spec: BundleSpec) -> dict[str, object]:
    mounts = base_mounts() + [b.to_oci() for b in spec.binds]
    linux: dict[str, object] = {
        # No network namespace: the group shares the UVM's. No user namespace: ids are the guest's.
        "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")],
        "cgroupsPath": f"/parma/{spec.container_id}",
        "resources": {"devices": [{"allow": spec.privileged, "access": "rwm"}]},
    }
    if not spec.privileged:
        linux["maskedPaths"] = list(MASKED_PATHS)
        linux["readonlyPaths"] = list(READONLY_PATHS)
    if spec.seccomp is not None:
        linux["seccomp"] = spec.seccomp
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
