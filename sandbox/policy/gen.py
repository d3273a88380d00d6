"""Policy generation: a group spec plus its resolved images become canonical policy bytes.

Pure function of its inputs: the same spec, image configs, layer root hashes and volume hashes give
the same bytes on every machine. `container_process` is the single place that decides a container's
argv, env, working directory and user, so the launcher asks the agent for exactly what the policy
allows.

Mapping (docs/policy.md, "Generation"):
- argv: `command` (else the image ENTRYPOINT) followed by `args` (else the image CMD, unless `command`
  was given: as in Kubernetes, overriding the entrypoint drops the image CMD);
- env: the image ENV, overridden by name by the group's env, then the group's new names; PATH gets the
  usual default when neither defines it. Every var becomes a required rule: `string` for plain values,
  `NAME=(?s:.*)` (re2) for secure values so that the secret never enters the policy;
- working_dir: `workingDir`, else the image WorkingDir, else "/";
- user: `user`, else the image User; empty means root (uid 0); names match by name, numbers by id;
- mounts: one bind per group mount from /run/parma/volumes/<volume>, read-only when asked (always for
  `files` and `secret` volumes); every volume is pinned by kind in the policy's `volumes` (so the host
  cannot create one kind where the group has another), `files` volumes also by their root hash;
  `attestationApi: true` adds the read-only bind of the attestation API socket directory (docs/kbs.md);
- key_brokers: the pins of the key brokers the agent may accept secrets from (`key_brokers` argument);
- capabilities: the usual 14 (bounding/effective/permitted) adjusted by the group's add/drop;
  privileged: all 41 (bounding/effective/permitted) and allow_elevated; inheritable/ambient empty;
- init containers: policy containers like the others, listed first (each create is checked the same way);
- exec_processes: the container's `execProcesses`, then each exec probe's command (liveness, readiness,
  startup) not listed yet, without signals, as confcom lists an ARM template's probes; an httpGet
  probe needs nothing (the host sends it);
- allow_unencrypted_scratch: the group's `policy.allowUnencryptedScratch` (default false, as ACI's: the
  containers' writable layers must be on the guest-encrypted scratch disk);
- seccomp_profile_sha256: the measurement of the container's `seccompProfile` (sandbox/shared/seccomp.py;
  "" without one, which allows exactly no profile, as in ACI);
- debug mode: exec processes /bin/sh and /bin/bash, an allow-all env rule, and runtime logging,
  properties access and stack dumps turned on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sandbox.group.spec import ContainerSpec, GroupSpec, VolumeKind
from sandbox.images.model import ImageConfig, ResolvedImage
from sandbox.shared.errors import InputError
from sandbox.shared.kbs_protocol import PIN, attestation_api_mount
from sandbox.shared.messages import Capabilities, ContainerMount
from sandbox.shared.policy import defaults
from sandbox.shared.policy.model import (
    ANY_ID,
    HEX64,
    Container,
    EnvRule,
    ExecProcess,
    IdName,
    IdStrategy,
    KeyBroker,
    Mount,
    Policy,
    Strategy,
    User,
    Volume,
)
from sandbox.shared.seccomp import measure

DEBUG_SHELLS = (("/bin/sh",), ("/bin/bash",))
# Matches any NAME=VALUE (VALUE may be empty or span lines): the debug-mode allow-all env rule.
ALLOW_ALL_ENV = "[^=]+=(?s:.*)"


@dataclass(frozen=True)
class ContainerProcess:
    """What the launcher asks the agent to run for a container, and what the policy pins."""

    argv: tuple[str, ...]
    env: tuple[str, ...]              # "NAME=VALUE", secure values included (they never enter the policy)
    secure_names: frozenset[str]      # names whose values are secret
    working_dir: str
    user: str                         # "", "uid", "uid:gid", "name" or "name:group"


def container_process(container: ContainerSpec, config: ImageConfig) -> ContainerProcess:
    """argv, env, working dir and user of a container: image config with the group's overrides."""
    entrypoint = container.command if container.command is not None else config.entrypoint
    if container.args is not None:
        cmd = container.args
    else:
        cmd = () if container.command is not None else config.cmd
    argv = tuple(entrypoint) + tuple(cmd)
    if not argv:
        raise InputError(f"container {container.name!r} has no command",
                         hint="the image defines neither ENTRYPOINT nor CMD: set 'command' in the group file")
    values: dict[str, str] = {}
    for item in config.env:
        name, sep, value = item.partition("=")
        if sep and name:
            values[name] = value
    secure: set[str] = set()
    for var in container.env:
        values[var.name] = var.value
        (secure.add if var.secure else secure.discard)(var.name)
    if "PATH" not in values:
        values["PATH"] = defaults.DEFAULT_PATH_ENV.partition("=")[2]
    env = tuple(f"{name}={value}" for name, value in values.items())
    working_dir = container.working_dir or config.working_dir or "/"
    user = container.user if container.user is not None else config.user
    if container.user is not None and container.user.startswith(":"):
        # A group alone (an ARM template's runAsGroup without runAsUser) keeps the image's user.
        user = ((config.user or "").partition(":")[0] or "0") + container.user
    return ContainerProcess(argv, env, frozenset(secure), working_dir, user or "")


