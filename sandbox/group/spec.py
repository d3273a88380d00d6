"""The container-group spec (group.json): a frozen model and a validator that reports every problem.

Field names follow ACI's containerGroup where one exists (camelCase, `environmentVariables`-style
`{name, value|secureValue}` env entries, group-level `volumes` referenced by name from container
`mounts`). docs/group-spec.md is the user-facing description; group.schema.json is the JSON Schema
shipped for editors. Semantics: `command` replaces the image's ENTRYPOINT and `args` its CMD.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import posixpath
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sandbox.group.jsonio import ValidationError
from sandbox.shared.codec import Message
from sandbox.shared.errors import InputError
from sandbox.shared.jsoncheck import MISSING, Checker, join, type_name
from sandbox.shared.names import nameservers_problem, resolver_options_problem, search_domains_problem
from sandbox.shared.policy.defaults import PRIVILEGED_CAPABILITIES
from sandbox.shared.policy.points import VolumeKind  # the group's volume kinds are the policy's
from sandbox.shared.seccomp import SeccompError, SeccompProfile, parse_profile


class TeeMode(StrEnum):
    auto = "auto"
    sev_snp = "sev-snp"
    emulated = "emulated"


class LayerFormat(StrEnum):
    default = "default"      # e2fsck-clean ext4 images (sandbox/layers)
    aci = "aci"              # byte-identical to ACI's tar2ext4, so layer hashes equal ACI's (docs/aci.md)


class RestartPolicy(StrEnum):
    """ACI's containerGroup restartPolicy (the default is Always, as in ACI)."""

    always = "Always"
    on_failure = "OnFailure"
    never = "Never"


NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# "user", "user:group", or ":group" (the image's user with this group: an ARM template's runAsGroup alone).
USER_RE = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?"
                     r"|:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})$")
# Simplified docker reference grammar: [host[:port]/]path[:tag][@sha256:hex].
IMAGE_RE = re.compile(
    r"^(?:(?P<host>[A-Za-z0-9.-]+(?::[0-9]+)?)/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
LOCAL_IMAGE_PREFIXES = ("oci:", "docker-archive:")

SIGNALS = {
    "HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "BUS": 7, "FPE": 8, "KILL": 9,
    "USR1": 10, "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14, "TERM": 15, "STKFLT": 16, "CHLD": 17,
    "CONT": 18, "STOP": 19, "TSTP": 20, "TTIN": 21, "TTOU": 22, "URG": 23, "XCPU": 24, "XFSZ": 25,
    "VTALRM": 26, "PROF": 27, "WINCH": 28, "IO": 29, "PWR": 30, "SYS": 31,
}

# Every capability name the group spec accepts (the full privileged set).
CAPABILITIES = PRIVILEGED_CAPABILITIES

# Layer and `files` volume disks one group may attach: SCSI LUNs on virtio-scsi (sandbox.vmm), as many as
# hcsshim's LCOW UVM (4 SCSI controllers of 64 LUNs), so a group that runs here fits ACI too.
MAX_DEVICES = 256
DEFAULT_SCRATCH_GIB = 8

CONTAINER_FIELDS = frozenset({"name", "image", "command", "args", "env", "workingDir", "mounts", "ports",
                              "execProcesses", "signals", "user", "privileged", "capabilities", "stdio",
                              "attestationApi", "seccompProfile", "livenessProbe", "readinessProbe",
                              "startupProbe"})
# Init containers run to completion before the containers start (ACI's initContainers): no ports, no
# exec processes or signals (nothing talks to them), no attestation API, no probes (as in ACI and Kubernetes).
INIT_CONTAINER_FIELDS = frozenset({"name", "image", "command", "args", "env", "workingDir", "mounts", "user",
                                   "privileged", "capabilities", "stdio", "seccompProfile"})


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str
    secure: bool = False  # secure values never appear in logs, `inspect` or error messages

    def shown(self) -> str:
        return f"{self.name}=<secure>" if self.secure else f"{self.name}={self.value}"


@dataclass(frozen=True)
class ContainerPort:
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True)
class GroupPort:
    port: int             # port inside the group's network namespace
    host_port: int        # port on the host
    protocol: str = "TCP"
    host_address: str = "127.0.0.1"


