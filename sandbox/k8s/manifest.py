"""A group as a Kubernetes Pod or Deployment for the `parma` RuntimeClass (the containerd shim).

Pure function of the group spec and the policy bytes. The pod carries:
- `runtimeClassName: parma`, so kubelet asks containerd for runtime `io.containerd.parma.v2`;
- annotation `io.parma.policy`: base64 of the exact policy bytes (their SHA-256 becomes HOST_DATA),
  `io.parma.policy-sha256` (the same hash, for people and for the shim's consistency check), and the
  UVM size (`io.parma.vcpus`, `io.parma.memory-mib`);
- each container as the group says: image, command/args (same meaning as in Kubernetes: command
  replaces ENTRYPOINT, args replaces CMD), env (secure values through a Secret written alongside),
  working dir, ports, user (numeric only: Kubernetes cannot run as a user name), privileges, probes;
- the group's initContainers (listed in the policy like the others) and restartPolicy (same values in
  Kubernetes; a Deployment's pods can only restart Always);
- `enableServiceLinks: false`: Kubernetes would otherwise add service env vars the policy does not list;
  `automountServiceAccountToken: false`: host mounts do not reach the UVM (and the token would be the
  host's to read anyway).

- volumes: a `files` volume as a ConfigMap (written alongside; one item per file, with the file's mode,
  so that the directory kubelet makes holds exactly the names, modes and bytes the policy's root hash
  pins) and a configMap volume of the same name; `emptyDir` as emptyDir, `tmpfs` as a Memory emptyDir.
  The shim packages kubelet's directory into a dm-verity device and the guest checks its root hash
  against the policy: a changed ConfigMap is denied, not trusted;
- ports: each container port as a containerPort, and annotation `io.parma.ports` (the shim forwards
  these from the pod's network namespace into the UVM); a group host port becomes the hostPort (and
  hostIP: the group's hostAddress, 127.0.0.1 unless it says otherwise) of the container port it
  forwards to, which kubelet's CNI portmap forwards to the pod IP as `up` forwards it to the group.

What the shim cannot give a pod yet is refused here with the reason (docs/kubernetes.md): secret
volumes, files volumes a ConfigMap cannot reproduce (symlinks, empty directories, directories other
than 0755, more than 1 MiB), seccomp profiles, a host port no container lists, and images that exist
only on this machine (`oci:` / `docker-archive:`); nodes pull by reference.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import re
import stat
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from sandbox.group.spec import (
    LOCAL_IMAGE_PREFIXES,
    ContainerSpec,
    GroupSpec,
    RestartPolicy,
    VolumeKind,
    VolumeSpec,
)
from sandbox.images.model import ResolvedImage
from sandbox.images.reference import pinned_reference
from sandbox.shared.errors import InputError
from sandbox.shared.policy.model import Policy

RUNTIME_CLASS = "parma"
POLICY_ANNOTATION = "io.parma.policy"
POLICY_HASH_ANNOTATION = "io.parma.policy-sha256"
VCPUS_ANNOTATION = "io.parma.vcpus"
MEMORY_ANNOTATION = "io.parma.memory-mib"
PORTS_ANNOTATION = "io.parma.ports"
CONFIGMAP_MAX_BYTES = 1 << 20       # the API server's limit on one object (etcd's value size)
KUBELET_DIR_MODE = 0o755            # kubelet's atomic writer makes a configMap volume's directories so
_KEY_CHARS = re.compile(r"[^-._a-zA-Z0-9]")


class Kind(StrEnum):
    pod = "pod"
    deployment = "deployment"


def pod_annotations(spec: GroupSpec, policy: bytes) -> dict[str, str]:
    out = {
        POLICY_ANNOTATION: base64.b64encode(policy).decode("ascii"),
        POLICY_HASH_ANNOTATION: hashlib.sha256(policy).hexdigest(),
        VCPUS_ANNOTATION: str(spec.resources.vcpus),
        MEMORY_ANNOTATION: str(spec.resources.memory_mib),
    }
    ports = container_ports(spec)
    if ports:
        out[PORTS_ANNOTATION] = ",".join(ports)
    return out


def container_ports(spec: GroupSpec) -> list[str]:
    """The pod's container ports as `io.parma.ports` lists them: `PORT/PROTOCOL`, each once, in order."""
    seen: dict[str, None] = {}
    for c in spec.init_containers + spec.containers:
        for p in c.ports:
            seen[f"{p.port}/{p.protocol.lower()}"] = None
    return list(seen)


