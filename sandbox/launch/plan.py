"""From a validated group, its resolved images and its volume devices to the requests `up` sends.

A pure function: which read-only disks the VM gets (with the serials the guest finds them by), where
the agent mounts them, and the exact requests (sandbox/shared/messages.py) `up` sends for them. The process,
capabilities and mounts come from the policy generator's own functions (sandbox.policy.gen), so the
launcher asks for exactly what a generated policy allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sandbox.group.spec import ContainerSpec, GroupSpec, ProbeKind, ProbeSpec, RestartPolicy, VolumeKind
from sandbox.images.model import ResolvedImage
from sandbox.policy.gen import container_capabilities, container_mounts, container_process
from sandbox.shared import protocol as P
from sandbox.shared.codec import Message
from sandbox.shared.messages import (
    CreateContainerRequest,
    CreateVolumeRequest,
    DnsSettings,
    MemoryVolumeKind,
    MountDeviceRequest,
    MountOverlayRequest,
    MountScratchRequest,
    SetGroupNetworkRequest,
    UnmountOverlayRequest,
    UnmountScratchRequest,
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
class ProbePlan(Message):
    """A container's probe as the supervisor runs it: an exec probe through the agent, an httpGet probe from
    the host to the group port that forwards its port (`host_port` None: none does, it is not run)."""

    kind: ProbeKind
    probe: ProbeSpec
    host_address: str | None = None
    host_port: int | None = None


@dataclass(frozen=True)
class ContainerPlan(Message):
    """One container's requests (a Message: a detached group's supervisor reads it back from plan.json)."""

    name: str
    layer_targets: tuple[str, ...]      # top-most first, as mount_overlay wants them
    create: CreateContainerRequest
    stdio: bool
    exec_processes: tuple[tuple[str, ...], ...] = ()
    encrypted_scratch: bool = True      # its writable layer on the group's encrypted scratch (else guest memory)
    init: bool = False                  # an init container: runs to completion before the containers start
    probes: tuple[ProbePlan, ...] = ()  # liveness, readiness, startup (sandbox/launch/probes.py)

    @property
    def rootfs(self) -> str:
        return P.container_dir(self.name) + "/rootfs"

    @property
    def scratch(self) -> MountScratchRequest:
        return MountScratchRequest(self.name, self.encrypted_scratch)

    @property
    def overlay(self) -> MountOverlayRequest:
        return MountOverlayRequest(self.name, self.layer_targets, self.rootfs)

    @property
    def unmount_overlay(self) -> UnmountOverlayRequest:
        return UnmountOverlayRequest(self.rootfs)

    @property
    def unmount_scratch(self) -> UnmountScratchRequest:
        return UnmountScratchRequest(self.name)


@dataclass(frozen=True)
class LaunchPlan:
    layers: tuple[DeviceMount, ...]
    file_volumes: tuple[DeviceMount, ...]
    memory_volumes: tuple[CreateVolumeRequest, ...]
    containers: tuple[ContainerPlan, ...]
    extra: dict[str, Any] = field(default_factory=dict)
    init_containers: tuple[ContainerPlan, ...] = ()      # in the order they run
    network: SetGroupNetworkRequest | None = None        # what the containers' /etc files say
    scratch_gib: int = 0                                 # the group's encrypted scratch disk (0: none)
    restart_policy: RestartPolicy = RestartPolicy.always

    @property
    def disks(self) -> tuple[DeviceMount, ...]:
        return self.layers + self.file_volumes

    @property
    def all_containers(self) -> tuple[ContainerPlan, ...]:
        return self.init_containers + self.containers

    def with_dns(self, dns: DnsSettings) -> LaunchPlan:
        """The plan with other DNS settings for the containers (`up --dns-server`)."""
        network = self.network or SetGroupNetworkRequest("parma")
        return replace(self, network=replace(network, dns=dns))


def group_network(spec: GroupSpec) -> SetGroupNetworkRequest:
    """The group's hostname (its name), the names /etc/hosts gives the group, and its dnsConfig."""
    dns = spec.dns_config
    return SetGroupNetworkRequest(
        spec.name, tuple(c.name for c in spec.init_containers + spec.containers),
        DnsSettings(dns.name_servers, dns.search_domains, dns.options) if dns is not None else None)


# Where the host reaches a port forwarded from a wildcard address.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def probe_plan(spec: GroupSpec, kind: ProbeKind, probe: ProbeSpec) -> ProbePlan:
    """An httpGet probe goes to the host end of the group's TCP port with the probe's port (ports[].port)."""
    if probe.http_get is None:
        return ProbePlan(kind, probe)
    for p in spec.ports:
        if p.port == probe.http_get.port and p.protocol == "TCP":
            return ProbePlan(kind, probe, _LOOPBACK.get(p.host_address, p.host_address), p.host_port)
    return ProbePlan(kind, probe)


def build_plan(spec: GroupSpec, images: Mapping[str, ResolvedImage],
               volume_devices: Mapping[str, tuple[str, Path]], policy: Policy | None = None) -> LaunchPlan:
    """images: container name -> image (init containers too); volume_devices: files-volume name -> (root
    hash, image path); policy: a supplied policy (not generated here), which decides how volume binds are
    asked for."""
    layers: dict[str, DeviceMount] = {}
    for c in spec.init_containers + spec.containers:
        for layer in images[c.name].layers:
            if layer.root_hash not in layers:
                i = len(layers)
                layers[layer.root_hash] = DeviceMount(layer.root_hash, Path(layer.device_path), f"L{i}",
                                                      f"{P.LAYERS_DIR}/l{i}")
    file_volumes: list[DeviceMount] = []
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

    def container_plan(c: ContainerSpec, init: bool) -> ContainerPlan:
        image = images[c.name]
        targets = tuple(layers[layer.root_hash].target for layer in reversed(image.layers))
        process = container_process(c, image.config)
        create = CreateContainerRequest(
            container_id=c.name, argv=process.argv, env=process.env, working_dir=process.working_dir,
            user=process.user, mounts=container_mounts(spec, c, policy), capabilities=container_capabilities(c),
            privileged=c.privileged, no_new_privileges=False, umask=defaults.DEFAULT_UMASK,
            seccomp_profile=c.seccomp_profile.canonical if c.seccomp_profile is not None else None)
        return ContainerPlan(c.name, targets, create, c.stdio, tuple(e.command for e in c.allowed_execs),
                             encrypted_scratch=spec.resources.scratch_gib > 0, init=init,
                             probes=tuple(probe_plan(spec, kind, p) for kind, p in c.probes))

    return LaunchPlan(tuple(layers.values()), tuple(file_volumes), tuple(memory_volumes),
                      tuple(container_plan(c, False) for c in spec.containers),
                      init_containers=tuple(container_plan(c, True) for c in spec.init_containers),
                      network=group_network(spec), scratch_gib=spec.resources.scratch_gib,
                      restart_policy=spec.restart_policy)
