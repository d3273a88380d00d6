"""dm-verity tree throughput: ours (sandbox.shared.verity) against `veritysetup format`, same file, same run.

A 512 MiB file of random bytes is hashed with SHA-256, 4096-byte blocks, a 32-byte zero salt and the tree in
a separate file (no superblock), by both tools, alternately, with a warm page cache. Prints one JSON
document: the best and median wall time of each, MB/s, and ratio = veritysetup time / our time (best of
each; the goal is >= 1.0). Both must give the same root hash and the same tree bytes.

Usage: python bench/bench_verity.py [--size-mib N] [--repeat N]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.run import run  # noqa: E402
from sandbox.shared.verity import ZERO_SALT, format_verity  # noqa: E402


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


def ours(data: Path, tree: Path) -> tuple[float, str]:
    t = time.perf_counter()
    info = format_verity(data, salt=ZERO_SALT, superblock=False, hash_file=tree)
    return time.perf_counter() - t, info.root_hash


def veritysetup(data: Path, tree: Path) -> tuple[float, str]:
    tree.unlink(missing_ok=True)
    t = time.perf_counter()
    proc = run(["veritysetup", "format", "--no-superblock", f"--salt={ZERO_SALT.hex()}", data, tree])
    elapsed = time.perf_counter() - t
    m = re.search(rb"Root hash:\s+([0-9a-f]+)", proc.stdout)
    assert m, proc.stdout
    return elapsed, m.group(1).decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(prefix="bench-verity.") as tmp:
        d = Path(tmp)
        make_file(d / "data", size)
        times: dict[str, list[float]] = {"ours": [], "veritysetup": []}
        roots = set()
        for _ in range(args.repeat):
            for name, fn in (("veritysetup", veritysetup), ("ours", ours)):
                elapsed, root = fn(d / "data", d / f"{name}.tree")
                times[name].append(elapsed)
                roots.add(root)
        same_tree = filecmp.cmp(d / "ours.tree", d / "veritysetup.tree", shallow=False)
    best = {k: min(v) for k, v in times.items()}
    doc = {
        "benchmark": "verity",
        "size_bytes": size,
        "repeat": args.repeat,
        "same_root_hash": len(roots) == 1,
        "same_tree_bytes": same_tree,
        "ours": {"best_s": round(best["ours"], 4), "median_s": round(statistics.median(times["ours"]), 4),
                 "mb_per_s": round(size / best["ours"] / 1e6, 1)},
        "veritysetup": {"best_s": round(best["veritysetup"], 4),
                        "median_s": round(statistics.median(times["veritysetup"]), 4),
                        "mb_per_s": round(size / best["veritysetup"] / 1e6, 1)},
        "ratio": round(best["veritysetup"] / best["ours"], 3),
        "goal_ratio": 1.0,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
    }
    print(json.dumps(doc, indent=2))
    if len(roots) != 1 or not same_tree:
        sys.exit(1)


if __name__ == "__main__":
    main()
