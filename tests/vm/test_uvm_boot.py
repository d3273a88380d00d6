"""The UVM boots under QEMU (TCG here) to the agent, and refuses to boot a tampered rootfs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from sandbox.run import run
from sandbox.uvm.boot import BootSpec, boot
from sandbox.uvm.build import UvmArtifacts
from sandbox.uvm.overlay import INIT_PATH

BOOT_BUDGET = 10.0      # issue #4: agent ready on the serial console within 10 s
HARD_TIMEOUT = 60.0     # never wait on a hung guest longer than this


ATTEMPTS = 3            # the machine may be busy (2 shared cores): any attempt within budget counts


def test_uvm_boots_to_agent_ready_within_budget(uvm: UvmArtifacts) -> None:
    """Every attempt must reach the agent; at least one within the budget (TCG time is load-sensitive)."""
    times = []
    for _ in range(ATTEMPTS):
        result = boot(BootSpec(uvm.kernel, uvm.rootfs, uvm.cmdline), timeout=HARD_TIMEOUT)
        assert result.ready, f"no 'parma-agent: ready' ({result.outcome}):\n{result.tail()}"
        assert "device-mapper: verity" not in result.console and "Kernel panic" not in result.console
        times.append(result.seconds)
        if result.seconds is not None and result.seconds <= BOOT_BUDGET:
            break
    assert min(times) <= BOOT_BUDGET, f"boot to agent-ready took {times} s"


def _debugfs(image: Path, request: str) -> str:
    """Ask debugfs about the ext4 image (read-only; nothing is mounted)."""
    return run(["debugfs", "-R", request, image]).stdout.decode()


def _flip(image: Path, offset: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("where", ["init", "hash tree"])
def test_one_flipped_byte_stops_the_boot_with_a_verity_error(uvm: UvmArtifacts, tmp_path: Path, where: str) -> None:
    """A byte of the init the kernel runs (a data block), or of the tree's top block (every read depends on it)."""
    tampered = tmp_path / "rootfs.img"
    shutil.copyfile(uvm.rootfs, tampered)
    if where == "init":
        block = int(_debugfs(tampered, f"blocks /{INIT_PATH}").split()[0])
        expected = rf"device-mapper: verity: \d+:\d+: data block {block} is corrupted"
    else:
        block = uvm.manifest["rootfs"]["hash_start_block"]
        expected = r"device-mapper: verity: \d+:\d+: metadata block \d+ is corrupted"
    _flip(tampered, block * 4096 + 100)
    result = boot(BootSpec(uvm.kernel, tampered, uvm.cmdline), timeout=HARD_TIMEOUT)
    assert not result.ready, "the agent started from a tampered rootfs"
    assert re.search(expected, result.console), result.tail()
    # The guest does not limp on: the kernel panics (no init, or no root) and QEMU stops.
    assert "Kernel panic" in result.console and result.outcome.startswith("exited"), result.tail()
