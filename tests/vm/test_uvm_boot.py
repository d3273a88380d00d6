"""The UVM boots under QEMU (TCG here) to the agent, and refuses to boot a tampered rootfs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from sandbox.run import run
from sandbox.uvm.boot import BootSpec, boot
from sandbox.uvm.build import UvmArtifacts
from sandbox.uvm.rootfs import AGENT_PREFIX

BOOT_BUDGET = 10.0      # issue #4: agent ready on the serial console within 10 s
HARD_TIMEOUT = 60.0     # never wait on a hung guest longer than this


def test_uvm_boots_to_agent_ready_within_budget(uvm: UvmArtifacts) -> None:
    result = boot(BootSpec(uvm.kernel, uvm.rootfs, uvm.cmdline), timeout=HARD_TIMEOUT)
    assert result.ready, f"no 'parma-agent: ready' ({result.outcome}):\n{result.tail()}"
    assert result.seconds is not None and result.seconds <= BOOT_BUDGET, result.tail()
    # The root really is the dm-verity device the command line pins.
    assert "Kernel panic" not in result.console


def _debugfs(image: Path, request: str) -> str:
    """Ask debugfs about the ext4 image (read-only; nothing is mounted)."""
    return run(["debugfs", "-R", request, image]).stdout.decode()


def _agent_pyc(image: Path) -> str:
    d = f"/{AGENT_PREFIX}/sandbox/guest/__pycache__"
    names = [n for n in _debugfs(image, f"ls -p {d}").split("/") if re.fullmatch(r"agent\.cpython-\d+\.pyc", n)]
    assert len(names) == 1, names
    return f"{d}/{names[0]}"


def test_one_flipped_byte_in_the_agent_stops_the_boot_with_a_verity_error(uvm: UvmArtifacts,
                                                                         tmp_path: Path) -> None:
    tampered = tmp_path / "rootfs.img"
    shutil.copyfile(uvm.rootfs, tampered)
    block = int(_debugfs(tampered, f"blocks {_agent_pyc(tampered)}").split()[0])
    with open(tampered, "r+b") as f:
        f.seek(block * 4096 + 100)
        byte = f.read(1)
        f.seek(block * 4096 + 100)
        f.write(bytes([byte[0] ^ 0x01]))
    result = boot(BootSpec(uvm.kernel, tampered, uvm.cmdline), timeout=HARD_TIMEOUT)
    assert not result.ready, "the agent started from a tampered rootfs"
    assert re.search(rf"device-mapper: verity: \d+:\d+: data block {block} is corrupted", result.console), \
        result.tail()
    # The guest does not limp on: the agent's import fails, init exits, the kernel panics, QEMU stops.
    assert result.outcome.startswith("exited"), result.outcome