@dataclass(frozen=True)
class ExecProcessSpec:
    command: tuple[str, ...]
    signals: tuple[int, ...] = ()


class ProbeKind(StrEnum):
    """Kubernetes' three probes (ACI has the first two): the group field is `<kind>Probe`."""

    liveness = "liveness"      # failing: the container is stopped and restarted as the restartPolicy says
    readiness = "readiness"    # failing: the container is running but not ready (`ps`, `inspect`)
    startup = "startup"        # until it succeeds, the other two wait; failing: as liveness

    @property
    def field(self) -> str:
        return f"{self.value}Probe"


class HttpScheme(StrEnum):
    http = "HTTP"
    https = "HTTPS"


@dataclass(frozen=True)
class HttpGetAction(Message):
    """GET scheme://<the group's address>:port/path; a status of 200-399 passes (as Kubernetes)."""

    port: int
    path: str = "/"
    scheme: HttpScheme = HttpScheme.http


@dataclass(frozen=True)
class ProbeSpec(Message):
    """A container probe with ACI's and Kubernetes' fields and defaults: exactly one of `exec_command`
    (run in the container; exit 0 passes) and `http_get`. A Message: the launch plan carries it."""

    exec_command: tuple[str, ...] | None = None
    http_get: HttpGetAction | None = None
    initial_delay_s: int = 0
    period_s: int = 10
    timeout_s: int = 1
    failure_threshold: int = 3
    success_threshold: int = 1

    def document(self, *, lowercase_scheme: bool = False) -> dict[str, Any]:
        """The probe as ACI's ContainerProbe and Kubernetes' Probe write it (the names the group reads),
        defaults written out so that the document says what will run. They differ in one thing: ACI's
        httpGet scheme is lowercase (`lowercase_scheme`), Kubernetes' uppercase."""
        out: dict[str, Any] = {}
        if self.exec_command is not None:
            out["exec"] = {"command": list(self.exec_command)}
        if self.http_get is not None:
            scheme = self.http_get.scheme.value
            out["httpGet"] = {"path": self.http_get.path, "port": self.http_get.port,
                              "scheme": scheme.lower() if lowercase_scheme else scheme}
        return {**out, "initialDelaySeconds": self.initial_delay_s, "periodSeconds": self.period_s,
                "timeoutSeconds": self.timeout_s, "failureThreshold": self.failure_threshold,
                "successThreshold": self.success_threshold}


@dataclass(frozen=True)
class VolumeMount:
    volume: str
    mount_path: str
    read_only: bool = False


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    kind: VolumeKind
    size_mib: int | None = None                            # tmpfs
    source: Path | None = None                             # files: resolved against the group file
    items: tuple[tuple[str, bytes], ...] = ()              # secret: (file name, content)


@dataclass(frozen=True)
class CapabilityChanges:
    add: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    command: tuple[str, ...] | None = None   # replaces ENTRYPOINT
    args: tuple[str, ...] | None = None      # replaces CMD
    env: tuple[EnvVar, ...] = ()
    working_dir: str | None = None
    mounts: tuple[VolumeMount, ...] = ()
    ports: tuple[ContainerPort, ...] = ()
    exec_processes: tuple[ExecProcessSpec, ...] = ()
    signals: tuple[int, ...] = ()
    user: str | None = None
    privileged: bool = False
    capabilities: CapabilityChanges = CapabilityChanges()
    stdio: bool = True
    attestation_api: bool = False
    seccomp_profile: SeccompProfile | None = None    # pinned in the policy by its measurement
    liveness_probe: ProbeSpec | None = None
    readiness_probe: ProbeSpec | None = None
    startup_probe: ProbeSpec | None = None

    def probe(self, kind: ProbeKind) -> ProbeSpec | None:
        return {ProbeKind.liveness: self.liveness_probe, ProbeKind.readiness: self.readiness_probe,
                ProbeKind.startup: self.startup_probe}[kind]

    @property
    def probes(self) -> tuple[tuple[ProbeKind, ProbeSpec], ...]:
        return tuple((k, p) for k in ProbeKind if (p := self.probe(k)) is not None)

    @property
    def allowed_execs(self) -> tuple[ExecProcessSpec, ...]:
        """The exec processes the policy lists: `execProcesses`, then each exec probe's command not listed
        yet (no signals), liveness, readiness, startup; as confcom lists an ARM template's probes."""
        out = list(self.exec_processes)
        listed = {e.command for e in out}
        for _, p in self.probes:
            if p.exec_command is not None and p.exec_command not in listed:
                listed.add(p.exec_command)
                out.append(ExecProcessSpec(p.exec_command))
        return tuple(out)


