"""From a validated group, its resolved images and its volume devices to the requests `up` sends.

A pure function: which read-only disks the VM gets (with the serials the guest finds them by), where
the agent mounts them, and the exact requests (sandbox/shared/messages.py) `up` sends for them. The process,
capabilities and mounts come from the policy generator's own functions (sandbox.policy.gen), so the
launcher asks for exactly what a generated policy allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.group.spec import GroupSpec, VolumeKind
from sandbox.images.model import ResolvedImage
from sandbox.policy.gen import container_capabilities, container_mounts, container_process
from sandbox.shared import protocol as P
from sandbox.shared.messages import (
    CreateContainerRequest,
    CreateVolumeRequest,
    MemoryVolumeKind,
    MountDeviceRequest,
    MountOverlayRequest,
    MountScratchRequest,
)
from sandbox.shared.policy import defaults
from sandbox.shared.policy.model import Policy


@dataclass(frozen=True)
class DeviceMount:
    root_hash: str
    path: Path          # the ext4 + verity image on the host
    serial: str         # virtio-blk serial, how the guest finds the disk
    target: str         # where the agent mounts it

    @property
    def mount(self) -> MountDeviceRequest:
        return MountDeviceRequest(self.serial, self.target)


@dataclass(frozen=True)
class ContainerPlan:
    name: str
    layer_targets: tuple[str, ...]      # top-most first, as mount_overlay wants them
    create: CreateContainerRequest
    stdio: bool
    exec_processes: tuple[tuple[str, ...], ...] = ()

    @property
    def scratch(self) -> MountScratchRequest:
        return MountScratchRequest(self.name)

    @property
    def overlay(self) -> MountOverlayRequest:
        return MountOverlayRequest(self.name, self.layer_targets, P.container_dir(self.name) + "/rootfs")


@dataclass(frozen=True)
class LaunchPlan:
    layers: tuple[DeviceMount, ...]
    file_volumes: tuple[DeviceMount, ...]
    memory_volumes: tuple[CreateVolumeRequest, ...]
    containers: tuple[ContainerPlan, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def disks(self) -> tuple[DeviceMount, ...]:
        return self.layers + self.file_volumes


def build_plan(spec: GroupSpec, images: Mapping[str, ResolvedImage],
               volume_devices: Mapping[str, tuple[str, Path]], policy: Policy | None = None) -> LaunchPlan:
    """images: container name -> image; volume_devices: files-volume name -> (root hash, image path);
    policy: a supplied policy (not generated here), which decides how volume binds are asked for."""
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
            memory_volumes.append(CreateVolumeRequest(v.name, MemoryVolumeKind.secret, items=dict(v.items)))
        elif v.kind == VolumeKind.tmpfs:
            memory_volumes.append(CreateVolumeRequest(v.name, MemoryVolumeKind.tmpfs, size_mib=v.size_mib))
        else:
            memory_volumes.append(CreateVolumeRequest(v.name, MemoryVolumeKind.empty_dir))

    containers = []
    for c in spec.containers:
        image = images[c.name]
        targets = tuple(layers[layer.root_hash].target for layer in reversed(image.layers))
        process = container_process(c, image.config)
        create = CreateContainerRequest(
            container_id=c.name, argv=process.argv, env=process.env, working_dir=process.working_dir,
            user=process.user, mounts=container_mounts(spec, c, policy), capabilities=container_capabilities(c),
            privileged=c.privileged, no_new_privileges=False, umask=defaults.DEFAULT_UMASK,
            seccomp_profile_sha256="")
        containers.append(ContainerPlan(c.name, targets, create, c.stdio,
                                        tuple(e.command for e in c.exec_processes)))
    return LaunchPlan(tuple(layers.values()), tuple(file_volumes), tuple(memory_volumes), tuple(containers))
