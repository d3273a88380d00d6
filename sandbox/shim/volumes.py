"""A container's bind mounts as the policy's group volumes.

kubelet and `ctr run --mount` hand a runtime a container's volumes as bind mounts of host directories in
the bundle's OCI spec. None of the host's directories reach the UVM as they are: the shim maps each bind,
by the container's mount destination, to the volume the policy binds there (`/run/parma/volumes/<name>`)
and gives the guest that volume the way `up` does:
- `files`: the host directory is packaged into a read-only ext4 + dm-verity device (sandbox/layers/volumes.py)
  and attached; the guest derives its root hash from the device and mount_device checks it against the
  policy's pin, so changed content (an edited ConfigMap) is denied, not trusted;
- `emptyDir` / `tmpfs`: created empty in guest memory (create_volume); the host directory is not used.
A bind the policy does not describe is refused. Binds the runtime itself adds (CRI's /etc/hosts,
/etc/hostname, /etc/resolv.conf, /dev/shm, /dev/termination-log) are left out: the guest writes its own
/etc files and a container's /dev is the guest's.

A configMap volume, as kubelet writes it, is a directory of symlinks into a timestamped directory
(`name -> ..data/name`, `..data -> ..2024_...`): what a container sees there is the dereferenced view,
which `volume_view` copies out so that the device holds what the ConfigMap's files are (names, modes,
bytes), as the group's `files` directory does.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sandbox.group.spec import VolumeKind, VolumeMount, VolumeSpec
from sandbox.shared.errors import InputError
from sandbox.shared.policy import defaults
from sandbox.shared.policy.model import Container, Policy
from sandbox.shim.bundle import OciContainer, OciMount

# Binds the container runtime adds on its own (CRI's; ctr adds none): not volumes, and not given to the UVM.
RUNTIME_BINDS = frozenset({"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/dev/shm", "/dev/termination-log"})
# The spec's own filesystems (proc, sysfs, devpts, ...): the guest's runtime makes its own.
RUNTIME_MOUNTS = frozenset({"/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup", "/run"})
KUBELET_DATA = "..data"         # kubelet's atomic writer: the symlink to the current content
CONFIGMAP_PLUGIN_DIR = "kubernetes.io~configmap"


@dataclass(frozen=True)
class VolumeBind:
    """One bind mount of the bundle, as the policy's volume it maps to."""

    volume: str
    kind: VolumeKind
    source: str          # the host directory (for a files volume: what the device is made from)
    destination: str
    read_only: bool

    @property
    def mount(self) -> VolumeMount:
        return VolumeMount(self.volume, self.destination, self.read_only or self.kind == VolumeKind.files)


def _candidates(policy: Policy, name: str | None, argv: Sequence[str]) -> list[Container]:
    """The policy containers this one may be: the one of its CRI name, else those with its command."""
    if name:
        named = [c for c in policy.containers if c.name == name]
        if named:
            return named
    same = [c for c in policy.containers if c.command is not None and tuple(c.command) == tuple(argv)]
    return same or list(policy.containers)


def _volume_at(containers: list[Container], destination: str) -> set[str]:
    prefix = defaults.VOLUMES_DIR + "/"
    return {m.source.removeprefix(prefix) for c in containers for m in c.mounts
            if m.destination == destination and m.source.startswith(prefix)}


def volume_binds(policy: Policy | None, oci: OciContainer, name: str | None) -> tuple[VolumeBind, ...]:
    """Map the bundle's bind mounts to the policy's volumes by destination; refuse any the policy does not
    describe (InputError, what and where)."""
    out = []
    kinds = {v.name: v.kind for v in policy.volumes} if policy is not None else {}
    containers = _candidates(policy, name, oci.args) if policy is not None else []
    who = f"container {name!r}" if name else "the container"
    for m in oci.mounts:
        if not m.is_bind:
            if m.destination in RUNTIME_MOUNTS:
                continue
            raise InputError(f"{who} asks for a {m.type or 'untyped'} mount at {m.destination}, which the parma "
                             "runtime does not give the UVM", hint="only binds of the policy's volumes reach a container")
        if m.destination in RUNTIME_BINDS:
            continue
        out.append(_map(m, policy, containers, kinds, who))
    return tuple(out)