@dataclass(frozen=True)
class Resources:
    vcpus: int = 1
    memory_mib: int = 512
    scratch_gib: int = DEFAULT_SCRATCH_GIB   # the group's disk scratch: a sparse file, encrypted in the guest;
    #                                          0: none, the writable layers stay in guest memory (unencrypted)


@dataclass(frozen=True)
class DnsConfig:
    """ACI's containerGroup dnsConfig: what the containers' /etc/resolv.conf says."""

    name_servers: tuple[str, ...]
    search_domains: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicyOptions:
    debug_mode: bool = False
    allow_environment_variable_dropping: bool = False
    allow_capability_dropping: bool = False
    allow_unencrypted_scratch: bool = False   # ACI's default: scratch must be the encrypted disk


@dataclass(frozen=True)
class GroupSpec:
    name: str
    containers: tuple[ContainerSpec, ...]
    ports: tuple[GroupPort, ...] = ()
    volumes: tuple[VolumeSpec, ...] = ()
    resources: Resources = Resources()
    policy: PolicyOptions = PolicyOptions()
    tee: TeeMode = TeeMode.auto
    layer_format: LayerFormat = LayerFormat.default
    restart_policy: RestartPolicy = RestartPolicy.always
    init_containers: tuple[ContainerSpec, ...] = ()     # run in order, each to completion, before `containers`
    dns_config: DnsConfig | None = None
    base_dir: Path = field(default=Path("."), compare=False)

    def container(self, name: str) -> ContainerSpec:
        for c in self.containers + self.init_containers:
            if c.name == name:
                return c
        raise InputError(f"group {self.name!r} has no container {name!r}",
                         hint="containers: " + ", ".join(c.name for c in self.containers + self.init_containers))


def device_count_problem(spec: GroupSpec, layers: int) -> str | None:
    """Why the group cannot be attached, given its number of distinct image layers (None when it can)."""
    volumes = sum(1 for v in spec.volumes if v.kind == VolumeKind.files)
    if layers + volumes <= MAX_DEVICES:
        return None
    return (f"the group needs {layers + volumes} layer and volume disks ({layers} distinct image layers, "
            f"{volumes} files volumes); at most {MAX_DEVICES} can be attached")


def check_device_count(spec: GroupSpec, layers: int, source: str = "group.json") -> None:
    """Raise ValidationError (exit 2) when the group needs more disks than a UVM attaches."""
    if problem := device_count_problem(spec, layers):
        raise ValidationError(source, [problem], hint="use fewer or smaller images (images that share base "
                                                      "layers share their disks), or merge files volumes")


# ---------------------------------------------------------------------------------------------------------
# Validation: walk the raw JSON, collect every problem with its path, build the model only when clean.

class _Checker(Checker):
    """The shared checker with group.json's conventions: strings are non-empty unless said otherwise."""

    def string(self, d: dict, key: str, path: str, default: Any = MISSING, *, nonempty: bool = True,
               pattern: re.Pattern[str] | None = None, what: str = "") -> Any:
        return super().string(d, key, path, default, nonempty=nonempty, pattern=pattern, what=what)

    def boolean(self, d: dict, key: str, path: str, default: bool) -> bool:
        return self.get(d, key, path, bool, default)

    def array(self, d: dict, key: str, path: str) -> list | None:
        return self.get(d, key, path, list, None)

    def string_list(self, d: dict, key: str, path: str, *, nonempty_list: bool = False) -> tuple[str, ...] | None:
        return self.strings(d, key, path, nonempty=nonempty_list)

    def signal_list(self, d: dict, key: str, path: str) -> tuple[int, ...]:
        items = self.array(d, key, path)
        if items is None:
            return ()
        out = []
        for i, item in enumerate(items):
            sig = parse_signal(item)
            if sig is None:
                self.problem(f"{join(path, key)}[{i}]",
                             f"unknown signal {item!r} (use a number 1-64 or a name like SIGTERM)")
            else:
                out.append(sig)
        return tuple(out)


