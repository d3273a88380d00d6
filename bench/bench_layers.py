"""Layer disks on virtio-scsi against virtio-blk: time to agent-ready and to mount every layer.

Boots the real UVM (TCG, the vm tier's harness) with N synthetic one-file layers attached either as
virtio-blk PCI devices (the old way; a q35 root bus holds about 26) or as LUNs of a virtio-scsi
controller, and mounts them all through the agent (find by serial, read the verity layout, dm-verity,
ext4). Runs alternate between the variants so machine load hits them alike. Prints one JSON document:
per variant the median agent-ready and mount-all seconds, and the SCSI/virtio-blk ratio at equal N.

Usage: python bench/bench_layers.py [--runs 2] [--blk 20] [--scsi 20,60,256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "vm"))

from harness import boot, busybox_tar, image_of, make_layer, tar_of  # noqa: E402

from sandbox.group import validate_group  # noqa: E402
from sandbox.launch.plan import build_plan  # noqa: E402
from sandbox.shared.messages import MountDeviceRequest, SetPolicyRequest  # noqa: E402
from sandbox.vmm.config import DiskBus  # noqa: E402


def one_run(work: Path, layers: list, bus: DiskBus, tag: str) -> dict[str, float]:
    spec = validate_group({"name": "bench", "containers": [{"name": "app", "image": "test",
                                                             "command": ["/bin/true"]}]}, base_dir=work)
    images = {"app": image_of(*layers)}
    plan = build_plan(spec, images, {})
    t0 = time.monotonic()
    guest = boot(work / f"state-{tag}", spec=spec, images=images, disks=[(m.path, m.serial) for m in plan.layers],
                 disk_bus=bus)
    ready = time.monotonic() - t0
    try:
        with guest.client() as c:
            c.call(SetPolicyRequest(policy=guest.policy))
            t1 = time.monotonic()
            for m in plan.layers:
                c.call(MountDeviceRequest(device=m.serial, target=m.target))
            mounted = time.monotonic() - t1
    finally:
        guest.stop()
    return {"agent_ready_s": ready, "mount_all_s": mounted}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--blk", type=int, default=20)
    ap.add_argument("--scsi", default="20,60,256")
    args = ap.parse_args()
    variants = [(DiskBus.virtio_blk, args.blk)] + [(DiskBus.scsi, int(n)) for n in args.scsi.split(",")]
    results: dict[str, list[dict[str, float]]] = {f"{bus.value}-{n}": [] for bus, n in variants}
    with tempfile.TemporaryDirectory(prefix="bench-layers-") as tmp:
        work = Path(tmp)
        most = max(n for _, n in variants)
        layers = [make_layer(work, "busybox", busybox_tar())]
        for i in range(1, most):
            layers.append(make_layer(work, f"x{i}", tar_of([(f"f{i}", f"{i}\n".encode(), None, 0o644)])))
        for run in range(args.runs):
            for bus, n in variants:
                key = f"{bus.value}-{n}"
                results[key].append(one_run(work, layers[:n], bus, f"{key}-{run}"))
    summary: dict[str, Any] = {}
    for key, runs in results.items():
        summary[key] = {m: round(statistics.median(r[m] for r in runs), 2) for m in ("agent_ready_s", "mount_all_s")}
        summary[key]["runs"] = len(runs)
    blk, scsi = f"virtio-blk-{args.blk}", f"scsi-{args.blk}"
    if scsi in summary:
        summary["ratio_scsi_to_blk_at_equal_n"] = {
            m: round(summary[scsi][m] / summary[blk][m], 2) for m in ("agent_ready_s", "mount_all_s")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
