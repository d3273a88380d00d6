"""dm-verity trees as commands: `parma-sandbox verity` against `veritysetup format`, same files, same run.

For each size (default 256 MiB and 2 GiB of random bytes, page cache warm) both commands write the tree of
the file to a separate file: SHA-256, 4096-byte blocks, a 32-byte zero salt, no superblock. Each sample is
one process timed from spawn to exit (start-up included, as a user or script runs it), with its CPU time;
samples of the two alternate and the median of --runs counts. Both must give the same root hash and the
same tree bytes. Prints one JSON document; ratio = veritysetup median / our median (goal >= 1.0), and
cpu_ratio the same for CPU time (ours hashes in two processes: the wall-time ratio tends to cpu_ratio when
no second core is free).

Usage: python bench/bench_verity.py [--sizes-mib 256,2048] [--runs N]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_RATIO = 1.0
SALT = "00" * 32


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n
    with open(path, "rb") as f:                     # warm the page cache
        while f.read(8 << 20):
            pass


def cli() -> list[str]:
    script = Path(sys.executable).parent / "parma-sandbox"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "sandbox"]


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, bytes]:
    """(wall s, CPU s, stdout) of one command, CPU from its rusage; it must succeed."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if code:
            raise SystemExit(f"{' '.join(argv)} failed (exit {code}): {err.read().decode()[-2000:]}")
        return elapsed, usage.ru_utime + usage.ru_stime, out.read()


def summary(samples: list[tuple[float, float]], size: int) -> dict:
    wall = [w for w, _ in samples]
    med = statistics.median(wall)
    return {"median_s": round(med, 4), "min_s": round(min(wall), 4),
            "cpu_median_s": round(statistics.median(c for _, c in samples), 4), "mb_per_s": round(size / med / 1e6, 1)}


def bench_size(work: Path, size: int, runs: int, env: dict[str, str]) -> dict:
    data = work / "data"
    make_file(data, size)
    ours_tree, theirs_tree = work / "ours.tree", work / "veritysetup.tree"
    commands = {
        "ours": [*cli(), "--format", "json", "verity", "--no-superblock", f"--salt={SALT}", "--hash-file",
                 str(ours_tree), str(data)],
        "veritysetup": ["veritysetup", "format", "--no-superblock", f"--salt={SALT}", str(data), str(theirs_tree)],
    }
    roots: dict[str, str] = {}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for i in range(runs + 1):                       # the first round warms up (bytecode caches)
        for name, argv in commands.items():
            (ours_tree if name == "ours" else theirs_tree).unlink(missing_ok=True)
            wall, cpu, out = timed(argv, env)
            if i:
                samples[name].append((wall, cpu))
            if name == "ours":
                roots[name] = json.loads(out)["root_hash"]
            else:
                m = re.search(rb"Root hash:\s+([0-9a-f]+)", out)
                assert m, out
                roots[name] = m.group(1).decode()
    same_tree = filecmp.cmp(ours_tree, theirs_tree, shallow=False)
    ours, theirs = summary(samples["ours"], size), summary(samples["veritysetup"], size)
    for path in (data, ours_tree, theirs_tree):
        path.unlink()
    return {"size_bytes": size, "same_root_hash": roots["ours"] == roots["veritysetup"], "same_tree_bytes": same_tree,
            "root_hash": roots["ours"], "ours": {"command": " ".join(commands["ours"]), **ours},
            "veritysetup": {"command": " ".join(commands["veritysetup"]), **theirs},
            "ratio": round(theirs["median_s"] / ours["median_s"], 3),
            "cpu_ratio": round(theirs["cpu_median_s"] / ours["cpu_median_s"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="256,2048")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    build = REPO / "build"
    build.mkdir(exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-verity.", dir=build) as tmp:
        for mib in (int(x) for x in args.sizes_mib.split(",")):
            results.append(bench_size(Path(tmp), mib << 20, args.runs, env))
    ok = all(r["same_root_hash"] and r["same_tree_bytes"] for r in results)
    doc = {
        "benchmark": "verity",
        "runs": args.runs,
        "sizes": results,
        "goal_ratio": GOAL_RATIO,
        "all_ratios_ok": all(r["ratio"] >= GOAL_RATIO for r in results),
        "trees_identical": ok,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
    }
    print(json.dumps(doc, indent=2))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
