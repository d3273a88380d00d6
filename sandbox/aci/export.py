"""A group as a Confidential ACI deployment: an ARM template whose ccePolicy describes ACI's runtime.

The policy is the one `az confcom acipolicygen` writes for the same template (api 0.10.0, framework
0.2.3), built from the group's resolved images with ACI-compatible layer root hashes:

- each container: its layers, the argv ACI will start (the template's `command`, else the image's
  ENTRYPOINT + CMD), env rules for the image's and the group's variables (secure values as a
  wildcard: their value is a deployment parameter and must not be in the policy), plus the variables
  ACI injects; its volume mounts at ACI's sources (`sandbox:///tmp/atlas/<kind>/.+`) and ACI's
  /etc/resolv.conf mount; exec processes; any user unless the group names one; the default or
  privileged capability sets as the framework computes them;
- init containers as containers (confcom appends them after the group's containers);
- ACI's pause container and the default infrastructure fragment import, as confcom writes them;
- the flags confcom writes (env and capability dropping allowed, properties access allowed,
  unencrypted scratch not allowed, which ACI requires).

The template pins every image by digest, makes each secure value a secureString parameter, carries the
group's probes (liveness and readiness: ACI has no startup probe), init containers, restart policy and
DNS configuration, and holds nothing local. HOST_DATA on ACI is SHA-256 of the Rego text (sandbox/aci/rego.py).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sandbox.aci.rego import ccepolicy_base64, rego_module
from sandbox.group.spec import ContainerSpec, GroupSpec, VolumeKind
from sandbox.images.model import ResolvedImage
from sandbox.images.reference import pinned_reference
from sandbox.policy.gen import ContainerProcess, container_capabilities, container_process
from sandbox.shared.errors import InputError
from sandbox.shared.seccomp import measure

API_VERSION, FRAMEWORK_VERSION = "0.10.0", "0.2.3"
ARM_API_VERSION = "2023-05-01"
INFRA_FRAGMENT = {"feed": "mcr.microsoft.com/aci/aci-cc-infra-fragment", "includes": ["containers", "fragments"],
                  "issuer": "did:x509:0:sha256:I__iuL25oXEVFdTP_aBLx_eT1RPHbCQ_ECBQfYZpt9s::eku:1.3.6.1.4.1.311.76.59.1.3",
                  "minimum_svn": "4"}
# Variables ACI's platform sets in every container (confcom internal_config.json, "default_envs").
ACI_ENV_RULES = ("TERM=xterm", "(?i)(FABRIC)_.+=.+", "HOSTNAME=.+", "T(E)?MP=.+", "FabricPackageFileName=.+",
                 "HostedServiceName=.+", "IDENTITY_API_VERSION=.+", "IDENTITY_HEADER=.+",
                 "IDENTITY_SERVER_THUMBPRINT=.+", "azurecontainerinstance_restarted_by=.+")
MOUNT_SOURCES = {VolumeKind.empty_dir: "sandbox:///tmp/atlas/emptydir/.+",
                 VolumeKind.tmpfs: "sandbox:///tmp/atlas/emptydir/.+",
                 VolumeKind.secret: "sandbox:///tmp/atlas/secretsVolume/.+",
                 VolumeKind.files: "sandbox:///tmp/atlas/azureFileVolume/.+"}
RESOLV_CONF = {"destination": "/etc/resolv.conf", "options": ["rbind", "rshared", "rw"],
               "source": "sandbox:///tmp/atlas/resolvconf/.+", "type": "bind"}
ANY_USER = {"group_idnames": [{"pattern": "", "strategy": "any"}], "umask": "0022",
            "user_idname": {"pattern": "", "strategy": "any"}}
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# ACI's pause container: the image's one layer, as every confcom policy pins it.
PAUSE_LAYER = "16b514057a06ad665f92c02863aca074fd5976c755d26bff16365299169e8415"
_PAUSE_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
               "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
               "CAP_KILL", "CAP_AUDIT_WRITE"]
PAUSE_CONTAINER = {
    "allow_elevated": False, "allow_stdio_access": True,
    "capabilities": {"ambient": [], "bounding": _PAUSE_CAPS, "effective": _PAUSE_CAPS, "inheritable": [],
                     "permitted": _PAUSE_CAPS},
    "command": ["/pause"],
    "env_rules": [{"pattern": DEFAULT_PATH, "required": True, "strategy": "string"},
                  {"pattern": "TERM=xterm", "required": False, "strategy": "string"}],
    "exec_processes": [], "layers": [PAUSE_LAYER], "mounts": [], "name": "pause-container",
    "no_new_privileges": False, "seccomp_profile_sha256": "", "signals": [], "user": ANY_USER, "working_dir": "/"}
FLAGS = {"allow_properties_access": True, "allow_dump_stacks": False, "allow_runtime_logging": False,
         "allow_environment_variable_dropping": True, "allow_unencrypted_scratch": False,
         "allow_capability_dropping": True}


def _process(container: ContainerSpec, image: ResolvedImage) -> tuple[ContainerProcess, list[str] | None]:
    """What ACI starts, and the argv the policy pins: None (confcom's null, which never matches) when
    neither the template nor the image gives a command."""
    config = image.config
    if container.command is None and container.args is None and not config.entrypoint and not config.cmd:
        return container_process(container, dataclasses.replace(config, cmd=("",))), None
    process = container_process(container, config)
    return process, list(process.argv)


def _env_rules(container: ContainerSpec, image: ResolvedImage) -> list[dict[str, Any]]:
    process, _ = _process(container, image)
    rules: list[dict[str, Any]] = []
    for item in process.env:
        name = item.partition("=")[0]
        if name in process.secure_names:
            rules.append({"pattern": f"{name}=.*", "required": False, "strategy": "re2"})
        else:
            rules.append({"pattern": item, "required": False, "strategy": "string"})
    rules += [{"pattern": p, "required": False, "strategy": "string" if p == "TERM=xterm" else "re2"}
              for p in ACI_ENV_RULES]
    unique = {r["pattern"]: r for r in rules}
    return [unique[p] for p in sorted(unique)]


def _user(container: ContainerSpec) -> dict[str, Any]:
    if container.user is None:
        return ANY_USER
    user, _, group = container.user.partition(":")

    def idname(part: str) -> dict[str, str]:
        if not part:
            return {"pattern": "", "strategy": "any"}
        return {"pattern": part, "strategy": "id" if part.isdigit() else "name"}
    return {"group_idnames": [idname(group)], "umask": "0022", "user_idname": idname(user)}


def policy_container(spec: GroupSpec, container: ContainerSpec, image: ResolvedImage,
                     registry: str | None = None) -> dict[str, Any]:
    kinds = {v.name: v.kind for v in spec.volumes}
    mounts = [{"destination": m.mount_path,
               "options": ["rbind", "rshared", "ro" if m.read_only or kinds[m.volume] in
                           (VolumeKind.secret, VolumeKind.files) else "rw"],
               "source": MOUNT_SOURCES[kinds[m.volume]], "type": "bind"} for m in container.mounts]
    if container.attestation_api:
        raise InputError(f"container {container.name!r}: attestationApi is parma-sandbox's own attestation "
                         "endpoint", hint="on ACI, add the confidential-sidecar (SKR) container instead")
    caps = container_capabilities(container)
    sets = {k: sorted(getattr(caps, k)) for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
    process, argv = _process(container, image)
    return {
        "allow_elevated": container.privileged, "allow_stdio_access": container.stdio, "capabilities": sets,
        "command": argv, "env_rules": _env_rules(container, image),
        "exec_processes": [{"command": list(p.command), "signals": list(p.signals)}
                           for p in container.allowed_execs],
        "id": pinned_reference(image, registry, consumer="ACI"), "layers": list(image.layer_hashes), "mounts": [*mounts, RESOLV_CONF],
        "name": container.name, "no_new_privileges": False,
        "seccomp_profile_sha256": measure(container.seccomp_profile),
        "signals": list(dict.fromkeys(container.signals)), "user": _user(container),
        "working_dir": process.working_dir}


def aci_policy(spec: GroupSpec, images: Mapping[str, ResolvedImage], registry: str | None = None) -> str:
    """The ccePolicy Rego text ACI enforces for the group (module docstring). Init containers follow the
    containers, as confcom appends them: the framework treats both alike."""
    containers = [policy_container(spec, c, images[c.name], registry)
                  for c in spec.containers + spec.init_containers]
    doc = {"api_version": API_VERSION, "framework_version": FRAMEWORK_VERSION,
           "containers": [*containers, PAUSE_CONTAINER], **FLAGS}
    return rego_module(doc, [INFRA_FRAGMENT])


def host_data(rego: str) -> str:
    """The HOST_DATA ACI attests for this policy: SHA-256 of the Rego text."""
    return hashlib.sha256(rego.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Export:
    template: dict[str, Any]
    rego: str

    @property
    def host_data(self) -> str:
        return host_data(self.rego)


def arm_probes(c: ContainerSpec) -> dict[str, Any]:
    if c.startup_probe is not None:
        raise InputError(f"container {c.name!r} has a startupProbe, which ACI does not have",
                         hint="drop it for ACI (a livenessProbe with a longer initialDelaySeconds does the same "
                              "there), or export the group for Kubernetes, which has it")
    return {kind.field: p.document(lowercase_scheme=True) for kind, p in c.probes}  # ACI's scheme: lowercase


def _param_name(*parts: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in "-".join(parts).replace("_", "-").split("-") if p)


def aci_template(spec: GroupSpec, images: Mapping[str, ResolvedImage], registry: str | None = None) -> Export:
    """The ARM template (a dict, written as JSON) deploying the group on Confidential ACI."""
    rego = aci_policy(spec, images, registry)
    parameters: dict[str, Any] = {"location": {"type": "string", "defaultValue": "[resourceGroup().location]"}}
    n = len(spec.containers)
    cpu = math.floor(spec.resources.vcpus / n * 10) / 10 or 0.1
    memory = math.ceil(spec.resources.memory_mib / 1024 / n * 10) / 10
    containers: list[dict[str, Any]] = []
    init_containers: list[dict[str, Any]] = []
    for init, c in [(False, c) for c in spec.containers] + [(True, c) for c in spec.init_containers]:
        process, _ = _process(c, images[c.name])
        env = []
        for var in c.env:
            if var.secure:
                pname = _param_name(c.name, var.name)
                parameters[pname] = {"type": "secureString",
                                     "metadata": {"description": f"{var.name} of container {c.name}"}}
                env.append({"name": var.name, "secureValue": f"[parameters('{pname}')]"})
            else:
                env.append({"name": var.name, "value": var.value})
        props: dict[str, Any] = {"image": pinned_reference(images[c.name], registry, consumer="ACI")}
        if not init:    # ACI's init containers take no resources or ports: they use the group's
            props["resources"] = {"requests": {"cpu": cpu, "memoryInGB": memory}}
        if c.command is not None or c.args is not None:
            props["command"] = list(process.argv)
        if env:
            props["environmentVariables"] = env
        if c.ports:
            props["ports"] = [{"port": p.port, "protocol": p.protocol} for p in c.ports]
        if c.mounts:
            props["volumeMounts"] = [{"name": m.volume, "mountPath": m.mount_path, "readOnly": m.read_only}
                                     for m in c.mounts]
        sc: dict[str, Any] = {}
        if c.privileged:
            sc["privileged"] = True
        if c.capabilities.add or c.capabilities.drop:
            sc["capabilities"] = {"add": list(c.capabilities.add), "drop": list(c.capabilities.drop)}
        if c.user:
            user, _, user_group = c.user.partition(":")
            if user:
                sc["runAsUser"] = int(user) if user.isdigit() else user
            if user_group:
                sc["runAsGroup"] = int(user_group) if user_group.isdigit() else user_group
        if c.seccomp_profile is not None:
            # ACI's guest measures what it receives as confcom measured this (sandbox/shared/seccomp.py).
            sc["seccompProfile"] = base64.b64encode(c.seccomp_profile.canonical).decode("ascii")
        if sc:
            props["securityContext"] = sc
        props.update(arm_probes(c))
        (init_containers if init else containers).append({"name": c.name, "properties": props})
    volumes = []
    for v in spec.volumes:
        if v.kind in (VolumeKind.empty_dir, VolumeKind.tmpfs):
            volumes.append({"name": v.name, "emptyDir": {}})
        elif v.kind == VolumeKind.secret:
            volumes.append({"name": v.name, "secret": {k: base64.b64encode(b).decode() for k, b in v.items}})
        else:   # files: a directory shipped with the group -> an Azure file share the user fills
            share = {"shareName": _param_name(v.name, "share"), "storageAccountName": _param_name(v.name, "account"),
                     "storageAccountKey": _param_name(v.name, "key")}
            for key, pname in share.items():
                parameters[pname] = {"type": "secureString" if key == "storageAccountKey" else "string",
                                     "metadata": {"description": f"{key} of the share holding volume {v.name}"}}
            volumes.append({"name": v.name, "azureFile": {**{k: f"[parameters('{p}')]" for k, p in share.items()},
                                                          "readOnly": True}})
    group: dict[str, Any] = {"containers": containers, "osType": "Linux", "sku": "Confidential",
                             "restartPolicy": spec.restart_policy.value,
                             "confidentialComputeProperties": {"ccePolicy": ccepolicy_base64(rego)}}
    if init_containers:
        group["initContainers"] = init_containers
    if spec.dns_config is not None:
        dns = spec.dns_config
        group["dnsConfig"] = {"nameServers": list(dns.name_servers),
                              **({"searchDomains": " ".join(dns.search_domains)} if dns.search_domains else {}),
                              **({"options": " ".join(dns.options)} if dns.options else {})}
    if spec.ports:
        group["ipAddress"] = {"type": "Public", "ports": [{"port": p.port, "protocol": p.protocol}
                                                          for p in spec.ports]}
    if volumes:
        group["volumes"] = volumes
    template = {
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "metadata": {"generator": "parma-sandbox export aci", "hostData": host_data(rego)},
        "parameters": parameters,
        "resources": [{"type": "Microsoft.ContainerInstance/containerGroups", "apiVersion": ARM_API_VERSION,
                       "name": spec.name, "location": "[parameters('location')]", "properties": group}],
    }
    return Export(template, rego)
