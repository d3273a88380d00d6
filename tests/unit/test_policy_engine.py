"""The enforcement engine: a table of allow/deny cases across every enforcement point, then transactions.

Each case builds a policy, replays setup requests (which must all be allowed), then checks one request:
allowed or not, a fragment of the explanation, and (when given) part of the results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from sandbox.shared.errors import StateError
from sandbox.shared.policy import PolicyEngine, PolicyInputError, canonical_bytes
from sandbox.shared.policy.defaults import PRIVILEGED_CAPABILITIES, UNPRIVILEGED_CAPABILITIES

L0, L1, L2, L3 = ("0" * 63 + "a", "1" * 63 + "b", "2" * 63 + "c", "3" * 63 + "d")
V0 = "f" * 64
CMD = ["/bin/httpd", "-f", "-p", "8080"]
ENV = ["PATH=/usr/bin:/bin", "GREETING=hello"]
ANY = {"pattern": "", "strategy": "any"}


def caps(privileged: bool = False) -> dict[str, list[str]]:
    c = list(PRIVILEGED_CAPABILITIES if privileged else UNPRIVILEGED_CAPABILITIES)
    return {"bounding": c, "effective": c, "inheritable": c if privileged else [], "permitted": c, "ambient": []}


def env_rule(pattern: str, strategy: str = "string", required: bool = False) -> dict[str, Any]:
    return {"pattern": pattern, "strategy": strategy, "required": required}


def container(**over: Any) -> dict[str, Any]:
    c = {
        "name": "web", "id": "example/web:1", "layers": [L0, L1, L2], "command": CMD,
        "env_rules": [env_rule("PATH=/usr/bin:/bin", required=True), env_rule("GREETING=hello", required=True),
                      env_rule("DEBUG=(0|1)", "re2")],
        "working_dir": "/srv",
        "mounts": [{"destination": "/data", "source": "sandbox:///volumes/data", "type": "bind",
                    "options": ["rbind", "rprivate", "rw"]},
                   {"destination": "/www", "source": "/run/parma/volumes/www", "type": "bind",
                    "options": ["rbind", "rprivate", "ro"]}],
        "exec_processes": [{"command": ["/bin/cat", "/www/index.html"], "signals": [9]}],
        "signals": [15],
        "user": {"user_idname": ANY, "group_idnames": [ANY], "umask": "0022"},
        "capabilities": caps(), "seccomp_profile_sha256": "", "allow_elevated": False, "allow_stdio_access": True,
        "no_new_privileges": False,
    }
    c.update(over)
    return c


def policy(*containers: dict[str, Any], framework: str = "0.5.0", **top: Any) -> dict[str, Any]:
    doc = {"api_version": "0.12.0", "framework_version": framework,
           "containers": list(containers) or [container()],
           "external_processes": [{"command": ["/usr/bin/uptime"], "env_rules": [env_rule("TERM=xterm")],
                                   "working_dir": "/", "allow_stdio_access": False}],
           "volumes": [{"name": "www", "target": "/run/parma/volumes/www", "device_hash": V0}],
           "allow_properties_access": False, "allow_dump_stacks": False, "allow_runtime_logging": False,
           "allow_environment_variable_dropping": False, "allow_unencrypted_scratch": False,
           "allow_capability_dropping": False}
    doc.update(top)
    return doc


def mounts_for(layers: list[str], first: int = 0) -> list[tuple[str, dict]]:
    return [("mount_device", {"target": f"/run/parma/layers/{first + i}", "device_hash": h}) for i, h in enumerate(layers)]


def overlay(cid: str = "c1", n: int = 3, first: int = 0, target: str | None = None) -> tuple[str, dict]:
    paths = [f"/run/parma/layers/{first + i}" for i in reversed(range(n))]   # top-most first
    return ("mount_overlay", {"container_id": cid, "layer_paths": paths, "target": target or f"/run/c/{cid}"})


def create(cid: str = "c1", **over: Any) -> tuple[str, dict]:
    req = {"container_id": cid, "argv": CMD, "env": ENV, "working_dir": "/srv"}
    req.update(over)
    return ("create_container", req)


ETC_MOUNTS = [{"destination": f"/etc/{n}", "source": f"/run/parma/containers/c1/etc/{n}", "type": "bind",
               "options": ["rbind", "rprivate", "rw"]} for n in ("hostname", "hosts", "resolv.conf")]
MOUNTED = [*mounts_for([L0, L1, L2]), overlay()]
CREATED = [*MOUNTED, create()]
WWW_MOUNT = {"destination": "/www", "source": "/run/parma/volumes/www", "type": "bind",
             "options": ["rbind", "rprivate", "ro"]}


def two(first: dict[str, Any], second: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A policy with two containers sharing one layer stack (ambiguous after mount_overlay)."""
    return policy(container(**first), container(**second), **top)


@dataclass
class Case:
    id: str
    request: tuple[str, dict]
    allowed: bool
    reason: str = ""
    setup: list[tuple[str, dict]] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=policy)
    results: dict[str, Any] = field(default_factory=dict)


# -- what ACI policy modules say beyond our generator: fragments, null commands, the second env-rule form,
# rules the module answers itself, layers of ignored containers, share volumes
ISSUER = "did:x509:0:sha256:AAAA::eku:1.2.3"
SIDE = container(name="side", layers=[L3], command=["/side"], env_rules=[], mounts=[], exec_processes=[],
                 working_dir="/")


def fragment(namespace: str = "side", svn: str | None = '"2"', **adds: Any) -> str:
    """A fragment module (confcom's layout) adding SIDE, or what `adds` says."""
    lines = [f"package {namespace}", "", *([f"svn := {svn}"] if svn is not None else []),
             'framework_version := "0.5.0"', ""]
    for name, value in ({"containers": [SIDE]} | adds).items():
        lines.append(f"{name} := {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def load(rego: str | None = None, issuer: str = ISSUER, feed: str = "example.com/side",
         header_svn: int | None = None) -> tuple[str, dict]:
    inp: dict[str, Any] = {"issuer": issuer, "feed": feed, "rego": fragment() if rego is None else rego}
    if header_svn is not None:
        inp["header_svn"] = header_svn
    return ("load_fragment", inp)


IMPORTS = [{"issuer": ISSUER, "feed": "example.com/side", "minimum_svn": "2", "includes": ["containers"]}]
FRAG = policy(fragments=IMPORTS)
SIDE_OVERLAY = ("mount_overlay", {"container_id": "s1", "layer_paths": ["/run/parma/layers/7"],
                                  "target": "/run/c/s1"})