def configmap_name(spec: GroupSpec, volume: str) -> str:
    return f"{spec.name}-{volume}"


def _configmap_key(rel: str, used: set[str]) -> str:
    """A ConfigMap key for the file at `rel` (keys are flat: [-._a-zA-Z0-9]); the item's path puts it back."""
    base = _KEY_CHARS.sub("_", rel.replace("/", "."))[:240].lstrip(".") or "file"
    key, n = base, 1
    while key in used:
        n += 1
        key = f"{base}-{n}"
    used.add(key)
    return key


def files_volume_configmap(spec: GroupSpec, v: VolumeSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A `files` volume as a ConfigMap and the configMap volume's items: one item per file, with its path
    and mode, so that kubelet's directory has the names, modes and bytes the policy's root hash was made
    from (sandbox/layers/volumes.py archives names, modes, link targets and content, nothing else)."""
    assert v.source is not None
    where = f"files volume {v.name!r} ({v.source})"
    hint = "a ConfigMap holds regular files only; kubelet makes every directory 0755"
    if not v.source.is_dir():
        raise InputError(f"{where}: not a directory")
    data: dict[str, str] = {}
    binary: dict[str, str] = {}
    items: list[dict[str, Any]] = []
    used: set[str] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(v.source):
        dirnames.sort()
        base = Path(dirpath)
        for name in dirnames:
            st = (base / name).lstat()
            rel = (base / name).relative_to(v.source).as_posix()
            if stat.S_ISLNK(st.st_mode):
                raise InputError(f"{where}: {rel} is a symlink, which a ConfigMap cannot hold", hint=hint)
            if stat.S_IMODE(st.st_mode) != KUBELET_DIR_MODE:
                raise InputError(f"{where}: directory {rel} has mode {stat.S_IMODE(st.st_mode):04o}; kubelet "
                                 f"makes a configMap volume's directories {KUBELET_DIR_MODE:04o}",
                                 hint=f"chmod 755 {base / name} (the policy pins every mode)")
            if not any(True for _ in (base / name).iterdir()):
                raise InputError(f"{where}: directory {rel} is empty, which a ConfigMap cannot hold", hint=hint)
        for name in sorted(filenames):
            path = base / name
            rel = path.relative_to(v.source).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise InputError(f"{where}: {rel} is a symlink, which a ConfigMap cannot hold", hint=hint)
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{where}: {rel} is not a regular file, which a ConfigMap cannot hold", hint=hint)
            mode = stat.S_IMODE(st.st_mode)
            if mode & ~0o777:
                raise InputError(f"{where}: {rel} has mode {mode:04o}; a configMap item's mode is at most 0777")
            content = path.read_bytes()
            total += len(content)
            key = _configmap_key(rel, used)
            try:
                data[key] = content.decode("utf-8")
            except UnicodeDecodeError:
                binary[key] = base64.b64encode(content).decode("ascii")
            items.append({"key": key, "path": rel, "mode": mode})
    if total > CONFIGMAP_MAX_BYTES:
        raise InputError(f"{where} holds {total} bytes; a ConfigMap holds at most {CONFIGMAP_MAX_BYTES}",
                         hint="put large content in the image instead")
    cm: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": configmap_name(spec, v.name)}}
    if data:
        cm["data"] = data
    if binary:
        cm["binaryData"] = binary
    return cm, items


def _first_with_port(spec: GroupSpec, port: int, protocol: str) -> str | None:
    for c in spec.init_containers + spec.containers:
        if any((p.port, p.protocol) == (port, protocol) for p in c.ports):
            return c.name
    return None


def _pod_volume(spec: GroupSpec, v: VolumeSpec, items: list[dict[str, Any]] | None) -> dict[str, Any]:
    if v.kind == VolumeKind.files:
        return {"name": v.name, "configMap": {"name": configmap_name(spec, v.name), "items": items or []}}
    if v.kind == VolumeKind.empty_dir:
        return {"name": v.name, "emptyDir": {}}
    if v.kind == VolumeKind.tmpfs:
        body: dict[str, Any] = {"medium": "Memory"}
        if v.size_mib:
            body["sizeLimit"] = f"{v.size_mib}Mi"
        return {"name": v.name, "emptyDir": body}
    raise InputError(f"group {spec.name!r}: {v.kind.value} volume {v.name!r} is not given to pods yet",
                     hint="the shim does not deliver secret volumes; see docs/kubernetes.md, 'What is not supported'")


def _secret_name(spec: GroupSpec) -> str:
    return f"{spec.name}-secure-env"


def _container(spec: GroupSpec, c: ContainerSpec) -> dict[str, Any]:
    where = f"container {c.name!r}"
    if c.image.startswith(LOCAL_IMAGE_PREFIXES):
        raise InputError(f"{where}: image {c.image!r} exists only on this machine",
                         hint="push it unchanged to a registry the nodes pull from and give --registry REGISTRY/PREFIX "
                              "(or use that reference, pinned by @sha256 digest, in the group)")
    if c.seccomp_profile is not None:
        raise InputError(f"{where} has a seccompProfile, which the parma runtime does not give pods yet",
                         hint="a pod's seccomp profile is a file on the node (Localhost) or the runtime's "
                              "default, neither of which the policy could pin; see docs/kubernetes.md")
    out: dict[str, Any] = {"name": c.name, "image": c.image}
    if c.command is not None:
        out["command"] = list(c.command)
    if c.args is not None:
        out["args"] = list(c.args)
    if c.working_dir:
        out["workingDir"] = c.working_dir
    env = []
    for var in c.env:
        if var.secure:
            env.append({"name": var.name, "valueFrom": {"secretKeyRef": {"name": _secret_name(spec), "key": var.name}}})
        else:
            env.append({"name": var.name, "value": var.value})
    if env:
        out["env"] = env
    if c.ports:
        ports = []
        for p in c.ports:
            port: dict[str, Any] = {"containerPort": p.port, "protocol": p.protocol}
            for g in spec.ports:     # the first container that lists the port gets it (a pod binds it once)
                if (g.port, g.protocol) == (p.port, p.protocol) and _first_with_port(spec, p.port, p.protocol) == c.name:
                    port["hostPort"] = g.host_port
                    if g.host_address not in ("0.0.0.0", "::"):
                        port["hostIP"] = g.host_address
            ports.append(port)
        out["ports"] = ports
    if c.mounts:
        kinds = {v.name: v.kind for v in spec.volumes}
        out["volumeMounts"] = [{"name": m.volume, "mountPath": m.mount_path,
                                "readOnly": m.read_only or kinds[m.volume] == VolumeKind.files} for m in c.mounts]
    security: dict[str, Any] = {}
    if c.user is not None:
        uid, _, gid = c.user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise InputError(f"{where}: user {c.user!r} is a name; Kubernetes runs containers only as numeric ids",
                             hint="write the user as UID or UID:GID in the group file")
        security["runAsUser"] = int(uid)
        if gid:
            security["runAsGroup"] = int(gid)
    if c.privileged:
        security["privileged"] = True
    caps = {k: [n.removeprefix("CAP_") for n in v] for k, v in (("add", c.capabilities.add),
                                                                  ("drop", c.capabilities.drop)) if v}
    if caps:
        security["capabilities"] = caps
    if security:
        out["securityContext"] = security
    for kind, probe in c.probes:    # exec probes run through the shim's policy-checked exec (the policy lists them)
        out[kind.field] = probe.document()
    return out


def manifests(spec: GroupSpec, policy: bytes, *, kind: Kind = Kind.pod, namespace: str | None = None,
              replicas: int = 1) -> list[dict[str, Any]]:
    """The documents to apply: an optional Secret (secure env values), a ConfigMap per files volume, and
    the Pod or Deployment."""
    listed = {(p.port, p.protocol) for c in spec.init_containers + spec.containers for p in c.ports}
    for g in spec.ports:
        if (g.port, g.protocol) not in listed:
            raise InputError(f"group {spec.name!r} forwards host port {g.host_port} to port {g.port}/{g.protocol}, "
                             "which no container lists; in Kubernetes a hostPort belongs to a container port",
                             hint=f"add {{\"port\": {g.port}}} to the 'ports' of the container that serves it")
    configmaps: list[dict[str, Any]] = []
    volumes = []
    for v in spec.volumes:
        items = None
        if v.kind == VolumeKind.files:
            cm, items = files_volume_configmap(spec, v)
            if namespace:
                cm["metadata"]["namespace"] = namespace
            configmaps.append(cm)
        volumes.append(_pod_volume(spec, v, items))
    containers = [_container(spec, c) for c in spec.containers]
    metadata: dict[str, Any] = {"name": spec.name, "labels": {"app.kubernetes.io/name": spec.name}}
    if namespace:
        metadata["namespace"] = namespace
    pod_spec: dict[str, Any] = {"runtimeClassName": RUNTIME_CLASS, "enableServiceLinks": False,
                                "automountServiceAccountToken": False, "containers": containers}
    if volumes:
        pod_spec["volumes"] = volumes
    if spec.init_containers:    # the policy lists them too: kubelet's creates of them are checked like the others
        pod_spec["initContainers"] = [_container(spec, c) for c in spec.init_containers]
    if kind == Kind.pod:    # a Deployment's pods must restart Always (the API server refuses anything else)
        pod_spec["restartPolicy"] = spec.restart_policy.value
    elif spec.restart_policy != RestartPolicy.always:
        raise InputError(f"group {spec.name!r} has restartPolicy {spec.restart_policy.value}, and a Deployment's "
                         "pods always restart", hint="export it as a Pod (--kind pod), or use restartPolicy Always")
    annotations = pod_annotations(spec, policy)
    docs: list[dict[str, Any]] = []
    secure = {v.name: v.value for c in spec.containers for v in c.env if v.secure}
    if secure:
        secret_meta: dict[str, Any] = {"name": _secret_name(spec)}
        if namespace:
            secret_meta["namespace"] = namespace
        docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": secret_meta, "type": "Opaque",
                     "data": {k: base64.b64encode(v.encode()).decode("ascii") for k, v in sorted(secure.items())}})
    docs += configmaps
    if kind == Kind.pod:
        docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {**metadata, "annotations": annotations},
                     "spec": pod_spec})
    else:
        labels = metadata["labels"]
        docs.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata,
                     "spec": {"replicas": replicas, "selector": {"matchLabels": dict(labels)},
                              "template": {"metadata": {"labels": dict(labels), "annotations": annotations},
                                           "spec": pod_spec}}})
    return docs


def with_registry_images(spec: GroupSpec, images: Mapping[str, ResolvedImage], registry: str | None) -> GroupSpec:
    """The group with each local image (oci:, docker-archive:) named where the user pushes it unchanged,
    REGISTRY/PREFIX/<name>@<digest>, and every other image pinned by its digest: a node then pulls exactly
    the bytes the policy's layer hashes were computed from, and the policy's container ids (which the shim
    matches a pod's containers with) are the manifest's image references."""
    def pinned(c: ContainerSpec) -> ContainerSpec:
        return dataclasses.replace(c, image=pinned_reference(images[c.name], registry, consumer="a node"))
    return dataclasses.replace(spec, containers=tuple(map(pinned, spec.containers)),
                               init_containers=tuple(map(pinned, spec.init_containers)))


def check_policy_images(spec: GroupSpec, policy: Policy) -> None:
    """The shim takes a pod's images from the policy's container ids: they must be the group's images."""
    listed = {c.id for c in policy.containers}
    missing = sorted({c.image for c in spec.init_containers + spec.containers} - listed)
    if missing:
        raise InputError(f"the policy lists no container with image {', '.join(map(repr, missing))}",
                         hint="the policy was made for other images; regenerate it from this group "
                              "(or omit --policy)")


def exec_notes(spec: GroupSpec) -> list[str]:
    """What `kubectl exec` may run (the policy's exec processes): everything else is denied."""
    return [f"{c.name}: {' '.join(e.command)}" for c in spec.containers for e in c.allowed_execs]
