"""A container whose image has 60 layers, each a SCSI LUN on virtio-scsi (far beyond the ~26 virtio-blk PCI
devices a q35 root bus holds): the agent finds every disk by its serial (VPD page 0x80), derives its root
hash, mounts it under dm-verity, and the container sees the files of all 60 layers."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.group import validate_group
from sandbox.launch.plan import build_plan
from sandbox.shared.messages import ReadOutputRequest, WaitProcessRequest
from sandbox.vmm.config import DiskBus

sys.path.insert(0, str(Path(__file__).parent))
from harness import Guest, boot, busybox_tar, image_of, make_layer, start_plan, tar_of  # noqa: E402

LAYERS = 60
ARGV = ["/bin/sh", "-c", "cat /layers/* | wc -l; cat /layers/f59"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    d = tmp_path_factory.mktemp("scsi")
    layers = [make_layer(d, "busybox", busybox_tar())]
    for i in range(1, LAYERS):
        layers.append(make_layer(d, f"x{i}", tar_of([("layers", None, None, 0o755),
                                                     (f"layers/f{i:02d}", f"layer {i}\n".encode(), None, 0o644)])))
    spec = validate_group({"name": "many", "containers": [{"name": "app", "image": "test", "command": ARGV}]},
                          base_dir=d)
    images = {"app": image_of(*layers)}
    plan = build_plan(spec, images, {})
    assert len(plan.layers) == LAYERS
    t0 = time.monotonic()
    guest = boot(d / "s", spec=spec, images=images, disks=[(m.path, m.serial) for m in plan.layers],
                 disk_bus=DiskBus.scsi)
    guest.extra["launch_to_agent_s"] = time.monotonic() - t0
    try:
        yield {"guest": guest, "plan": plan}
    finally:
        guest.stop()


def test_sixty_scsi_layers_mount_and_make_one_container(world: dict) -> None:
    guest: Guest = world["guest"]
    plan = world["plan"]
    with guest.client() as c:
        t0 = time.monotonic()
        start_plan(c, guest, plan)
        start_s = time.monotonic() - t0
        w = c.call(WaitProcessRequest("app", timeout=60), timeout=90)
        assert w.exit_code == 0
        page = c.call(ReadOutputRequest("app", offset=0, wait=5))
        out = b"".join(ch.data for ch in page.chunks if ch.stream == "stdout")
        assert out.split() == [b"59", b"layer", b"59"]
    # Only the root disk is virtio-blk: every layer the agent found was a SCSI LUN.
    assert [d.bus for d in guest.cfg.disks] == [DiskBus.virtio_blk] + [DiskBus.scsi] * LAYERS
    print(f"\n60 SCSI layers: launch to agent {guest.extra['launch_to_agent_s']:.2f} s, "
          f"agent wait {guest.extra['boot_s']:.2f} s, 60 mount_device + create + start {start_s:.2f} s")
