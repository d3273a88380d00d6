"""An ACI ARM template (a `Microsoft.ContainerInstance/containerGroups` resource) read as a group spec.

`az confcom acipolicygen -a` reads the same templates. The mapping (docs/aci.md):

| template (resource `properties`)                      | group spec                                  |
|-------------------------------------------------------|---------------------------------------------|
| resource `name`                                       | `name`                                      |
| `containers[].name`, `.properties.image`              | `containers[].name`, `.image`               |
| `.properties.command`                                 | `command` (the whole argv, as in ACI)        |
| `.properties.environmentVariables` (value/secureValue)| `env`                                       |
| `.properties.ports`                                   | container `ports`                           |
| `.properties.volumeMounts`                            | `mounts`                                    |
| `.properties.securityContext` privileged/capabilities/runAsUser/runAsGroup/seccompProfile | `privileged`, `capabilities`, `user`, `seccompProfile` |
| `.properties.livenessProbe`/`readinessProbe`/`startupProbe` | the same probes (exec commands become exec processes of the policy, as confcom does) |
| `.properties.resources.requests` cpu/memoryInGB (summed) | `resources` vcpus/memoryMiB (rounded up)  |
| `volumes[]` emptyDir / secret                         | `volumes[]` emptyDir / secret               |
| `volumes[]` azureFile / gitRepo                       | `files` volume from `--volume NAME=PATH`    |
| `.properties.configMap.keyValuePairs`                 | a secret-kind volume at /mnt/configmap      |
| `ipAddress.ports`                                     | `ports` (forwarded from 127.0.0.1, same port)|
| `initContainers[]` (as containers, in order)          | `initContainers`                            |
| `restartPolicy`, `dnsConfig`                          | `restartPolicy`, `dnsConfig`                |

Parameter values come from `<template stem>.parameters.json` next to the template when it exists
(the usual `azuredeploy.json` / `azuredeploy.parameters.json` pair), else from `defaultValue`.
Fields that would change what a container may do and that parma-sandbox cannot honour
(allowPrivilegeEscalation false) are errors; fields with no local meaning (location, sku, osType,
dnsNameLabel, registry credentials, the template's own ccePolicy) are ignored.
"""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path
from typing import Any

from sandbox.group.armexpr import ArmError, Resolver
from sandbox.group.jsonio import ValidationError, load_json_file
from sandbox.group.spec import GroupSpec, validate_group
from sandbox.log import log

RESOURCE_TYPE = "microsoft.containerinstance/containergroups"


def is_arm_template(raw: Any) -> bool:
    """A deployment template has a `resources` array; a group file never does."""
    return isinstance(raw, dict) and isinstance(raw.get("resources"), list)


def parameters_file(template: Path) -> Path:
    return template.with_name(f"{template.stem}.parameters.json")


def _parameter_values(template: Path) -> dict[str, Any]:
    path = parameters_file(template)
    if not path.is_file():
        return {}
    raw = load_json_file(path)
    params = raw.get("parameters") if isinstance(raw, dict) else None
    if not isinstance(params, dict):
        raise ArmError(f"{path}: expected an object with 'parameters'",
                       hint='a parameters file looks like {"parameters": {"name": {"value": ...}}}')
    values = {}
    for name, entry in params.items():
        if not isinstance(entry, dict) or "value" not in entry:
            what = "a Key Vault reference" if isinstance(entry, dict) and "reference" in entry else "no 'value'"
            raise ArmError(f"{path}: parameters.{name}: {what} (only literal values are supported)")
        values[name] = entry["value"]
    return values


def _get(d: Any, key: str) -> Any:
    """Case-insensitive key lookup, as ARM property names are."""
    if not isinstance(d, dict):
        return None
    if key in d:
        return d[key]
    return next((v for k, v in d.items() if k.lower() == key.lower()), None)


