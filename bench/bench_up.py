"""Benchmark `up` for examples/hello: cold and warm, up to the first container running; enforcement share.

Prints one JSON document:
- cold: `up -d` with empty image-layer and files-volume caches (the UVM itself comes from the cache:
  building the kernel and rootfs is a one-off that bench_boot measures);
- warm: the same with every cache filled (median of --runs);
- for each run, seconds from the command's start to the first container running (the launcher's own
  marks: images resolved, UVM prepared, launched, agent answering, first container started), and the
  wall time of the whole `up -d`;
- reference: the UVM's boot to a serving agent in the same run, and warm_up / boot as a ratio (what `up`
  adds on top of booting the VM);
- phases: the seconds between consecutive marks (launch, boot, self-check beside set-up, containers);
- enforcement: policy decision time as a share of create-to-running, per container (the agent reports
  the time spent in the engine for create_container, as wall time and as its thread's CPU time, and the
  create + start total); the goal is <= 1% for the web container (the probe's share is reported too).
  Under TCG with one vCPU the wall clock also counts whatever
  else the guest kernel does meanwhile; the CPU clock is the decision's own cost.

Usage: python bench/bench_up.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HELLO = REPO / "examples" / "hello"
sys.path.insert(0, str(REPO))

from sandbox.paths import cache_dir  # noqa: E402

# Cache parts a cold run starts without (the rest, e.g. the UVM, is shared with the real cache).
COLD_PARTS = ("layers", "volumes")
GOAL_WARM_S = 4.0             # issue #17: `up` warm, to the first container, under TCG
GOAL_ENFORCE_SHARE = 0.01     # issue #17: the policy decision's share of the web container's create-to-running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_file(tmp: Path) -> Path:
    group = json.loads((HELLO / "group.json").read_text())
    group["ports"] = [{"port": 8080, "hostPort": free_port()}]
    for c in group["containers"]:
        c["image"] = f"oci:{REPO / 'build' / 'images' / 'busybox'}:latest"
    group["volumes"][0]["files"]["path"] = str(HELLO / "www")
    path = tmp / "group.json"
    path.write_text(json.dumps(group))
    return path


def cli(env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "sandbox", *args], env=env, cwd=REPO, text=True,
                       capture_output=True, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"parma-sandbox {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r


def one_up(env: dict[str, str], group: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    summary = json.loads(cli(env, "-q", "up", "-d", "--name", "bench", "--format", "json", str(group)).stdout)
    wall = time.monotonic() - t0
    info = json.loads(cli(env, "inspect", "bench", "--format", "json").stdout)
    cli(env, "down", "bench")
    marks = summary["timings"]
    first = next(k for k in marks if k.startswith("started:"))
    containers = {}
    for name, c in info["startup"]["containers"].items():
        create_to_running = c["create"]["total_s"] + c["start"]["total_s"]
        cpu = c["create"].get("enforce_cpu_s", c["create"]["enforce_s"])
        containers[name] = {"enforce_s": round(c["create"]["enforce_s"], 6), "enforce_cpu_s": round(cpu, 6),
                            "create_to_running_s": round(create_to_running, 4),
                            "enforce_share": round(c["create"]["enforce_s"] / create_to_running, 5),
                            "enforce_cpu_share": round(cpu / create_to_running, 5)}
    boot = marks["agent"] - marks["launched"]
    return {"wall_s": round(wall, 3), "to_first_container_s": marks[first], "marks": marks,
            "boot_s": round(boot, 3), "containers": containers}


def phases(marks: dict[str, float]) -> dict[str, float]:
    """Seconds from each mark to the next, in time order ("agent->verified": the time between the two)."""
    order = sorted(marks.items(), key=lambda kv: kv[1])
    out = {f"start->{order[0][0]}": order[0][1]} if order else {}
    out.update({f"{a}->{b}": round(tb - ta, 3) for (a, ta), (b, tb) in zip(order, order[1:], strict=False)})
    return out


def enforcement(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per container over every run: the policy decision's share of create-to-running (wall and CPU)."""
    out: dict[str, Any] = {}
    for name in sorted({n for r in runs for n in r["containers"]}):
        rows = [r["containers"][name] for r in runs if name in r["containers"]]
        wall, cpu = [c["enforce_share"] for c in rows], [c["enforce_cpu_share"] for c in rows]
        out[name] = {"wall_share": {"median": statistics.median(wall), "max": max(wall)},
                     "cpu_share": {"median": statistics.median(cpu), "max": max(cpu)},
                     "enforce_s_median": statistics.median(c["enforce_s"] for c in rows),
                     "create_to_running_s_median": statistics.median(c["create_to_running_s"] for c in rows)}
    if "web" in out:
        out["web"]["goal_share"] = GOAL_ENFORCE_SHARE
        out["web"]["meets_goal"] = out["web"]["wall_share"]["median"] <= GOAL_ENFORCE_SHARE
    out["note"] = ("goal (issue #17): <= 1% for the web container; the probe's create-to-running is a "
                   "fraction of the web's (its image is warm by then), so the same decision is a larger share")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="warm runs (median reported)")
    args = ap.parse_args()
    load_start = [round(x, 2) for x in os.getloadavg()]
    if not (REPO / "build" / "images" / "busybox" / "index.json").exists():
        subprocess.run(["make", "-C", str(REPO), "example-images"], check=True, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(prefix="parma-bench-up-") as tmp_name:
        tmp = Path(tmp_name)
        real_cache = cache_dir()
        cold_cache = tmp / "cache"
        cold_cache.mkdir()
        for part in real_cache.iterdir() if real_cache.is_dir() else ():
            if part.name not in COLD_PARTS:
                (cold_cache / part.name).symlink_to(part)
        base_env = {**os.environ, "PARMA_SANDBOX_RUNTIME": str(tmp / "run"),
                    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        group = group_file(tmp)
        cold = one_up({**base_env, "PARMA_SANDBOX_CACHE": str(cold_cache)}, group)
        warm_runs = [one_up({**base_env, "PARMA_SANDBOX_CACHE": str(cold_cache)}, group) for _ in range(args.runs)]
        shutil.rmtree(cold_cache, ignore_errors=True)
    warm = sorted(warm_runs, key=lambda r: r["to_first_container_s"])[len(warm_runs) // 2]
    warm_times = [r["to_first_container_s"] for r in warm_runs]
    boot = statistics.median(r["boot_s"] for r in warm_runs)
    doc = {
        "benchmark": "up examples/hello",
        "host": {"cpus": os.cpu_count(), "load_average_start": load_start,
                 "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "warm": {"to_first_container_s": {"median": statistics.median(warm_times), "runs": warm_times},
                 "goal_s": GOAL_WARM_S, "meets_goal": statistics.median(warm_times) <= GOAL_WARM_S,
                 "median_run": {**warm, "phases": phases(warm["marks"])}},
        "cold": {**cold, "phases": phases(cold["marks"])},
        "reference": {"uvm_boot_to_agent_s": boot,
                      "warm_up_over_boot": round(warm["to_first_container_s"] / boot, 3) if boot else None},
        "enforcement": enforcement([cold, *warm_runs]),
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
