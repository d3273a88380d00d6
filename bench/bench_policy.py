"""Decision latency of the policy engine, per enforcement point, on a 20-container policy.

Each sample is one decision as the guest agent makes it: building the engine's typed input from the
request's fields (sandbox/shared/policy/inputs.py), then engine.enforce() (decision, explanation,
commit). With --from-json each sample decodes the input from its JSON form instead, as `policy check`
does (and as the engine itself did before inputs were typed). Prints one JSON document: median, p99
and max in microseconds per point, as wall time and as the thread's CPU time (which leaves out time
spent waiting for a CPU on a busy host), the policy load time, the load average, and whether every
p99 is under the 200 µs goal. No reference tool runs here: ACI's Rego framework cannot be shipped
with the project (see docs/policy.md, "Agreement with ACI").

Usage: python bench/bench_policy.py [--iterations N] [--containers N] [--from-json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.shared.policy import PolicyEngine, canonical_bytes
from sandbox.shared.policy.defaults import UNPRIVILEGED_CAPABILITIES, layer_target
from sandbox.shared.policy.inputs import EnforcementPoint, parse_input

GOAL_P99_US = 200.0
ANY = {"pattern": "", "strategy": "any"}


def layer(c: int, i: int) -> str:
    return f"{c:02x}{i:02x}".ljust(64, "e")


def container(c: int) -> dict[str, Any]:
    caps = list(UNPRIVILEGED_CAPABILITIES)
    return {
        "name": f"app{c}", "id": f"registry.example/app{c}:1.0", "layers": [layer(c, i) for i in range(5)],
        "command": [f"/usr/bin/app{c}", "--port", str(8000 + c), "--config", "/etc/app/config.yaml"],
        "env_rules": [
            {"pattern": "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "strategy": "string",
             "required": True},
            {"pattern": f"APP_NAME=app{c}", "strategy": "string", "required": True},
            {"pattern": "LOG_LEVEL=(debug|info|warn|error)", "strategy": "re2", "required": False},
            {"pattern": "HOSTNAME=.+", "strategy": "re2", "required": False},
            {"pattern": "TERM=xterm", "strategy": "string", "required": False},
            {"pattern": "DB_PASSWORD=(?s:.*)", "strategy": "re2", "required": True},
            {"pattern": "(?i)(FABRIC)_.+=.+", "strategy": "re2", "required": False},
            {"pattern": "LANG=C.UTF-8", "strategy": "string", "required": False},
        ],
        "working_dir": "/srv",
        "mounts": [
            {"destination": "/data", "source": "/run/parma/volumes/data", "type": "bind",
             "options": ["rbind", "rprivate", "nosuid", "nodev", "rw"]},
            {"destination": "/etc/app", "source": "/run/parma/volumes/config", "type": "bind",
             "options": ["rbind", "rprivate", "nosuid", "nodev", "ro"]},
            {"destination": "/cache", "source": "sandbox:///volumes/cache-[0-9]+", "type": "bind",
             "options": ["rbind", "rprivate", "rw"]},
        ],
        "exec_processes": [{"command": ["/usr/bin/healthcheck"], "signals": [9]},
                           {"command": ["/bin/cat", "/srv/status"], "signals": []}],
        "signals": [15, 2],
        "user": {"user_idname": {"pattern": "1000", "strategy": "id"}, "group_idnames": [ANY], "umask": "0022"},
        "capabilities": {"bounding": caps, "effective": caps, "inheritable": [], "permitted": caps, "ambient": []},
        "seccomp_profile_sha256": "", "allow_elevated": False, "allow_stdio_access": True, "no_new_privileges": False,
    }


def policy(n: int) -> bytes:
    return canonical_bytes({
        "api_version": "0.12.0", "framework_version": "0.5.0", "containers": [container(c) for c in range(n)],
        "external_processes": [{"command": ["/usr/bin/uptime"], "env_rules": [
            {"pattern": "PATH=/usr/bin:/bin", "strategy": "string", "required": True}], "working_dir": "/",
            "allow_stdio_access": True}],
        "allow_properties_access": True, "allow_dump_stacks": True, "allow_runtime_logging": True,
        "allow_environment_variable_dropping": False, "allow_unencrypted_scratch": True,
        "allow_capability_dropping": False,
        # the group volumes the containers bind: the engine binds only volumes the policy pins
        "volumes": [{"name": "data", "target": "/run/parma/volumes/data", "kind": "emptyDir"},
                    {"name": "config", "target": "/run/parma/volumes/config", "kind": "secret"}],
    })


ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LOG_LEVEL=info", "HOSTNAME=app",
       "DB_PASSWORD=hunter2", "LANG=C.UTF-8"]
MOUNTS = [{"destination": "/data", "source": "/run/parma/volumes/data", "type": "bind",
           "options": ["rbind", "rprivate", "nosuid", "nodev", "rw"]},
          {"destination": "/etc/app", "source": "/run/parma/volumes/config", "type": "bind",
           "options": ["rbind", "rprivate", "nosuid", "nodev", "ro"]},
          {"destination": "/cache", "source": "/run/parma/sandbox/volumes/cache-7", "type": "bind",
           "options": ["rbind", "rprivate", "rw"]},
          {"destination": "/proc", "source": "proc", "type": "proc", "options": ["nosuid", "noexec", "nodev"]}]


def create_input(cid: str, c: int, env: list[str] | None = None) -> dict[str, Any]:
    caps = list(UNPRIVILEGED_CAPABILITIES)
    return {"container_id": cid, "argv": container(c)["command"], "env": [*ENV, f"APP_NAME=app{c}"] + (env or []),
            "working_dir": "/srv", "mounts": MOUNTS, "user": {"id": "1000", "name": "app"},
            "groups": [{"id": "1000", "name": "app"}], "umask": "0022",
            "capabilities": {"bounding": caps, "effective": caps, "inheritable": [], "permitted": caps,
                             "ambient": []},
            "privileged": False, "no_new_privileges": False, "seccomp_profile_sha256": ""}


def typed_fields(ep: EnforcementPoint, inp: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """The input's class and its fields as typed values, ready for the agent's constructor call."""
    typed = parse_input(ep, inp)
    return type(typed), {f: getattr(typed, f) for f in typed.__dataclass_fields__}


class Timer:
    """Times one decision per call. The request's JSON (and, on the agent path, its typed field values)
    is prepared before the clock starts; the clock covers building the input and engine.enforce()."""

    def __init__(self, engine: PolicyEngine, from_json: bool) -> None:
        self.engine = engine
        self.from_json = from_json
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def time(self, name: str, ep: str, inp: dict[str, Any], expect: bool = True) -> None:
        point = EnforcementPoint(ep)
        enforce, enforce_json = self.engine.enforce, self.engine.enforce_json
        if self.from_json:
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            decision = enforce_json(point, inp)
            t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        else:
            cls, fields = typed_fields(point, inp)
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            decision = enforce(cls(**fields))
            t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        if decision.allowed != expect:
            raise SystemExit(f"{name}: unexpected decision: {decision.reason}")
        self.wall.setdefault(name, []).append((t1 - t0) / 1000)
        self.cpu.setdefault(name, []).append((c1 - c0) / 1000)


def stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median_us": round(statistics.median(xs), 1),
            "p99_us": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))], 1), "max_us": round(xs[-1], 1)}


def run(iterations: int, n_containers: int, from_json: bool = False) -> dict[str, Any]:
    raw = policy(n_containers)
    t0 = time.perf_counter()
    engine = PolicyEngine.from_bytes(raw)
    load_ms = (time.perf_counter() - t0) * 1000
    t = Timer(engine, from_json)
    last = n_containers - 1   # the candidate scanned last in every list
    # Layers of the last container stay mounted for the overlay and create measurements.
    for i in range(5):
        engine.enforce_json("mount_device", {"target": layer_target(f"base{i}"), "device_hash": layer(last, i)})
    paths = [layer_target(f"base{i}") for i in reversed(range(5))]
    engine.enforce_json("create_volume", {"target": "/run/parma/volumes/data", "kind": "emptyDir"})
    engine.enforce_json("create_volume", {"target": "/run/parma/volumes/config", "kind": "secret"})
    exec_env = [*ENV, f"APP_NAME=app{last}"]
    gc.disable()
    try:
        for k in range(iterations):
            target = layer_target(f"m{k % 7}")
            cid = f"c{k}"
            rootfs = f"/run/parma/containers/{cid}/rootfs"
            t.time("mount_device", "mount_device", {"target": target, "device_hash": layer(k % n_containers, 3)})
            t.time("unmount_device", "unmount_device", {"target": target})
            t.time("mount_overlay", "mount_overlay", {"container_id": cid, "layer_paths": paths, "target": rootfs})
            t.time("create_container (denied)", "create_container",
                   create_input(cid, last, ["LD_PRELOAD=/tmp/x.so"]), expect=False)
            t.time("create_container", "create_container", create_input(cid, last))
            t.time("exec_in_container", "exec_in_container", {
                "container_id": cid, "argv": ["/usr/bin/healthcheck"], "env": exec_env, "working_dir": "/srv",
                "user": {"id": "1000", "name": "app"}})
            t.time("signal_container_process", "signal_container_process",
                   {"container_id": cid, "signal": 15, "is_init": True})
            t.time("shutdown_container", "shutdown_container", {"container_id": cid})
            t.time("unmount_overlay", "unmount_overlay", {"target": rootfs})
            t.time("exec_external", "exec_external", {"argv": ["/usr/bin/uptime"], "env": ["PATH=/usr/bin:/bin"]})
            t.time("scratch_mount", "scratch_mount", {"target": "/run/parma/scratch/x"})
            t.time("scratch_unmount", "scratch_unmount", {"target": "/run/parma/scratch/x"})
            for ep in ("get_properties", "dump_stacks", "runtime_logging"):
                t.time(ep, ep, {})
    finally:
        gc.enable()
    points = {name: {"n": len(xs), "wall": stats(xs), "cpu": stats(t.cpu[name])} for name, xs in t.wall.items()}
    return {
        "benchmark": "policy engine decision latency",
        "python": platform.python_version(), "machine": platform.machine(),
        # Wall time includes waiting for a CPU on a busy host; thread CPU time does not.
        "loadavg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "policy": {"containers": n_containers, "bytes": len(raw), "load_ms": round(load_ms, 2)},
        "iterations": iterations,
        "input": "decoded from JSON" if from_json else "typed, as the agent builds it",
        "goal_p99_us": GOAL_P99_US,
        "all_under_goal_wall": all(p["wall"]["p99_us"] < GOAL_P99_US for p in points.values()),
        "all_under_goal_cpu": all(p["cpu"]["p99_us"] < GOAL_P99_US for p in points.values()),
        "points": points,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--from-json", action="store_true", help="decode each input from JSON inside the clock")
    args = parser.parse_args()
    print(json.dumps(run(args.iterations, args.containers, args.from_json), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
