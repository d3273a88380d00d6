"""What the guest runtime adds on its own, and the guest paths the policy refers to.

These are data of the engine, not of the policy document, exactly as in ACI where the guest agent
hands the framework its default mounts and capability sets (hcsshim `DefaultCRIMounts`,
`DefaultCRIPrivilegedMounts`, `DefaultUnprivilegedCapabilities`, `DefaultPrivilegedCapabilities`).
The host-side launcher builds container specs from the same constants, so the two cannot drift.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

from sandbox.shared.protocol import container_dir

if TYPE_CHECKING:
    from typing import Any

# Framework versions this engine implements (ACI framework.rego 0.5.0 / api.rego 0.12.0 semantics).
FRAMEWORK_VERSION = "0.5.0"
API_VERSION = "0.12.0"

SANDBOX_PREFIX = "sandbox://"
# Guest directory that `sandbox://` in a mount source stands for (ACI: /run/gcs/c/<sandbox>/sandboxMounts).
DEFAULT_SANDBOX_DIR = "/run/parma/sandbox"

# Guest paths shared with the agent (sandbox/shared/protocol.py uses the same ones). Layer devices are
# mounted at LAYERS_DIR/<name>: mount_device only accepts layer hashes at targets matching
# LAYER_TARGET_PATTERN (ACI passes the analogous `mountPathRegex` from the guest, not from the host).
LAYERS_DIR = "/run/parma/layers"
LAYER_TARGET_PATTERN = "/run/parma/layers/[a-z0-9][a-z0-9-]{0,63}"
# Group volumes live at VOLUMES_DIR/<volume>; a `files` volume's verity device is mounted there.
VOLUMES_DIR = "/run/parma/volumes"
# Options of the bind mount that puts a group volume into a container, as the launcher requests it
# (the agent adds nosuid and nodev on its own: sandbox/guest/oci.py BIND_HARDENING).
VOLUME_BIND_OPTIONS = ("rbind", "rprivate")


# ACI's mount sources for a group's volumes (confcom writes `sandbox:///tmp/atlas/<kind>/.+`): the agent
# resolves `<sandbox dir>/tmp/atlas/<kind>/<volume>` to the group volume of that kind, so that policies
# written for ACI allow the binds a template asks for (docs/aci.md, "Running ACI policies locally").
ACI_VOLUMES_SUBDIR = "tmp/atlas"
ACI_VOLUME_KINDS = ("emptydir", "secretsVolume", "azureFileVolume", "gitRepoVolume")
# Shares (azureFile, gitRepo): their content is the owner's, not measured, on ACI as here.
ACI_SHARE_SOURCES = (f"{SANDBOX_PREFIX}/{ACI_VOLUMES_SUBDIR}/azureFileVolume/",
                     f"{SANDBOX_PREFIX}/{ACI_VOLUMES_SUBDIR}/gitRepoVolume/")


def aci_volume_source(kind: str, volume: str, sandbox_dir: str = DEFAULT_SANDBOX_DIR) -> str:
    """Where ACI's runtime puts a volume of `kind`, in the guest (the source of its bind mounts)."""
    return f"{sandbox_dir}/{ACI_VOLUMES_SUBDIR}/{kind}/{volume}"


def layer_target(name: str | int) -> str:
    return f"{LAYERS_DIR}/{name}"


def volume_target(name: str) -> str:
    return f"{VOLUMES_DIR}/{name}"


def volume_bind_mount(volume: str, destination: str, read_only: bool) -> dict[str, object]:
    """The mount entry (policy constraint and OCI mount alike) that binds a group volume into a container."""
    return {"destination": destination, "source": volume_target(volume), "type": "bind",
            "options": [*VOLUME_BIND_OPTIONS, "ro" if read_only else "rw"]}


def _mount(destination: str, type_: str, source: str, options: tuple[str, ...]) -> MappingProxyType[str, Any]:
    """A read-only OCI mount object: destination, type and source are str, options a tuple[str, ...]."""
    return MappingProxyType({"destination": destination, "type": type_, "source": source,
                             "options": options})


# The mounts every container gets from the runtime (same list as hcsshim DefaultCRIMounts).
DEFAULT_MOUNTS = (
    _mount("/proc", "proc", "proc", ("nosuid", "noexec", "nodev")),
    _mount("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
    _mount("/dev/pts", "devpts", "devpts",
           ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5")),
    _mount("/dev/shm", "tmpfs", "shm", ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k")),
    _mount("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
    _mount("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")),
    _mount("/run", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
    _mount("/sys/fs/cgroup", "cgroup", "cgroup", ("nosuid", "noexec", "nodev", "relatime", "ro")),
    _mount("/sys/fs/cgroup", "cgroup2", "cgroup2", ("nosuid", "noexec", "nodev", "relatime", "ro")),
)

# The files the agent writes for each container from the group's names and DNS settings, and binds over
# the container's /etc (sandbox/guest/etcfiles.py). hcsshim binds a pod's hostname, hosts and resolv.conf
# the same way and adds those mounts to the framework's default mounts before it checks a create
# (ExtendDefaultMounts), so a policy needs no entry for them, and ACI's Rego policies keep working. A
# container that binds a volume at one of these paths gets the volume instead (the policy checks that bind).
ETC_FILES = ("hostname", "hosts", "resolv.conf")
ETC_BIND_OPTIONS = ("rbind", "rprivate", "rw")


def etc_files_dir(container_id: str) -> str:
    return f"{container_dir(container_id)}/etc"


def etc_file_mounts(container_id: str) -> tuple[MappingProxyType[str, Any], ...]:
    """The binds of a container's own /etc/hostname, /etc/hosts and /etc/resolv.conf."""
    return tuple(_mount(f"/etc/{name}", "bind", f"{etc_files_dir(container_id)}/{name}", ETC_BIND_OPTIONS)
                 for name in ETC_FILES)


# Extra mounts allowed for containers whose policy entry has allow_elevated (hcsshim DefaultCRIPrivilegedMounts).
PRIVILEGED_MOUNTS = (
    _mount("/sys/fs/cgroup", "cgroup", "cgroup", ("nosuid", "noexec", "nodev", "relatime", "rw")),
    _mount("/sys/fs/cgroup", "cgroup2", "cgroup2", ("nosuid", "noexec", "nodev", "relatime", "rw")),
    _mount("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "rw")),
)

# The usual 14 capabilities of an unprivileged container (Docker/containerd defaults).
UNPRIVILEGED_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

# Every capability up to CAP_CHECKPOINT_RESTORE (41), for privileged containers.
PRIVILEGED_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)

CAPABILITY_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")


def default_capabilities(privileged: bool) -> dict[str, tuple[str, ...]]:
    """The capability sets the runtime gives a container (the framework's dynamic defaults)."""
    caps = PRIVILEGED_CAPABILITIES if privileged else UNPRIVILEGED_CAPABILITIES
    return {"bounding": caps, "effective": caps, "inheritable": caps if privileged else (),
            "permitted": caps, "ambient": ()}


DEFAULT_UMASK = "0022"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
