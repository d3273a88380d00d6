"""The host is the attacker, in-process: hostile requests against a real agent outside the UVM.

Each test drives the offline agent (tests/offline_agent.py: the real frame loop, service, gate, engine,
process handles and mounts, in private pid and mount namespaces; layer devices and crun are stand-ins)
over its port, in frames, as a malicious host would. tests/vm/test_malicious_host.py plays the same
host against the booted UVM where the kernel, dm-verity or crun must be real.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.shared.policy.model import canonical_bytes
from tests.offline_agent import OfflineAgent, available, busybox_layer

pytestmark = pytest.mark.skipif(available() is not None, reason=f"offline agent: {available()}")

LAYER = "1" * 64
OTHER_LAYER = "2" * 64
INIT = ["/bin/sleep", "100000"]
SLEEPER = ["/bin/sleep", "100000"]
SHORT = ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]
ROOTFS = "/run/parma/containers/{}/rootfs"


def policy_container(**changes: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": "app", "layers": [LAYER], "command": INIT, "env_rules": [
            {"pattern": "PATH=/usr/bin:/bin", "strategy": "string", "required": False}],
        "working_dir": "/", "mounts": [],
        "exec_processes": [{"command": SLEEPER, "signals": [9, 15]}, {"command": SHORT, "signals": []}],
        "signals": [9, 15], "allow_elevated": False, "allow_stdio_access": True, "no_new_privileges": False,
        "user": {"user_idname": {"pattern": "", "strategy": "any"},
                 "group_idnames": [{"pattern": "", "strategy": "any"}], "umask": "0022"},
        "capabilities": None, "seccomp_profile_sha256": "",
    }
    c.update(changes)
    return c


def policy_doc(*containers: dict[str, Any], **top: Any) -> bytes:
    doc: dict[str, Any] = {"api_version": "0.12.0", "framework_version": "0.5.0",
                           "containers": list(containers) or [policy_container()],
                           "allow_unencrypted_scratch": True}
    doc.update(top)
    return canonical_bytes(doc)


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path]]:
    d = tmp_path_factory.mktemp("layers")
    return {"L0": (LAYER, busybox_layer(d / "l0")), "L1": (OTHER_LAYER, busybox_layer(d / "l1"))}


def agent_with(tmp_path: Path, layers: dict, policy: bytes) -> Iterator[OfflineAgent]:
    with OfflineAgent.start(tmp_path, policy, layers) as agent:
        agent.set_policy()
        yield agent


@pytest.fixture
def agent(tmp_path: Path, layers: dict) -> Iterator[OfflineAgent]:
    yield from agent_with(tmp_path, layers, policy_doc())


def rootfs(agent: OfflineAgent, cid: str, *, device: str = "L0", layer_target: str = "/run/parma/layers/l0") -> None:
    """mount_device (once per target), mount_scratch and mount_overlay for container `cid`."""
    if layer_target not in agent.mounted:
        agent.ok("mount_device", {"device": device, "target": layer_target})
        agent.mounted.add(layer_target)
    agent.ok("mount_scratch", {"container_id": cid})
    agent.ok("mount_overlay", {"container_id": cid, "layer_paths": [layer_target], "target": ROOTFS.format(cid)})


def running(agent: OfflineAgent, cid: str = "app", **create: Any) -> None:
    rootfs(agent, cid)
    agent.ok("create_container", {"container_id": cid, "argv": INIT, "env": ["PATH=/usr/bin:/bin"], **create})
    agent.ok("start_container", {"container_id": cid})


def gone(agent: OfflineAgent, pid: int, timeout: float = 10) -> None:
    """Wait until `pid` names no process in the agent's pid namespace (the agent reaped it)."""
    deadline = time.monotonic() + timeout
    while agent.ctl("exists", pid=pid):
        assert time.monotonic() < deadline, f"pid {pid} was never reaped"
        time.sleep(0.05)


def output(agent: OfflineAgent, cid: str, exec_id: str | None = None) -> tuple[bytes, bytes]:
    out, err, offset = [], [], 0
    while True:
        page = agent.ok("read_output", {"container_id": cid, "exec_id": exec_id, "offset": offset, "wait": 5})
        for ch in page["chunks"]:
            (out if ch["stream"] == "stdout" else err).append(base64.b64decode(ch["data"]))
        offset = page["next_offset"]
        if page["eof"]:
            return b"".join(out), b"".join(err)


# ---------------------------------------------------------------------------------------------------------
# Issue 13, item 2: signals and waits go to the process the policy allowed, never to a reused pid