def parse_signal(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 1 <= value <= 64 else None
    if isinstance(value, str):
        name = value.upper().removeprefix("SIG")
        if name in SIGNALS:
            return SIGNALS[name]
        if name.isdigit() and 1 <= int(name) <= 64:
            return int(name)
    return None


def normalize_capability(name: str) -> str | None:
    cap = name.upper()
    if not cap.startswith("CAP_"):
        cap = "CAP_" + cap
    return cap if cap in CAPABILITIES else None


def check_image_reference(ref: str) -> str | None:
    """Return a problem description, or None when `ref` is a syntactically valid image reference."""
    if ref.startswith(LOCAL_IMAGE_PREFIXES):
        kind, _, rest = ref.partition(":")
        return None if rest else f"{kind}: needs a path after the colon"
    if len(ref) > 4096:
        return "is too long"
    if not IMAGE_RE.match(ref):
        return ("is not a valid image reference (expected [registry/]name[:tag][@sha256:digest], "
                "oci:DIR[:TAG] or docker-archive:FILE)")
    return None


def _abs_path(c: _Checker, value: Any, path: str) -> str | None:
    if not isinstance(value, str):
        return None
    if not value.startswith("/"):
        c.problem(path, f"must be an absolute path, got {value!r}")
        return None
    if ".." in value.split("/"):
        c.problem(path, "must not contain '..'")
        return None
    return posixpath.normpath(value)


def _check_env(c: _Checker, items: list, path: str) -> tuple[EnvVar, ...]:
    out: list[EnvVar] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        ipath = f"{path}[{i}]"
        if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]:
            ipath = f"{path}.{item['name']}"
        d = c.obj(item, ipath, {"name", "value", "secureValue"}, {"name"})
        if d is None:
            continue
        name = c.string(d, "name", f"{path}[{i}]", default=None)
        if name is None:
            continue
        if not ENV_NAME_RE.match(name):
            c.problem(ipath, "invalid environment variable name (letters, digits and '_', not starting with a digit)")
            continue
        if name in seen:
            c.problem(ipath, "duplicate environment variable")
            continue
        seen.add(name)
        has_value, has_secure = "value" in d, "secureValue" in d
        if has_value == has_secure:
            c.problem(ipath, "needs exactly one of 'value' and 'secureValue'")
            continue
        key = "value" if has_value else "secureValue"
        value = c.string(d, key, ipath, default=None, nonempty=False)
        if value is not None:
            out.append(EnvVar(name, value, secure=has_secure))
    return tuple(out)


def _check_port_number(c: _Checker, d: dict, key: str, path: str, default: Any = MISSING) -> Any:
    return c.integer(d, key, path, 1, 65535, default)


def _check_protocol(c: _Checker, d: dict, path: str) -> str:
    proto = c.string(d, "protocol", path, default="TCP")
    if isinstance(proto, str) and proto.upper() not in ("TCP", "UDP"):
        c.problem(join(path, "protocol"), f"must be TCP or UDP, got {proto!r}")
        return "TCP"
    return proto.upper()


