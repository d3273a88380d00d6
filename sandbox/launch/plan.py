"""From a validated group, its resolved images and its volume devices to the requests `up` sends.

A pure function: which read-only disks the VM gets (with the serials the guest finds them by), where
the agent mounts them, and the exact create_container payload of every container. Everything here
is also what the generated policy must allow, so the mapping from the group spec follows the
Kubernetes/ACI rules: `command` replaces ENTRYPOINT (and then the image CMD is not used), `args`
replaces CMD, group env overrides image env by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.group.spec import CAPABILITIES, Container, GroupSpec, VolumeKind
from sandbox.guest.oci import DEFAULT_CAPABILITIES
from sandbox.images.model import ResolvedImage
from sandbox.shared import protocol as P
from sandbox.shared.kbs_protocol import attestation_api_mount

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class DeviceMount:
    root_hash: str
    path: Path          # the ext4 + verity image on the host
    serial: str         # virtio-blk serial, how the guest finds the disk
    target: str         # where the agent mounts it


@dataclass(frozen=True)
class ContainerPlan:
    name: str
    layer_targets: tuple[str, ...]      # top-most first, as mount_overlay wants them
    create: dict[str, Any]              # the create_container payload
    stdio: bool
    exec_processes: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class LaunchPlan:
    layers: tuple[DeviceMount, ...]
    file_volumes: tuple[DeviceMount, ...]
    memory_volumes: tuple[dict[str, Any], ...]     # create_volume payloads
    containers: tuple[ContainerPlan, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def disks(self) -> tuple[DeviceMount, ...]:
        return self.layers + self.file_volumes


def container_argv(c: Container, image: ResolvedImage) -> list[str]:
    if c.command is not None:
        return [*c.command, *(c.args or ())]
    return [*image.config.entrypoint, *(c.args if c.args is not None else image.config.cmd)]


def container_env(c: Container, image: ResolvedImage) -> list[str]:
    env: dict[str, str] = {}
    for entry in image.config.env:
        key, _, value = entry.partition("=")
        env[key] = value
    if "PATH" not in env:
        env["PATH"] = DEFAULT_PATH.split("=", 1)[1]
    for var in c.env:
        env[var.name] = var.value
    return [f"{k}={v}" for k, v in env.items()]


def container_capabilities(c: Container) -> dict[str, list[str]]:
    if c.privileged:
        caps = list(CAPABILITIES)
    else:
        chosen = set(DEFAULT_CAPABILITIES) | set(c.capabilities.add)
        chosen -= set(c.capabilities.drop)
        caps = sorted(chosen)
    return {"bounding": caps, "effective": caps, "inheritable": [], "permitted": caps, "ambient": []}


def container_mounts(c: Container, spec: GroupSpec) -> list[dict[str, Any]]:
    out = []
    for m in c.mounts:
        volume = next(v for v in spec.volumes if v.name == m.volume)
        read_only = m.read_only or volume.kind in (VolumeKind.files, VolumeKind.secret)
        out.append({"destination": m.mount_path, "source": P.volume_path(volume.name), "type": "bind",
                    "options": ["rbind", "rprivate", "ro" if read_only else "rw"]})
    if c.attestation_api:
        out.append(attestation_api_mount())  # the same entry policy generation pins (docs/kbs.md)
    return out


def build_plan(spec: GroupSpec, images: Mapping[str, ResolvedImage],
               volume_devices: Mapping[str, tuple[str, Path]]) -> LaunchPlan:
    """images: container name -> image; volume_devices: files-volume name -> (root hash, image path)."""
    layers: dict[str, DeviceMount] = {}
    for c in spec.containers:
        for layer in images[c.name].layers:
            if layer.root_hash not in layers:
                i = len(layers)
                layers[layer.root_hash] = DeviceMount(layer.root_hash, Path(layer.device_path), f"L{i}",
                                                      f"{P.LAYERS_DIR}/l{i}")
    file_volumes = []
    memory_volumes = []
    for v in spec.volumes:
        if v.kind == VolumeKind.files:
            root_hash, path = volume_devices[v.name]
            file_volumes.append(DeviceMount(root_hash, path, f"V{len(file_volumes)}", P.volume_path(v.name)))
        elif v.kind == VolumeKind.secret:
            memory_volumes.append({"name": v.name, "kind": "secret",
                                   "items": {n: P.b64encode(data) for n, data in v.items}})
        elif v.kind == VolumeKind.tmpfs:
            memory_volumes.append({"name": v.name, "kind": "tmpfs", "size_mib": v.size_mib})
        else:
            memory_volumes.append({"name": v.name, "kind": "emptyDir"})

    containers = []
    for c in spec.containers:
        image = images[c.name]
        targets = tuple(layers[layer.root_hash].target for layer in reversed(image.layers))
        create = {
            "container_id": c.name,
            "argv": container_argv(c, image),
            "env": container_env(c, image),
            "working_dir": c.working_dir or image.config.working_dir or "/",
            "user": c.user or image.config.user or "",
            "mounts": container_mounts(c, spec),
            "capabilities": container_capabilities(c),
            "privileged": c.privileged,
            "no_new_privileges": False,
            "umask": "0022",
            "seccomp_profile_sha256": "",
        }
        containers.append(ContainerPlan(c.name, targets, create, c.stdio,
                                        tuple(e.command for e in c.exec_processes)))
    return LaunchPlan(tuple(layers.values()), tuple(file_volumes), tuple(memory_volumes), tuple(containers))
