"""The host is the attacker: drive the agent's protocol directly against one booted UVM (in order).

Disks: L0 busybox, L1 data, L2 a copy of the data layer with one flipped bit in /data/big.txt (its
verity tree untouched, so its root hash is the policy's), R0 a layer no policy lists.
"""

from __future__ import annotations

import base64
import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.group import validate_group
from sandbox.launch.agent_client import AgentClient
from sandbox.launch.plan import build_plan
from sandbox.shared.messages import REQUEST_TYPES
from sandbox.shared.protocol import MAX_FRAME_BYTES, Op

sys.path.insert(0, str(Path(__file__).parent))
from harness import (
    DATA_LINE,
    Guest,
    boot,
    busybox_tar,
    data_tar,
    image_of,
    make_layer,
    tamper_file_block,
    tar_of,
)

ARGV = ["/bin/sh", "-c", "echo started; exec sleep 100000"]
CAT_BIG = ["/bin/cat", "/data/big.txt"]
CAT_SMALL = ["/bin/cat", "/data/small.txt"]
BIG = b"".join(DATA_LINE % i for i in range(8000))
TAMPER_AT = 200_000  # byte offset in big.txt: about the middle
# The "sec" container's seccomp profile: mkdir fails with EPERM, everything else is allowed.
DENY_MKDIR = {"defaultAction": "SCMP_ACT_ALLOW",
              "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
MKDIR = ["/bin/sh", "-c", "mkdir /tmp/made"]
TOUCH = ["/bin/sh", "-c", "echo written > /cache/f && cat /cache/f && ls -A /cache"]
SLEEPER = ["/bin/sleep", "100000"]
MOUNTINFO = ["/bin/cat", "/proc/self/mountinfo"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    d = tmp_path_factory.mktemp("mal")
    base = make_layer(d, "busybox", busybox_tar())
    data = make_layer(d, "data", data_tar())
    rogue = make_layer(d, "rogue", tar_of([("evil", b"#!/bin/sh\necho pwned\n", None, 0o755)]))
    tamper_file_block(data.image, d / "data-tampered.img", "/data/big.txt", TAMPER_AT)
    # The scratches here are tmpfs (mount_scratch without encrypted): the policy allows it.
    spec = validate_group({"name": "mal", "policy": {"allowUnencryptedScratch": True},
                           "volumes": [{"name": "cache", "emptyDir": {}}], "containers": [{
        "name": "app", "image": "test", "command": ARGV,
        "execProcesses": [{"command": CAT_BIG}, {"command": CAT_SMALL}]}, {
        "name": "sec", "image": "test", "command": ARGV, "mounts": [{"name": "cache", "mountPath": "/cache"}],
        "seccompProfile": base64.b64encode(json.dumps(DENY_MKDIR).encode()).decode(),
        "execProcesses": [{"command": MKDIR}, {"command": TOUCH}, {"command": SLEEPER, "signals": [9]},
                          {"command": MOUNTINFO}]}]},
        base_dir=d)
    images = {"app": image_of(base, data), "sec": image_of(base)}
    plan = build_plan(spec, images, {})
    create = plan.containers[0].create.to_json()
    guest = boot(d / "s", spec=spec, images=images,
                 disks=[(base.image, "L0"), (data.image, "L1"), (d / "data-tampered.img", "L2"), (rogue.image, "R0")])
    try:
        with guest.client() as client:
            yield {"guest": guest, "client": client, "env": create["env"], "create": create,
                   "sec": plan.containers[1].create.to_json()}
    finally:
        guest.stop()


def call(client: AgentClient, op: Op, payload: dict | None = None, **kw: Any) -> dict:
    """A request written as its JSON payload, sent typed; its result back as JSON."""
    return client.call(REQUEST_TYPES[op].from_json(payload or {}), **kw).to_json()


def err(client: AgentClient, op: Op, payload: dict) -> dict:
    resp = client.send(op, payload)
    assert not resp.ok, f"{op.value} unexpectedly succeeded: {resp.result}"
    return {"code": str(resp.error.code), "message": resp.error.message}


def create_payload(world: dict, cid: str, **changes: object) -> dict:
    """The launcher's own create_container request for the policy's container, under another id."""
    return {**world["create"], "container_id": cid, **changes}


def run_exec(client: AgentClient, cid: str, argv: list[str], env: list[str]) -> tuple[int, bytes, bytes]:
    r = call(client, Op.exec_process, {"container_id": cid, "argv": argv, "env": env})
    out, errs, offset = [], [], 0
    while True:
        page = call(client, Op.read_output, {"container_id": cid, "exec_id": r["exec_id"], "offset": offset,
                                            "wait": 5})
        for ch in page["chunks"]:
            (out if ch["stream"] == "stdout" else errs).append(base64.b64decode(ch["data"]))
        offset = page["next_offset"]
        if page["eof"]:
            break
    w = call(client, Op.wait_process, {"container_id": cid, "exec_id": r["exec_id"], "timeout": 60}, timeout=90)
    return w["exit_code"], b"".join(out), b"".join(errs)


def test_policy_with_another_hash_is_rejected_and_agent_stays_deny_all(world: dict) -> None:
    c, guest = world["client"], world["guest"]
    e = err(c, Op.set_policy, {"policy": base64.b64encode(guest.policy + b"\n").decode()})
    assert e["code"] == "policy_mismatch" and "does not match HOST_DATA" in e["message"]
    assert call(c, Op.ping)["policy_set"] is False
    e = err(c, Op.mount_device, {"device": "L0", "target": "/run/parma/layers/l0"})
    assert e["code"] == "policy_denied" and "no execution policy" in e["message"]


def test_matching_policy_is_accepted_exactly_once(world: dict) -> None:
    c, guest = world["client"], world["guest"]
    r = call(c, Op.set_policy, {"policy": base64.b64encode(guest.policy).decode()})
    assert r["host_data_source"] == "emulated report"
    e = err(c, Op.set_policy, {"policy": base64.b64encode(guest.policy).decode()})
    assert e["code"] == "policy_already_set"


def test_device_not_in_policy_is_denied(world: dict) -> None:
    c = world["client"]
    e = err(c, Op.mount_device, {"device": "R0", "target": "/run/parma/layers/rogue"})
    assert e["code"] == "policy_denied" and "is not a layer of any container in the policy" in e["message"]
    e = err(c, Op.mount_device, {"device": "L0", "target": "/etc"})
    assert e["code"] == "invalid_request"


def test_swapped_layer_order_is_denied(world: dict) -> None:
    c = world["client"]
    call(c, Op.mount_device, {"device": "L0", "target": "/run/parma/layers/l0"})
    call(c, Op.mount_device, {"device": "L1", "target": "/run/parma/layers/l1"})
    call(c, Op.mount_scratch, {"container_id": "app"})
    target = "/run/parma/containers/app/rootfs"
    e = err(c, Op.mount_overlay, {"container_id": "app", "target": target,
                                  "layer_paths": ["/run/parma/layers/l0", "/run/parma/layers/l1"]})
    assert e["code"] == "policy_denied" and "different order" in e["message"]
    call(c, Op.mount_overlay, {"container_id": "app", "target": target,
                              "layer_paths": ["/run/parma/layers/l1", "/run/parma/layers/l0"]})


def test_extra_ld_preload_is_denied(world: dict) -> None:
    c, env = world["client"], world["env"]
    e = err(c, Op.create_container, create_payload(world, "app", env=env + ["LD_PRELOAD=/tmp/evil.so"]))
    assert e["code"] == "policy_denied" and "LD_PRELOAD" in e["message"]
    call(c, Op.create_container, create_payload(world, "app"))
    call(c, Op.start_container, {"container_id": "app"})
    code, out, _ = run_exec(c, "app", CAT_BIG, env)
    assert code == 0 and out == BIG


def test_tampered_block_gives_read_errors_never_wrong_data(world: dict) -> None:
    c, env = world["client"], world["env"]
    # The tampered copy has the data layer's root hash: the policy lets it be mounted and used...
    call(c, Op.mount_device, {"device": "L2", "target": "/run/parma/layers/l2"})
    call(c, Op.mount_scratch, {"container_id": "tamp"})
    call(c, Op.mount_overlay, {"container_id": "tamp", "target": "/run/parma/containers/tamp/rootfs",
                              "layer_paths": ["/run/parma/layers/l2", "/run/parma/layers/l0"]})
    call(c, Op.create_container, create_payload(world, "tamp"))
    call(c, Op.start_container, {"container_id": "tamp"})
    # ...but dm-verity refuses the flipped block: a read error, and what was read is all correct.
    code, out, errs = run_exec(c, "tamp", CAT_BIG, env)
    assert code != 0
    assert b"Input/output error" in errs
    assert len(out) < TAMPER_AT and BIG.startswith(out)
    code, out, _ = run_exec(c, "tamp", CAT_SMALL, env)
    assert code == 0 and out == b"small and intact\n"
    assert "is corrupted" in world["guest"].console()


def test_malformed_and_oversized_frames_get_errors_and_the_agent_keeps_serving(world: dict) -> None:
    guest: Guest = world["guest"]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(guest.cfg.agent_sockets[-1]))
        s.settimeout(60)
        buf = b""

        def reply() -> dict:
            nonlocal buf
            while b"\n" not in buf:
                chunk = s.recv(65536)
                assert chunk, "the agent closed the port"
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            return json.loads(line)

        s.sendall(b"\n{this is not json\n")
        assert reply()["error"]["code"] == "malformed_frame"
        s.sendall(b"[1, 2, 3]\n")
        assert reply()["error"]["code"] == "malformed_frame"
        s.sendall(b'{"v":1,"id":41,"op":"mount_device","payload":{"device":7}}\n')
        r = reply()
        assert r["id"] == 41 and r["error"]["code"] == "invalid_request"
        s.sendall(b'{"v":1,"id":42,"op":"set_policy","payload":{"policy":"' + b"QUFB" * (MAX_FRAME_BYTES // 4)
                  + b'"}}\n')
        r = reply()
        assert r["id"] == 42 and r["error"]["code"] == "frame_too_large"
        # One frame must never silence a port (issue 13): a lone surrogate, a boolean version, an
        # overflowing number and deep nesting each get their one reply, and the port goes on.
        s.sendall(rb'{"v":1,"id":"\ud800","op":"ping"}' + b"\n")
        r = reply()
        assert r["id"] is None and r["error"]["code"] == "malformed_frame"
        s.sendall(b'{"v":true,"id":44,"op":"ping"}\n')
        assert reply()["error"]["code"] == "unsupported_version"
        s.sendall(b'{"v":1,"id":45,"op":"wait_process","payload":{"container_id":"app","timeout":1e400}}\n')
        assert reply()["error"]["code"] == "malformed_frame"
        s.sendall(b'{"v":1,"id":46,"op":"ping","payload":' + b"[" * 50_000 + b"]" * 50_000 + b"}\n")
        assert reply()["error"]["code"] == "malformed_frame"
        s.sendall(b'{"v":1,"id":43,"op":"ping"}\n')
        r = reply()
        assert r["id"] == 43 and r["ok"] and r["result"]["policy_set"] is True
    assert call(world["client"], Op.list_containers)["containers"][0]["status"] == "running"


def test_teardown_is_checked_and_ordered(world: dict) -> None:
    c = world["client"]
    e = err(c, Op.unmount_device, {"target": "/run/parma/layers/l0"})
    assert e["code"] == "conflict"                      # still a layer of the app's and tamp's overlays
    assert err(c, Op.unmount_overlay, {"target": "/run/parma/containers/tamp/rootfs"})["code"] == "conflict"
    r = call(c, Op.shutdown_container, {"container_id": "tamp", "timeout": 2}, timeout=60)
    assert r["exit_code"] is not None
    call(c, Op.unmount_overlay, {"target": "/run/parma/containers/tamp/rootfs"})
    call(c, Op.unmount_scratch, {"container_id": "tamp"})
    call(c, Op.unmount_device, {"target": "/run/parma/layers/l2"})
    e = err(c, Op.create_container, create_payload(world, "tamp"))
    assert e["code"] == "conflict"                      # no overlay any more
    statuses = {x["id"]: x["status"] for x in call(c, Op.list_containers)["containers"]}
    assert statuses == {"app": "running", "tamp": "exited"}


# ---------------------------------------------------------------------------------------------------------
# Issue 13, items 2-4 and the frame layer, with the real kernel and crun


def test_the_host_cannot_create_a_prefilled_volume_where_the_group_expects_an_emptydir(world: dict) -> None:
    c = world["client"]
    e = err(c, Op.create_volume, {"name": "cache", "kind": "secret",
                                  "items": {"evil.so": base64.b64encode(b"\x7fELF").decode()}})
    assert e["code"] == "policy_denied" and "'cache' is a emptyDir volume in the policy" in e["message"]
    call(c, Op.create_volume, {"name": "cache", "kind": "emptyDir"})


def test_a_seccomp_profile_other_than_the_pinned_one_is_denied(world: dict) -> None:
    c, sec = world["client"], world["sec"]
    call(c, Op.mount_scratch, {"container_id": "sec"})
    call(c, Op.mount_overlay, {"container_id": "sec", "target": "/run/parma/containers/sec/rootfs",
                               "layer_paths": ["/run/parma/layers/l0"]})
    allow_all = base64.b64encode(b'{"defaultAction":"SCMP_ACT_ALLOW"}').decode()
    for payload in ({**sec, "seccomp_profile": allow_all}, {k: v for k, v in sec.items() if k != "seccomp_profile"}):
        e = err(c, Op.create_container, payload)
        assert e["code"] == "policy_denied" and "seccomp_profile_sha256" in e["message"]


def test_a_nul_in_an_env_value_never_reaches_crun(world: dict) -> None:
    """The frame layer refuses NUL in any string (no C program downstream would see the value whole): the
    booted agent answers the frame, and the container the request names is never created."""
    guest: Guest = world["guest"]
    sec = world["sec"]
    env = list(sec["env"])
    env[0] = env[0].replace("=", "=\u0000", 1)         # an allowed variable, its value cut by a NUL
    frames = [{**sec, "env": env}, {**sec, "argv": ["/bin/sleep\u0000", "100000"]},
              {**sec, "working_dir": "/\u0000/etc"}]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(guest.cfg.agent_sockets[-1]))
        s.settimeout(60)
        buf = b""
        for n, payload in enumerate(frames):
            s.sendall(json.dumps({"v": 1, "id": 51 + n, "op": "create_container", "payload": payload}).encode()
                      + b"\n")
            while b"\n" not in buf:
                chunk = s.recv(65536)
                assert chunk, "the agent closed the port"
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            r = json.loads(line)
            assert r["id"] == 51 + n and r["error"]["code"] == "invalid_request"
            assert "must not contain NUL characters" in r["error"]["message"]
    ids = {x["id"] for x in call(world["client"], Op.list_containers)["containers"]}
    assert "sec" not in ids


def test_the_pinned_seccomp_profile_is_really_applied(world: dict) -> None:
    c, sec = world["client"], world["sec"]
    call(c, Op.create_container, sec, timeout=120)
    call(c, Op.start_container, {"container_id": "sec"}, timeout=120)
    code, out, errs = run_exec(c, "sec", MKDIR, sec["env"])
    assert code != 0 and b"Operation not permitted" in errs            # the kernel refused mkdir(2)
    code, out, _ = run_exec(c, "sec", TOUCH, sec["env"])                # and nothing else: /cache was empty
    assert code == 0 and out == b"written\nf\n"


def test_volume_binds_carry_no_setuid_programs_or_devices(world: dict) -> None:
    code, out, _ = run_exec(world["client"], "sec", MOUNTINFO, world["sec"]["env"])
    cache = next(line for line in out.decode().splitlines() if line.split()[4] == "/cache")
    options = set(cache.split()[5].split(","))
    assert {"nosuid", "nodev", "rw"} <= options, cache


def test_a_signal_never_reaches_a_process_after_its_exit(world: dict) -> None:
    c, sec = world["client"], world["sec"]
    r = call(c, Op.exec_process, {"container_id": "sec", "argv": SLEEPER, "env": sec["env"]})
    call(c, Op.signal_process, {"container_id": "sec", "exec_id": r["exec_id"], "signal": 9})
    w = call(c, Op.wait_process, {"container_id": "sec", "exec_id": r["exec_id"], "timeout": 30}, timeout=60)
    assert (w["running"], w["exit_code"], w["signal"]) == (False, 137, 9)
    e = err(c, Op.signal_process, {"container_id": "sec", "exec_id": r["exec_id"], "signal": 9})
    assert e["code"] == "conflict" and "has exited" in e["message"]
    page = call(c, Op.read_output, {"container_id": "sec", "exec_id": r["exec_id"], "wait": 5})
    assert page["eof"]
    # Reported and read: forgotten.
    assert err(c, Op.wait_process, {"container_id": "sec", "exec_id": r["exec_id"]})["code"] == "not_found"