def _check_container(c: _Checker, raw: Any, path: str, volumes: dict[str, VolumeSpec],
                     allowed: frozenset[str] = CONTAINER_FIELDS) -> ContainerSpec | None:
    d = c.obj(raw, path, allowed, {"name", "image"})
    if d is None:
        return None
    before = len(c.problems)
    name = c.string(d, "name", path, default=None)
    if name is not None and not NAME_RE.match(name):
        c.problem(join(path, "name"), f"{name!r} is not a valid name (lowercase letters, digits and '-', max 63)")
    image = c.string(d, "image", path, default=None)
    if image is not None and (why := check_image_reference(image)):
        c.problem(join(path, "image"), why)
    command = c.string_list(d, "command", path, nonempty_list=True)
    args = c.string_list(d, "args", path)
    env_items = c.array(d, "env", path)
    env = _check_env(c, env_items, join(path, "env")) if env_items is not None else ()
    working_dir = None
    if "workingDir" in d:
        working_dir = _abs_path(c, c.string(d, "workingDir", path, default=None), join(path, "workingDir"))

    mounts: list[VolumeMount] = []
    seen_paths: set[str] = set()
    for i, m in enumerate(c.array(d, "mounts", path) or []):
        mpath = f"{join(path, 'mounts')}[{i}]"
        md = c.obj(m, mpath, {"name", "mountPath", "readOnly"}, {"name", "mountPath"})
        if md is None:
            continue
        vol = c.string(md, "name", mpath, default=None)
        if vol is not None and vol not in volumes:
            c.problem(join(mpath, "name"), f"no volume named {vol!r} in the group's 'volumes'")
        mount_path = _abs_path(c, c.string(md, "mountPath", mpath, default=None), join(mpath, "mountPath"))
        if mount_path == "/":
            c.problem(join(mpath, "mountPath"), "cannot mount over the container's root")
        elif mount_path in seen_paths:
            c.problem(join(mpath, "mountPath"), f"{mount_path} is mounted twice")
        read_only = c.boolean(md, "readOnly", mpath, False)
        if vol in volumes and mount_path:
            seen_paths.add(mount_path)
            if volumes[vol].kind in (VolumeKind.files, VolumeKind.secret):
                read_only = True
            mounts.append(VolumeMount(vol, mount_path, read_only))

    ports: list[ContainerPort] = []
    for i, p in enumerate(c.array(d, "ports", path) or []):
        ppath = f"{join(path, 'ports')}[{i}]"
        pd = c.obj(p, ppath, {"port", "protocol"}, {"port"})
        if pd is None:
            continue
        port = _check_port_number(c, pd, "port", ppath, None)
        proto = _check_protocol(c, pd, ppath)
        if port is not None:
            ports.append(ContainerPort(port, proto))

    execs: list[ExecProcessSpec] = []
    for i, e in enumerate(c.array(d, "execProcesses", path) or []):
        epath = f"{join(path, 'execProcesses')}[{i}]"
        ed = c.obj(e, epath, {"command", "signals"}, {"command"})
        if ed is None:
            continue
        cmd = c.string_list(ed, "command", epath, nonempty_list=True)
        sigs = c.signal_list(ed, "signals", epath)
        if cmd:
            execs.append(ExecProcessSpec(cmd, sigs))

    signals = c.signal_list(d, "signals", path)
    user = c.string(d, "user", path, default=None)
    if user is not None and not USER_RE.match(user):
        c.problem(join(path, "user"), f"{user!r} is not a valid user (use uid, uid:gid, name or name:group)")
    privileged = c.boolean(d, "privileged", path, False)
    caps = CapabilityChanges()
    if "capabilities" in d:
        cpath = join(path, "capabilities")
        cd = c.obj(d["capabilities"], cpath, {"add", "drop"})
        if cd is not None:
            lists = {}
            for key in ("add", "drop"):
                names = c.string_list(cd, key, cpath) or ()
                norm = []
                for i, n in enumerate(names):
                    cap = normalize_capability(n)
                    if cap is None:
                        c.problem(f"{cpath}.{key}[{i}]", f"unknown capability {n!r}")
                    else:
                        norm.append(cap)
                lists[key] = tuple(norm)
            caps = CapabilityChanges(**lists)
    stdio = c.boolean(d, "stdio", path, True)
    attestation_api = c.boolean(d, "attestationApi", path, False)
    seccomp = _check_seccomp(c, c.string(d, "seccompProfile", path, default=None), join(path, "seccompProfile"))
    probes = {kind: _check_probe(c, d[kind.field], join(path, kind.field), kind)
              for kind in ProbeKind if kind.field in d and kind.field in allowed}
    if len(c.problems) != before:
        return None
    return ContainerSpec(name=name, image=image, command=command, args=args, env=env, working_dir=working_dir,
                     mounts=tuple(mounts), ports=tuple(ports), exec_processes=tuple(execs), signals=signals,
                     user=user, privileged=privileged, capabilities=caps, stdio=stdio,
                     attestation_api=attestation_api, seccomp_profile=seccomp,
                     liveness_probe=probes.get(ProbeKind.liveness), readiness_probe=probes.get(ProbeKind.readiness),
                     startup_probe=probes.get(ProbeKind.startup))


