"""The shim's one adapter to the project's launch code: a pod sandbox is a sandbox `up -d` launched.

Everything the shim does to a UVM goes through here, so a change in sandbox/launch touches one module:
- launch: `sandbox.launch.pipeline.up` with `create_containers=False` (images resolved and converted,
  the policy set and checked against HOST_DATA, every layer mounted, no container yet);
- create/start/exec/signal/wait/read output: the agent requests `up` and `exec` make, on the sandbox's
  agent ports (`sandbox.launch.lifecycle.connect`);
- teardown: `sandbox.launch.lifecycle.down`, as `parma-sandbox down` does.

The sandbox is an ordinary one in the state store: `parma-sandbox ps`, `inspect`, `logs` and `down` see
it under its name (the same PARMA_SANDBOX_RUNTIME provided).
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sandbox.group.spec import (
    ContainerSpec,
    GroupPort,
    GroupSpec,
    LayerFormat,
    Resources,
    TeeMode,
    VolumeSpec,
)
from sandbox.images.model import ResolvedImage
from sandbox.launch import lifecycle
from sandbox.launch.agent_client import AgentClient
from sandbox.launch.pipeline import UpOptions, load_running
from sandbox.launch.pipeline import up as launch_up
from sandbox.launch.plan import build_plan
from sandbox.policy.sources import resolve_group_images
from sandbox.shared import messages as M
from sandbox.shared.errors import InputError
from sandbox.shared.policy.model import Policy, parse_policy
from sandbox.state import StateStore

_GUEST_ID = re.compile(M.CONTAINER_ID)


def sandbox_name(namespace: str, sandbox_id: str) -> str:
    """The state-store name of a containerd sandbox: readable, unique per (namespace, id), <= 63 chars."""
    digest = hashlib.sha256(f"{namespace}/{sandbox_id}".encode()).hexdigest()[:10]
    stem = re.sub(r"[^a-z0-9]+", "-", sandbox_id.lower()).strip("-")[:40].strip("-") or "sandbox"
    return f"ctrd-{stem}-{digest}"


def guest_container_id(container_id: str) -> str:
    """containerd ids allow upper case and 76 characters; the agent's are lower case, at most 64."""
    if _GUEST_ID.fullmatch(container_id):
        return container_id
    return "c-" + hashlib.sha256(container_id.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Launch:
    """What to bring up: the containers whose images the UVM needs, and the policy (None: generate)."""

    name: str
    containers: tuple[ContainerSpec, ...]
    policy: bytes | None
    tee: TeeMode = TeeMode.auto
    vcpus: int = 1
    memory_mib: int = 512
    volumes: tuple[VolumeSpec, ...] = ()        # made in the guest at launch (files: devices; others: empty)
    netns: str | None = None                    # run QEMU in this network namespace (the pod's)
    ports: tuple[tuple[int, str], ...] = ()     # (port, tcp|udp): forwarded from netns into the UVM


def port_forwards(netns: str | None, ports: tuple[tuple[int, str], ...]) -> tuple[GroupPort, ...]:
    """The UVM's forwards for the pod's container ports: in the pod's network namespace, on all its addresses
    (the pod IP, and loopback for kubelet's probes), to the same port in the UVM. Without a namespace of
    its own QEMU would listen in the node's: nothing is forwarded then."""
    if netns is None:
        return ()
    return tuple(GroupPort(port, port, proto.upper(), "0.0.0.0") for port, proto in ports)


@dataclass
class GuestSandbox:
    """A launched UVM and the agent connection the shim controls it through."""

    name: str
    store: StateStore
    qemu_pid: int
    layer_targets: dict[str, str]                      # layer root hash -> where the agent mounted it
    images: dict[str, ResolvedImage] = field(default_factory=dict)   # by reference
    layer_format: LayerFormat = LayerFormat.default
    policy: Policy | None = None                       # the annotation's policy (None: generated)
    volumes: tuple[VolumeSpec, ...] = ()               # the group volumes in the guest
    volume_devices: dict[str, tuple[str, Path]] = field(default_factory=dict)  # files volume -> (root hash, image)
    volume_sources: dict[str, str] = field(default_factory=dict)   # files volume -> the host directory it came from
    _client: AgentClient | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- launch and teardown ------------------------------------------------------------------

    @classmethod
    def launch(cls, req: Launch, policy_dir: Path, store: StateStore | None = None) -> GuestSandbox:
        """Resolve the images, launch the UVM, set the policy and mount every layer; create no container."""
        store = store or StateStore()
        spec = GroupSpec(name=req.name, containers=req.containers, tee=req.tee,
                         resources=Resources(vcpus=req.vcpus, memory_mib=req.memory_mib), volumes=req.volumes,
                         ports=port_forwards(req.netns, req.ports))
        policy_file = policy = None
        if req.policy is not None:
            policy = parse_policy(req.policy, "io.parma.policy")
            spec = replace(spec, layer_format=_layer_format_for(spec, policy))
            policy_file = policy_dir / "policy.json"
            policy_file.write_bytes(req.policy)
        images = resolve_group_images(spec)
        launched = launch_up(spec, UpOptions(name=req.name, policy_file=policy_file, tee=req.tee, detach=True,
                                             create_containers=False, netns=req.netns), store)
        qemu = launched.record.processes.get("qemu")
        return cls(name=req.name, store=store, qemu_pid=qemu.pid if qemu else 0,
                   layer_targets={d.root_hash: d.target for d in launched.plan.layers},
                   images={c.image: images[c.name] for c in req.containers}, layer_format=spec.layer_format,
                   policy=policy, volumes=req.volumes,
                   volume_devices={Path(d.target).name: (d.root_hash, d.path) for d in launched.plan.file_volumes})

    def down(self, timeout: float = 10.0) -> None:
        """Stop every container and the UVM and remove the sandbox's state (`parma-sandbox down`)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
        if self.store.load(self.name) is not None:
            lifecycle.down(self.name, timeout=timeout, store=self.store)

    # -- agent requests -----------------------------------------------------------------------

    def connect(self, *, wait: float = 30.0) -> AgentClient:
        """A new connection on a free agent port (for a caller that blocks on it, e.g. output)."""
        return lifecycle.connect(load_running(self.name, self.store), self.store, wait=wait)

    def call(self, request: M.Request[Any], *, timeout: float = 60.0) -> dict[str, Any]:
        """One request on the shim's control connection (serialised; quick requests only); its result
        in JSON form."""
        with self._lock:
            if self._client is None:
                self._client = self.connect()
            try:
                return self._client.call(request, timeout=timeout).to_json()
            except Exception:
                # A timed-out or broken connection may still carry a late answer: start afresh.
                self._client.close()
                self._client = None
                raise

    def image(self, reference: str) -> ResolvedImage:
        if reference not in self.images:
            spec = GroupSpec(name=self.name, containers=(ContainerSpec(name="c", image=reference),),
                             layer_format=self.layer_format)
            self.images[reference] = resolve_group_images(spec)["c"]
        return self.images[reference]

    def create(self, guest_id: str, container: ContainerSpec) -> dict[str, Any]:
        """Mount the container's scratch and overlay and create it (policy-checked), not started."""
        image = self.image(container.image)
        missing = [h for h in image.layer_hashes if h not in self.layer_targets]
        if missing:
            raise InputError(f"image {container.image} has layers the sandbox was not launched with "
                             f"({len(missing)} of {len(image.layer_hashes)})",
                             hint="a pod's images come from its policy (io.parma.policy): every container "
                                  "must use an image the policy lists")
        launched = {v.name for v in self.volumes}
        missing_volumes = sorted({m.volume for m in container.mounts} - launched)
        if missing_volumes:
            raise InputError(f"the container binds volume(s) {', '.join(missing_volumes)}, which the sandbox was "
                             "not launched with",
                             hint="a plain container's volumes are the binds of the container that launched "
                                  "the sandbox; a pod's are the volumes its policy lists")
        plan = build_plan(GroupSpec(name=self.name, containers=(container,), volumes=self.volumes),
                          {container.name: image}, self.volume_devices, policy=self.policy)
        planned = replace(plan.containers[0], name=guest_id,
                          layer_targets=tuple(self.layer_targets[h] for h in reversed(image.layer_hashes)))
        self.call(planned.scratch)
        self.call(planned.overlay)
        return self.call(replace(planned.create, container_id=guest_id), timeout=120)

    def start(self, guest_id: str) -> dict[str, Any]:
        return self.call(M.StartContainerRequest(guest_id), timeout=120)

    def exec(self, guest_id: str, argv: list[str], env: list[str], cwd: str) -> dict[str, Any]:
        """Run a process in a running container if the policy lists it; returns its exec_id and pid."""
        return self.call(M.ExecProcessRequest(guest_id, tuple(argv), tuple(env), cwd))

    def signal(self, guest_id: str, exec_id: str | None, signal: int) -> None:
        self.call(M.SignalProcessRequest(guest_id, signal, exec_id))

    def shutdown_container(self, guest_id: str, timeout: float) -> None:
        """SIGTERM, then SIGKILL after `timeout` (the agent's shutdown, which a policy always allows)."""
        with self.connect() as client:
            client.call(M.ShutdownContainerRequest(guest_id, timeout), timeout=timeout + 30)


def cri_env_to_drop(policy: Policy | None, container_name: str) -> frozenset[str]:
    """Variables containerd's CRI plugin adds to every container that the pod's policy does not expect.

    CRI sets HOSTNAME (the pod's hostname) in every container; a group, and so its policy, names only
    the variables the workload needs. The shim leaves HOSTNAME out unless the policy's container of that
    name has a rule for it: the host chooses what to ask, the policy still decides.
    """
    if policy is None:
        return frozenset()
    for c in policy.containers:
        if c.name == container_name:
            if any(getattr(r, "pattern", "").startswith("HOSTNAME=") or getattr(r, "name", "") == "HOSTNAME"
                   for r in c.env_rules):
                return frozenset()
            return frozenset({"HOSTNAME"})
    return frozenset({"HOSTNAME"})


def _layer_format_for(spec: GroupSpec, policy: Policy) -> LayerFormat:
    """The layer format the policy's root hashes were computed in (ACI-compatible or ours)."""
    return LayerFormat.aci if policy_wants_aci_layers(spec, policy) else LayerFormat.default


def policy_wants_aci_layers(spec: GroupSpec, policy: Policy) -> bool:
    """True when converting the images our way gives hashes the policy does not know, and ACI's way does."""
    wanted = {h for c in policy.containers for h in c.layers}
    ours = resolve_group_images(spec)
    if all(h in wanted for image in ours.values() for h in image.layer_hashes):
        return False
    aci = resolve_group_images(replace(spec, layer_format=LayerFormat.aci))
    return all(h in wanted for image in aci.values() for h in image.layer_hashes)


def containers_from_policy(policy: Policy) -> tuple[ContainerSpec, ...]:
    """A pod's containers as its policy lists them: the images (policy `id`) whose layers the UVM needs."""
    out = []
    for i, c in enumerate(policy.containers):
        if not c.id:
            raise InputError(f"policy container {c.label(i)} has no 'id' (image reference)",
                             hint="the shim takes a pod's images from the policy: generate it with "
                                  "'parma-sandbox export k8s' (or 'policy gen'), which records them")
        name = c.name if c.name and re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", c.name) else f"c{i}"
        out.append(ContainerSpec(name=name, image=c.id, command=c.command))
    return tuple(out)