class _Reader:
    def __init__(self, resolver: Resolver, source: str) -> None:
        self.r = resolver
        self.source = source
        self.names: dict[str, str] = {}          # ARM volume name -> group-spec volume name
        self.extra_volumes: list[dict[str, Any]] = []

    def fail(self, path: str, message: str, hint: str | None = None) -> ArmError:
        return ArmError(f"{self.source}: {path}: {message}", hint=hint or "see docs/aci.md for what is supported")

    def scalar(self, v: Any, path: str) -> str:
        """A string value as is; a number or boolean as ARM renders it into a string."""
        if isinstance(v, str):
            return v
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        raise self.fail(path, f"expected a string, number or boolean, got {_kind_name(type(v))}")

    def value(self, d: Any, key: str, path: str, kind: type | tuple[type, ...] | None = None) -> Any:
        """A field of an already resolved object, type-checked."""
        value = _get(d, key)
        if kind is not None and value is not None and not isinstance(value, kind):
            raise self.fail(f"{path}.{key}", f"expected {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def port(self, d: Any, path: str) -> int:
        """A port number; ARM converts numeric strings ("80") to the integer the schema wants."""
        v = self.value(d, "port", path, (int, str))
        if isinstance(v, str):
            if not v.isdigit():
                raise self.fail(f"{path}.port", f"{v!r} is not a port number")
            v = int(v)
        return v

    def number(self, d: Any, key: str, path: str) -> float:
        v = self.value(d, key, path)
        if v is None:
            return 0.0
        try:
            return float(v)
        except (TypeError, ValueError):
            raise self.fail(f"{path}.{key}", f"{v!r} is not a number") from None

    def container(self, raw: Any, path: str) -> dict[str, Any]:
        name = self.value(raw, "name", path, str)
        props = _get(raw, "properties")
        ppath = f"{path}.properties"
        if not isinstance(props, dict):
            raise self.fail(ppath, "a container needs 'properties'")
        out: dict[str, Any] = {"name": name, "image": self.value(props, "image", ppath, str)}
        command = self.value(props, "command", ppath, list)
        if command:
            out["command"] = [str(a) for a in command]
        env = []
        for i, e in enumerate(self.value(props, "environmentVariables", ppath, list) or []):
            epath = f"{ppath}.environmentVariables[{i}]"
            var = {"name": self.value(e, "name", epath, str)}
            secure = _get(e, "secureValue") is not None
            value = self.value(e, "secureValue" if secure else "value", epath)
            if value is None:
                raise self.fail(epath, f"environment variable {var['name']!r} has no value")
            var["secureValue" if secure else "value"] = self.scalar(value, f"{epath}.{'secureValue' if secure else 'value'}")
            env.append(var)
        if env:
            out["env"] = env
        ports = [{"port": self.port(p, f"{ppath}.ports[{i}]"),
                  **({"protocol": proto} if (proto := self.value(p, "protocol", f"{ppath}.ports[{i}]", str))
                     else {})}
                 for i, p in enumerate(self.value(props, "ports", ppath, list) or [])]
        if ports:
            out["ports"] = ports
        mounts = []
        for i, m in enumerate(self.value(props, "volumeMounts", ppath, list) or []):
            mpath = f"{ppath}.volumeMounts[{i}]"
            arm_name = self.value(m, "name", mpath, str)
            mount = {"name": self.names.get(arm_name, arm_name), "mountPath": self.value(m, "mountPath", mpath, str)}
            if (ro := self.value(m, "readOnly", mpath, bool)) is not None:
                mount["readOnly"] = ro
            mounts.append(mount)
        if mounts:
            out["mounts"] = mounts
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if (raw_probe := _get(props, probe)) is not None:
                out[probe] = self.probe(raw_probe, f"{ppath}.{probe}")
        out.update(self.security_context(_get(props, "securityContext"), f"{ppath}.securityContext"))
        if _get(props, "gpu") is not None:
            raise self.fail(f"{ppath}.gpu", "is not supported by parma-sandbox")
        config_map = self.value(_get(props, "configMap"), "keyValuePairs", f"{ppath}.configMap", dict)
        if config_map:
            # ACI writes the pairs as files under /mnt/configmap (confcom: CONFIGMAP_LOCATION); here they
            # become a read-only secret-kind volume of this container.
            volume = _volume_name(f"configmap-{name}", self.names)
            self.extra_volumes.append({"name": volume, "secret": {
                k: base64.b64encode(self.scalar(v, f"{ppath}.configMap.keyValuePairs.{k}").encode()).decode()
                for k, v in config_map.items()}})
            out.setdefault("mounts", []).append({"name": volume, "mountPath": CONFIGMAP_MOUNT_PATH,
                                                 "readOnly": True})
        return out

    def probe(self, raw: Any, path: str) -> dict[str, Any]:
        """ACI's ContainerProbe as the group's probe (same field names); the policy lists an exec probe's
        command as an exec process of its container (sandbox.policy.gen), as confcom does."""
        if not isinstance(raw, dict):
            raise self.fail(path, f"expected an object, got {type(raw).__name__}")
        out: dict[str, Any] = {}
        for key in PROBE_NUMBERS:
            if (value := self.value(raw, key, path)) is not None:
                out[key] = int(value) if isinstance(value, str) and value.isdigit() else value
        if (action := _get(raw, "exec")) is not None:
            command = self.value(action, "command", f"{path}.exec", list)
            out["exec"] = {"command": [self.scalar(a, f"{path}.exec.command") for a in command or []]}
        if (http := _get(raw, "httpGet")) is not None:
            if _get(http, "httpHeaders"):
                raise self.fail(f"{path}.httpGet.httpHeaders", "is not supported by parma-sandbox",
                                hint="remove the headers, or probe with an exec command")
            get: dict[str, Any] = {"port": self.port(http, f"{path}.httpGet")}
            for key in ("path", "scheme"):
                if (value := self.value(http, key, f"{path}.httpGet", str)) is not None:
                    get[key] = value
            out["httpGet"] = get
        return out

    def security_context(self, sc: Any, path: str) -> dict[str, Any]:
        if sc is None:
            return {}
        out: dict[str, Any] = {}
        if self.value(sc, "privileged", path, bool):
            out["privileged"] = True
        caps = _get(sc, "capabilities")
        if caps is not None:
            out["capabilities"] = {k: self.value(caps, k, f"{path}.capabilities", list) or []
                                   for k in ("add", "drop")}
        user = self.value(sc, "runAsUser", path, (int, str))
        group = self.value(sc, "runAsGroup", path, (int, str))
        if user is not None or group is not None:
            # runAsGroup alone keeps the image's user (":gid" in the group spec).
            out["user"] = f"{'' if user is None else user}{'' if group is None else f':{group}'}"
        if self.value(sc, "allowPrivilegeEscalation", path, bool) is False:
            raise self.fail(f"{path}.allowPrivilegeEscalation", "false (no_new_privileges) is not supported by "
                            "parma-sandbox yet", hint="remove it to run locally (containers then may gain privileges "
                                                      "through setuid binaries)")
        profile = _get(sc, "seccompProfile")
        if profile is not None:
            # ACI's shape: the OCI linux.seccomp JSON, base64-encoded; the group spec takes it as is.
            out["seccompProfile"] = self.value(sc, "seccompProfile", path, str)
        return out

    def volume(self, raw: Any, path: str, volume_paths: dict[str, Path]) -> dict[str, Any]:
        arm_name = self.value(raw, "name", path, str)
        name = self.names[arm_name]
        if _get(raw, "emptyDir") is not None:
            return {"name": name, "emptyDir": {}}
        secret = self.value(raw, "secret", path, dict)
        if secret is not None:
            return {"name": name, "secret": {k: self.scalar(v, f"{path}.secret.{k}") for k, v in secret.items()}}
        kinds = [k for k in ("azureFile", "gitRepo") if _get(raw, k) is not None]
        if kinds:
            # The share (or the repository) lives outside the TEE on ACI too; locally it is a directory the
            # user names, shipped read-only as a `files` volume (pinned by its root hash).
            local = volume_paths.get(arm_name)
            if local is None:
                raise self.fail(f"{path}.{kinds[0]}", f"{kinds[0]} volume {arm_name!r} needs a local directory",
                                hint=f"give one with --volume {arm_name}=PATH (mounted read-only, docs/aci.md)")
            if not local.is_dir():
                raise ArmError(f"--volume {arm_name}={local}: not a directory")
            return {"name": name, "files": {"path": str(local.resolve())}}
        raise self.fail(path, "a volume needs one of emptyDir, secret, azureFile, gitRepo")


CONFIGMAP_MOUNT_PATH = "/mnt/configmap"
PROBE_NUMBERS = ("initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold")


def _volume_name(arm_name: str, taken: dict[str, str]) -> str:
    """A group-spec name (lowercase letters, digits, '-') for an ARM volume or group name, unique in `taken`."""
    base = re.sub(r"[^a-z0-9-]+", "-", arm_name.lower()).strip("-")[:55] or "volume"
    name, n = base, 2
    while name in taken.values():
        name, n = f"{base}-{n}", n + 1
    return name


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", list: "an array", dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def container_groups(raw: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    return [(i, r) for i, r in enumerate(raw["resources"])
            if isinstance(r, dict) and str(_get(r, "type") or "").lower() == RESOURCE_TYPE]