def test_a_reused_exec_pid_is_never_signalled(agent: OfflineAgent) -> None:
    running(agent)
    e = agent.ok("exec_process", {"container_id": "app", "argv": SLEEPER, "env": ["PATH=/usr/bin:/bin"]})
    pid = e["pid"]
    agent.ok("signal_process", {"container_id": "app", "exec_id": e["exec_id"], "signal": 9})
    gone(agent, pid)                                    # reaped by the agent: the pid is free ...
    victim = agent.ctl("spawn_at", pid=pid)             # ... and now another process's
    assert victim == pid and agent.ctl("alive", pid=pid)
    for sig in (15, 9):
        err = agent.err("signal_process", {"container_id": "app", "exec_id": e["exec_id"], "signal": sig})
        assert err["code"] == "conflict" and "has exited" in err["message"]
    assert agent.ctl("alive", pid=pid)
    # Its own exit status, not the newcomer's; reported once, then forgotten.
    w = agent.ok("wait_process", {"container_id": "app", "exec_id": e["exec_id"], "timeout": 5})
    assert (w["running"], w["exit_code"], w["signal"]) == (False, 137, 9)
    assert output(agent, "app", e["exec_id"]) == (b"", b"")
    assert agent.err("wait_process", {"container_id": "app", "exec_id": e["exec_id"]})["code"] == "not_found"
    assert agent.err("signal_process", {"container_id": "app", "exec_id": e["exec_id"], "signal": 9})["code"] \
        == "not_found"
    assert agent.ctl("alive", pid=pid)


def test_a_reused_init_pid_is_never_signalled(agent: OfflineAgent) -> None:
    running(agent)
    init = next(c for c in agent.ok("list_containers")["containers"] if c["id"] == "app")["pid"]
    agent.ok("signal_process", {"container_id": "app", "signal": 9})
    gone(agent, init)
    assert agent.ctl("spawn_at", pid=init) == init
    err = agent.err("signal_process", {"container_id": "app", "signal": 15})
    assert err["code"] == "conflict" and "init process of container app has exited" in err["message"]
    w = agent.ok("wait_process", {"container_id": "app", "timeout": 5})
    assert (w["exit_code"], w["signal"]) == (137, 9)
    err = agent.err("exec_process", {"container_id": "app", "argv": SLEEPER, "env": env()})
    assert err["code"] == "conflict" and "exited, not running" in err["message"]
    r = agent.ok("shutdown_container", {"container_id": "app", "timeout": 2})
    assert r["signal"] == 9                             # the container's own status, again
    assert agent.ctl("alive", pid=init)


def test_exec_statuses_are_forgotten_once_reported_and_read(agent: OfflineAgent) -> None:
    running(agent)
    handles = agent.ctl("tracked")
    for _ in range(5):
        e = agent.ok("exec_process", {"container_id": "app", "argv": SHORT, "env": ["PATH=/usr/bin:/bin"]})
        w = agent.ok("wait_process", {"container_id": "app", "exec_id": e["exec_id"], "timeout": 10})
        assert w["exit_code"] == 3
        # Reported but not yet read: still there for its output, and no signal reaches anything.
        assert agent.err("signal_process", {"container_id": "app", "exec_id": e["exec_id"], "signal": 9})["code"] \
            == "conflict"
        assert output(agent, "app", e["exec_id"]) == (b"out\n", b"err\n")
        assert agent.err("wait_process", {"container_id": "app", "exec_id": e["exec_id"]})["code"] == "not_found"
        assert agent.err("read_output", {"container_id": "app", "exec_id": e["exec_id"]})["code"] == "not_found"
    assert agent.ctl("tracked") == handles              # no process handle left behind


# ---------------------------------------------------------------------------------------------------------
# Issue 13, item 4: volumes the host can pre-fill


CACHE = {"destination": "/cache", "source": "/run/parma/volumes/cache", "type": "bind",
         "options": ["rbind", "rprivate", "rw"]}
CFG = {"destination": "/cfg", "source": "/run/parma/volumes/cfg", "type": "bind", "options": ["rbind", "rprivate", "ro"]}
VOLUMES = [{"name": "cache", "target": "/run/parma/volumes/cache", "kind": "emptyDir"},
           {"name": "cfg", "target": "/run/parma/volumes/cfg", "kind": "secret"},
           {"name": "tmp", "target": "/run/parma/volumes/tmp", "kind": "tmpfs"}]
CAT_CACHE = ["/bin/sh", "-c", "ls -A /cache; cat /cfg/token"]


