"""Cold start of the `parma-sandbox` command, verb by verb, against the interpreter's floor and docker/podman.

Each sample is one new process, as a user or a script runs it: the installed `parma-sandbox` entry point
(or `python -m sandbox` when there is none), stdout and stderr discarded, timed from spawn to exit. The
verbs are `--version`, `--help`, `ps` (an empty runtime directory), `validate examples/hello/group.json`
and `policy check` of a small policy and a 6-request trace. Samples of all verbs and references alternate
round by round, so a burst of load on this shared machine hits them alike. One warm-up round first writes
the bytecode caches, as installing the package does.

References in the same run: `python -c pass` with the same interpreter (the floor of any Python CLI), and
`docker --version` / `podman --version` where installed. Prints one JSON document: per verb the median,
min and max wall time in seconds, whether the median meets the 0.15 s goal, ratio = reference median /
our median for each reference (>= 1.0 means we answer as fast), and the median CPU time (user + system),
which unlike wall time hardly grows with other work on the machine.

Usage: python bench/bench_cli.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sandbox.shared.policy import canonical_bytes  # noqa: E402

GOAL_S = 0.15
LAYER_HASHES = ("1a" * 32, "2b" * 32)


def write_policy_and_trace(work: Path) -> tuple[Path, Path]:
    """A one-container policy and a trace that mounts its layers and scratch and creates it (all allowed)."""
    any_id = {"pattern": "", "strategy": "any"}
    doc = {"api_version": "0.12.0", "framework_version": "0.5.0", "external_processes": [], "containers": [{
        "name": "web", "layers": list(LAYER_HASHES), "command": ["/bin/httpd", "-f"],
        "env_rules": [{"pattern": "PATH=/bin", "strategy": "string", "required": True}],
        "working_dir": "/", "mounts": [], "exec_processes": [], "signals": [15],
        "user": {"user_idname": any_id, "group_idnames": [any_id], "umask": "0022"},
        "capabilities": None, "seccomp_profile_sha256": "", "allow_elevated": False,
        "allow_stdio_access": True, "no_new_privileges": False}]}
    policy = work / "policy.json"
    policy.write_bytes(canonical_bytes(doc))
    layers = [f"/run/parma/layers/{i}" for i in range(len(LAYER_HASHES))]
    requests = [
        *({"ep": "mount_device", "input": {"target": path, "device_hash": h}} for path, h in zip(layers, LAYER_HASHES,
                                                                                                  strict=True)),
        {"ep": "scratch_mount", "input": {"target": "/run/parma/scratch", "encrypted": True}},
        {"ep": "scratch_mount", "input": {"target": "/run/parma/containers/web/scratch", "encrypted": True}},
        {"ep": "mount_overlay", "input": {"container_id": "web", "target": "/run/parma/containers/web/rootfs",
                                          "layer_paths": layers[::-1]}},
        {"ep": "create_container", "input": {"container_id": "web", "argv": ["/bin/httpd", "-f"],
                                             "env": ["PATH=/bin"]}},
    ]
    trace = work / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in requests))
    return policy, trace


def entry_point() -> list[str]:
    script = Path(sys.executable).parent / "parma-sandbox"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "sandbox"]


def sample(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run; the CPU time does not grow with the machine's load."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}")
    return elapsed, usage.ru_utime + usage.ru_stime


def summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    wall = [w for w, _ in samples]
    return {"median_s": round(statistics.median(wall), 4), "min_s": round(min(wall), 4),
            "max_s": round(max(wall), 4), "cpu_median_s": round(statistics.median(c for _, c in samples), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args()
    cli = entry_point()
    with tempfile.TemporaryDirectory(prefix="bench-cli.") as tmp:
        work = Path(tmp)
        policy, trace = write_policy_and_trace(work)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PARMA_SANDBOX_RUNTIME"] = str(work / "run")
        verbs = {
            "--version": [*cli, "--version"],
            "--help": [*cli, "--help"],
            "ps": [*cli, "ps"],
            "validate": [*cli, "validate", str(REPO / "examples" / "hello" / "group.json")],
            "policy check": [*cli, "policy", "check", str(policy), str(trace)],
        }
        references = {"python -c pass": [sys.executable, "-c", "pass"]}
        for tool in ("docker", "podman"):
            if path := shutil.which(tool):
                references[f"{tool} --version"] = [path, "--version"]
        everything = {**verbs, **references}
        for argv in everything.values():         # warm-up: bytecode caches, page cache
            sample(argv, env)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in everything}
        for _ in range(args.runs):
            for name, argv in everything.items():
                times[name].append(sample(argv, env))
    refs = {name: summary(times[name]) for name in references}
    results = {}
    for name in verbs:
        s = summary(times[name])
        results[name] = {**s, "goal_ok": s["median_s"] <= GOAL_S,
                         "ratio": {ref: round(r["median_s"] / s["median_s"], 3) for ref, r in refs.items()}}
    doc = {
        "benchmark": "cli-startup",
        "command": cli,
        "runs": args.runs,
        "goal_s": GOAL_S,
        "verbs": results,
        "references": refs,
        "all_goals_ok": all(r["goal_ok"] for r in results.values()),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
