"""A property of every group: the policy generated for it allows every request `up` makes for it, and
denies the same requests tampered with.

The launcher's plan (sandbox.launch.plan) is turned into engine inputs the way the guest agent does
(sandbox/guest/service.py: the same from_request, the same runtime mounts, users resolved as the
image's /etc/passwd would, the container's own /etc file binds), for each example group and for a group
that uses every kind of volume, mount, user and capability change, and an init container; the supervisor's
restarts (stop, then every step of a start again) are allowed as well.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from sandbox.group import GroupSpec, load_group, validate_group
from sandbox.guest.service import base_mounts
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.launch.plan import ContainerPlan, LaunchPlan, build_plan
from sandbox.policy.gen import generate_policy
from sandbox.shared import protocol as P
from sandbox.shared.messages import ContainerMount, CreateContainerRequest
from sandbox.shared.policy import PolicyEngine, defaults
from sandbox.shared.policy.inputs import CreateContainerInput, NamedId
from sandbox.shared.seccomp import measure, parse_profile

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*/group.json"))
BUSYBOX = ImageConfig(cmd=("sh",), env=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",))
OTHER = ImageConfig(entrypoint=("/app",), cmd=("--serve",), env=("HOME=/home/app", "PATH=/bin"),
                    working_dir="/srv", user="app")
# What the agent's resolve_user finds in the images' /etc/passwd and /etc/group.
NAMES = {"0": "root", "65534": "nobody", "1000": "app", "app": "1000", "root": "0", "nobody": "65534",
         "nogroup": "65534", "staff": "50"}

EVERY_KIND = {
    "name": "every-kind",
    "volumes": [
        {"name": "site", "files": {"path": "site"}},
        {"name": "conf", "secret": {"app.conf": "a2V5PXZhbHVl"}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "tmpfs": {"sizeMiB": 16}},
    ],
    "initContainers": [
        {"name": "prepare", "image": "busybox", "command": ["/bin/sh", "-c", "echo ready > /var/cache/ready"],
         "mounts": [{"name": "cache", "mountPath": "/var/cache"}]},
    ],
    "containers": [
        {"name": "web", "image": "busybox", "command": ["/bin/httpd", "-f"],
         "env": [{"name": "TOKEN", "secureValue": "s3cret"}, {"name": "MODE", "value": "prod"}],
         "mounts": [{"name": "site", "mountPath": "/www"}, {"name": "conf", "mountPath": "/etc/app"},
                    {"name": "cache", "mountPath": "/var/cache"},
                    {"name": "tmp", "mountPath": "/tmp/scratch", "readOnly": True}],
         "user": "65534:65534", "capabilities": {"add": ["NET_ADMIN"], "drop": ["CHOWN"]},
         "execProcesses": [{"command": ["/bin/cat", "/www/index.html"], "signals": ["SIGHUP"]}],
         "signals": ["SIGTERM"], "attestationApi": True},
        {"name": "app", "image": "other", "mounts": [{"name": "cache", "mountPath": "/cache", "readOnly": True}],
         "workingDir": "/data", "user": "app:staff"},
        {"name": "root", "image": "busybox", "command": ["/bin/sleep", "1000"], "privileged": True,
         "mounts": [{"name": "site", "mountPath": "/site", "readOnly": False}], "stdio": False},
    ],
}


def named(part: str) -> NamedId:
    """A user or group part as the agent resolves it: both its id and its name."""
    return NamedId(part, NAMES[part]) if part.isdigit() else NamedId(NAMES[part], part)


def images_for(spec: GroupSpec) -> dict[str, ResolvedImage]:
    out = {}
    for i, c in enumerate(spec.init_containers + spec.containers):
        layers = tuple(LayerInfo("sha256:" + f"{i}{j}" * 32, "tar", 1, f"{i:x}{j:x}" * 32, Path(f"/cache/{i}-{j}.img"))
                       for j in range(1 + i % 2))
        config = OTHER if c.image == "other" else BUSYBOX
        out[c.name] = ResolvedImage(c.image, "sha256:" + "9" * 64, config, layers)
    return out


def example(path: Path) -> GroupSpec:
    return load_group(path)


def every_kind(tmp_path: Path) -> GroupSpec:
    (tmp_path / "site").mkdir()
    return validate_group(EVERY_KIND, base_dir=tmp_path)


def setup_for(spec: GroupSpec) -> tuple[LaunchPlan, PolicyEngine]:
    images = images_for(spec)
    hashes = {v.name: f"{k:02x}" * 32 for k, v in enumerate(spec.volumes) if v.source is not None}
    plan = build_plan(spec, images, {name: (h, Path(f"/cache/{name}.img")) for name, h in hashes.items()})
    return plan, PolicyEngine.from_bytes(generate_policy(spec, images, volume_hashes=hashes))


def create_input(create: CreateContainerRequest) -> CreateContainerInput:
    """service.op_create_container's engine input for the launcher's create_container request."""
    user, _, group = (create.user or "0").partition(":")
    uid = named(user)
    gid = named(group) if group else named("0")
    assert create.capabilities is not None
    # The agent binds the container's own /etc/hostname, hosts and resolv.conf (the engine's default mounts).
    etc = tuple(ContainerMount.from_json(dict(m)) for m in defaults.etc_file_mounts(create.container_id))
    profile = parse_profile(create.seccomp_profile) if create.seccomp_profile is not None else None
    return CreateContainerInput.from_request(create, mounts=base_mounts() + create.mounts + etc, user=uid,
                                             groups=(gid,), capabilities=create.capabilities,
                                             seccomp_profile_sha256=measure(profile))


def allow(engine: PolicyEngine, ep: str, inp: dict) -> None:
    d = engine.enforce_json(ep, inp)
    assert d.allowed, d.reason


def start(engine: PolicyEngine, c: ContainerPlan) -> None:
    """What the supervisor asks to start a container: its scratch, its overlay, its create."""
    cdir = P.container_dir(c.name)
    allow(engine, "scratch_mount", {"target": cdir + "/scratch", "encrypted": c.scratch.encrypted})
    allow(engine, "mount_overlay", {"container_id": c.name, "layer_paths": list(c.layer_targets),
                                    "target": cdir + "/rootfs"})
    d = engine.enforce(create_input(c.create))
    assert d.allowed, d.reason


def stop(engine: PolicyEngine, c: ContainerPlan) -> None:
    """What the supervisor asks to clean up after a container (to restart it, or once an init container is done)."""
    allow(engine, "shutdown_container", {"container_id": c.name})
    allow(engine, "unmount_overlay", {"target": c.rootfs})
    allow(engine, "scratch_unmount", {"target": P.container_dir(c.name) + "/scratch"})


def replay_up(plan: LaunchPlan, engine: PolicyEngine) -> None:
    """Every request `up` sends, in order, each allowed."""
    for disk in plan.disks:
        allow(engine, "mount_device", {"target": disk.target, "device_hash": disk.root_hash})
    for volume in plan.memory_volumes:
        allow(engine, "create_volume", {"target": P.volume_path(volume.name), "kind": volume.kind.value})
    if plan.scratch_gib:      # setup_scratch: what the agent builds is encrypted
        allow(engine, "scratch_mount", {"target": P.GROUP_SCRATCH_DIR, "encrypted": True})
    for c in plan.init_containers:
        start(engine, c)
        stop(engine, c)
    for c in plan.containers:
        start(engine, c)
        for argv in c.exec_processes:   # `parma-sandbox exec` sends the container's env and working dir
            allow(engine, "exec_in_container", {"container_id": c.name, "argv": list(argv),
                                                "env": list(c.create.env), "working_dir": c.create.working_dir})


def groups(tmp_path: Path) -> list[GroupSpec]:
    return [example(p) for p in EXAMPLES] + [every_kind(tmp_path)]


def test_the_examples_are_all_here() -> None:
    assert {p.parent.name for p in EXAMPLES} >= {"hello", "minimal", "secret"}


@pytest.mark.parametrize("name", [p.parent.name for p in EXAMPLES] + ["every-kind"])
def test_every_request_of_up_is_allowed(name: str, tmp_path: Path) -> None:
    spec = next(s for s in groups(tmp_path) if s.name == name)
    plan, engine = setup_for(spec)
    replay_up(plan, engine)
    for c in plan.containers:
        if c.name in {x.name for x in spec.containers if x.signals}:
            allow(engine, "signal_container_process", {"container_id": c.name, "signal": "SIGTERM", "is_init": True})
    for c in plan.containers:      # restartPolicy: the supervisor restarts each, every step checked again
        stop(engine, c)
        start(engine, c)
    for c in plan.containers:
        allow(engine, "shutdown_container", {"container_id": c.name})


def test_the_scratch_must_be_encrypted_by_default(tmp_path: Path) -> None:
    plan, engine = setup_for(every_kind(tmp_path))
    assert plan.scratch_gib and all(c.scratch.encrypted for c in plan.all_containers)
    d = engine.enforce_json("scratch_mount", {"target": P.container_dir("web") + "/scratch", "encrypted": False})
    assert not d.allowed and "allow_unencrypted_scratch is false" in d.reason


@pytest.mark.parametrize("name", [p.parent.name for p in EXAMPLES] + ["every-kind"])
def test_each_bind_mount_changed_is_denied(name: str, tmp_path: Path) -> None:
    """Each bind mount the launcher asks for is pinned exactly: flipped between ro and rw, or moved,
    the container's create is denied. (Asking for fewer mounts than the policy lists is allowed, as in
    ACI: the policy's mounts are what a container may get.)"""
    spec = next(s for s in groups(tmp_path) if s.name == name)
    plan, engine = setup_for(spec)
    for disk in plan.disks:
        engine.enforce_json("mount_device", {"target": disk.target, "device_hash": disk.root_hash})
    for volume in plan.memory_volumes:
        engine.enforce_json("create_volume", {"target": P.volume_path(volume.name), "kind": volume.kind.value})
    checked = 0
    for c in plan.containers:
        engine.enforce_json("mount_overlay", {"container_id": c.name, "layer_paths": list(c.layer_targets),
                                              "target": P.container_dir(c.name) + "/rootfs"})
        good = create_input(c.create)
        for i, m in enumerate(c.create.mounts):
            flipped = tuple("rw" if o == "ro" else "ro" if o == "rw" else o for o in m.options)
            for changed in (replace(m, options=flipped), replace(m, destination=m.destination + "x")):
                mounts = (*base_mounts(), *c.create.mounts[:i], changed, *c.create.mounts[i + 1:],
                          *good.mounts[len(base_mounts()) + len(c.create.mounts):])
                d = engine.enforce(replace(good, mounts=mounts))
                assert not d.allowed, (c.name, changed)
            checked += 1
        assert engine.enforce(good).allowed
    assert checked == sum(len(c.mounts) + c.attestation_api for c in spec.containers)


def test_tampered_requests_of_up_are_denied() -> None:
    spec = example(next(p for p in EXAMPLES if p.parent.name == "hello"))
    plan, engine = setup_for(spec)
    for disk in plan.disks:
        engine.enforce_json("mount_device", {"target": disk.target, "device_hash": disk.root_hash})
    web = next(c for c in plan.containers if c.name == "web")
    engine.enforce_json("mount_overlay", {"container_id": "web", "layer_paths": list(web.layer_targets),
                                          "target": P.container_dir("web") + "/rootfs"})
    good = create_input(web.create)
    for change, expected in (
        ({"argv": ("/bin/sh",)}, "argv"),
        ({"env": (*good.env, "LD_PRELOAD=/x.so")}, "LD_PRELOAD"),
        ({"privileged": True}, "privileged"),
    ):
        d = engine.enforce(replace(good, **change))
        assert not d.allowed and expected in d.reason
    assert engine.enforce(good).allowed
    shell = engine.enforce_json("exec_in_container", {"container_id": "web", "argv": ["/bin/sh"],
                                                      "env": list(good.env)})
    assert not shell.allowed and "is not an exec_process" in shell.reason