@pytest.fixture
def with_volumes(tmp_path: Path, layers: dict) -> Iterator[OfflineAgent]:
    doc = policy_doc(policy_container(mounts=[CACHE, CFG], exec_processes=[{"command": CAT_CACHE, "signals": []}]),
                     volumes=VOLUMES)
    yield from agent_with(tmp_path, layers, doc)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_the_host_cannot_create_a_prefilled_volume_where_the_group_expects_an_emptydir(
        with_volumes: OfflineAgent) -> None:
    a = with_volumes
    err = a.err("create_volume", {"name": "cache", "kind": "secret", "items": {"evil.so": b64(b"\x7fELF")}})
    assert err["code"] == "policy_denied" and "'cache' is a emptyDir volume in the policy, not secret" in err["message"]
    assert a.ctl("ls", path="/run/parma/volumes/cache") in (None, [])      # nothing was made
    err = a.err("create_volume", {"name": "cache", "kind": "emptyDir", "items": {"evil.so": b64(b"x")}})
    assert err["code"] == "invalid_request" and "created empty" in err["message"]
    err = a.err("create_volume", {"name": "cache", "kind": "tmpfs", "size_mib": 4})
    assert err["code"] == "policy_denied"
    # Without the volume, no container may bind it (the agent refuses before the engine would).
    rootfs(a, "app")
    err = a.err("create_container", {"container_id": "app", "argv": INIT, "env": ["PATH=/usr/bin:/bin"],
                                     "mounts": [CACHE, CFG]})
    assert err["code"] == "invalid_request" and "is not a group volume" in err["message"]


def test_memory_volumes_are_made_by_the_guest_with_their_pinned_kind(with_volumes: OfflineAgent) -> None:
    a = with_volumes
    a.ok("create_volume", {"name": "cache", "kind": "emptyDir"})
    a.ok("create_volume", {"name": "cfg", "kind": "secret", "items": {"token": b64(b"s3cret\n")}})
    a.ok("create_volume", {"name": "tmp", "kind": "tmpfs", "size_mib": 4})
    assert a.ctl("ls", path="/run/parma/volumes/cache") == []
    assert a.err("create_volume", {"name": "cache", "kind": "emptyDir"})["code"] == "conflict"
    # A name the policy does not list can be made, but no container of this policy can bind it.
    a.ok("create_volume", {"name": "stray", "kind": "secret", "items": {"x": b64(b"x")}})
    err = a.err("mount_device", {"device": "L0", "target": "/run/parma/volumes/cache"})
    assert err["code"] in ("conflict", "policy_denied")
    mounts = a.ctl("mounts")
    cfg_line = next(line for line in mounts.splitlines() if " /run/parma/volumes/cfg " in line)
    assert " ro," in cfg_line and "nosuid" in cfg_line and "nodev" in cfg_line
    rootfs(a, "app")
    stray = {**CACHE, "source": "/run/parma/volumes/stray"}
    err = a.err("create_container", {"container_id": "app", "argv": INIT, "env": ["PATH=/usr/bin:/bin"],
                                     "mounts": [stray, CFG]})
    assert err["code"] == "policy_denied" and "/run/parma/volumes/stray" in err["message"]
    a.ok("create_container", {"container_id": "app", "argv": INIT, "env": ["PATH=/usr/bin:/bin"],
                              "mounts": [CACHE, CFG]})
    a.ok("start_container", {"container_id": "app"})
    e = a.ok("exec_process", {"container_id": "app", "argv": CAT_CACHE, "env": ["PATH=/usr/bin:/bin"]})
    assert output(a, "app", e["exec_id"]) == (b"s3cret\n", b"")        # /cache is empty, /cfg has the item


@pytest.mark.parametrize("items", [{"../x": "eA=="}, {"a/b": "eA=="}, {".": "eA=="}, {"": "eA=="},
                                   {"x" * 256: "eA=="}, {f"i{n}": "eA==" for n in range(1025)}])
def test_secret_item_names_cannot_leave_the_volume(with_volumes: OfflineAgent, items: dict) -> None:
    err = with_volumes.err("create_volume", {"name": "cfg", "kind": "secret", "items": items})
    assert err["code"] == "invalid_request"
    assert with_volumes.ctl("ls", path="/run/parma/volumes/cfg") in (None, [])


# ---------------------------------------------------------------------------------------------------------
# Issue 13, item 3: the guest measures the seccomp profile it applies