def _idname(part: str) -> IdName:
    return IdName(part, IdStrategy.id if part.isdigit() else IdStrategy.name)


def policy_user(user: str) -> User:
    """The policy's user entry for a User string; no user means root, as container runtimes do."""
    user_part, _, group_part = user.partition(":")
    groups = (_idname(group_part),) if group_part else (ANY_ID,)
    return User(_idname(user_part or "0"), groups, defaults.DEFAULT_UMASK)


def container_capabilities(container: ContainerSpec) -> Capabilities:
    """Unprivileged: the usual 14 in bounding/effective/permitted with the group's add/drop applied.
    Privileged: all 41 there. Inheritable and ambient stay empty either way, as runtimes do since
    CVE-2022-24769 (inheritable capabilities survive execve of non-root programs)."""
    caps: tuple[str, ...]
    if container.privileged:
        caps = defaults.PRIVILEGED_CAPABILITIES
    else:
        drop = set(container.capabilities.drop)
        caps = tuple(c for c in defaults.UNPRIVILEGED_CAPABILITIES if c not in drop)
        caps += tuple(c for c in dict.fromkeys(container.capabilities.add) if c not in drop and c not in caps)
    return Capabilities(bounding=caps, effective=caps, inheritable=(), permitted=caps, ambient=())


def _env_rules(process: ContainerProcess, debug: bool) -> tuple[EnvRule, ...]:
    rules = []
    for item in process.env:
        name = item.partition("=")[0]
        if name in process.secure_names:
            rules.append(EnvRule(f"{name}=(?s:.*)", Strategy.re2, required=True))
        else:
            rules.append(EnvRule(item, Strategy.string, required=True))
    if debug:
        rules.append(EnvRule(ALLOW_ALL_ENV, Strategy.re2, required=False))
    return tuple(rules)


def aci_volume_bind(policy: Policy, container: str, destination: str) -> tuple[str, tuple[str, ...]] | None:
    """(kind, options) when `policy` binds `destination` from one of ACI's volume sources
    (`sandbox:///tmp/atlas/<kind>/...`, as confcom writes them) for this container (by name, or any of its
    containers when none has the name); None otherwise."""
    named = [c for c in policy.containers if c.name == container]
    prefix = f"{defaults.SANDBOX_PREFIX}/{defaults.ACI_VOLUMES_SUBDIR}/"
    for c in named or policy.containers:
        for m in c.mounts:
            kind = m.source[len(prefix):].split("/", 1)[0] if m.source.startswith(prefix) else None
            if m.destination == destination and kind in defaults.ACI_VOLUME_KINDS:
                return kind, m.options
    return None


def container_mounts(spec: GroupSpec, container: ContainerSpec,
                     policy: Policy | None = None) -> tuple[ContainerMount, ...]:
    """The bind mounts of a container, the one place that decides them: the launcher asks for exactly
    these and the policy pins exactly these. One per group mount, from the volume's directory in the
    UVM, read-only when asked (always for `files` and `secret` volumes); then the attestation API's
    directory when the container asks for it (docs/kbs.md).

    Under a supplied `policy` (not generated from the group, e.g. a template's ccePolicy) that binds a
    destination from one of ACI's volume sources, that mount is asked for there instead, with the
    policy's options: `<sandbox dir>/tmp/atlas/<kind>/<volume>`, which the agent resolves to the volume
    when it is of that kind (docs/aci.md, "Running ACI policies locally")."""
    kinds = {v.name: v.kind for v in spec.volumes}
    out: list[dict[str, object]] = []
    for m in container.mounts:
        aci = aci_volume_bind(policy, container.name, m.mount_path) if policy is not None else None
        if aci is not None:
            out.append({"destination": m.mount_path, "source": defaults.aci_volume_source(aci[0], m.volume),
                        "type": "bind", "options": list(aci[1])})
        else:
            out.append(defaults.volume_bind_mount(m.volume, m.mount_path, m.read_only or kinds[m.volume] in
                                                  (VolumeKind.files, VolumeKind.secret)))
    if container.attestation_api:
        out.append(attestation_api_mount())
    return tuple(ContainerMount.from_json(m) for m in out)


