"""The encrypted, integrity-protected scratch disk in a real UVM with 256 MiB of memory.

Until the agent sets the scratch up itself (the launcher wiring comes with the typed protocol), the guest
module runs where the agent would run it: a privileged container whose image is the UVM's own rootfs (so
it has python3 and the agent's package) calls sandbox.guest.scratch on the group's raw scratch disk, then
writes 1 GiB of a known line to it, reads it back through dm-crypt and dm-integrity, and fills the rest to
ENOSPC. The host then reads the disk file: it holds at least 1 GiB of data and not one copy of the line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.group import validate_group
from sandbox.launch.plan import build_plan
from sandbox.shared.messages import ExecProcessRequest, PingRequest, ReadOutputRequest
from sandbox.uvm.overlay import build_rootfs_tar
from sandbox.vmm.config import DiskBus

sys.path.insert(0, str(Path(__file__).parent))
from harness import Guest, boot, image_of, make_layer, start_plan  # noqa: E402

GIB = 1 << 30
DISK_BYTES = 1280 << 20
# Built from parts so the bytes searched for on the host appear nowhere but where the guest writes them.
MARKER = "-".join(["PARMA", "SCRATCH", "PLAINTEXT", "MARKER"]).encode()

SCRIPT = r"""
import errno, os, sys, time
sys.path.insert(0, "/usr/lib/parma-sandbox")
from pathlib import Path
from sandbox.guest import blockdev, scratch
marker = "-".join(["PARMA", "SCRATCH", "PLAINTEXT", "MARKER"]).encode()
t0 = time.monotonic()
s = scratch.setup(blockdev.find_by_serial("parma-scratch"), mountpoint=Path("/scratch"))
print("setup_s", round(time.monotonic() - t0, 2), "bytes", s.size_bytes, flush=True)
line = marker + b" %08d\n"
chunk = b"".join(line % i for i in range(1 << 20 // len(line % 0)))
chunk += b"\n" * ((1 << 20) - len(chunk))
t0 = time.monotonic()
with open("/scratch/big", "wb") as f:
    for _ in range(1024):
        f.write(chunk)
    f.flush()
    os.fsync(f.fileno())
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
print("write_s", round(time.monotonic() - t0, 2), flush=True)
t0 = time.monotonic()
with open("/scratch/big", "rb") as f:
    for _ in range(64):
        assert f.read(len(chunk)) == chunk
print("read64_s", round(time.monotonic() - t0, 2), flush=True)
try:
    with open("/scratch/fill", "wb") as f:
        while True:
            f.write(chunk)
except OSError as e:
    print("fill", errno.errorcode[e.errno], flush=True)
st = os.statvfs("/scratch")
print("free_blocks", st.f_bavail, flush=True)
from sandbox.guest import devmapper
print("mismatches", devmapper.status(s.integrity.name)[0].params.split()[0], flush=True)
print("done", "waiting", flush=True)
time.sleep(100000)
"""
# Run by exec after the host altered the disk: read the start of the file again, from the disk.
REREAD = r"""
import os
with open("/scratch/big", "rb") as f:
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        for _ in range(256):
            f.read(1 << 20)
        print("read: no error")
    except OSError as e:
        print("read:", os.strerror(e.errno))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    d = tmp_path_factory.mktemp("scratch")
    rootfs = make_layer(d, "rootfs", build_rootfs_tar().tar.read_bytes())
    spec = validate_group({"name": "scratch", "containers": [{
        "name": "tool", "image": "test", "privileged": True, "command": ["/usr/bin/python3", "-c", SCRIPT],
        "execProcesses": [{"command": ["/usr/bin/python3", "-c", REREAD]}]}]},
        base_dir=d)
    images = {"tool": image_of(rootfs)}
    plan = build_plan(spec, images, {})
    disk = d / "scratch.img"
    disk.write_bytes(b"")
    os.truncate(disk, DISK_BYTES)        # sparse, as the launcher makes it
    guest = boot(d / "s", spec=spec, images=images, memory_mib=256,
                 disks=[(m.path, m.serial) for m in plan.layers] + [(disk, "parma-scratch")],
                 disk_bus=DiskBus.scsi, writable=("parma-scratch",))
    try:
        yield {"guest": guest, "plan": plan, "disk": disk}
    finally:
        guest.stop()


def _output_until(c, cid: str, last: bytes, exec_id: str | None = None) -> tuple[bytes, bytes]:
    out, err, offset = [], [], 0
    while True:
        page = c.call(ReadOutputRequest(cid, exec_id, offset=offset, wait=10), timeout=30)
        for ch in page.chunks:
            (out if ch.stream == "stdout" else err).append(ch.data)
        offset = page.next_offset
        if page.eof or last in b"".join(out):
            return b"".join(out), b"".join(err)


def _count(disk: Path, needle: bytes) -> int:
    found, tail = 0, b""
    with disk.open("rb") as f:
        while block := f.read(8 << 20):
            found += (tail + block).count(needle)
            tail = block[-len(needle):]
    return found


def test_one_gib_of_plaintext_never_reaches_the_host_and_tampering_is_detected(world: dict) -> None:
    guest: Guest = world["guest"]
    plan = world["plan"]
    disk: Path = world["disk"]
    with guest.client() as c:
        start_plan(c, guest, plan)
        ctr = plan.containers[0]
        out, err = _output_until(c, "tool", b"done waiting")
        print("\n" + out.decode(errors="replace"))
        assert b"done waiting" in out, err.decode(errors="replace")[-3000:]
        fields = dict(line.split(" ", 1) for line in out.decode().splitlines())
        assert fields["fill"] == "ENOSPC"            # a full scratch is an error in the container...
        assert int(fields["free_blocks"]) == 0
        assert c.call(PingRequest()).policy_set is True  # ...and the VM lives on
        assert fields["mismatches"] == "0"           # nothing read a sector that was never written
        assert disk.stat().st_blocks * 512 >= GIB    # the gibibyte did go to the host's disk...
        assert _count(disk, MARKER[:16]) == 0        # ...and not one line of it in the clear

        # The host alters the disk under the running guest: 64 KiB every 64 MiB.
        with disk.open("r+b") as f:
            for off in range(64 << 20, GIB, 64 << 20):
                f.seek(off)
                f.write(os.urandom(64 << 10))
        r = c.call(ExecProcessRequest("tool", ("/usr/bin/python3", "-c", REREAD), env=ctr.create.env))
        out, err = _output_until(c, "tool", b"read:", r.exec_id)
        assert out.strip() in (b"read: Input/output error", b"read: Invalid or incomplete multibyte or wide character"), \
            out + err
        assert c.call(PingRequest()).policy_set is True
