"""The generated policy allows exactly what `up` asks for: the launcher's plan for examples/hello, turned
into engine inputs the way the guest agent does (sandbox/guest/service.py: the same from_request and
the same runtime mounts), goes through the engine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from sandbox.group import load_group
from sandbox.guest.service import BASE_MOUNTS
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.launch.plan import build_plan
from sandbox.policy.gen import generate_policy
from sandbox.shared import protocol as P
from sandbox.shared.messages import CreateContainerRequest
from sandbox.shared.policy import PolicyEngine
from sandbox.shared.policy.inputs import CreateContainerInput, NamedId
from sandbox.shared.seccomp import measure, parse_profile

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello" / "group.json"
BUSYBOX = ImageConfig(cmd=("sh",), env=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",))
LAYERS = ("1a" * 32, "2b" * 32)
WWW = "3c" * 32
# What the agent's resolve_user finds in busybox's /etc/passwd and /etc/group.
PASSWD = {"": ("0", "root", "0", "root"), "65534:65534": ("65534", "nobody", "65534", "nogroup")}


@pytest.fixture
def setup():
    spec = load_group(EXAMPLE)
    layers = tuple(LayerInfo("sha256:" + "0" * 64, "tar", 1, h, Path(f"/cache/{h}.img")) for h in LAYERS)
    images = {c.name: ResolvedImage(c.image, "sha256:" + "9" * 64, BUSYBOX, layers) for c in spec.containers}
    plan = build_plan(spec, images, {"www": (WWW, Path("/cache/www.img"))})
    engine = PolicyEngine.from_bytes(generate_policy(spec, images, volume_hashes={"www": WWW}))
    return spec, plan, engine


def create_input(create: CreateContainerRequest) -> CreateContainerInput:
    """service.op_create_container's engine input for the launcher's create_container request."""
    uid, user, gid, group = PASSWD[create.user]
    assert create.capabilities is not None
    profile = parse_profile(create.seccomp_profile) if create.seccomp_profile is not None else None
    return CreateContainerInput.from_request(create, mounts=BASE_MOUNTS + create.mounts, user=NamedId(uid, user),
                                             groups=(NamedId(gid, group),), capabilities=create.capabilities,
                                             seccomp_profile_sha256=measure(profile))


def test_every_request_of_up_is_allowed(setup) -> None:
    _spec, plan, engine = setup

    def allow(ep: str, inp: dict) -> None:
        d = engine.enforce_json(ep, inp)
        assert d.allowed, d.reason

    def allow_input(inp: CreateContainerInput) -> None:
        d = engine.enforce(inp)
        assert d.allowed, d.reason

    for disk in plan.disks:
        allow("mount_device", {"target": disk.target, "device_hash": disk.root_hash})
    for c in plan.containers:
        cdir = P.container_dir(c.name)
        allow("scratch_mount", {"target": cdir + "/scratch", "encrypted": False})
        allow("mount_overlay", {"container_id": c.name, "layer_paths": list(c.layer_targets),
                                "target": cdir + "/rootfs"})
        allow_input(create_input(c.create))
        for argv in c.exec_processes:   # `parma-sandbox exec` sends the container's env and working dir
            allow("exec_in_container", {"container_id": c.name, "argv": list(argv), "env": list(c.create.env),
                                        "working_dir": c.create.working_dir})
    allow("signal_container_process", {"container_id": "web", "signal": "SIGTERM", "is_init": True})
    for c in plan.containers:
        allow("shutdown_container", {"container_id": c.name})


def test_tampered_requests_of_up_are_denied(setup) -> None:
    _spec, plan, engine = setup
    for disk in plan.disks:
        engine.enforce_json("mount_device", {"target": disk.target, "device_hash": disk.root_hash})
    web = next(c for c in plan.containers if c.name == "web")
    engine.enforce_json("mount_overlay", {"container_id": "web", "layer_paths": list(web.layer_targets),
                                     "target": P.container_dir("web") + "/rootfs"})
    good = create_input(web.create)
    binds = [m for m in good.mounts if m not in BASE_MOUNTS]
    for change, expected in (
        ({"argv": ("/bin/sh",)}, "argv"),
        ({"env": (*good.env, "LD_PRELOAD=/x.so")}, "LD_PRELOAD"),
        ({"mounts": (*BASE_MOUNTS, replace(binds[0], options=("rbind", "rprivate", "rw")))}, "options"),
        ({"privileged": True}, "privileged"),
    ):
        d = engine.enforce(replace(good, **change))
        assert not d.allowed and expected in d.reason
    assert engine.enforce(good).allowed
    shell = engine.enforce_json("exec_in_container", {"container_id": "web", "argv": ["/bin/sh"],
                                                      "env": list(good.env)})
    assert not shell.allowed and "is not an exec_process" in shell.reason