PROBE_FIELDS = frozenset({"exec", "httpGet", "initialDelaySeconds", "periodSeconds", "timeoutSeconds",
                          "failureThreshold", "successThreshold"})
MAX_PROBE_SECONDS = 86400


def _check_probe(c: _Checker, raw: Any, path: str, kind: ProbeKind) -> ProbeSpec | None:
    """A probe as ACI's ARM schema and Kubernetes write it (same names, same defaults)."""
    d = c.obj(raw, path, PROBE_FIELDS)
    if d is None:
        return None
    before = len(c.problems)
    if ("exec" in d) == ("httpGet" in d):
        c.problem(path, "needs exactly one of 'exec' (a command run in the container) and 'httpGet' "
                        '(e.g. {"httpGet": {"port": 8080, "path": "/healthz"}})')
    command = http = None
    if "exec" in d:
        epath = join(path, "exec")
        ed = c.obj(d["exec"], epath, {"command"}, {"command"})
        command = c.string_list(ed, "command", epath, nonempty_list=True) if ed is not None else None
    if "httpGet" in d:
        hpath = join(path, "httpGet")
        hd = c.obj(d["httpGet"], hpath, {"path", "port", "scheme"}, {"port"})
        if hd is not None:
            port = _check_port_number(c, hd, "port", hpath, None)
            url_path = c.string(hd, "path", hpath, default="/")
            if isinstance(url_path, str) and (not url_path.startswith("/") or any(ch.isspace() for ch in url_path)):
                c.problem(join(hpath, "path"), f"must start with '/' and hold no spaces, got {url_path!r}")
            scheme = c.string(hd, "scheme", hpath, default="HTTP")
            if isinstance(scheme, str) and scheme.upper() not in ("HTTP", "HTTPS"):
                c.problem(join(hpath, "scheme"), f"must be HTTP or HTTPS, got {scheme!r}")
            elif port is not None and isinstance(url_path, str):
                http = HttpGetAction(port, url_path, HttpScheme(scheme.upper()))
    values = {key: c.integer(d, name, path, lo, MAX_PROBE_SECONDS if name.endswith("Seconds") else 1000, default)
              for key, name, lo, default in (("initial_delay_s", "initialDelaySeconds", 0, 0),
                                             ("period_s", "periodSeconds", 1, 10),
                                             ("timeout_s", "timeoutSeconds", 1, 1),
                                             ("failure_threshold", "failureThreshold", 1, 3),
                                             ("success_threshold", "successThreshold", 1, 1))}
    if kind != ProbeKind.readiness and d.get("successThreshold", 1) != 1:
        c.problem(join(path, "successThreshold"), f"must be 1 for a {kind.value} probe (as in Kubernetes): one "
                                                  "success shows the container is alive")
    if len(c.problems) != before:
        return None
    return ProbeSpec(exec_command=command, http_get=http, **values)


def _check_seccomp(c: _Checker, b64: str | None, path: str) -> SeccompProfile | None:
    """seccompProfile: base64 of the OCI linux.seccomp JSON, as ACI's ARM securityContext.seccompProfile."""
    if b64 is None:
        return None
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        c.problem(path, "is not valid base64 (the profile's JSON, base64-encoded)")
        return None
    try:
        return parse_profile(raw)
    except SeccompError as e:
        c.problem(path, e.message)
        return None


