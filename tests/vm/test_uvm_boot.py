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

HARD_TIMEOUT = 60.0     # never wait on a hung guest longer than this; boot *speed* is bench/bench_boot.py's


def test_uvm_boots_to_agent_ready(uvm: UvmArtifacts) -> None:
    """The UVM reaches the agent's ready line with a verified root and no panic.

    How fast is measured by bench/bench_boot.py against a trivial init in the same run, not here: under
    TCG on shared cores a wall-clock budget in a test measures the machine's load, not the UVM."""
    result = boot(BootSpec(uvm.kernel, uvm.rootfs, uvm.cmdline), timeout=HARD_TIMEOUT)
    assert result.ready, f"no 'parma-agent: ready' ({result.outcome}):\n{result.tail()}"
    assert "device-mapper: verity" not in result.console and "Kernel panic" not in result.console


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


RELIABILITY_BOOTS = 50


@pytest.mark.slow
def test_fifty_consecutive_boots_reach_the_agent(uvm: UvmArtifacts) -> None:
    """Reliability (issue #17's acceptance): 50 boots in a row, each to the agent's ready line, none lost.

    Counts failures only; bench/bench_boot.py --boots N reports the times."""
    failures = []
    for i in range(RELIABILITY_BOOTS):
        result = boot(BootSpec(uvm.kernel, uvm.rootfs, uvm.cmdline), timeout=HARD_TIMEOUT)
        if not result.ready or "Kernel panic" in result.console:
            failures.append(f"boot {i}: {result.outcome}\n{result.tail(15)}")
    assert not failures, f"{len(failures)} of {RELIABILITY_BOOTS} boots failed:\n" + "\n\n".join(failures)