DENY_MKDIR = {"defaultAction": "SCMP_ACT_ALLOW",
              "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}


def canonical(profile: dict) -> bytes:
    return json.dumps(profile, separators=(",", ":")).encode()


@pytest.fixture
def pinned_seccomp(tmp_path: Path, layers: dict) -> Iterator[OfflineAgent]:
    pin = hashlib.sha256(canonical(DENY_MKDIR)).hexdigest()
    yield from agent_with(tmp_path, layers, policy_doc(policy_container(seccomp_profile_sha256=pin)))


def create_with(agent: OfflineAgent, cid: str, profile: bytes | None) -> dict:
    payload: dict[str, Any] = {"container_id": cid, "argv": INIT, "env": ["PATH=/usr/bin:/bin"]}
    if profile is not None:
        payload["seccomp_profile"] = b64(profile)
    return agent.call("create_container", payload)


def test_the_profile_the_host_sends_is_measured_and_applied_exactly(pinned_seccomp: OfflineAgent) -> None:
    a = pinned_seccomp
    rootfs(a, "app")
    # The same profile spelled differently measures the same, and crun gets the measured form.
    r = create_with(a, "app", json.dumps(DENY_MKDIR, indent=2, sort_keys=True).encode())
    assert r["ok"], r
    spec = json.loads(base64.b64decode(a.ctl("read", path="/run/parma/containers/app/config.json")))
    assert spec["linux"]["seccomp"] == DENY_MKDIR
    assert canonical(spec["linux"]["seccomp"]) == canonical(DENY_MKDIR)


@pytest.mark.parametrize(("profile", "code", "needle"), [
    (None, "policy_denied", "seccomp_profile_sha256 '' does not match"),                     # pinned, none sent
    (canonical({**DENY_MKDIR, "defaultAction": "SCMP_ACT_LOG"}), "policy_denied", "seccomp_profile_sha256"),
    (canonical({"defaultAction": "SCMP_ACT_ALLOW"}), "policy_denied", "seccomp_profile_sha256"),
    (canonical(DENY_MKDIR)[:-1], "invalid_request", "seccomp profile"),
    (canonical({**DENY_MKDIR, "listenerPath": "/run/x"}), "invalid_request", "seccomp agent"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[],"syscalls":[]}', "invalid_request", "duplicate key"),
])
def test_a_profile_other_than_the_pinned_one_is_denied(pinned_seccomp: OfflineAgent, profile: bytes | None,
                                                       code: str, needle: str) -> None:
    a = pinned_seccomp
    rootfs(a, "app")
    r = create_with(a, "app", profile)
    assert not r["ok"] and r["error"]["code"] == code and needle in r["error"]["message"], r
    assert a.ctl("ls", path="/run/crun") in (None, [])           # crun never saw a spec


def test_an_empty_pin_allows_exactly_no_profile(agent: OfflineAgent) -> None:
    rootfs(agent, "app")
    r = create_with(agent, "app", canonical({"defaultAction": "SCMP_ACT_ALLOW"}))
    assert r["error"]["code"] == "policy_denied" and "seccomp_profile_sha256" in r["error"]["message"]
    assert create_with(agent, "app", None)["ok"]
    spec = json.loads(base64.b64decode(agent.ctl("read", path="/run/parma/containers/app/config.json")))
    assert "seccomp" not in spec["linux"]


# ---------------------------------------------------------------------------------------------------------
# Siblings: the catalog a malicious host would try next


APP_USER = {"user_idname": {"pattern": "app", "strategy": "name"},
            "group_idnames": [{"pattern": "", "strategy": "any"}], "umask": "0022"}
WWW = {"destination": "/www", "source": "/run/parma/volumes/www", "type": "bind", "options": ["rbind", "rprivate", "ro"]}


@pytest.fixture
def strict(tmp_path: Path, layers: dict) -> Iterator[OfflineAgent]:
    """A container that runs as `app`, binds a files volume, and allows stdio; a second without stdio."""
    doc = policy_doc(policy_container(user=APP_USER, mounts=[WWW]),
                     policy_container(name="quiet", layers=[OTHER_LAYER], allow_stdio_access=False),
                     volumes=[{"name": "www", "target": "/run/parma/volumes/www", "device_hash": OTHER_LAYER}],
                     allow_properties_access=True, allow_dump_stacks=True)
    yield from agent_with(tmp_path, layers, doc)


def env(*extra: str) -> list[str]:
    return ["PATH=/usr/bin:/bin", *extra]


@pytest.mark.parametrize(("change", "code", "needle"), [
    ({"env": env("LD_PRELOAD=/tmp/evil.so")}, "policy_denied", "LD_PRELOAD"),
    ({"env": env("ld_preload=/tmp/evil.so")}, "policy_denied", "ld_preload"),
    ({"env": env("LD_AUDIT=/x.so")}, "policy_denied", "LD_AUDIT"),
    ({"env": ["PATH=/tmp:/usr/bin:/bin"]}, "policy_denied", "PATH=/tmp"),
    ({"env": env("PATH=/tmp")}, "policy_denied", "PATH=/tmp"),                       # a duplicate name
    ({"env": env("=/tmp/evil.so")}, "invalid_request", "NAME=VALUE"),                # an empty name
    ({"env": env("LD_PRELOAD")}, "invalid_request", "NAME=VALUE"),
    ({"working_dir": "/../../etc"}, "policy_denied", "working_dir"),
    ({"working_dir": "/proc/1/root"}, "policy_denied", "working_dir"),
    ({"user": "0"}, "policy_denied", "user"),
    ({"user": "root"}, "policy_denied", "user"),
    ({"user": "65534"}, "policy_denied", "user"),
    ({"user": "nobody"}, "policy_denied", "user"),
    ({"user": "no-such-user"}, "failed", "no-such-user"),
    ({"user": "\u00b2"}, "failed", "is not in the image's /etc/passwd"),       # a digit to str.isdigit(), not to int()
    ({"user": "app:\u00b2"}, "failed", "is not in the image's /etc/group"),
    ({"user": "\u0660"}, "failed", "is not in the image's /etc/passwd"),       # Arabic-Indic zero is no uid 0
    ({"user": "4294967295"}, "failed", "beyond the largest id"),               # (uid_t)-1
    ({"user": "app:" + "9" * 200}, "failed", "beyond the largest id"),
    ({"privileged": True}, "policy_denied", "allow_elevated"),
    ({"capabilities": {"bounding": ["CAP_SYS_ADMIN"], "effective": ["CAP_SYS_ADMIN"],
                       "permitted": ["CAP_SYS_ADMIN"]}}, "policy_denied", "capabilities"),
    ({"umask": "000"}, "policy_denied", "umask"),
    ({"mounts": [{**WWW, "destination": "/proc"}]}, "policy_denied", "/proc"),
    ({"mounts": [{**WWW, "destination": "/www/../etc"}]}, "invalid_request", "destination"),
    ({"mounts": [{**WWW, "source": "/run/parma/volumes/../layers/l0"}]}, "invalid_request", "not a group volume"),
    ({"mounts": [{**WWW, "source": "/run/parma/layers/l0"}]}, "invalid_request", "not a group volume"),
    ({"mounts": [{**WWW, "source": "/"}]}, "invalid_request", "not a group volume"),
    ({"mounts": [{**WWW, "options": ["rbind", "rprivate", "rw"]}]}, "policy_denied", "options"),
    ({"mounts": [{**WWW, "options": ["rbind", "rprivate", "ro", "suid"]}]}, "policy_denied", "options"),
    ({"mounts": [{**WWW, "type": "proc"}]}, "invalid_request", "only bind mounts"),
])
def test_create_container_tricks_are_refused(strict: OfflineAgent, change: dict, code: str, needle: str) -> None:
    a = strict
    a.ok("mount_device", {"device": "L1", "target": "/run/parma/volumes/www"})
    rootfs(a, "app")
    r = a.call("create_container", {"container_id": "app", "argv": INIT, "env": env(), "user": "app",
                                    "mounts": [WWW], **change})
    assert not r["ok"] and r["error"]["code"] == code and needle in r["error"]["message"], r
    # ...and nothing was created: the honest request still works.
    a.ok("create_container", {"container_id": "app", "argv": INIT, "env": env(), "user": "app", "mounts": [WWW]})


def test_the_primary_group_is_the_hosts_choice_only_when_the_policy_says_any(strict: OfflineAgent) -> None:
    """As in ACI: a policy that pins the user by name and any group lets the host pick the group
    (docs/security.md says so; `user: name:group` in the group file pins it)."""
    a = strict
    a.ok("mount_device", {"device": "L1", "target": "/run/parma/volumes/www"})
    rootfs(a, "app")
    a.ok("create_container", {"container_id": "app", "argv": INIT, "env": env(), "user": "app:wheel",
                              "mounts": [WWW]})


def test_a_volume_device_stays_while_a_container_binds_it(strict: OfflineAgent) -> None:
    a = strict
    a.ok("mount_device", {"device": "L1", "target": "/run/parma/volumes/www"})
    running(a, user="app", mounts=[WWW])
    err = a.err("unmount_device", {"target": "/run/parma/volumes/www"})
    assert err["code"] == "conflict" and "bound into container app" in err["message"]
    err = a.err("unmount_device", {"target": "/run/parma/layers/l0"})
    assert err["code"] == "conflict" and "overlay of app" in err["message"]
    a.ok("shutdown_container", {"container_id": "app", "timeout": 2})
    a.ok("unmount_device", {"target": "/run/parma/volumes/www"})
    # Gone for the engine too: a new container cannot bind the empty directory left behind.
    rootfs(a, "app2")
    err = a.err("create_container", {"container_id": "app2", "argv": INIT, "env": env(), "user": "app",
                                     "mounts": [WWW]})
    assert err["code"] in ("invalid_request", "policy_denied")


def test_a_stopped_container_takes_no_exec_and_comes_back_only_as_a_checked_restart(agent: OfflineAgent) -> None:
    running(agent)
    agent.ok("shutdown_container", {"container_id": "app", "timeout": 2})
    err = agent.err("exec_process", {"container_id": "app", "argv": SLEEPER, "env": env()})
    assert err["code"] == "conflict" and "not running" in err["message"]
    assert agent.err("signal_process", {"container_id": "app", "signal": 9})["code"] in ("conflict", "policy_denied")
    # The id may be created again (restartPolicy, docs/policy.md "Differences from ACI"), but only on a
    # fresh overlay, and the new create is checked exactly like the first.
    err = agent.err("create_container", {"container_id": "app", "argv": INIT, "env": env()})
    assert err["code"] in ("conflict", "policy_denied")
    agent.ok("unmount_overlay", {"target": ROOTFS.format("app")})
    agent.ok("mount_overlay", {"container_id": "app", "layer_paths": ["/run/parma/layers/l0"],
                               "target": ROOTFS.format("app")})
    err = agent.err("create_container", {"container_id": "app", "argv": ["/bin/sh"], "env": env()})
    assert err["code"] == "policy_denied"
    agent.ok("create_container", {"container_id": "app", "argv": INIT, "env": env()})


def test_exec_into_a_created_but_not_started_container_is_refused(agent: OfflineAgent) -> None:
    rootfs(agent, "app")
    agent.ok("create_container", {"container_id": "app", "argv": INIT, "env": env()})
    err = agent.err("exec_process", {"container_id": "app", "argv": SLEEPER, "env": env()})
    assert err["code"] == "conflict" and "created, not running" in err["message"]


def test_signals_follow_the_policy_for_init_and_each_exec_process(agent: OfflineAgent) -> None:
    running(agent)
    e = agent.ok("exec_process", {"container_id": "app", "argv": SLEEPER, "env": env()})
    # SHORT's exec process allows no signal; init allows 9 and 15 only.
    err = agent.err("signal_process", {"container_id": "app", "signal": 10})
    assert err["code"] == "policy_denied" and "to the init process" in err["message"]
    err = agent.err("signal_process", {"container_id": "app", "exec_id": e["exec_id"], "signal": 10})
    assert err["code"] == "policy_denied" and "exec_process" in err["message"]
    assert agent.err("signal_process", {"container_id": "app", "exec_id": "e99", "signal": 9})["code"] == "not_found"
    assert agent.err("signal_process", {"container_id": "other", "signal": 9})["code"] == "not_found"
    agent.ok("signal_process", {"container_id": "app", "exec_id": e["exec_id"], "signal": 15})


@pytest.mark.parametrize(("op", "payload", "code"), [
    ("exec_process", {"container_id": "app", "argv": SLEEPER, "env": env(), "working_dir": "/../etc"},
     "policy_denied"),
    ("exec_process", {"container_id": "app", "argv": SLEEPER, "env": ["LD_PRELOAD"]}, "invalid_request"),
    ("exec_process", {"container_id": "app", "argv": SLEEPER, "env": ["=x"]}, "invalid_request"),
    ("exec_process", {"container_id": "app", "argv": SLEEPER, "env": env("LD_PRELOAD=/x.so")}, "policy_denied"),
    ("exec_process", {"container_id": "app", "argv": ["/bin/sh"], "env": env()}, "policy_denied"),
    ("exec_process", {"container_id": "app", "argv": [*SLEEPER, "x"], "env": env()}, "policy_denied"),
])
def test_exec_tricks_are_refused(agent: OfflineAgent, op: str, payload: dict, code: str) -> None:
    running(agent)
    assert agent.err(op, payload)["code"] == code


def test_output_the_policy_keeps_from_the_host_stays_there(strict: OfflineAgent) -> None:
    a = strict
    rootfs(a, "quiet", device="L1", layer_target="/run/parma/layers/l1")
    a.ok("create_container", {"container_id": "quiet", "argv": INIT, "env": env()})
    a.ok("start_container", {"container_id": "quiet"})
    err = a.err("read_output", {"container_id": "quiet"})
    assert err["code"] == "policy_denied" and "allow_stdio_access is false" in err["message"]
    e = a.ok("exec_process", {"container_id": "quiet", "argv": SHORT, "env": env()})
    assert e["stdio"] is False
    assert a.err("read_output", {"container_id": "quiet", "exec_id": e["exec_id"]})["code"] == "policy_denied"


def test_properties_and_stacks_show_no_secrets(tmp_path: Path, layers: dict) -> None:
    """Stack dumps carry code lines, never values; properties carry ids and hashes. Neither shows what
    went through the agent: a secret volume's content, an env value."""
    marker = "s3cr3t-marker-7f1c"
    doc = policy_doc(policy_container(env_rules=[{"pattern": "TOKEN=.*", "strategy": "re2", "required": True}],
                                      mounts=[CFG]),
                     volumes=[{"name": "cfg", "target": "/run/parma/volumes/cfg", "kind": "secret"}],
                     allow_properties_access=True, allow_dump_stacks=True)
    for a in agent_with(tmp_path, layers, doc):
        a.ok("create_volume", {"name": "cfg", "kind": "secret", "items": {"token": b64(marker.encode())}})
        rootfs(a, "app")
        a.ok("create_container", {"container_id": "app", "argv": INIT, "env": [f"TOKEN={marker}"], "mounts": [CFG]})
        a.ok("start_container", {"container_id": "app"})
        text = json.dumps([a.ok("get_properties"), a.ok("dump_stacks")])
        assert marker not in text and "--- thread" in text


def test_the_policy_is_set_once(agent: OfflineAgent) -> None:
    err = agent.err("set_policy", {"policy": base64.b64encode(agent.policy).decode()})
    assert err["code"] == "policy_already_set"
    other = policy_doc(policy_container(command=["/bin/sh"]))
    assert agent.err("set_policy", {"policy": base64.b64encode(other).decode()})["code"] == "policy_already_set"


def test_state_after_a_failed_create_is_unchanged(tmp_path: Path, layers: dict) -> None:
    missing = ["/bin/not-in-the-layer"]
    doc = policy_doc(policy_container(command=missing))
    for a in agent_with(tmp_path, layers, doc):
        rootfs(a, "app")
        handles = a.ctl("tracked")
        for _ in range(2):      # the same failure again: the first attempt left nothing behind
            err = a.err("create_container", {"container_id": "app", "argv": missing, "env": env()})
            assert err["code"] == "failed" and "not found" in err["message"]
        assert a.ok("list_containers")["containers"] == []
        assert a.ctl("tracked") == handles
        assert a.ctl("ls", path="/run/crun") in (None, [])


def test_layer_stacks_with_duplicates_or_volume_devices_are_refused(strict: OfflineAgent) -> None:
    a = strict
    a.ok("mount_device", {"device": "L0", "target": "/run/parma/layers/l0"})
    a.ok("mount_device", {"device": "L0", "target": "/run/parma/layers/l9"})     # one device twice: allowed
    a.ok("mount_device", {"device": "L1", "target": "/run/parma/volumes/www"})
    a.ok("mount_scratch", {"container_id": "app"})
    for paths in (["/run/parma/layers/l0", "/run/parma/layers/l9"], ["/run/parma/volumes/www"],
                  ["/run/parma/layers/l0", "/run/parma/layers/l0"], ["/run/parma/layers/../layers/l0"]):
        err = a.err("mount_overlay", {"container_id": "app", "layer_paths": paths, "target": ROOTFS.format("app")})
        assert err["code"] in ("policy_denied", "not_found"), (paths, err)
    a.ok("mount_overlay", {"container_id": "app", "layer_paths": ["/run/parma/layers/l9"],
                           "target": ROOTFS.format("app")})
    err = a.err("unmount_device", {"target": "/run/parma/layers/l9"})
    assert err["code"] == "conflict"
    a.ok("unmount_device", {"target": "/run/parma/layers/l0"})                  # the other copy is free


@pytest.mark.parametrize("target", ["/run/parma/layers/../volumes/x", "/run/parma/layers/l0/", "/etc",
                                    "/run/parma/layers/L0", "/run/parma/volumes/", "/proc/self/root"])
def test_device_targets_are_fixed_paths(agent: OfflineAgent, target: str) -> None:
    assert agent.err("mount_device", {"device": "L0", "target": target})["code"] in ("invalid_request",
                                                                                      "policy_denied")


# ---------------------------------------------------------------------------------------------------------
# Siblings found by the second review: fragments against unpinned volumes, hostile fragment text


SIDE_CMD = ["/bin/sleep", "7"]
SIDE_X = {"destination": "/x", "source": "/run/parma/volumes/x", "type": "bind", "options": ["rbind", "rprivate", "ro"]}
FEED = "example.com/side"


def side_fragment(**changes: Any) -> bytes:
    side = {**policy_container(name="side", command=SIDE_CMD, exec_processes=[], mounts=[SIDE_X]), **changes}
    return f'package side\n\nsvn := "2"\nframework_version := "0.5.0"\n\ncontainers := {json.dumps([side])}\n'.encode()


@pytest.fixture(scope="module")
def fragment_issuer() -> Any:
    from sandbox.aci.fragment_crypto import make_test_issuer
    return make_test_issuer()


def test_a_volume_made_before_a_fragment_cannot_be_bound_by_the_fragments_containers(
        tmp_path: Path, layers: dict, fragment_issuer: Any) -> None:
    """The host creates a secret volume under a name the policy does not pin, while no container could bind
    it, then loads a fragment whose container binds that path: a pre-filled volume where the fragment's
    author expected whatever the policy would have pinned. Unpinned volumes are never bound by path."""
    from sandbox.aci.fragment_crypto import sign_fragment

    imports = [{"issuer": fragment_issuer.did(), "feed": FEED, "minimum_svn": "2", "includes": ["containers"]}]
    for a in agent_with(tmp_path, layers, policy_doc(policy_container(), fragments=imports)):
        a.ok("create_volume", {"name": "x", "kind": "secret", "items": {"evil.so": b64(b"\x7fELF")}})
        envelope = sign_fragment(fragment_issuer, side_fragment(), feed=FEED, svn=2)
        assert a.ok("load_fragment", {"fragment": b64(envelope)})["namespace"] == "side"
        rootfs(a, "side")
        err = a.err("create_container", {"container_id": "side", "argv": SIDE_CMD, "env": env(), "mounts": [SIDE_X]})
        assert err["code"] == "policy_denied" and "a volume the policy does not pin" in err["message"], err
        assert a.ctl("ls", path="/run/crun") in (None, [])
        a.ok("create_container", {"container_id": "side", "argv": INIT, "env": env()})     # the policy's own


@pytest.mark.parametrize(("text", "needle"), [
    (b'package p\nframework_version := "0.5.0"\nsvn := 1' + b"0" * 5000 + b"\n", "is not an integer"),
    (b'package p\nframework_version := "1' + b"0" * 5000 + b'.0.0"\ncontainers := []\n', "framework_version"),
    (b'package p\nframework_version := "0.5.0"\ncontainers := ' + b"[" * 100000 + b"]" * 100000 + b"\n",
     "nested deeper"),
    (b'package p\nframework_version := "0.5.0"\nx := "\\ud800"\ncontainers := []\n', "load_fragment denied"),
    ("package \u0440\ncontainers := []\n".encode(), "expected a name"),
])
def test_hostile_fragment_text_is_a_denial_never_an_internal_error(agent: OfflineAgent, text: bytes,
                                                                    needle: str) -> None:
    """The host can sign a fragment with a chain of its own: the agent reads its Rego text before it knows
    no import names that issuer, so the text itself must never break the reader."""
    from sandbox.aci.fragment_crypto import make_test_issuer, sign_fragment

    envelope = sign_fragment(make_test_issuer(), text, feed=FEED, svn=2)
    err = agent.err("load_fragment", {"fragment": b64(envelope)})
    assert err["code"] == "policy_denied" and needle in err["message"], err
    assert agent.ok("ping")["policy_set"]


# ---------------------------------------------------------------------------------------------------------
# Issue 13, review 3: each incarnation of a container id starts from an empty writable layer


PLANT = ["/bin/sh", "-c", "echo app:x:0:0:app:/:/bin/sh > /etc/passwd; echo planted > /planted"]
PROBE = ["/bin/sh", "-c", "id -u; cat /planted; ls -A /"]
SCRATCH = "/run/parma/containers/{}/scratch"


@pytest.fixture
def two_on_one_stack(tmp_path: Path, layers: dict) -> Iterator[OfflineAgent]:
    """Two policy containers on the same layer: a `writer` that runs as root and a `reader` as `app`."""
    doc = policy_doc(policy_container(name="writer", command=PLANT),
                     policy_container(name="reader", user=APP_USER, exec_processes=[{"command": PROBE, "signals": []}]))
    yield from agent_with(tmp_path, layers, doc)


@pytest.mark.parametrize("remount_scratch", [False, True], ids=["overlay-only", "overlay-and-scratch"])
def test_a_recreated_container_never_sees_what_its_previous_incarnation_wrote(
        two_on_one_stack: OfflineAgent, remount_scratch: bool) -> None:
    a = two_on_one_stack
    rootfs(a, "c")
    a.ok("create_container", {"container_id": "c", "argv": PLANT, "env": env()})
    a.ok("start_container", {"container_id": "c"})
    assert a.ok("wait_process", {"container_id": "c", "timeout": 10})["exit_code"] == 0
    assert "planted" in a.ctl("ls", path=ROOTFS.format("c"))
    a.ok("shutdown_container", {"container_id": "c", "timeout": 2})
    err = a.err("create_container", {"container_id": "c", "argv": INIT, "env": env(), "user": "app"})
    assert err["code"] == "conflict" and "earlier incarnation" in err["message"]
    # The host re-creates the id as the other policy container of that layer stack, remounting only
    # the overlay (or, like the supervisor, the scratch too): user names resolve from the new rootfs.
    a.ok("unmount_overlay", {"target": ROOTFS.format("c")})
    deadline = time.monotonic() + 10
    while a.ctl("ls", path=SCRATCH.format("c")):        # the old writable layer is deleted
        assert time.monotonic() < deadline, a.ctl("ls", path=SCRATCH.format("c"))
        time.sleep(0.05)
    if remount_scratch:
        a.ok("unmount_scratch", {"container_id": "c"})
        a.ok("mount_scratch", {"container_id": "c"})
    a.ok("mount_overlay", {"container_id": "c", "layer_paths": ["/run/parma/layers/l0"], "target": ROOTFS.format("c")})
    assert "planted" not in a.ctl("ls", path=ROOTFS.format("c"))
    a.ok("create_container", {"container_id": "c", "argv": INIT, "env": env(), "user": "app"})
    a.ok("start_container", {"container_id": "c"})
    e = a.ok("exec_process", {"container_id": "c", "argv": PROBE, "env": env()})
    out, err = output(a, "c", e["exec_id"])
    assert out.splitlines()[0] == b"1000"           # the image's app, not the uid 0 the writer gave it
    assert b"planted" not in out and b"/planted" in err