def _map(m: OciMount, policy: Policy | None, containers: list[Container], kinds: dict[str, VolumeKind],
         who: str) -> VolumeBind:
    hint = ("the policy lists the volumes a container may bind (the group's 'volumes' and 'mounts'; "
            "'parma-sandbox export k8s' writes the pod's from them); nothing else of the host's reaches the UVM")
    if policy is None:
        raise InputError(f"{who} binds host directory {m.source} at {m.destination}, and a generated policy "
                         "describes no volumes", hint="give the container an io.parma.policy that binds it")
    names = _volume_at(containers, m.destination)
    if not names:
        raise InputError(f"{who} binds host directory {m.source} at {m.destination}, where the policy binds "
                         "no volume", hint=hint)
    if len(names) > 1:
        raise InputError(f"{who} binds {m.destination}, where policy containers bind different volumes "
                         f"({', '.join(sorted(names))})",
                         hint="name the container (io.kubernetes.cri.container-name) as the policy does")
    volume = names.pop()
    kind = kinds.get(volume)
    if kind is None:
        raise InputError(f"{who} binds {m.destination} from volume {volume!r}, which the policy's volumes do not "
                         "list", hint=hint)
    if kind == VolumeKind.secret:
        raise InputError(f"{who} binds secret volume {volume!r} at {m.destination}; the parma runtime does not "
                         "give pods secret volumes yet", hint="see docs/kubernetes.md, 'What is not supported'")
    return VolumeBind(volume, kind, m.source, m.destination, m.read_only)


def volume_view(source: Path, staging: Path) -> Path:
    """The directory a container sees at a bind of `source`. A plain directory is itself; kubelet's
    configMap layout is copied out dereferenced (visible names only, modes kept) into `staging`."""
    if not (source / KUBELET_DATA).is_symlink():
        return source
    root = source.resolve()
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for entry in sorted(os.listdir(source)):
        if entry.startswith(".."):
            continue
        target = (source / entry).resolve()
        if not target.is_relative_to(root):
            raise InputError(f"{source / entry} points outside the volume ({target})")
        if target.is_dir():
            shutil.copytree(target, staging / entry, symlinks=True)
        else:
            shutil.copy2(target, staging / entry)
    return staging


def kubelet_volume_dir(kubelet_dir: str, pod_uid: str, volume: str) -> Path:
    """Where kubelet puts a pod's configMap volume (its --root-dir, pods/<uid>/volumes/<plugin>/<name>)."""
    return Path(kubelet_dir) / "pods" / pod_uid / "volumes" / CONFIGMAP_PLUGIN_DIR / volume


def launch_volumes(binds: Sequence[VolumeBind], staging: Path) -> tuple[VolumeSpec, ...]:
    """The group volumes a UVM is launched with for these binds (each volume once)."""
    out: dict[str, VolumeSpec] = {}
    for b in binds:
        if b.volume in out:
            continue
        source = volume_view(Path(b.source), staging / b.volume) if b.kind == VolumeKind.files else None
        out[b.volume] = VolumeSpec(b.volume, b.kind, source=source)
    return tuple(out.values())


def pod_volumes(policy: Policy, kubelet_dir: str, pod_uid: str | None, staging: Path) -> tuple[VolumeSpec, ...]:
    """A pod's volumes at its sandbox's launch, before any container is known: every volume the policy
    lists; a files volume from kubelet's configMap directory of that name (kubelet mounts a pod's volumes
    before it asks for the sandbox)."""
    out = []
    for v in policy.volumes:
        if v.kind == VolumeKind.files:
            if not pod_uid:
                raise InputError(f"the policy lists files volume {v.name!r}, and the pod sandbox has no "
                                 "io.kubernetes.cri.sandbox-uid annotation to find kubelet's directory by")
            d = kubelet_volume_dir(kubelet_dir, pod_uid, v.name)
            if not d.is_dir():
                raise InputError(f"files volume {v.name!r}: kubelet's directory {d} does not exist",
                                 hint="the pod must have a configMap volume of that name ('parma-sandbox export "
                                      "k8s' writes it); kubelet_dir in shim.toml names kubelet's --root-dir")
            out.append(VolumeSpec(v.name, v.kind, source=volume_view(d, staging / v.name)))
        elif v.kind == VolumeKind.secret:
            raise InputError(f"the policy lists secret volume {v.name!r}; the parma runtime does not give pods "
                             "secret volumes yet", hint="see docs/kubernetes.md, 'What is not supported'")
        else:
            out.append(VolumeSpec(v.name, v.kind))
    return tuple(out)


def check_bind_sources(binds: Sequence[VolumeBind], shipped: dict[str, str]) -> None:
    """A files volume's device was made at launch: a later bind of it must be of the same host directory."""
    for b in binds:
        if b.kind == VolumeKind.files and b.volume in shipped and \
                os.path.realpath(b.source) != os.path.realpath(shipped[b.volume]):
            raise InputError(f"the container binds {b.source} at {b.destination} as files volume {b.volume!r}, "
                             f"whose device the sandbox was launched with from {shipped[b.volume]}")