def _check_volume(c: _Checker, raw: Any, path: str, base_dir: Path) -> VolumeSpec | None:
    d = c.obj(raw, path, {"name", "emptyDir", "tmpfs", "files", "secret"}, {"name"})
    if d is None:
        return None
    name = c.string(d, "name", path, default=None)
    if name is not None and not NAME_RE.match(name):
        c.problem(join(path, "name"), f"{name!r} is not a valid name (lowercase letters, digits and '-')")
        name = None
    kinds = [k for k in VolumeKind if k.value in d]
    if len(kinds) != 1:
        c.problem(path, "needs exactly one of 'emptyDir', 'tmpfs', 'files', 'secret'")
        return None
    kind = kinds[0]
    body = d[kind.value]
    kpath = join(path, kind.value)
    if kind == VolumeKind.empty_dir:
        c.obj(body, kpath, set())
        return VolumeSpec(name, kind) if name else None
    if kind == VolumeKind.tmpfs:
        bd = c.obj(body, kpath, {"sizeMiB"})
        size = c.integer(bd, "sizeMiB", kpath, 1, 65536, 64) if bd is not None else None
        return VolumeSpec(name, kind, size_mib=size) if name and size else None
    if kind == VolumeKind.files:
        bd = c.obj(body, kpath, {"path"}, {"path"})
        rel = c.string(bd, "path", kpath, default=None) if bd is not None else None
        if rel is None:
            return None
        src = (base_dir / rel).resolve()
        if not src.is_dir():
            c.problem(join(kpath, "path"), f"{rel!r} is not a directory next to the group file ({src})")
            return None
        return VolumeSpec(name, kind, source=src) if name else None
    # secret: {"file-name": "base64 content"}
    if not isinstance(body, dict) or not body:
        c.problem(kpath, "expected a non-empty object mapping file names to base64 content")
        return None
    items = []
    for fname, b64 in sorted(body.items()):
        ipath = join(kpath, fname)
        if not re.match(r"^[A-Za-z0-9._-]{1,255}$", fname) or fname in (".", ".."):
            c.problem(ipath, "invalid file name")
            continue
        if not isinstance(b64, str):
            c.problem(ipath, f"expected a base64 string, got {type_name(b64)}")
            continue
        try:
            items.append((fname, base64.b64decode(b64, validate=True)))
        except (binascii.Error, ValueError):
            c.problem(ipath, "is not valid base64")
    return VolumeSpec(name, kind, items=tuple(items)) if name else None


