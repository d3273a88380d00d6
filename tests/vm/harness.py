"""Boot the real UVM with hand-made layer disks, and play the (malicious) host against the agent.

Images here are built from the host's static busybox, so the vm tier needs no registry: a tar is
converted with the project's own layer converter, a ResolvedImage is assembled by hand, and the policy
comes from the real generator. Extra disks (a tampered copy, a rogue layer) are attached too; the
policy decides what the agent may do with them.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.attest.psp import write_launch_material
from sandbox.group import GroupSpec
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.launch.agent_client import AgentClient, wait_for_agent
from sandbox.launch.plan import LaunchPlan
from sandbox.layers.convert import convert_layer
from sandbox.policy.gen import generate_policy
from sandbox.shared.messages import SetPolicyRequest, StartContainerRequest
from sandbox.shared.protocol import PORT_COUNT
from sandbox.shared.snp.emulated_psp import FW_CFG_NAME
from sandbox.uvm.build import ensure_uvm
from sandbox.vmm import backend as vmm
from sandbox.vmm.config import Accel, Backend, Disk, DiskBus, FwCfgFile, PortForward, Tee, VmConfig

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "echo", "httpd", "wget", "sleep", "head", "ls", "id", "env", "true", "false", "wc")


def tar_of(entries: list[tuple[str, bytes | None, str | None, int]]) -> bytes:
    """(name, content or None for a dir, symlink target or None, mode) -> a reproducible tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, content, link, mode in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 0, mode
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def busybox_tar() -> bytes:
    entries: list[tuple[str, bytes | None, str | None, int]] = [
        ("bin", None, None, 0o755), ("bin/busybox", BUSYBOX.read_bytes(), None, 0o755),
        ("etc", None, None, 0o755),
        ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", None, 0o644),
        ("etc/group", b"root:x:0:\nnogroup:x:65534:\n", None, 0o644),
        ("tmp", None, None, 0o1777),
    ]
    entries += [(f"bin/{a}", None, "busybox", 0o777) for a in APPLETS]
    return tar_of(entries)


DATA_LINE = b"the quick brown fox jumps over the lazy dog %06d\n"


def data_tar() -> bytes:
    """A layer with a 400 KiB file of known lines (so a flipped byte shows), plus a small one."""
    big = b"".join(DATA_LINE % i for i in range(8000))
    return tar_of([("data", None, None, 0o755), ("data/big.txt", big, None, 0o644),
                 ("data/small.txt", b"small and intact\n", None, 0o644)])


@dataclass
class Layer:
    tar: Path
    image: Path
    root_hash: str

    def info(self) -> LayerInfo:
        return LayerInfo("sha256:" + hashlib.sha256(self.tar.read_bytes()).hexdigest(), "application/tar", 0,
                         self.root_hash, self.image)


def make_layer(dirpath: Path, name: str, content: bytes) -> Layer:
    tar = dirpath / f"{name}.tar"
    tar.write_bytes(content)
    image = dirpath / f"{name}.img"
    result = convert_layer(tar, image)
    return Layer(tar, image, result.root_hash)


def tamper_file_block(image: Path, out: Path, path_in_fs: str, byte_offset: int) -> int:
    """Copy `image` to `out` and flip one bit of `path_in_fs` at `byte_offset` (data only; the verity tree is
    left alone, so the root hash the guest derives still matches the policy). Returns the block number."""
    from sandbox.run import run

    blocks = run(["debugfs", "-R", f"blocks {path_in_fs}", str(image)]).stdout.split()
    block = int(blocks[byte_offset // 4096])
    shutil.copyfile(image, out)
    with open(out, "r+b") as f:
        f.seek(block * 4096 + byte_offset % 4096)
        b = f.read(1)
        f.seek(block * 4096 + byte_offset % 4096)
        f.write(bytes([b[0] ^ 0x01]))
    return block


def image_of(*layers: Layer, **config: Any) -> ResolvedImage:
    return ResolvedImage("test", "sha256:" + "0" * 64, ImageConfig(**config), tuple(layer.info() for layer in layers))


@dataclass
class Guest:
    """One booted UVM and what it was started with."""

    vm: vmm.Vm
    cfg: VmConfig
    policy: bytes
    state: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def client(self, **kw: Any) -> AgentClient:
        return AgentClient.connect(self.cfg.agent_sockets, **kw)

    def console(self) -> str:
        try:
            return self.cfg.console_log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        self.vm.stop(5)


def boot(state: Path, *, spec: GroupSpec, images: dict[str, ResolvedImage], disks: list[tuple[Path, str]],
         forwards: tuple[PortForward, ...] = (), backend: Backend = Backend.qemu,
         boot_timeout: float = 240, disk_bus: DiskBus = DiskBus.virtio_blk, memory_mib: int = 512,
         writable: tuple[str, ...] = ()) -> Guest:
    """Launch the project's UVM (emulated, TCG) with the given extra disks (on `disk_bus`; the serials in
    `writable` read-write on virtio-blk) and the generated policy's HOST_DATA; return once the agent answers."""
    uvm = ensure_uvm()
    state.mkdir(parents=True, exist_ok=True)
    policy = generate_policy(spec, images)
    measurement = uvm.expected_measurement(1) or "00" * 48
    psp = state / "psp.json"
    write_launch_material(psp, policy_bytes=policy, measurement=bytes.fromhex(measurement))
    cfg = VmConfig(
        name="t", tee=Tee.emulated, accel=Accel.tcg, vcpus=1, memory_mib=memory_mib, kernel=Path(uvm.kernel),
        cmdline=str(uvm.cmdline), disks=(Disk(Path(uvm.rootfs), "parma-root"),)
        + tuple(Disk(p, serial, readonly=False) if serial in writable else Disk(p, serial, bus=disk_bus)
                for p, serial in disks),
        agent_sockets=tuple(state / f"agent-{i}.sock" for i in range(PORT_COUNT)),
        console_log=state / "console.log", qmp_socket=state / "qmp.sock", forwards=forwards,
        fw_cfg=(FwCfgFile(FW_CFG_NAME, psp),), pidfile=state / "qemu.pid")
    vm = vmm.launch(cfg, backend, log_file=state / "qemu.log", attached=True)
    try:
        t0 = time.monotonic()
        wait_for_agent(cfg.agent_sockets, timeout=boot_timeout, alive=vm.alive, console=cfg.console_log)
        return Guest(vm, cfg, policy, state, {"boot_s": time.monotonic() - t0})
    except BaseException:
        vm.stop(3)
        raise


def start_plan(client: AgentClient, guest: Guest, plan: LaunchPlan) -> None:
    """What `up` asks of the agent for a launch plan: the policy, every layer device, and each container's
    scratch, overlay, create and start (the same typed requests the launcher sends)."""
    client.call(SetPolicyRequest(guest.policy))
    for m in plan.layers:
        assert client.call(m.mount).root_hash == m.root_hash
    for ctr in plan.containers:
        client.call(ctr.scratch)
        client.call(ctr.overlay)
        client.call(ctr.create, timeout=120)
        client.call(StartContainerRequest(ctr.name), timeout=120)