SIDE_LOADED = [load(), ("mount_device", {"target": "/run/parma/layers/7", "device_hash": L3}), SIDE_OVERLAY]
NESTED = policy(fragments=[{**IMPORTS[0], "includes": ["containers", "fragments", "external_processes"]}])
INNER = {"issuer": "did:x509:0:sha256:BBBB::eku:1.2.3", "feed": "example.com/inner", "minimum_svn": 1,
         "includes": ["containers"]}
SHARE = {"destination": "/share", "source": "sandbox:///tmp/atlas/azureFileVolume/.+", "type": "bind",
         "options": ["rbind", "rshared", "rw"]}
NAMED_ENV = {"name": "LOG", "name_strategy": "string", "value": "debug|info", "value_strategy": "re2",
             "required": False}

OLD = policy(container(signals=[]), framework="0.4.0")
NEW_NO_SIGNALS = policy(container(signals=[]))
PRIV = policy(container(allow_elevated=True, capabilities=caps(True)))
WWW_USER = policy(container(user={"user_idname": {"pattern": "33", "strategy": "id"}, "group_idnames": [ANY],
                                  "umask": "0027"}))
VOLUME_PINS = [{"name": "www", "target": "/run/parma/volumes/www", "device_hash": V0},
               {"name": "cache", "target": "/run/parma/volumes/cache", "kind": "emptyDir"},
               {"name": "tmp", "target": "/run/parma/volumes/tmp", "kind": "tmpfs"},
               {"name": "cfg", "target": "/run/parma/volumes/cfg", "kind": "secret"}]
VOLUMES = policy(volumes=VOLUME_PINS)
CACHE_MOUNT = {"destination": "/cache", "source": "/run/parma/volumes/cache", "type": "bind",
               "options": ["rbind", "rprivate", "rw"]}
VOLUMES_BOUND = policy(container(mounts=[CACHE_MOUNT]), volumes=VOLUME_PINS)
V020 = {k: v for k, v in container().items() if k not in ("user", "capabilities", "seccomp_profile_sha256")}
V021 = {k: v for k, v in container().items() if k not in ("capabilities", "seccomp_profile_sha256")}

