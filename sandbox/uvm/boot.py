"""Boot a UVM kernel + root image under QEMU and watch the serial console for a marker line.

A small, self-contained launcher for boot tests and the boot benchmark (the full launcher with agent
channels and networking is sandbox.vmm). It uses the same machine shape as sandbox.vmm: q35,
-nodefaults, virtio-blk root as the first disk, virtio-rng; the console is read from QEMU's stdout.
Always bounded by a hard timeout: a hung guest is killed, never waited on.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.run import spawn

READY_LINE = "parma-agent: ready"
LINE_END_WAIT = 2.0     # seconds to wait for the rest of the marker's line once the marker is there


@dataclass(frozen=True)
class BootSpec:
    kernel: Path
    rootfs: Path
    cmdline: str
    memory_mib: int = 512
    vcpus: int = 1
    accel: str = "tcg"
    firmware: Path | None = None            # -bios image (None: QEMU's default, direct kernel boot)
    extra_args: tuple[str, ...] = ()

    def argv(self, qemu: str = "qemu-system-x86_64") -> list[str]:
        argv = [qemu, "-machine", f"q35,accel={self.accel}", "-nodefaults", "-no-user-config",
                "-display", "none", "-vga", "none", "-no-reboot",
                "-smp", str(self.vcpus), "-m", f"{self.memory_mib}M",
                "-chardev", "stdio,id=console0,signal=off", "-serial", "chardev:console0",
                "-kernel", os.fspath(self.kernel), "-append", self.cmdline,
                "-drive", f"if=none,id=root,file={os.fspath(self.rootfs).replace(',', ',,')},format=raw,readonly=on",
                "-device", "virtio-blk-pci,drive=root",
                "-device", "virtio-rng-pci"]
        if self.firmware is not None:
            argv += ["-bios", os.fspath(self.firmware)]
        return argv + list(self.extra_args)


@dataclass(frozen=True)
class BootResult:
    ready: bool
    seconds: float | None           # QEMU spawn -> marker line (None when not reached)
    elapsed: float                  # until we stopped watching
    outcome: str                    # "ready", "exited (code N)" or "timeout"
    console: str = field(repr=False)
    marks: dict[str, float] = field(default_factory=dict)   # QEMU spawn -> each `also` marker seen

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


def boot(spec: BootSpec, *, marker: str = READY_LINE, timeout: float = 30.0,
         stop_patterns: Sequence[str] = (), also: Sequence[str] = ()) -> BootResult:
    """Boot and wait for `marker`'s line (or an early QEMU exit, or a stop pattern, or the timeout); then kill
    QEMU. The times of the `also` markers that appear on the way are in the result's marks."""
    start = time.monotonic()
    proc = spawn(spec.argv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, new_session=True)
    assert proc.stdout is not None
    buf = b""
    seconds: float | None = None
    outcome = "timeout"
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    want = marker.encode()
    stops = [p.encode() for p in stop_patterns]
    marks: dict[str, float] = {}
    deadline = start + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not sel.select(timeout=min(left, 0.5)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                proc.wait(timeout=5)
                if seconds is None:
                    outcome = f"exited (code {proc.returncode})"
                break
            buf += chunk
            for m in also:
                if m not in marks and m.encode() in buf:
                    marks[m] = time.monotonic() - start
            if seconds is None and want in buf:
                seconds = time.monotonic() - start
                outcome = "ready"
                deadline = min(deadline, time.monotonic() + LINE_END_WAIT)
            if seconds is not None:
                if b"\n" in buf[buf.index(want):]:
                    break   # the whole marker line: what follows the marker on it belongs to the result
                continue
            if any(s in buf for s in stops):
                outcome = "stop pattern"
                break
    finally:
        sel.close()
        elapsed = time.monotonic() - start
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Drain what QEMU wrote before it died, for the console record.
        rest = proc.stdout.read() or b""
        proc.stdout.close()
    return BootResult(ready=seconds is not None, seconds=seconds, elapsed=elapsed, outcome=outcome,
                      console=(buf + rest).decode(errors="replace"), marks=marks)
