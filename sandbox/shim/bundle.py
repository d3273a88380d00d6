"""What containerd hands the shim: the bundle's OCI config.json, its annotations, and the node config.

Annotations the shim reads (docs/kubernetes.md):
- `io.parma.policy`: the execution policy, base64 of its exact bytes (SHA-256 of those bytes is HOST_DATA).
  On a pod's sandbox container (Kubernetes passes pod annotations there when the runtime's
  `pod_annotations` lets them through); on a plain `ctr run` container, the container's own.
- `io.parma.policy-sha256`: optional; when present it must be SHA-256 of the policy (a copy/paste check).
- `io.parma.vcpus`, `io.parma.memory-mib`: the UVM's size (default: the node config's).
- `io.parma.image`: the image reference to take this container's layers from (`ctr run` passes no
  image name to a runtime; CRI's `io.kubernetes.cri.image-name` serves otherwise).
- `io.parma.ports`: the pod's container ports (`8080/tcp,53/udp`), forwarded from the pod's network
  namespace into the UVM (`export k8s` writes it; the OCI spec carries no ports).
- CRI's own: `io.kubernetes.cri.container-type` (sandbox | container), `...sandbox-id`, `...sandbox-uid`,
  `...container-name`, `...image-name`.

Besides annotations: the spec's `mounts` (bind mounts of host directories are how kubelet and `ctr run
--mount` hand a container its volumes; sandbox/shim/volumes.py maps them to the policy's volumes) and
the network namespace in `linux.namespaces` (CRI's pod netns, `ctr run --with-ns network:PATH`), where
the shim runs QEMU.

Node config: a TOML file named by the runtime options' `ConfigPath` (CRI `options`, or
`ctr run --runtime-config-path`), else $PARMA_SANDBOX_SHIM_CONFIG, else /etc/parma-sandbox/shim.toml;
every key is optional.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sandbox.group.spec import ContainerSpec, EnvVar, TeeMode
from sandbox.shared.errors import InputError

POLICY_ANNOTATION = "io.parma.policy"
POLICY_HASH_ANNOTATION = "io.parma.policy-sha256"
VCPUS_ANNOTATION = "io.parma.vcpus"
MEMORY_ANNOTATION = "io.parma.memory-mib"
IMAGE_ANNOTATION = "io.parma.image"
PORTS_ANNOTATION = "io.parma.ports"
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
CRI_CONTAINER_NAME = "io.kubernetes.cri.container-name"
CRI_IMAGE_NAME = "io.kubernetes.cri.image-name"
CRI_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
CRI_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
CRI_SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"

DEFAULT_CONFIG = Path("/etc/parma-sandbox/shim.toml")
CONFIG_ENV = "PARMA_SANDBOX_SHIM_CONFIG"


@dataclass(frozen=True)
class NodeConfig:
    """How this node runs sandboxes. Keys of shim.toml, all optional."""

    allow_generated_policy: bool = False    # no io.parma.policy: generate one from the container(s)
    tee: str = TeeMode.auto.value           # auto | sev-snp | emulated
    vcpus: int = 1
    memory_mib: int = 512
    socket_dir: str = "/run/containerd/s"   # where shim sockets live (containerd's own convention)
    runtime_dir: str = ""                   # PARMA_SANDBOX_RUNTIME for the sandboxes (default: as the CLI)
    kubelet_dir: str = "/var/lib/kubelet"   # kubelet's --root-dir: where a pod's configMap volumes are
    path: str = field(default="", compare=False)        # the file it came from ("": built-in defaults)

    @property
    def source(self) -> str:
        return self.path or "the built-in defaults (no shim.toml)"


def load_node_config(config_path: str | None) -> NodeConfig:
    path = Path(config_path) if config_path else Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    if not path.is_file():
        if config_path or os.environ.get(CONFIG_ENV):
            raise InputError(f"shim config {path} does not exist")
        return NodeConfig()
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"shim config {path}: {e}") from None
    known = {f.name for f in fields(NodeConfig) if f.name != "path"}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InputError(f"shim config {path}: unknown key(s) {', '.join(unknown)}",
                         hint=f"known keys: {', '.join(sorted(known))}")
    defaults = NodeConfig()
    for key, value in raw.items():
        if type(value) is not type(getattr(defaults, key)):
            raise InputError(f"shim config {path}: {key} must be a {type(getattr(defaults, key)).__name__}")
    if raw.get("tee", defaults.tee) not in {t.value for t in TeeMode}:
        raise InputError(f"shim config {path}: tee must be one of {', '.join(t.value for t in TeeMode)}")
    return NodeConfig(**raw, path=str(path))


@dataclass(frozen=True)
class OciMount:
    """One entry of the spec's `mounts`."""

    destination: str
    type: str
    source: str
    options: tuple[str, ...] = ()

    @property
    def is_bind(self) -> bool:
        return self.type == "bind" or "bind" in self.options or "rbind" in self.options

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