CASES = [
    # -- mount_device / unmount_device ------------------------------------------------------------------
    Case("device-layer-ok", ("mount_device", {"target": "/run/parma/layers/0", "device_hash": L0}), True),
    Case("device-unknown-hash", ("mount_device", {"target": "/run/parma/layers/0", "device_hash": L3}), False,
         "is not a layer of any container"),
    Case("device-bad-target", ("mount_device", {"target": "/etc", "device_hash": L0}), False,
         "may only be mounted at targets matching"),
    Case("device-target-anchored", ("mount_device", {"target": "/run/parma/layers/0/../../etc", "device_hash": L0}),
         False, "may only be mounted at targets"),
    Case("device-double-mount", ("mount_device", {"target": "/run/parma/layers/0", "device_hash": L1}), False,
         "already mounted", setup=mounts_for([L0])),
    Case("device-same-hash-twice", ("mount_device", {"target": "/run/parma/layers/5", "device_hash": L0}), True,
         setup=mounts_for([L0])),
    Case("device-unmount", ("unmount_device", {"target": "/run/parma/layers/0"}), True, setup=mounts_for([L0])),
    Case("device-unmount-unknown", ("unmount_device", {"target": "/run/parma/layers/9"}), False,
         "no device is mounted"),
    Case("device-unmount-twice", ("unmount_device", {"target": "/run/parma/layers/0"}), False, "no device is mounted",
         setup=[*mounts_for([L0]), ("unmount_device", {"target": "/run/parma/layers/0"})]),
    Case("device-remount-after-unmount", ("mount_device", {"target": "/run/parma/layers/0", "device_hash": L0}), True,
         setup=[*mounts_for([L0]), ("unmount_device", {"target": "/run/parma/layers/0"})]),
    Case("volume-device-ok", ("mount_device", {"target": "/run/parma/volumes/www", "device_hash": V0}), True),
    Case("volume-device-wrong-hash", ("mount_device", {"target": "/run/parma/volumes/www", "device_hash": L0}), False,
         "not the hash pinned for volume 'www'"),
    Case("volume-hash-at-layer-target", ("mount_device", {"target": "/run/parma/layers/0", "device_hash": V0}), False,
         "is not a layer"),
    # -- create_volume (an extension: every volume pinned by kind) ---------------------------------------
    Case("volume-create-ok", ("create_volume", {"target": "/run/parma/volumes/cache", "kind": "emptyDir"}), True,
         policy=VOLUMES),
    Case("volume-create-tmpfs-ok", ("create_volume", {"target": "/run/parma/volumes/tmp", "kind": "tmpfs"}), True,
         policy=VOLUMES),
    Case("volume-create-secret-ok", ("create_volume", {"target": "/run/parma/volumes/cfg", "kind": "secret"}),
         True, policy=VOLUMES),
    Case("volume-create-secret-as-emptydir", ("create_volume", {"target": "/run/parma/volumes/cache",
                                                                "kind": "secret"}), False,
         "'cache' is a emptyDir volume in the policy, not secret", policy=VOLUMES),
    Case("volume-create-emptydir-as-secret", ("create_volume", {"target": "/run/parma/volumes/cfg",
                                                                "kind": "emptyDir"}), False,
         "is a secret volume in the policy, not emptyDir", policy=VOLUMES),
    Case("volume-create-unlisted-unbound", ("create_volume", {"target": "/run/parma/volumes/other",
                                                              "kind": "secret"}), True, policy=VOLUMES),
    Case("volume-create-unlisted-bound", ("create_volume", {"target": "/run/parma/volumes/cache", "kind": "secret"}),
         False, "'web' may bind it, but the policy does not pin its kind (its volumes: www)",
         policy=policy(container(mounts=[CACHE_MOUNT]))),
    Case("volume-create-over-files", ("create_volume", {"target": "/run/parma/volumes/www", "kind": "secret"}),
         False, "is a files volume", policy=VOLUMES),
    Case("volume-create-twice", ("create_volume", {"target": "/run/parma/volumes/cache", "kind": "emptyDir"}),
         False, "a volume exists there already", policy=VOLUMES,
         setup=[("create_volume", {"target": "/run/parma/volumes/cache", "kind": "emptyDir"})]),
    Case("volume-device-over-memory-volume", ("mount_device", {"target": "/run/parma/volumes/cache",
                                                               "device_hash": L0}), False,
         "is a emptyDir volume, which the guest creates itself", policy=VOLUMES),
    Case("volume-bind-created", create(mounts=[CACHE_MOUNT]), True, policy=VOLUMES_BOUND,
         setup=[*MOUNTED, ("create_volume", {"target": "/run/parma/volumes/cache", "kind": "emptyDir"})]),
    Case("volume-bind-not-created", create(mounts=[CACHE_MOUNT]), False, "no emptyDir volume has been created there",
         setup=MOUNTED, policy=VOLUMES_BOUND),
    # -- mount_overlay / unmount_overlay ----------------------------------------------------------------
    Case("overlay-ok", overlay(), True, setup=mounts_for([L0, L1, L2])),
    Case("overlay-order-swapped", ("mount_overlay", {"container_id": "c1", "target": "/run/c/c1",
                                                     "layer_paths": ["/run/parma/layers/0", "/run/parma/layers/1",
                                                                     "/run/parma/layers/2"]}),
         False, "different order", setup=mounts_for([L0, L1, L2])),
    Case("overlay-one-extra", overlay(n=4), False, "1 extra layer", setup=mounts_for([L0, L1, L2, L0])),
    Case("overlay-extra-foreign", overlay(n=4), False, "extra layer",
         setup=[*mounts_for([L0, L1, L2]), ("mount_device", {"target": "/run/parma/layers/3", "device_hash": L3})],
         policy=policy(container(), container(name="other", layers=[L3]))),
    Case("overlay-one-missing", overlay(n=2), False, "1 missing layer", setup=mounts_for([L0, L1])),
    Case("overlay-path-not-mounted", overlay(n=3), False, "has no device mounted", setup=mounts_for([L0, L1])),
    Case("overlay-after-device-unmount", overlay(), False, "has no device mounted",
         setup=[*mounts_for([L0, L1, L2]), ("unmount_device", {"target": "/run/parma/layers/1"})]),
    Case("overlay-twice-same-container", overlay(target="/run/c/other"), False, "already has an overlay",
         setup=MOUNTED),
    Case("overlay-target-in-use", overlay(cid="c2", target="/run/c/c1"), False, "already has an overlay",
         setup=MOUNTED),
    Case("overlay-second-container", overlay(cid="c2"), True, setup=MOUNTED),
    Case("overlay-unmount", ("unmount_overlay", {"target": "/run/c/c1"}), True, setup=MOUNTED),
    Case("overlay-unmount-unknown", ("unmount_overlay", {"target": "/run/c/nope"}), False,
         "no overlay is mounted"),
    # -- scratch ------------------------------------------------------------------------------------------
    Case("scratch-encrypted", ("scratch_mount", {"target": "/run/s/1", "encrypted": True}), True),
    Case("scratch-unencrypted-refused", ("scratch_mount", {"target": "/run/s/1"}), False,
         "requires encrypted scratch"),
    Case("scratch-unencrypted-allowed", ("scratch_mount", {"target": "/run/s/1", "encrypted": False}), True,
         policy=policy(allow_unencrypted_scratch=True)),
    Case("scratch-double", ("scratch_mount", {"target": "/run/s/1", "encrypted": True}), False,
         "already mounted", setup=[("scratch_mount", {"target": "/run/s/1", "encrypted": True})]),
    Case("scratch-unmount", ("scratch_unmount", {"target": "/run/s/1"}), True,
         setup=[("scratch_mount", {"target": "/run/s/1", "encrypted": True})]),
    Case("scratch-unmount-unknown", ("scratch_unmount", {"target": "/run/s/1"}), False, "no scratch is mounted"),
    # -- create_container: argv, working_dir ------------------------------------------------------------------
    Case("create-ok", create(), True, setup=MOUNTED,
         results={"env_list": ENV, "allow_stdio_access": True,
                  "caps_list": {k: list(v) for k, v in caps().items()}}),
    Case("create-argv-extra-arg", create(argv=[*CMD, "-v"]), False, "argv", setup=MOUNTED),
    Case("create-argv-other-binary", create(argv=["/bin/sh", "-c", "id"]), False,
         "does not match command", setup=MOUNTED),
    Case("create-argv-empty", create(argv=[]), False, "does not match command", setup=MOUNTED),
    Case("create-working-dir", create(working_dir="/"), False, "working_dir '/' does not match '/srv'",
         setup=MOUNTED),
    Case("create-no-overlay", create(), False, "no overlay has been mounted", setup=mounts_for([L0, L1, L2])),
    Case("create-twice", create(), False, "already created", setup=CREATED),
    Case("create-after-shutdown", create(), False, "no overlay has been mounted for it since it was shut down",
         setup=[*CREATED, ("shutdown_container", {"container_id": "c1"})]),
    # A restart: the shut-down id is created again after a fresh overlay, checked exactly like the first time.
    Case("create-after-shutdown-and-new-overlay", create(), True,
         setup=[*CREATED, ("shutdown_container", {"container_id": "c1"}), ("unmount_overlay", {"target": "/run/c/c1"}),
                overlay()], results={"env_list": ENV, "allow_stdio_access": True}),
    Case("create-again-is-checked-like-the-first", create(argv=["/bin/sh"]), False, "does not match command",
         setup=[*CREATED, ("shutdown_container", {"container_id": "c1"}), ("unmount_overlay", {"target": "/run/c/c1"}),
                overlay()]),
    Case("create-again-needs-the-old-overlay-gone", overlay(), False, "already has an overlay",
         setup=[*CREATED, ("shutdown_container", {"container_id": "c1"})]),
    Case("exec-after-re-create", ("exec_in_container", {"container_id": "c1", "argv": ["/bin/cat", "/www/index.html"],
                                                        "env": ENV, "working_dir": "/srv"}), True,
         setup=[*CREATED, ("shutdown_container", {"container_id": "c1"}), ("unmount_overlay", {"target": "/run/c/c1"}),
                overlay(), create()]),
    Case("shutdown-twice", ("shutdown_container", {"container_id": "c1"}), True,
         setup=[*CREATED, ("shutdown_container", {"container_id": "c1"})]),
    Case("signal-after-shutdown", ("signal_container_process", {"container_id": "c1", "signal": 15, "is_init": True}),
         False, "has been shut down", setup=[*CREATED, ("shutdown_container", {"container_id": "c1"})]),
    # -- create_container: the container's own /etc files (default mounts, as hcsshim adds them) -------------
    Case("create-with-etc-files", create(mounts=ETC_MOUNTS), True, setup=MOUNTED),
    Case("create-etc-files-of-another-container", create(mounts=[{**ETC_MOUNTS[1], "source": ETC_MOUNTS[1]["source"]
                                                                  .replace("/c1/", "/c2/")}]), False,
         "mount at '/etc/hosts': source", setup=MOUNTED),
    Case("create-etc-files-other-options", create(mounts=[{**ETC_MOUNTS[2], "options": ["rbind", "rshared", "rw"]}]),
         False, "mount at '/etc/resolv.conf': options", setup=MOUNTED),
    # -- create_container: env --------------------------------------------------------------------------------
    Case("env-ld-preload", create(env=[*ENV, "LD_PRELOAD=/x.so"]), False,
         "env 'LD_PRELOAD=/x.so' matches no env_rule", setup=MOUNTED),
    Case("env-required-missing", create(env=["PATH=/usr/bin:/bin"]), False,
         "required env_rule 'GREETING=hello' is matched by no env", setup=MOUNTED),
    Case("env-string-exact", create(env=["PATH=/usr/bin:/bin", "GREETING=hello!"]), False,
         "'GREETING=hello!' matches no env_rule", setup=MOUNTED),
    Case("env-re2-alternative-ok", create(env=[*ENV, "DEBUG=1"]), True, setup=MOUNTED),
    Case("env-re2-group-anchored", create(env=[*ENV, "DEBUG=10"]), False, "matches no env_rule",
         setup=MOUNTED),
    Case("env-dotstar-newline", create(env=[*ENV, "A=1\nB=2"]), False, "matches no env_rule", setup=MOUNTED,
         policy=policy(container(env_rules=[*container()["env_rules"], env_rule("A=.*", "re2")]))),
    Case("env-dotstar-ok", create(env=[*ENV, "A=1"]), True, setup=MOUNTED,
         policy=policy(container(env_rules=[*container()["env_rules"], env_rule("A=.*", "re2")]))),
    Case("env-alternation-anchored-suffix", create(env=[*ENV, "A=1;X=2"]), False, "matches no env_rule",
         setup=MOUNTED, policy=policy(container(env_rules=[*container()["env_rules"], env_rule("A=1|B=1", "re2")]))),
    Case("env-alternation-anchored-prefix", create(env=[*ENV, "X=B=1"]), False, "matches no env_rule",
         setup=MOUNTED, policy=policy(container(env_rules=[*container()["env_rules"], env_rule("A=1|B=1", "re2")]))),
    Case("env-alternation-ok", create(env=[*ENV, "B=1"]), True,
         setup=MOUNTED, policy=policy(container(env_rules=[*container()["env_rules"], env_rule("A=1|B=1", "re2")]))),
    # RE2 semantics and linear time (regex.py): a backtracker would never finish the first two.
    Case("env-re2-exponential-value-denied", create(env=[*ENV, "A" * 100_000 + "!"]), False, "matches no env_rule",
         setup=MOUNTED, policy=policy(container(env_rules=[*container()["env_rules"], env_rule("(A|AA)+=1", "re2")]))),
    Case("env-re2-quadratic-value-denied", create(env=[*ENV, "FABRIC_" + "=" * 100_000 + "\n"]), False,
         "matches no env_rule", setup=MOUNTED,
         policy=policy(container(env_rules=[*container()["env_rules"], env_rule("FABRIC_.+=.+", "re2")]))),
    Case("env-re2-inline-flag-group", create(env=[*ENV, "Fabric_NodeName=n0"]), True, setup=MOUNTED,
         policy=policy(container(env_rules=[*container()["env_rules"], env_rule("((?i)FABRIC)_.+=.+", "re2")]))),
    Case("env-trailing-newline", create(env=["PATH=/usr/bin:/bin", "GREETING=hello", "DEBUG=1\n"]), False,
         "matches no env_rule", setup=MOUNTED),
    Case("env-dropping-drops", create(env=[*ENV, "LD_PRELOAD=/x.so"]), True, setup=MOUNTED,
         policy=policy(allow_environment_variable_dropping=True), results={"env_list": ENV}),
    Case("env-dropping-keeps-required", create(env=["PATH=/usr/bin:/bin", "LD_PRELOAD=/x.so"]), False,
         "required env_rule 'GREETING=hello'", setup=MOUNTED, policy=policy(allow_environment_variable_dropping=True)),
    Case("env-dropping-ambiguous", create(env=["X=1", "Y=1"]), False, "env after dropping is ambiguous",
         setup=MOUNTED, policy=two({"env_rules": [env_rule("X=1")]}, {"name": "web2", "env_rules": [env_rule("Y=1")]},
                                   allow_environment_variable_dropping=True)),
    # -- create_container: mounts ------------------------------------------------------------------------------
    Case("mount-sandbox-ok", create(mounts=[{"destination": "/data", "source": "/run/parma/sandbox/volumes/data",
                                             "type": "bind", "options": ["rbind", "rw", "rprivate"]}]),
         True, setup=MOUNTED),
    Case("mount-source-mismatch", create(mounts=[{"destination": "/data", "source": "/run/parma/sandbox/volumes/other",
                                                  "type": "bind", "options": ["rbind", "rprivate", "rw"]}]),
         False, "source '/run/parma/sandbox/volumes/other' does not match", setup=MOUNTED),
    Case("mount-source-anchored", create(mounts=[{"destination": "/data",
                                                  "source": "/run/parma/sandbox/volumes/data/../../../etc",
                                                  "type": "bind", "options": ["rbind", "rprivate", "rw"]}]),
         False, "does not match 'sandbox:///volumes/data'", setup=MOUNTED),
    Case("mount-destination-mismatch", create(mounts=[{"destination": "/etc", "source": "/run/parma/sandbox/volumes/data",
                                                       "type": "bind", "options": ["rbind", "rprivate", "rw"]}]),
         False, "matches no allowed mount destination", setup=MOUNTED),
    Case("mount-options-mismatch", create(mounts=[{**WWW_MOUNT, "options": ["rbind", "rprivate", "rw"]}]),
         False, "options ['rbind', 'rprivate', 'rw'] are not", setup=[*MOUNTED, ("mount_device", {
             "target": "/run/parma/volumes/www", "device_hash": V0})]),
    Case("mount-options-extra", create(mounts=[{**WWW_MOUNT, "options": ["rbind", "rprivate", "ro", "suid"]}]),
         False, "options", setup=[*MOUNTED, ("mount_device", {"target": "/run/parma/volumes/www", "device_hash": V0})]),
    Case("mount-type-mismatch", create(mounts=[{"destination": "/data", "source": "/run/parma/sandbox/volumes/data",
                                                "type": "tmpfs", "options": ["rbind", "rprivate", "rw"]}]),
         False, "type 'tmpfs' is not 'bind'", setup=MOUNTED),
    Case("mount-default-proc", create(mounts=[{"destination": "/proc", "source": "proc", "type": "proc",
                                               "options": ["nosuid", "noexec", "nodev"]}]), True, setup=MOUNTED),
    Case("mount-privileged-sysfs-refused", create(mounts=[{"destination": "/sys", "source": "sysfs",
                                                           "type": "sysfs",
                                                           "options": ["nosuid", "noexec", "nodev", "rw"]}]),
         False, "options", setup=MOUNTED),
    Case("mount-privileged-sysfs-elevated", create(privileged=True, mounts=[{
        "destination": "/sys", "source": "sysfs", "type": "sysfs", "options": ["nosuid", "noexec", "nodev", "rw"]}]),
         True, setup=MOUNTED, policy=PRIV),
    Case("volume-bind-pinned", create(mounts=[WWW_MOUNT]), True,
         setup=[*MOUNTED, ("mount_device", {"target": "/run/parma/volumes/www", "device_hash": V0})]),
    Case("volume-bind-not-mounted", create(mounts=[WWW_MOUNT]), False, "pinned device is not mounted there",
         setup=MOUNTED),
    # -- create_container: privileges, user, seccomp ------------------------------------------------------------
    Case("privileged-escalation", create(privileged=True, capabilities=caps(True)), False,
         "privileged is requested but allow_elevated is false", setup=MOUNTED),
    Case("privileged-allowed", create(privileged=True, capabilities=caps(True)), True, setup=MOUNTED, policy=PRIV),
    Case("privileged-default-caps", create(privileged=True), True, setup=MOUNTED, policy=PRIV,
         results={"caps_list": {k: list(v) for k, v in caps(True).items()}}),
    Case("caps-extra", create(capabilities={**caps(), "bounding": [*caps()["bounding"], "CAP_SYS_ADMIN"]}), False,
         "capabilities.bounding: CAP_SYS_ADMIN not allowed", setup=MOUNTED),
    Case("caps-missing", create(capabilities={**caps(), "effective": caps()["effective"][1:]}), False,
         "capabilities.effective: missing CAP_CHOWN", setup=MOUNTED),
    Case("caps-duplicate", create(capabilities={**caps(), "ambient": ["CAP_KILL", "CAP_KILL"]}), False,
         "capabilities.ambient", setup=MOUNTED),
    Case("caps-dropping-drops", create(capabilities={**caps(), "bounding": [*caps()["bounding"], "CAP_SYS_ADMIN"]}),
         True, setup=MOUNTED, policy=policy(allow_capability_dropping=True),
         results={"caps_list": {k: list(v) for k, v in caps().items()}}),
    Case("caps-dropping-still-needs-all", create(capabilities={**caps(), "effective": caps()["effective"][1:]}),
         False, "missing CAP_CHOWN", setup=MOUNTED, policy=policy(allow_capability_dropping=True)),
    Case("nnp-required", create(), False, "no_new_privileges is false but the policy requires true",
         setup=MOUNTED, policy=policy(container(no_new_privileges=True))),
    Case("nnp-extra-is-fine", create(no_new_privileges=True), True, setup=MOUNTED),
    Case("user-name-mismatch", create(user={"id": 0, "name": "root"}), False, "user 'root' (id 0) does not match",
         setup=MOUNTED, policy=policy(container(user={"user_idname": {"pattern": "www", "strategy": "name"},
                                                      "group_idnames": [ANY], "umask": "0022"}))),
    Case("user-id-match", create(user={"id": 33, "name": "www"}), True, setup=MOUNTED,
         policy=policy(container(user={"user_idname": {"pattern": "33", "strategy": "id"},
                                       "group_idnames": [ANY], "umask": "0022"}))),
    Case("user-re2-anchored", create(user={"id": 1, "name": "wwwroot"}), False, "does not match user_idname",
         setup=MOUNTED, policy=policy(container(user={"user_idname": {"pattern": "www|web", "strategy": "re2"},
                                                      "group_idnames": [ANY], "umask": "0022"}))),
    Case("group-mismatch", create(groups=[{"id": 0, "name": "root"}]), False, "group 'root' (id 0) matches no",
         setup=MOUNTED, policy=policy(container(user={"user_idname": ANY, "umask": "0022",
                                                      "group_idnames": [{"pattern": "33", "strategy": "id"}]}))),
    Case("umask-mismatch", create(umask="0000"), False, "umask '0000' does not match '0022'", setup=MOUNTED),
    Case("seccomp-mismatch", create(seccomp_profile_sha256="e" * 64), False, "seccomp_profile_sha256",
         setup=MOUNTED),
    # -- create_container: candidate sets ------------------------------------------------------------------------
    Case("stdio-ambiguous", create(), False, "disagree on allow_stdio_access", setup=MOUNTED,
         policy=two({}, {"name": "web2", "allow_stdio_access": False})),
    Case("stdio-narrowed-by-command", create(argv=["/bin/other"]), True, setup=MOUNTED,
         policy=two({}, {"name": "web2", "command": ["/bin/other"], "allow_stdio_access": False}),
         results={"allow_stdio_access": False}),
    Case("candidates-none-fit", create(argv=["/bin/third"]), False, "no candidate allows it", setup=MOUNTED,
         policy=two({}, {"name": "web2", "command": ["/bin/other"]})),
    # -- exec_in_container -------------------------------------------------------------------------------------
    Case("exec-listed", ("exec_in_container", {"container_id": "c1", "argv": ["/bin/cat", "/www/index.html"],
                                               "env": ENV, "working_dir": "/srv"}), True, setup=CREATED,
         results={"env_list": ENV, "allow_stdio_access": True}),
    Case("exec-unlisted", ("exec_in_container", {"container_id": "c1", "argv": ["/bin/sh"], "env": ENV,
                                                 "working_dir": "/srv"}), False,
         "argv ['/bin/sh'] is not an exec_process", setup=CREATED),
    Case("exec-before-create", ("exec_in_container", {"container_id": "c1", "argv": ["/bin/cat", "/www/index.html"],
                                                      "env": ENV, "working_dir": "/srv"}), False,
         "has not been created", setup=MOUNTED),
    Case("exec-after-shutdown", ("exec_in_container", {"container_id": "c1", "argv": ["/bin/cat", "/www/index.html"],
                                                       "env": ENV, "working_dir": "/srv"}), False,
         "has been shut down", setup=[*CREATED, ("shutdown_container", {"container_id": "c1"})]),
    Case("exec-working-dir", ("exec_in_container", {"container_id": "c1", "argv": ["/bin/cat", "/www/index.html"],
                                                    "env": ENV, "working_dir": "/tmp"}), False,
         "working_dir '/tmp'", setup=CREATED),
    Case("exec-ld-preload", ("exec_in_container", {"container_id": "c1", "argv": ["/bin/cat", "/www/index.html"],
                                                   "env": [*ENV, "LD_PRELOAD=/x.so"], "working_dir": "/srv"}),
         False, "LD_PRELOAD", setup=CREATED),
    Case("exec-narrows-then-signal", ("signal_container_process", {"container_id": "c1", "signal": 10,
                                                                   "is_init": True}),
         False, "signal 10 to the init process is not in signals [15]",
         setup=[*MOUNTED, create(), ("exec_in_container", {"container_id": "c1", "argv": ["/bin/cat",
                                                                                          "/www/index.html"],
                                                           "env": ENV, "working_dir": "/srv"})],
         policy=two({}, {"name": "web2", "signals": [10], "exec_processes": []})),
    Case("exec-inherits-container-identity", ("exec_in_container", {
        "container_id": "c1", "argv": ["/bin/cat", "/www/index.html"], "env": ENV, "working_dir": "/srv"}), True,
         setup=[*MOUNTED, create(user={"id": 33, "name": "www"}, umask="0027")], policy=WWW_USER),
    Case("exec-explicit-identity-checked", ("exec_in_container", {
        "container_id": "c1", "argv": ["/bin/cat", "/www/index.html"], "env": ENV, "working_dir": "/srv",
        "user": {"id": 0, "name": "root"}}), False, "user 'root' (id 0) does not match user_idname id '33'",
         setup=[*MOUNTED, create(user={"id": 33, "name": "www"}, umask="0027")], policy=WWW_USER),
    # -- exec_external -------------------------------------------------------------------------------------------
    Case("external-listed", ("exec_external", {"argv": ["/usr/bin/uptime"], "env": ["TERM=xterm"]}), True,
         results={"allow_stdio_access": False, "env_list": ["TERM=xterm"]}),
    Case("external-unlisted", ("exec_external", {"argv": ["/bin/sh"]}), False, "argv ['/bin/sh'] is not"),
    Case("external-env", ("exec_external", {"argv": ["/usr/bin/uptime"], "env": ["LD_PRELOAD=/x.so"]}), False,
         "matches no env_rule"),
    Case("external-none", ("exec_external", {"argv": ["/usr/bin/uptime"]}), False, "allows no external processes",
         policy=policy(external_processes=[])),
    # -- signal_container_process --------------------------------------------------------------------------------
    Case("signal-init-listed", ("signal_container_process", {"container_id": "c1", "signal": "SIGTERM",
                                                             "is_init": True}), True, setup=CREATED),
    Case("signal-init-unlisted", ("signal_container_process", {"container_id": "c1", "signal": 9,
                                                               "is_init": True}), False,
         "signal 9 to the init process is not in signals [15]", setup=CREATED),
    Case("signal-exec-listed", ("signal_container_process", {"container_id": "c1", "signal": 9,
                                                             "argv": ["/bin/cat", "/www/index.html"]}), True,
         setup=CREATED),
    Case("signal-exec-unlisted-signal", ("signal_container_process", {"container_id": "c1", "signal": 15,
                                                                      "argv": ["/bin/cat", "/www/index.html"]}),
         False, "signal 15 is not in the signals [9]", setup=CREATED),
    Case("signal-exec-unlisted-process", ("signal_container_process", {"container_id": "c1", "signal": 9,
                                                                       "argv": ["/bin/sh"]}),
         False, "is not an exec_process", setup=CREATED),
    Case("signal-before-create", ("signal_container_process", {"container_id": "c1", "signal": 15,
                                                               "is_init": True}), False, "has not been created",
         setup=MOUNTED),
    Case("signal-old-framework-kill", ("signal_container_process", {"container_id": "c1", "signal": 9,
                                                                    "is_init": True}), True,
         setup=CREATED, policy=OLD),
    Case("signal-old-framework-term", ("signal_container_process", {"container_id": "c1", "signal": 15,
                                                                    "is_init": True}), True,
         setup=CREATED, policy=OLD),
    Case("signal-old-framework-other", ("signal_container_process", {"container_id": "c1", "signal": 1,
                                                                     "is_init": True}), False,
         "not in signals [9, 15]", setup=CREATED, policy=OLD),
    Case("signal-old-framework-exec-no-defaults", ("signal_container_process", {
        "container_id": "c1", "signal": 15, "argv": ["/bin/cat", "/www/index.html"]}), False,
         "signal 15 is not in the signals [9]", setup=CREATED, policy=OLD),
    Case("signal-new-framework-no-defaults", ("signal_container_process", {"container_id": "c1", "signal": 9,
                                                                           "is_init": True}), False,
         "not in signals []", setup=CREATED, policy=NEW_NO_SIGNALS),
    # -- shutdown_container --------------------------------------------------------------------------------------
    Case("shutdown-ok", ("shutdown_container", {"container_id": "c1"}), True, setup=CREATED),
    Case("shutdown-unknown", ("shutdown_container", {"container_id": "zz"}), False, "has not been created",
         setup=CREATED),
    # -- host access ---------------------------------------------------------------------------------------------
    Case("properties-denied", ("get_properties", {}), False, "allow_properties_access is false"),
    Case("properties-allowed", ("get_properties", {}), True, policy=policy(allow_properties_access=True)),
    Case("stacks-denied", ("dump_stacks", {}), False, "allow_dump_stacks is false"),
    Case("stacks-allowed", ("dump_stacks", {}), True, policy=policy(allow_dump_stacks=True)),
    Case("logging-denied", ("runtime_logging", {}), False, "allow_runtime_logging is false"),
    Case("logging-allowed", ("runtime_logging", {}), True, policy=policy(allow_runtime_logging=True)),
    # -- version-dependent defaults for older framework_versions -------------------------------------------------
    Case("v0.2.0-any-user", create(user={"id": 65534, "name": "nobody"}, umask="0022"), True, setup=MOUNTED,
         policy=policy(V020, framework="0.2.0")),
    Case("v0.2.0-default-umask", create(umask="0077"), False, "umask '0077' does not match '0022'", setup=MOUNTED,
         policy=policy(V020, framework="0.2.0")),
    Case("v0.2.1-dynamic-caps", create(), True, setup=MOUNTED, policy=policy(V021, framework="0.2.1")),
    Case("v0.2.1-dynamic-caps-privileged", create(privileged=True, capabilities=caps(True)), True, setup=MOUNTED,
         policy=policy({**V021, "allow_elevated": True}, framework="0.2.1")),
    Case("v0.2.1-dynamic-caps-extra", create(capabilities=caps(True)), False, "not allowed", setup=MOUNTED,
         policy=policy({**V021, "allow_elevated": True}, framework="0.2.1")),
    Case("v0.2.0-nnp-default-false", create(), True, setup=MOUNTED,
         policy=policy({k: v for k, v in V020.items() if k != "no_new_privileges"}, framework="0.1.0")),
    # -- fragments (load_fragment) -------------------------------------------------------------------------------
    Case("fragment-accepted", load(), True, policy=FRAG),
    Case("fragment-unknown-issuer", load(issuer="did:x509:0:sha256:CCCC::eku:1.2.3"), False,
         "issuer did:x509:0:sha256:CCCC::eku:1.2.3 is not one the policy accepts fragments from", policy=FRAG),
    Case("fragment-unknown-feed", load(feed="example.com/other"), False,
         "feed 'example.com/other' is not one the policy accepts", policy=FRAG),
    Case("fragment-svn-too-low", load(fragment(svn='"1"')), False, "its SVN 1 is below the minimum_svn 2",
         policy=FRAG),
    Case("fragment-header-svn-too-low", load(fragment(svn=None), header_svn=1), False,
         "the envelope's SVN 1 is below the minimum_svn 2", policy=FRAG),
    Case("fragment-header-svn-differs", load(header_svn=3), False,
         "the fragment's svn '2' differs from the envelope's SVN 3", policy=FRAG),
    Case("fragment-without-svn", load(fragment(svn=None)), False, "neither the fragment nor its envelope",
         policy=FRAG),
    Case("fragment-reserved-namespace", load(fragment("policy")), False, "cannot be a fragment's namespace",
         policy=FRAG),
    Case("fragment-no-imports", load(), False, "(it names: none)"),
    Case("fragment-layer-before-load", ("mount_device", {"target": "/run/parma/layers/7", "device_hash": L3}),
         False, "not a layer of any container in the policy", policy=FRAG),
    Case("fragment-layer-after-load", ("mount_device", {"target": "/run/parma/layers/7", "device_hash": L3}), True,
         setup=[load()], policy=FRAG),
    Case("fragment-container-created", create("s1", argv=["/side"], env=[], working_dir="/"), True,
         setup=SIDE_LOADED, policy=FRAG),
    Case("fragment-container-other-argv", create("s1", argv=["/bin/sh"], env=[], working_dir="/"), False,
         "argv ['/bin/sh'] does not match command ['/side']", setup=SIDE_LOADED, policy=FRAG),
    Case("fragment-nested-import", load(fragment("inner"), issuer=INNER["issuer"], feed=INNER["feed"]), True,
         setup=[load(fragment(fragments=[INNER]))], policy=NESTED),
    Case("fragment-nested-not-included", load(fragment("inner"), issuer=INNER["issuer"], feed=INNER["feed"]), False,
         "is not one the policy accepts", setup=[load(fragment(fragments=[INNER]))], policy=FRAG),
    Case("fragment-external-process", ("exec_external", {"argv": ["/bin/date"], "env": [], "working_dir": "/"}),
         True, setup=[load(fragment(external_processes=[{"command": ["/bin/date"], "env_rules": [],
                                                          "working_dir": "/", "allow_stdio_access": True}]))],
         policy=NESTED, results={"allow_stdio_access": True}),
    # -- null commands, the second env-rule form ----------------------------------------------------------------
    Case("command-null-never-matches", create(), False, "null (which matches no argv)", setup=MOUNTED,
         policy=policy(container(command=None))),
    Case("exec-command-null-never-matches", ("exec_in_container", {"container_id": "c1", "argv": ["/bin/cat"]}),
         False, "is not an exec_process", setup=CREATED,
         policy=policy(container(exec_processes=[{"command": None, "signals": []}]))),
    Case("env-name-value-form", create(env=[*ENV, "LOG=info"]), True, setup=MOUNTED,
         policy=policy(container(env_rules=[*container()["env_rules"], NAMED_ENV]))),
    Case("env-name-value-form-value", create(env=[*ENV, "LOG=trace"]), False, "env 'LOG=trace' matches no env_rule",
         setup=MOUNTED, policy=policy(container(env_rules=[*container()["env_rules"], NAMED_ENV]))),
    Case("env-name-value-form-name", create(env=[*ENV, "LOGS=info"]), False, "env 'LOGS=info' matches no env_rule",
         setup=MOUNTED, policy=policy(container(env_rules=[*container()["env_rules"], NAMED_ENV]))),
    # -- rules the module answers itself ------------------------------------------------------------------------
    Case("rule-constant-allows", ("dump_stacks", {}), True, policy=policy(rules={"dump_stacks": {"allowed": True}})),
    Case("rule-constant-denies", ("mount_device", {"target": "/run/parma/layers/0", "device_hash": L0}), False,
         "the policy answers every mount_device request with {'allowed': False}",
         policy=policy(rules={"mount_device": {"allowed": False}})),
    Case("rule-missing", ("exec_external", {"argv": ["/usr/bin/uptime"], "env": ["TERM=xterm"]}), False,
         "rule for exec_external is missing from policy", policy=policy(rules={"exec_external": None})),
    Case("rule-absent-predating-api", ("get_properties", {}), True,
         policy=policy(api_version="0.6.0", rules={"get_properties": None})),
    Case("rule-constant-create-results", create(env=["A=1"]), True, setup=MOUNTED,
         policy=policy(rules={"create_container": {"allowed": True, "env_list": ["A=1", "B=2"]}}),
         results={"env_list": ["A=1"], "allow_stdio_access": False}),
    Case("rule-constant-create-records-nothing", ("exec_in_container", {"container_id": "c1", "argv": ["/bin/cat",
                                                                                                     "/www/index.html"]}),
         False, "it has not been created", setup=[*MOUNTED, create()],
         policy=policy(rules={"create_container": {"allowed": True}})),
    # An exec that leaves env out inherits the container's: a constant env_list narrows that one.
    Case("rule-constant-exec-inherited-env", ("exec_in_container", {"container_id": "c1",
                                                                    "argv": ["/bin/cat", "/www/index.html"]}),
         True, setup=CREATED, results={"env_list": ["PATH=/usr/bin:/bin"]},
         policy=policy(rules={"exec_in_container": {"allowed": True, "env_list": ["PATH=/usr/bin:/bin"]}})),
    Case("rule-constant-exec-inherited-env-unrecorded",
         ("exec_in_container", {"container_id": "c9", "argv": ["/x"]}),
         True, results={"env_list": []},
         policy=policy(rules={"exec_in_container": {"allowed": True, "env_list": ["PATH=/usr/bin:/bin"]}})),
    # -- layers of containers the framework ignores, share volumes ----------------------------------------------
    Case("ignored-container-layer-mounts", ("mount_device", {"target": "/run/parma/layers/7", "device_hash": L3}),
         True, policy=policy(ignored_container_layers=[L3])),
    Case("ignored-container-no-overlay", SIDE_OVERLAY, False, "matches no container",
         setup=[("mount_device", {"target": "/run/parma/layers/7", "device_hash": L3})],
         policy=policy(ignored_container_layers=[L3])),
    Case("share-volume-device", ("mount_device", {"target": "/run/parma/volumes/share", "device_hash": L3}), True,
         policy=policy(container(mounts=[SHARE]))),
    Case("share-volume-device-odd-target", ("mount_device", {"target": "/run/parma/volumes/../../etc",
                                                             "device_hash": L3}), False,
         "not a layer of any container", policy=policy(container(mounts=[SHARE]))),
    Case("share-volume-device-not-allowed", ("mount_device", {"target": "/run/parma/volumes/share",
                                                              "device_hash": L3}), False,
         "not a layer of any container"),
]


