"""UVM boot benchmark: time to `parma-agent: ready` against the same kernel booting a trivial init.

Both guests use the same kernel, QEMU command line shape (q35, TCG unless --accel kvm, virtio-blk root,
virtio-rng) and the same dm-verity root setup; only the root image differs: the UVM rootfs (Debian base,
python3, the agent) versus a one-file busybox-static image whose /init echoes a marker. Runs alternate
between the two (A B A B ...) so machine load hits both alike. Also finds the smallest guest memory that
still reaches agent-ready, and optionally runs N consecutive boots counting failures.

Prints one JSON document. Goals (issue #4): ratio <= 1.5, minimal memory <= 256 MiB, 0 failures in 50 boots.

Usage: python bench/bench_boot.py [--runs 5] [--boots 50] [--memory 512] [--no-memory-search]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.uvm.boot import BootResult, BootSpec, boot  # noqa: E402
from sandbox.uvm.build import UvmArtifacts, ensure_uvm  # noqa: E402
from sandbox.uvm.image import RootfsImage, convert_rootfs, kernel_cmdline  # noqa: E402

GOAL_RATIO = 1.5
GOAL_MEMORY_MIB = 256
TRIVIAL_MARKER = "trivial-init: ready"
TIMEOUT = 60.0


def trivial_root(work: Path) -> tuple[Path, str]:
    """A root image holding only busybox-static and an /init script; returns (image, cmdline)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    tar_path = work / "trivial.tar"
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tf:
        for d in ("bin", "dev", "proc", "sys"):
            info = tarfile.TarInfo(f"./{d}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        data = Path(busybox).read_bytes()
        info = tarfile.TarInfo("./bin/busybox")
        info.size, info.mode = len(data), 0o755
        tf.addfile(info, io.BytesIO(data))
        script = f"#!/bin/busybox sh\necho '{TRIVIAL_MARKER}'\nexec /bin/busybox sleep 3600\n".encode()
        info = tarfile.TarInfo("./init")
        info.size, info.mode = len(script), 0o755
        tf.addfile(info, io.BytesIO(script))
    tar_sha = hashlib.sha256(tar_path.read_bytes()).hexdigest()
    image = work / "trivial.img"
    p = convert_rootfs(tar_path, image, tar_sha256=tar_sha)
    img = RootfsImage(path=image, sha256="", size=image.stat().st_size, root_hash=str(p["root_hash"]),
                      salt=bytes.fromhex(str(p["salt"])), data_blocks=int(p["data_blocks"]),  # type: ignore[arg-type]
                      hash_start_block=int(p["hash_start_block"]), tar_sha256=tar_sha, key="")  # type: ignore[arg-type]
    return image, kernel_cmdline(img, init="/init")


def _summary(results: list[BootResult]) -> dict[str, Any]:
    times = [r.seconds for r in results if r.seconds is not None]
    return {"median_s": round(statistics.median(times), 3) if times else None,
            "min_s": round(min(times), 3) if times else None, "max_s": round(max(times), 3) if times else None,
            "runs_s": [round(t, 3) for t in times], "failures": sum(not r.ready for r in results)}


def compare(uvm: UvmArtifacts, runs: int, memory: int, accel: str, work: Path) -> dict[str, Any]:
    image, cmdline = trivial_root(work)
    uvm_spec = BootSpec(uvm.kernel, uvm.rootfs, uvm.cmdline, memory_mib=memory, accel=accel)
    trivial_spec = BootSpec(uvm.kernel, image, cmdline, memory_mib=memory, accel=accel)
    agent, trivial = [], []
    for _ in range(runs):
        agent.append(boot(uvm_spec, timeout=TIMEOUT))
        trivial.append(boot(trivial_spec, marker=TRIVIAL_MARKER, timeout=TIMEOUT))
    a, t = _summary(agent), _summary(trivial)
    ratio = round(a["median_s"] / t["median_s"], 3) if a["median_s"] and t["median_s"] else None
    return {"agent_ready": a, "trivial_init": t, "ratio": ratio, "goal_ratio": GOAL_RATIO,
            "meets_goal": ratio is not None and ratio <= GOAL_RATIO}


def memory_search(uvm: UvmArtifacts, accel: str, low: int = 32, high: int = 512) -> dict[str, Any]:
    """Smallest -m (MiB, to 8 MiB) that reaches agent-ready; each candidate must boot twice in a row."""
    def ok(mib: int) -> bool:
        spec = BootSpec(uvm.kernel, uvm.rootfs, uvm.cmdline, memory_mib=mib, accel=accel)
        return all(boot(spec, timeout=TIMEOUT).ready for _ in range(2))

    tried: dict[int, bool] = {}
    if not ok(high):
        return {"min_memory_mib": None, "tried": {high: False}}
    tried[high] = True
    while high - low > 8:
        mid = (low + high) // 2
        tried[mid] = ok(mid)
        if tried[mid]:
            high = mid
        else:
            low = mid
    return {"min_memory_mib": high, "goal_mib": GOAL_MEMORY_MIB, "meets_goal": high <= GOAL_MEMORY_MIB,
            "tried": dict(sorted(tried.items()))}


def reliability(uvm: UvmArtifacts, boots: int, memory: int, accel: str) -> dict[str, Any]:
    spec = BootSpec(uvm.kernel, uvm.rootfs, uvm.cmdline, memory_mib=memory, accel=accel)
    results, failures = [], []
    for i in range(boots):
        r = boot(spec, timeout=TIMEOUT)
        results.append(r)
        if not r.ready:
            failures.append({"boot": i, "outcome": r.outcome, "console_tail": r.tail(15)})
    return {"boots": boots, "failures": len(failures), **{k: v for k, v in _summary(results).items()
                                                         if k != "runs_s" and k != "failures"},
            "failed": failures}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="boots per variant for the medians (default 5)")
    ap.add_argument("--boots", type=int, default=0, help="also run N consecutive UVM boots (reliability)")
    ap.add_argument("--memory", type=int, default=512, help="guest memory in MiB for the timed boots")
    ap.add_argument("--accel", default="tcg", choices=["tcg", "kvm"])
    ap.add_argument("--no-memory-search", action="store_true")
    args = ap.parse_args()

    uvm = ensure_uvm()
    doc: dict[str, Any] = {"benchmark": "uvm-boot", "host": platform.node(), "accel": args.accel,
                           "memory_mib": args.memory, "rootfs_bytes": uvm.rootfs.stat().st_size,
                           "kernel_bytes": uvm.kernel.stat().st_size}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as tmp:
        doc["boot"] = compare(uvm, args.runs, args.memory, args.accel, Path(tmp))
    if not args.no_memory_search:
        doc["memory"] = memory_search(uvm, args.accel)
    if args.boots:
        doc["reliability"] = reliability(uvm, args.boots, args.memory, args.accel)
    doc["bench_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