@dataclass(frozen=True)
class OciContainer:
    """The parts of a bundle's config.json the shim uses."""

    bundle: Path
    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    uid: int
    gid: int
    terminal: bool
    annotations: dict[str, str]
    mounts: tuple[OciMount, ...] = ()
    netns: str | None = None            # the network namespace to join (a path), None: none named

    @property
    def is_cri_container(self) -> bool:
        """A container of a Kubernetes pod (CRI's io.kubernetes.cri.container-type=container)."""
        return self.annotations.get(CRI_CONTAINER_TYPE) == "container"

    @property
    def is_pod_sandbox(self) -> bool:
        """CRI's sandbox (pause) container: the pod's UVM, not a process in it."""
        return self.annotations.get(CRI_CONTAINER_TYPE) == "sandbox"

    def sandbox_id(self, own_id: str) -> str:
        """The id of the sandbox this container belongs to: CRI's pod sandbox, else itself."""
        return self.annotations.get(CRI_SANDBOX_ID) or own_id

    def policy(self) -> bytes | None:
        raw = self.annotations.get(POLICY_ANNOTATION)
        if raw is None:
            return None
        try:
            policy = base64.b64decode(raw.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"annotation {POLICY_ANNOTATION} is not valid base64",
                             hint="set it to base64 of the policy file's exact bytes "
                                  "('parma-sandbox export k8s' writes it)") from None
        expected = self.annotations.get(POLICY_HASH_ANNOTATION)
        if expected is not None and expected.strip().lower() != hashlib.sha256(policy).hexdigest():
            raise InputError(f"annotation {POLICY_HASH_ANNOTATION} is {expected.strip()!r}, but the policy in "
                             f"{POLICY_ANNOTATION} hashes to {hashlib.sha256(policy).hexdigest()}",
                             hint="the two annotations come from different exports")
        return policy

    def uvm_size(self, node: NodeConfig) -> tuple[int, int]:
        """(vcpus, memory MiB) from the annotations, else the node config's."""
        out = []
        for key, default, low, high in ((VCPUS_ANNOTATION, node.vcpus, 1, 64),
                                        (MEMORY_ANNOTATION, node.memory_mib, 128, 65536)):
            raw = self.annotations.get(key)
            if raw is None:
                out.append(default)
                continue
            if not raw.strip().isdigit() or not low <= int(raw) <= high:
                raise InputError(f"annotation {key}={raw!r} is not a number from {low} to {high}")
            out.append(int(raw))
        return out[0], out[1]

    def image(self) -> str | None:
        return self.annotations.get(IMAGE_ANNOTATION) or self.annotations.get(CRI_IMAGE_NAME)

    def ports(self) -> tuple[tuple[int, str], ...]:
        """(port, tcp|udp) of each container port in io.parma.ports, each once."""
        raw = self.annotations.get(PORTS_ANNOTATION, "").strip()
        out: dict[tuple[int, str], None] = {}
        for item in filter(None, (x.strip() for x in raw.split(","))):
            port, _, proto = item.partition("/")
            proto = proto.lower() or "tcp"
            if not port.isdigit() or not 0 < int(port) < 65536 or proto not in ("tcp", "udp"):
                raise InputError(f"annotation {PORTS_ANNOTATION}: {item!r} is not PORT or PORT/tcp or PORT/udp",
                                 hint="e.g. io.parma.ports=8080/tcp,53/udp ('parma-sandbox export k8s' writes it)")
            out[(int(port), proto)] = None
        return tuple(out)

    def group_container(self, name: str, image: str, *, drop_env: frozenset[str] = frozenset()) -> ContainerSpec:
        """This container as a group container: its argv replaces the image's (no image CMD is added),
        its env and working directory are the ones containerd asks for (image env already merged in),
        less the variables named in drop_env."""
        env = []
        seen = set(drop_env)
        for item in self.env:
            key, sep, value = item.partition("=")
            if sep and key and key not in seen:
                seen.add(key)
                env.append(EnvVar(key, value))
        return ContainerSpec(name=name, image=image, command=self.args, args=(), env=tuple(env),
                         working_dir=self.cwd or "/", user=f"{self.uid}:{self.gid}")


def read_bundle(bundle: Path) -> OciContainer:
    """Parse bundle/config.json (the OCI runtime spec containerd wrote)."""
    path = bundle / "config.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"cannot read the OCI spec {path}: {e}") from None
    if not isinstance(spec, dict):
        raise InputError(f"{path}: not a JSON object")
    process: dict[str, Any] = spec.get("process") or {}
    user = process.get("user") or {}
    annotations = spec.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        raise InputError(f"{path}: annotations must map strings to strings")
    mounts = []
    for i, m in enumerate(spec.get("mounts") or ()):
        if not isinstance(m, dict) or not isinstance(m.get("destination"), str):
            raise InputError(f"{path}: mounts[{i}] has no destination")
        mounts.append(OciMount(str(m["destination"]), str(m.get("type") or ""), str(m.get("source") or ""),
                               tuple(str(o) for o in m.get("options") or ())))
    netns = None
    for ns in (spec.get("linux") or {}).get("namespaces") or ():
        if isinstance(ns, dict) and ns.get("type") == "network" and ns.get("path"):
            netns = str(ns["path"])
    return OciContainer(bundle=bundle, args=tuple(process.get("args") or ()), env=tuple(process.get("env") or ()),
                        cwd=str(process.get("cwd") or "/"), uid=int(user.get("uid", 0)), gid=int(user.get("gid", 0)),
                        terminal=bool(process.get("terminal", False)), annotations=dict(annotations),
                        mounts=tuple(mounts), netns=netns)