def engine_for(doc: dict[str, Any]) -> PolicyEngine:
    return PolicyEngine.from_bytes(json.dumps(doc).encode())



def test_table_is_large_and_covers_every_enforcement_point() -> None:
    from sandbox.shared.policy import EnforcementPoint
    assert len(CASES) >= 80
    assert {c.request[0] for c in CASES} == set(EnforcementPoint.__members__)
    assert len({c.id for c in CASES}) == len(CASES)
    assert any(c.allowed for c in CASES) and any(not c.allowed for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case) -> None:
    engine = engine_for(case.policy)
    for ep, inp in case.setup:
        d = engine.enforce_json(ep, inp)
        assert d.allowed, f"setup step {ep} {inp} was denied: {d.reason}"
    ep, inp = case.request
    d = engine.enforce_json(ep, inp)
    assert d.allowed == case.allowed, d.reason
    if case.allowed:
        assert d.reason == ""
    else:
        assert d.reason.startswith(f"{ep} denied")
        assert case.reason in d.reason
        assert d.changes == ()
    for key, value in case.results.items():
        assert d.results[key] == value


# ---------------------------------------------------------------------------------------------------------
# Transactions


def test_action_runs_only_when_allowed_and_state_commits_after_it() -> None:
    engine = engine_for(policy())
    seen = []

    def action(decision):
        seen.append(decision)
        assert engine.snapshot()["devices"] == {}, "state must not change before the action finished"

    d = engine.enforce_json("mount_device", {"target": "/run/parma/layers/0", "device_hash": L0}, action)
    assert d.allowed and seen == [d]
    assert engine.snapshot()["devices"] == {"/run/parma/layers/0": L0}
    denied = engine.enforce_json("mount_device", {"target": "/run/parma/layers/1", "device_hash": L3}, action)
    assert not denied.allowed and seen == [d]