def validate_group(raw: Any, *, base_dir: Path = Path("."), source: str = "group.json") -> GroupSpec:
    """Validate a parsed group document; raise ValidationError listing every problem."""
    c = _Checker()
    top = c.obj(raw, "", {"$schema", "name", "containers", "ports", "volumes", "resources", "policy", "tee",
                          "layerFormat", "initContainers", "restartPolicy", "dnsConfig"},
                {"name", "containers"})
    if top is None:
        raise ValidationError(source, c.problems, hint="a group file is a JSON object; see docs/group-spec.md")
    name = c.string(top, "name", "", default=None)
    if name is not None and not NAME_RE.match(name):
        c.problem("name", f"{name!r} is not a valid group name (lowercase letters, digits and '-', max 63)")

    volumes: dict[str, VolumeSpec] = {}
    for i, v in enumerate(c.array(top, "volumes", "") or []):
        vol = _check_volume(c, v, f"volumes[{i}]", base_dir)
        if vol is not None:
            if vol.name in volumes:
                c.problem(f"volumes[{i}].name", f"duplicate volume name {vol.name!r}")
            volumes[vol.name] = vol

    containers: list[ContainerSpec] = []
    raw_containers = c.array(top, "containers", "")
    if raw_containers is not None and not raw_containers:
        c.problem("containers", "a group needs at least one container")
    # Init containers first: they run first, and a duplicate name is reported where it comes second.
    init_containers: list[ContainerSpec] = []
    names_seen: set[str] = set()
    for key, raw_list, out, allowed in (("initContainers", c.array(top, "initContainers", "") or [], init_containers,
                                         INIT_CONTAINER_FIELDS),
                                        ("containers", raw_containers or [], containers, CONTAINER_FIELDS)):
        for i, rc in enumerate(raw_list):
            ctr = _check_container(c, rc, f"{key}[{i}]", volumes, allowed)
            if ctr is None:
                continue
            if ctr.name in names_seen:
                c.problem(f"{key}[{i}].name", f"duplicate container name {ctr.name!r}")
            names_seen.add(ctr.name)
            out.append(ctr)

    ports: list[GroupPort] = []
    host_ports: set[tuple[str, int, str]] = set()
    for i, p in enumerate(c.array(top, "ports", "") or []):
        ppath = f"ports[{i}]"
        pd = c.obj(p, ppath, {"port", "hostPort", "protocol", "hostAddress"}, {"port"})
        if pd is None:
            continue
        port = _check_port_number(c, pd, "port", ppath, None)
        host_port = _check_port_number(c, pd, "hostPort", ppath, port)
        proto = _check_protocol(c, pd, ppath)
        addr = c.string(pd, "hostAddress", ppath, default="127.0.0.1")
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            c.problem(join(ppath, "hostAddress"), f"{addr!r} is not an IP address")
            continue
        if port is None or host_port is None:
            continue
        forward = (addr, host_port, proto)
        if forward in host_ports:
            c.problem(join(ppath, "hostPort"), f"host port {host_port}/{proto} is forwarded twice")
        host_ports.add(forward)
        ports.append(GroupPort(port, host_port, proto, addr))

    resources = Resources()
    if "resources" in top:
        rd = c.obj(top["resources"], "resources", {"vcpus", "memoryMiB", "scratchGiB"})
        if rd is not None:
            resources = Resources(vcpus=c.integer(rd, "vcpus", "resources", 1, 64, 1),
                                  memory_mib=c.integer(rd, "memoryMiB", "resources", 128, 65536, 512),
                                  scratch_gib=c.integer(rd, "scratchGiB", "resources", 0, 4096, DEFAULT_SCRATCH_GIB))

    policy = PolicyOptions()
    if "policy" in top:
        keys = {"debugMode", "allowEnvironmentVariableDropping", "allowCapabilityDropping",
                "allowUnencryptedScratch"}
        pd = c.obj(top["policy"], "policy", keys)
        if pd is not None:
            policy = PolicyOptions(
                debug_mode=c.boolean(pd, "debugMode", "policy", False),
                allow_environment_variable_dropping=c.boolean(pd, "allowEnvironmentVariableDropping", "policy", False),
                allow_capability_dropping=c.boolean(pd, "allowCapabilityDropping", "policy", False),
                allow_unencrypted_scratch=c.boolean(pd, "allowUnencryptedScratch", "policy", False),
            )
    if resources.scratch_gib == 0 and not policy.allow_unencrypted_scratch:
        c.problem("resources.scratchGiB", "0 keeps the containers' writable layers in guest memory, unencrypted, "
                                          "which the policy forbids: set policy.allowUnencryptedScratch to true, "
                                          "or give the group a scratch disk (1 or more GiB)")

    tee = _enum_field(c, top, "tee", TeeMode.auto)
    layer_format = _enum_field(c, top, "layerFormat", LayerFormat.default)
    restart_policy = _enum_field(c, top, "restartPolicy", RestartPolicy.always)
    dns_config = _check_dns_config(c, top["dnsConfig"]) if "dnsConfig" in top else None

    if c.problems:
        raise ValidationError(source, c.problems, hint="see docs/group-spec.md for the format")
    return GroupSpec(name=name, containers=tuple(containers), ports=tuple(ports), volumes=tuple(volumes.values()),
                     resources=resources, policy=policy, tee=tee, layer_format=layer_format,
                     restart_policy=restart_policy, init_containers=tuple(init_containers), dns_config=dns_config,
                     base_dir=base_dir)


def _enum_field(c: _Checker, top: dict, key: str, default: Any) -> Any:
    """A top-level string field that takes one of the values of `default`'s StrEnum."""
    raw = c.string(top, key, "", default=None)
    if raw is None:
        return default
    kind = type(default)
    try:
        return kind(raw)
    except ValueError:
        c.problem(key, f"must be one of {', '.join(e.value for e in kind)}; got {raw!r}")
        return default


def _check_dns_config(c: _Checker, raw: Any) -> DnsConfig | None:
    """ACI's shape: nameServers (a list), searchDomains and options (space-separated strings)."""
    d = c.obj(raw, "dnsConfig", {"nameServers", "searchDomains", "options"}, {"nameServers"})
    if d is None:
        return None
    before = len(c.problems)
    servers = c.string_list(d, "nameServers", "dnsConfig", nonempty_list=True) or ()
    search = tuple((c.string(d, "searchDomains", "dnsConfig", default="", nonempty=False) or "").split())
    options = tuple((c.string(d, "options", "dnsConfig", default="", nonempty=False) or "").split())
    for key, problem in (("nameServers", nameservers_problem(servers) if servers else None),
                         ("searchDomains", search_domains_problem(search)),
                         ("options", resolver_options_problem(options))):
        if problem:
            c.problem(f"dnsConfig.{key}", problem)
    if len(c.problems) != before:
        return None
    return DnsConfig(servers, search, options)