def container_group(raw: dict[str, Any], source: str, group: str | None = None,
                    resolver: Resolver | None = None) -> tuple[int, dict[str, Any]]:
    """The containerGroups resource to run: the only one, or the one `group` names (its name, as the
    template resolves it, or its 0-based index among the template's container groups)."""
    groups = container_groups(raw)
    if not groups:
        raise ArmError(f"{source}: no Microsoft.ContainerInstance/containerGroups resource in 'resources'",
                       hint="parma-sandbox runs ACI container groups; see docs/aci.md")

    def name_of(i: int, r: dict[str, Any]) -> str:
        value = _get(r, "name")
        if resolver is not None:
            try:
                value = resolver.resolve(value, f"resources[{i}].name")
            except ArmError:
                pass
        return str(value)

    names = [name_of(i, r) for i, r in groups]
    if group is None:
        if len(groups) > 1:
            raise ArmError(f"{source}: {len(groups)} container groups ({', '.join(map(repr, names))})",
                           hint="pick one with --group NAME (or its 0-based index)")
        return groups[0]
    if group in names:
        return groups[names.index(group)]
    if group.isdigit() and int(group) < len(groups):
        return groups[int(group)]
    raise ArmError(f"{source}: no container group {group!r} (the template has {', '.join(map(repr, names))})")