def test_failed_action_rolls_back_and_propagates() -> None:
    engine = engine_for(policy())
    for ep, inp in MOUNTED:
        engine.enforce_json(ep, inp)
    before = engine.snapshot()

    class Boom(Exception):
        pass

    def fail(_decision):
        raise Boom("crun create failed")

    with pytest.raises(Boom):
        engine.enforce_json(*create(), action=fail)
    assert engine.snapshot() == before
    # nothing was recorded, so the same request is still allowed afterwards
    assert engine.enforce_json(*create()).allowed
    assert engine.snapshot()["started"] == {"c1": False}


def test_failed_unmount_keeps_the_device_tracked() -> None:
    engine = engine_for(policy())
    engine.enforce_json("mount_device", {"target": "/run/parma/layers/0", "device_hash": L0})

    def fail(_d):
        raise OSError("device busy")

    with pytest.raises(OSError):
        engine.enforce_json("unmount_device", {"target": "/run/parma/layers/0"}, fail)
    assert not engine.enforce_json("mount_device", {"target": "/run/parma/layers/0", "device_hash": L0}).allowed


def test_enforce_inside_an_action_is_refused() -> None:
    engine = engine_for(policy(allow_properties_access=True))

    def nested(_d):
        engine.enforce_json("get_properties", {})

    with pytest.raises(StateError, match="inside the action"):
        engine.enforce_json("get_properties", {}, nested)
    assert engine.enforce_json("get_properties", {}).allowed


