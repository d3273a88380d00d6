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

What the shim cannot give a pod yet is refused here with the reason (docs/kubernetes.md): volumes
(Kubernetes volumes are host directories, the UVM has none of the host's), seccomp profiles, host ports, and images
that exist only on this machine (`oci:` / `docker-archive:`); nodes pull by reference.
"""

from __future__ import annotations

import base64
import hashlib
from enum import StrEnum
from typing import Any

from sandbox.group.spec import LOCAL_IMAGE_PREFIXES, ContainerSpec, GroupSpec, ProbeSpec, RestartPolicy
from sandbox.shared.errors import InputError
from sandbox.shared.policy.model import Policy

RUNTIME_CLASS = "parma"
POLICY_ANNOTATION = "io.parma.policy"
POLICY_HASH_ANNOTATION = "io.parma.policy-sha256"
VCPUS_ANNOTATION = "io.parma.vcpus"
MEMORY_ANNOTATION = "io.parma.memory-mib"


class Kind(StrEnum):
    pod = "pod"
    deployment = "deployment"


def pod_annotations(spec: GroupSpec, policy: bytes) -> dict[str, str]:
    return {
        POLICY_ANNOTATION: base64.b64encode(policy).decode("ascii"),
        POLICY_HASH_ANNOTATION: hashlib.sha256(policy).hexdigest(),
        VCPUS_ANNOTATION: str(spec.resources.vcpus),
        MEMORY_ANNOTATION: str(spec.resources.memory_mib),
    }


def _secret_name(spec: GroupSpec) -> str:
    return f"{spec.name}-secure-env"


def _container(spec: GroupSpec, c: ContainerSpec) -> dict[str, Any]:
    where = f"container {c.name!r}"
    if c.image.startswith(LOCAL_IMAGE_PREFIXES):
        raise InputError(f"{where}: image {c.image!r} exists only on this machine",
                         hint="push it to a registry the nodes can pull from and use that reference "
                              "(pin it by @sha256 digest so the node runs what the policy was made from)")
    if c.mounts:
        raise InputError(f"{where} mounts volumes, which the parma runtime does not give pods yet",
                         hint="Kubernetes volumes are host directories; see docs/kubernetes.md")
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
        out["ports"] = [{"containerPort": p.port, "protocol": p.protocol} for p in c.ports]
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
        out[kind.field] = _probe(probe)
    return out


def _probe(probe: ProbeSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if probe.exec_command is not None:
        out["exec"] = {"command": list(probe.exec_command)}
    if probe.http_get is not None:
        out["httpGet"] = {"path": probe.http_get.path, "port": probe.http_get.port,
                          "scheme": probe.http_get.scheme.value}
    return {**out, "initialDelaySeconds": probe.initial_delay_s, "periodSeconds": probe.period_s,
            "timeoutSeconds": probe.timeout_s, "failureThreshold": probe.failure_threshold,
            "successThreshold": probe.success_threshold}


def manifests(spec: GroupSpec, policy: bytes, *, kind: Kind = Kind.pod, namespace: str | None = None,
              replicas: int = 1) -> list[dict[str, Any]]:
    """The documents to apply: an optional Secret (secure env values) and the Pod or Deployment."""
    if spec.volumes:
        raise InputError(f"group {spec.name!r} has volumes, which the parma runtime does not give pods yet",
                         hint="see docs/kubernetes.md, 'What is not supported'")
    if spec.ports:
        raise InputError(f"group {spec.name!r} forwards host ports; in Kubernetes expose the pod with a Service",
                         hint="remove 'ports' from the group (containers' own 'ports' are kept)")
    containers = [_container(spec, c) for c in spec.containers]
    metadata: dict[str, Any] = {"name": spec.name, "labels": {"app.kubernetes.io/name": spec.name}}
    if namespace:
        metadata["namespace"] = namespace
    pod_spec: dict[str, Any] = {"runtimeClassName": RUNTIME_CLASS, "enableServiceLinks": False,
                                "automountServiceAccountToken": False, "containers": containers}
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