def group_document(raw: dict[str, Any], source: str, parameter_values: dict[str, Any], *,
                   group: str | None = None, volume_paths: dict[str, Path] | None = None,
                   deployment_name: str = "parma-sandbox") -> dict[str, Any]:
    """The group-spec document (docs/group-spec.md) for an ARM template, expressions resolved."""
    resolver = Resolver(raw, parameter_values, source, deployment_name)
    index, resource = container_group(raw, source, group, resolver)
    reader = _Reader(resolver, source)
    volume_paths = dict(volume_paths or {})
    path = f"resources[{index}]"
    props = _get(resource, "properties")
    if not isinstance(props, dict):
        raise reader.fail(path, "the containerGroups resource has no 'properties'")
    ppath = f"{path}.properties"
    # Resolve, once, only what is read: fields with no local meaning (location, tags...) may use
    # template functions that are not evaluated here.
    resolved = {key: reader.r.resolve(_get(props, key), f"{ppath}.{key}")
                for key in ("containers", "ipAddress", "initContainers", "restartPolicy", "dnsConfig")
                if _get(props, key) is not None}
    # A volume's kind and name are read; an azureFile or gitRepo volume's account, key or URL are not
    # (a local directory stands in), so their expressions are left unevaluated.
    raw_vols = _get(props, "volumes")
    if raw_vols is not None:
        raw_vols = reader.r.resolve(raw_vols, f"{ppath}.volumes") if not isinstance(raw_vols, list) else [
            {k: (v if str(k).lower() in ("azurefile", "gitrepo") else reader.r.resolve(v, f"{ppath}.volumes[{i}].{k}"))
             for k, v in vol.items()} if isinstance(vol, dict) else vol for i, vol in enumerate(raw_vols)]
        resolved["volumes"] = raw_vols
    props = resolved
    resource = {"name": reader.r.resolve(_get(resource, "name"), f"{path}.name")}
    raw_volumes = reader.value(props, "volumes", ppath, list) or []
    for i, v in enumerate(raw_volumes):
        arm_name = reader.value(v, "name", f"{ppath}.volumes[{i}]", str)
        reader.names[arm_name] = _volume_name(arm_name, reader.names)
    unknown = sorted(set(volume_paths) - set(reader.names))
    if unknown:
        raise ArmError(f"--volume {unknown[0]}: the container group has no volume of that name",
                       hint=f"its volumes: {', '.join(reader.names) or 'none'}")
    raw_containers = reader.value(props, "containers", ppath, list) or []
    if not raw_containers:
        raise reader.fail(f"{ppath}.containers", "a container group needs at least one container")
    containers = [reader.container(c, f"{ppath}.containers[{i}]") for i, c in enumerate(raw_containers)]
    cpu = memory_gb = 0.0
    for i, c in enumerate(raw_containers):
        rpath = f"{ppath}.containers[{i}].properties.resources.requests"
        requests = _get(_get(_get(c, "properties"), "resources"), "requests")
        cpu += reader.number(requests, "cpu", rpath)
        memory_gb += reader.number(requests, "memoryInGB", rpath)
    # Azure resource names are case-insensitive and may hold capitals; group names are lowercase.
    doc: dict[str, Any] = {"name": _volume_name(reader.value(resource, "name", path, str), {}),
                           "containers": containers,
                           "layerFormat": "aci"}
    volumes = [reader.volume(v, f"{ppath}.volumes[{i}]", volume_paths) for i, v in enumerate(raw_volumes)]
    volumes += reader.extra_volumes
    if volumes:
        doc["volumes"] = volumes
    ip = _get(props, "ipAddress")
    ports = []
    for i, p in enumerate(reader.value(ip, "ports", f"{ppath}.ipAddress", list) or []):
        port = {"port": reader.port(p, f"{ppath}.ipAddress.ports[{i}]")}
        if proto := reader.value(p, "protocol", f"{ppath}.ipAddress.ports[{i}]", str):
            port["protocol"] = proto.upper()
        ports.append(port)
    if ports:
        doc["ports"] = ports
    doc["resources"] = {"vcpus": max(1, math.ceil(cpu)), "memoryMiB": max(128, math.ceil(memory_gb * 1024))}
    init = [reader.container(c, f"{ppath}.initContainers[{i}]")
            for i, c in enumerate(reader.value(props, "initContainers", ppath, list) or [])]
    if init:
        doc["initContainers"] = init
    if (restart := reader.value(props, "restartPolicy", ppath, str)) is not None:
        doc["restartPolicy"] = restart
    if (dns := reader.value(props, "dnsConfig", ppath, dict)) is not None:
        doc["dnsConfig"] = {k: v for k in ("nameServers", "searchDomains", "options")
                            if (v := reader.value(dns, k, f"{ppath}.dnsConfig")) is not None}
    for ignored in ("imageRegistryCredentials", "confidentialComputeProperties", "diagnostics"):
        if _get(props, ignored) is not None:
            log.debug("%s: %s.%s has no local meaning and is ignored", source, ppath, ignored)
    return doc


