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

from sandbox.attest import psp_service
from sandbox.attest.psp import write_launch_material
from sandbox.group import GroupSpec
from sandbox.images.layout import LAYER_TAR, write_layout
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.launch.agent_client import AgentClient, wait_for_agent
from sandbox.layers.convert import convert_layer
from sandbox.policy.gen import generate_policy
from sandbox.shared.protocol import PORT_COUNT
from sandbox.uvm.build import ensure_uvm
from sandbox.vmm import backend as vmm
from sandbox.vmm.config import Accel, Backend, Disk, DiskBus, PortForward, Tee, VmConfig

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "echo", "httpd", "wget", "sleep", "head", "ls", "id", "env", "true", "false", "wc", "tty",
           "stty", "hostname", "dd", "yes", "sync", "grep")


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
    return tar_of(busybox_entries())


def busybox_entries() -> list[tuple[str, bytes | None, str | None, int]]:
    """The host's static busybox with its applets, a passwd and group file and /tmp."""
    entries: list[tuple[str, bytes | None, str | None, int]] = [
        ("bin", None, None, 0o755), ("bin/busybox", BUSYBOX.read_bytes(), None, 0o755),
        ("etc", None, None, 0o755),
        ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", None, 0o644),
        ("etc/group", b"root:x:0:\nnogroup:x:65534:\n", None, 0o644),
        ("tmp", None, None, 0o1777),
    ]
    entries += [(f"bin/{a}", None, "busybox", 0o777) for a in APPLETS]
    return entries


def glibc_tools_entries(*programs: str) -> list[tuple[str, bytes | None, str | None, int]]:
    """The host's (Debian 12) dynamically linked `programs` with the loader and libc, and an nsswitch.conf
    that resolves hosts from /etc/hosts, then DNS: enough for glibc's own resolver in a container."""
    entries: list[tuple[str, bytes | None, str | None, int]] = [
        ("usr", None, None, 0o755), ("usr/bin", None, None, 0o755), ("lib", None, None, 0o755),
        ("lib/x86_64-linux-gnu", None, None, 0o755), ("lib64", None, None, 0o755),
        ("lib/x86_64-linux-gnu/libc.so.6", Path("/lib/x86_64-linux-gnu/libc.so.6").read_bytes(), None, 0o755),
        ("lib64/ld-linux-x86-64.so.2", Path("/lib64/ld-linux-x86-64.so.2").resolve().read_bytes(), None, 0o755),
        ("etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n", None, 0o644)]
    entries += [(f"usr/bin/{p}", Path(f"/usr/bin/{p}").read_bytes(), None, 0o755) for p in programs]
    return entries


def write_image(dest: Path, layers: list[bytes], config: dict[str, Any] | None = None) -> str:
    """An OCI image layout at `dest` with these uncompressed layer tars (base first), tagged "latest";
    returns its `oci:` reference."""
    def build(w: Any) -> None:
        descs = [w.add_bytes(t, LAYER_TAR) for t in layers]
        w.add_image(descs, ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers], tag="latest",
                    config=config or {"Env": ["PATH=/usr/bin:/bin"]})
    write_layout(dest, build)
    return f"oci:{dest}:latest"


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
    psp = state / "psp.bin"
    write_launch_material(psp, policy_bytes=policy, measurement=bytes.fromhex(measurement))
    cfg = VmConfig(
        name="t", tee=Tee.emulated, accel=Accel.tcg, vcpus=1, memory_mib=memory_mib, kernel=Path(uvm.kernel),
        cmdline=str(uvm.cmdline), disks=(Disk(Path(uvm.rootfs), "parma-root"),)
        + tuple(Disk(p, serial, readonly=False) if serial in writable else Disk(p, serial, bus=disk_bus)
                for p, serial in disks),
        agent_sockets=tuple(state / f"agent-{i}.sock" for i in range(PORT_COUNT)),
        console_log=state / "console.log", qmp_socket=state / "qmp.sock", forwards=forwards,
        psp_socket=state / "psp.sock", pidfile=state / "qemu.pid")
    psp_service.spawn(state / "psp.sock", psp, state / psp_service.LOG_FILE)   # it ends with the VM
    vm = vmm.launch(cfg, backend, log_file=state / "qemu.log", attached=True)
    try:
        t0 = time.monotonic()
        wait_for_agent(cfg.agent_sockets, timeout=boot_timeout, alive=vm.alive, console=cfg.console_log)
        return Guest(vm, cfg, policy, state, {"boot_s": time.monotonic() - t0})
    except BaseException:
        vm.stop(3)
        raise