def _policy_mounts(spec: GroupSpec, container: ContainerSpec) -> tuple[Mount, ...]:
    return tuple(Mount(m.destination, m.source, m.type, m.options) for m in container_mounts(spec, container))


def _exec_processes(container: ContainerSpec, debug: bool) -> tuple[ExecProcess, ...]:
    procs = [ExecProcess(tuple(p.command), tuple(dict.fromkeys(p.signals))) for p in container.allowed_execs]
    if debug:
        listed = {p.command for p in procs}
        procs += [ExecProcess(shell, ()) for shell in DEBUG_SHELLS if shell not in listed]
    return tuple(procs)


def _policy_container(spec: GroupSpec, container: ContainerSpec, image: ResolvedImage, debug: bool) -> Container:
    layers = image.layer_hashes
    if not layers:
        raise InputError(f"image {image.reference!r} of container {container.name!r} has no layers")
    for h in layers:
        if not HEX64.fullmatch(h):
            raise InputError(f"image {image.reference!r}: layer root hash {h!r} is not 64 lowercase hex digits")
    process = container_process(container, image.config)
    return Container(
        name=container.name, id=container.image, layers=tuple(layers), command=process.argv,
        env_rules=_env_rules(process, debug), working_dir=process.working_dir, mounts=_policy_mounts(spec, container),
        exec_processes=_exec_processes(container, debug), signals=tuple(dict.fromkeys(container.signals)),
        allow_elevated=container.privileged, allow_stdio_access=container.stdio, no_new_privileges=False,
        user=policy_user(process.user), capabilities=container_capabilities(container),
        seccomp_profile_sha256=measure(container.seccomp_profile),
    )


def build_policy(spec: GroupSpec, images: Mapping[str, ResolvedImage], *, debug_mode: bool | None = None,
                 volume_hashes: Mapping[str, str] | None = None, key_brokers: Sequence[str] = ()) -> Policy:
    """The policy model for a group; see the module docstring for the mapping."""
    debug = spec.policy.debug_mode if debug_mode is None else debug_mode
    volume_hashes = volume_hashes or {}
    missing = [c.name for c in spec.init_containers + spec.containers if c.name not in images]
    if missing:
        raise InputError(f"no resolved image for container(s) {', '.join(missing)}",
                         hint="resolve every container's image before generating the policy")
    volumes = []
    for v in spec.volumes:
        if v.kind != VolumeKind.files:
            volumes.append(Volume(v.name, defaults.volume_target(v.name), "", v.kind))
            continue
        digest = volume_hashes.get(v.name)
        if digest is None:
            raise InputError(f"files volume {v.name!r} has no device root hash",
                             hint="build the volume's read-only device first and pass its dm-verity root hash")
        if not HEX64.fullmatch(digest):
            raise InputError(f"files volume {v.name!r}: root hash {digest!r} is not 64 lowercase hex digits")
        volumes.append(Volume(v.name, defaults.volume_target(v.name), digest))
    pins = []
    for pin in key_brokers:
        if not PIN.fullmatch(pin):
            raise InputError(f"key broker pin {pin!r} is not a SHA-256 (64 lowercase hex digits)",
                             hint="'parma-sandbox kbs key' prints the broker's pin")
        if pin not in pins:
            pins.append(pin)
    # Init containers are containers like the others to the policy (as confcom lists them): each of their
    # creates is checked against it.
    containers = tuple(_policy_container(spec, c, images[c.name], debug)
                       for c in spec.init_containers + spec.containers)
    return Policy(
        api_version=defaults.API_VERSION, framework_version=defaults.FRAMEWORK_VERSION, containers=containers,
        external_processes=(), volumes=tuple(volumes), key_brokers=tuple(KeyBroker(p) for p in pins),
        allow_properties_access=debug, allow_dump_stacks=debug, allow_runtime_logging=debug,
        allow_environment_variable_dropping=spec.policy.allow_environment_variable_dropping,
        allow_unencrypted_scratch=spec.policy.allow_unencrypted_scratch,
        allow_capability_dropping=spec.policy.allow_capability_dropping,
    )


def generate_policy(spec: GroupSpec, images: Mapping[str, ResolvedImage], *, debug_mode: bool | None = None,
                    volume_hashes: Mapping[str, str] | None = None, key_brokers: Sequence[str] = ()) -> bytes:
    """Canonical policy bytes for a group (their SHA-256 is the launch's HOST_DATA)."""
    policy = build_policy(spec, images, debug_mode=debug_mode, volume_hashes=volume_hashes,
                          key_brokers=key_brokers)
    return policy.canonical_bytes()