def load_template_group(path: Path, raw: dict[str, Any], *, group: str | None = None,
                        volume_paths: dict[str, Path] | None = None) -> GroupSpec:
    """The group spec of an ACI ARM template file (already parsed as `raw`)."""
    source = str(path)
    doc = group_document(raw, source, _parameter_values(path), group=group, volume_paths=volume_paths,
                         deployment_name=path.stem)
    try:
        return validate_group(doc, base_dir=path.resolve().parent, source=f"{source} (as a group)")
    except ValidationError as e:
        raise ValidationError(e.source, e.problems,
                              hint="the template maps to a group spec with these problems (paths are the "
                                   "group's, docs/group-spec.md; the mapping is in docs/aci.md)") from None


def ccepolicy_of_template(path: Path, raw: dict[str, Any], group: str | None = None) -> str | None:
    """The ccePolicy (base64) of the template's container group, resolved; None when empty or absent."""
    source = str(path)
    resolver = Resolver(raw, _parameter_values(path), source, path.stem)
    index, resource = container_group(raw, source, group, resolver)
    value = _get(_get(_get(resource, "properties"), "confidentialComputeProperties"), "ccePolicy")
    if value is None:
        return None
    policy = resolver.resolve(value, f"resources[{index}].properties.confidentialComputeProperties.ccePolicy")
    if policy is not None and not isinstance(policy, str):
        raise ArmError(f"{source}: the ccePolicy is not a string")
    return policy or None