# ---------------------------------------------------------------------------------------------------------
# Malformed requests


@pytest.mark.parametrize(("ep", "inp", "message"), [
    ("mount_devices", {}, "unknown enforcement point 'mount_devices' (did you mean 'mount_device'?)"),
    ("mount_device", {"target": "/run/parma/layers/0"}, "mount_device: input.device_hash: required field is missing"),
    ("create_container", {"container_id": "c1", "argList": []}, "input.argList: unknown field (did you mean 'argv'?)"),
    ("create_container", {"container_id": "c1", "argv": "/bin/sh"}, "input.argv: expected an array of strings"),
    ("create_container", {"container_id": "c1", "argv": ["/x"], "mounts": [{"destination": "/x"}]},
     "input.mounts[0].source: required field is missing"),
    ("signal_container_process", {"container_id": "c1", "signal": "SIGNOPE"}, "expected a signal number or name"),
    ("scratch_mount", {"target": "/x", "encrypted": "yes"}, "input.encrypted: expected true or false"),
    ("get_properties", {"x": 1}, "input.x: unknown field"),
])
def test_malformed_requests_are_input_errors(ep: str, inp: dict, message: str) -> None:
    engine = engine_for(policy())
    with pytest.raises(PolicyInputError) as exc:
        engine.enforce_json(ep, inp)
    assert message in exc.value.message
    assert exc.value.hint


def test_engine_records_the_policy_hash_of_the_exact_bytes() -> None:
    import hashlib
    raw = canonical_bytes(policy())
    engine = PolicyEngine.from_bytes(raw)
    assert engine.hash == hashlib.sha256(raw).hexdigest()
