"""UVM boot benchmark: time to `parma-agent: ready` against the same kernel booting a trivial init and a bare python3.

All guests use the same kernel, QEMU command line shape (q35, TCG unless --accel kvm, virtio-blk root,
virtio-rng, one virtio-serial agent port) and the same dm-verity root setup; only the init differs:
- agent: the UVM as `up` boots it, to the agent's ready line; also the time until it answers a ping on
  its port (what `up` waits for);
- trivial init: a one-file busybox-static image whose /init echoes a marker (the kernel's share);
- python floor: the UVM rootfs with `python3 -S -c print(...)` as init (the cost of any Python agent
  before its own imports: kernel, and interpreter start through dm-verity).
Runs alternate (A B C A B C ...) so that machine load hits all alike; each figure is a median with its
ratios to both references from the same run. Each ready line carries the guest's uptime: with --icount
(QEMU counts instructions: guest time no longer depends on the host's load) those are deterministic, for
comparing changes on a busy machine.

One more boot runs the agent under `python3 -X importtime` and reports each import's cost under TCG,
split into the imports before "ready" (the boot path) and those the agent makes after it.

Also finds the smallest guest memory that still reaches agent-ready, and optionally runs N consecutive
boots counting failures.

Prints one JSON document. Goals (issue #17): agent ready <= 1.3x the python floor (reported with the
ratio to the trivial init too); issue #4: minimal memory <= 256 MiB, 0 failures in 50 boots.

Usage: python bench/bench_boot.py [--runs 5] [--boots 50] [--memory 512] [--icount SHIFT]
                                  [--no-memory-search] [--no-importtime] [--hello]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.shared.protocol import PORT_PREFIX, PROTOCOL_VERSION
from sandbox.uvm.boot import BootResult, BootSpec, boot
from sandbox.uvm.build import UvmArtifacts, ensure_uvm
from sandbox.uvm.image import RootfsImage, convert_rootfs, kernel_cmdline
from sandbox.uvm.overlay import INIT_PATH

GOAL_RATIO_FLOOR = 1.3
GOAL_MEMORY_MIB = 256
AGENT_MARKER = "parma-agent: ready"
LOADED_MARKER = "parma-agent: loaded"
TRIVIAL_MARKER = "trivial-init: ready"
PYTHON_MARKER = "python-floor: ready"
UPTIME = re.compile(r"uptime ([0-9.]+)")
REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 60.0
# How the init runs the agent (images/uvm/init's shebang), with the importtime switch added.
AGENT_PYTHON_FLAGS = "-BISu"


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
        # The guest's uptime on the marker line costs a mount and a read (about a millisecond).
        script = ("#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\nread up idle < /proc/uptime\n"
                  f"echo \"{TRIVIAL_MARKER} (uptime $up s)\"\nexec /bin/busybox sleep 3600\n").encode()
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


def with_init(cmdline: str, init: str) -> str:
    """The UVM's command line with another init (and its arguments after --)."""
    return cmdline.rsplit(" init=", 1)[0] + f" init={init}"


def port_args(sock: Path) -> tuple[str, ...]:
    """One agent port, as sandbox/vmm/qemu.py attaches the first of `up`'s."""
    return ("-chardev", f"socket,id=agent0,path={sock},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vserial0",
            "-device", f"virtserialport,bus=vserial0.0,chardev=agent0,name={PORT_PREFIX}0")


class Pinger:
    """Pings the agent on its port from QEMU's start until the first answer; `seconds` is when that came."""

    def __init__(self, sock: Path, start: float, timeout: float) -> None:
        self.sock, self.start, self.timeout = sock, start, timeout
        self.seconds: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = self.start + self.timeout
        frame = json.dumps({"v": PROTOCOL_VERSION, "id": "bench-1", "op": "ping", "payload": {}}).encode() + b"\n"
        while time.monotonic() < deadline:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(self.sock))
                    s.settimeout(max(0.1, deadline - time.monotonic()))
                    s.sendall(b"\n" + frame)
                    buf = b""
                    while b'"bench-1"' not in buf:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                    if b'"bench-1"' in buf:
                        self.seconds = time.monotonic() - self.start
                        return
            except OSError:
                pass
            time.sleep(0.02)


@dataclass(frozen=True)
class Variant:
    name: str
    spec: BootSpec
    marker: str
    ping: bool = False      # the agent: also time its first answer, watching the console until "loaded"


@dataclass(frozen=True)
class Run:
    seconds: float | None         # QEMU spawn -> the marker line
    uptime: float | None          # the guest's uptime on the marker line
    answered: float | None        # QEMU spawn -> the first answer on the agent port
    result: BootResult


def boot_once(variant: Variant, work: Path) -> Run:
    sock = work / f"{variant.name}.sock"
    sock.unlink(missing_ok=True)
    spec = replace(variant.spec, extra_args=variant.spec.extra_args + port_args(sock))
    if not variant.ping:
        result = boot(spec, marker=variant.marker, timeout=TIMEOUT)
        seconds = result.seconds
        answered = None
    else:
        pinger = Pinger(sock, time.monotonic(), TIMEOUT)
        result = boot(spec, marker=LOADED_MARKER, also=[variant.marker], timeout=TIMEOUT)
        pinger.thread.join(0)
        seconds, answered = result.marks.get(variant.marker), pinger.seconds
    line = next((ln for ln in result.console.splitlines() if variant.marker in ln), "")
    m = UPTIME.search(line)
    return Run(seconds, float(m.group(1)) if m else None, answered, result)


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"median_s": None}
    return {"median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3),
            "max_s": round(max(values), 3), "runs_s": [round(v, 3) for v in values]}


def _summary(runs: list[Run], ping: bool) -> dict[str, Any]:
    out = {"wall": _stats([r.seconds for r in runs if r.seconds is not None]),
           "guest_uptime": _stats([r.uptime for r in runs if r.uptime is not None]),
           "failures": sum(r.seconds is None for r in runs)}
    if ping:
        out["first_answer"] = _stats([r.answered for r in runs if r.answered is not None])
        out["unanswered"] = sum(r.answered is None for r in runs)
    return out


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    return round(a["median_s"] / b["median_s"], 3) if a.get("median_s") and b.get("median_s") else None


def variants(uvm: UvmArtifacts, work: Path, memory: int, accel: str, extra: tuple[str, ...]) -> list[Variant]:
    image, cmdline = trivial_root(work)
    floor_init = f"/usr/bin/python3 -- -S -c \"import time; print('{PYTHON_MARKER} (uptime', time.monotonic(), 's)')\""
    base = BootSpec(uvm.kernel, uvm.rootfs, uvm.cmdline, memory_mib=memory, accel=accel, extra_args=extra)
    return [Variant("agent", base, AGENT_MARKER, ping=True),
            Variant("trivial_init", replace(base, rootfs=image, cmdline=cmdline), TRIVIAL_MARKER),
            Variant("python_floor", replace(base, cmdline=with_init(uvm.cmdline, floor_init)), PYTHON_MARKER)]


def compare(uvm: UvmArtifacts, runs: int, memory: int, accel: str, work: Path, extra: tuple[str, ...]) -> dict[str, Any]:
    vs = variants(uvm, work, memory, accel, extra)
    results: dict[str, list[Run]] = {v.name: [] for v in vs}
    for _ in range(runs):
        for v in vs:
            results[v.name].append(boot_once(v, work))
    s = {v.name: _summary(results[v.name], v.ping) for v in vs}
    agent, trivial, floor = s["agent"], s["trivial_init"], s["python_floor"]
    doc: dict[str, Any] = dict(s)
    for clock in ("wall", "guest_uptime"):
        doc[f"ratios_{clock}"] = {"agent_ready/python_floor": _ratio(agent[clock], floor[clock]),
                                  "agent_ready/trivial_init": _ratio(agent[clock], trivial[clock]),
                                  "python_floor/trivial_init": _ratio(floor[clock], trivial[clock])}
    # On a loaded machine the medians move with the load; two steadier views of the same runs: the
    # fastest run of each variant (the least disturbed), and the median of each round's own ratio (the
    # three boots of a round ran back to back, under about the same load).
    doc["ratios_wall_fastest"] = {"agent_ready/python_floor": _ratio({"median_s": agent["wall"].get("min_s")},
                                                                    {"median_s": floor["wall"].get("min_s")}),
                                  "agent_ready/trivial_init": _ratio({"median_s": agent["wall"].get("min_s")},
                                                                    {"median_s": trivial["wall"].get("min_s")})}
    rounds = [(a.seconds, f.seconds, t.seconds) for a, t, f in zip(results["agent"], results["trivial_init"],
                                                                    results["python_floor"], strict=True)]
    paired = [(a / f, a / t) for a, f, t in rounds if a and f and t]
    if paired:
        doc["ratios_wall_per_round_median"] = {
            "agent_ready/python_floor": round(statistics.median(p[0] for p in paired), 3),
            "agent_ready/trivial_init": round(statistics.median(p[1] for p in paired), 3)}
    if agent.get("first_answer", {}).get("median_s"):
        doc["ratios_wall"]["first_answer/python_floor"] = _ratio(agent["first_answer"], floor["wall"])
    ratio = doc["ratios_wall"]["agent_ready/python_floor"]
    doc["goal_ratio_python_floor"] = GOAL_RATIO_FLOOR
    doc["meets_goal"] = ratio is not None and ratio <= GOAL_RATIO_FLOOR
    return doc


IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")


def import_table(uvm: UvmArtifacts, memory: int, accel: str, extra: tuple[str, ...], work: Path) -> dict[str, Any]:
    """Boot once with `python3 -X importtime` running the init; each import's cost, before and after ready."""
    init = f"/usr/bin/python3 -- {AGENT_PYTHON_FLAGS} -X importtime /{INIT_PATH}"
    spec = BootSpec(uvm.kernel, uvm.rootfs, with_init(uvm.cmdline, init), memory_mib=memory, accel=accel,
                    extra_args=extra)
    run = boot_once(Variant("importtime", spec, LOADED_MARKER), work)
    if run.seconds is None:
        return {"error": f"no '{LOADED_MARKER}' line ({run.result.outcome})", "console_tail": run.result.tail(15)}
    phase = "before_ready"
    rows = []
    uptimes: dict[str, float | None] = {}
    for line in run.result.console.splitlines():
        if AGENT_MARKER in line or LOADED_MARKER in line:
            m = UPTIME.search(line)
            uptimes[AGENT_MARKER if AGENT_MARKER in line else LOADED_MARKER] = float(m.group(1)) if m else None
            phase = "after_ready"
        m = IMPORT_LINE.match(line)
        if m:
            rows.append({"module": m.group(4), "self_us": int(m.group(1)), "cumulative_us": int(m.group(2)),
                         "depth": len(m.group(3)) // 2, "phase": phase})
    totals = {p: {"modules": sum(r["phase"] == p for r in rows),
                  "self_s": round(sum(r["self_us"] for r in rows if r["phase"] == p) / 1e6, 3)}
              for p in ("before_ready", "after_ready")}
    return {"note": "python3 -X importtime in the guest under TCG, one boot (importtime itself adds some cost); "
                    "cumulative_us includes the imports a module made",
            "uptime_at_ready_s": uptimes.get(AGENT_MARKER), "uptime_at_loaded_s": uptimes.get(LOADED_MARKER),
            "totals": totals,
            "top_before_ready_by_cumulative": [f"{r['cumulative_us'] / 1000:8.1f} ms {'  ' * r['depth']}{r['module']}"
                                               for r in sorted((r for r in rows if r["phase"] == "before_ready"),
                                                               key=lambda r: -r["cumulative_us"])[:30]],
            "table": rows}


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


def hello_memory_search(low: int = 128, high: int = 256) -> dict[str, Any]:
    """Smallest group memoryMiB (the spec allows >= 128) at which examples/hello serves its page."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    layout = REPO / "build" / "images" / "busybox"
    if not (layout / "index.json").exists():
        subprocess.run(["make", "-C", str(REPO), "example-images"], check=True, timeout=600, stdout=subprocess.DEVNULL)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sandbox", *args], env=env, text=True, capture_output=True,
                              timeout=600)

    def serves(mib: int) -> bool:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        group = json.loads((REPO / "examples/hello/group.json").read_text())
        group["resources"]["memoryMiB"] = mib
        group["ports"] = [{"port": 8080, "hostPort": port}]
        for c in group["containers"]:
            c["image"] = f"oci:{layout}:latest"
        group["volumes"][0]["files"]["path"] = str(REPO / "examples/hello/www")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "group.json"
            path.write_text(json.dumps(group))
            name = f"bench-mem-{mib}"
            try:
                if cli("up", "-d", "--name", name, "--tee", "emulated", str(path)).returncode != 0:
                    return False
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
                        return body == (REPO / "examples/hello/www/index.html").read_bytes()
                    except OSError:
                        time.sleep(1)
                return False
            finally:
                cli("down", name)

    tried: dict[int, bool] = {high: serves(high)}
    if not tried[high]:
        return {"min_memory_mib": None, "tried": tried}
    if serves(low):
        return {"min_memory_mib": low, "note": "the group spec's minimum", "tried": {low: True, **tried}}
    tried[low] = False
    while high - low > 8:
        mid = (low + high) // 2
        tried[mid] = serves(mid)
        low, high = (low, mid) if tried[mid] else (mid, high)
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
    times = [r.seconds for r in results if r.seconds is not None]
    return {"boots": boots, "failures": len(failures), **{k: v for k, v in _stats(times).items() if k != "runs_s"},
            "failed": failures}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="boots per variant for the medians (default 5)")
    ap.add_argument("--boots", type=int, default=0, help="also run N consecutive UVM boots (reliability)")
    ap.add_argument("--memory", type=int, default=512, help="guest memory in MiB for the timed boots")
    ap.add_argument("--accel", default="tcg", choices=["tcg", "kvm"])
    ap.add_argument("--icount", type=int, metavar="SHIFT",
                    help="TCG counts instructions (-icount shift=SHIFT,sleep=on): guest uptimes become independent "
                         "of the host's load (for comparing changes; not the figure to quote)")
    ap.add_argument("--no-memory-search", action="store_true")
    ap.add_argument("--no-importtime", action="store_true")
    ap.add_argument("--hello", action="store_true",
                    help="also find the smallest memory at which examples/hello serves its page (slow)")
    args = ap.parse_args()

    uvm = ensure_uvm()
    extra = ("-icount", f"shift={args.icount},sleep=on") if args.icount is not None else ()
    doc: dict[str, Any] = {"benchmark": "uvm-boot", "host": platform.node(), "cpus": os.cpu_count(),
                           "accel": args.accel, "icount_shift": args.icount, "memory_mib": args.memory,
                           "rootfs_bytes": uvm.rootfs.stat().st_size, "kernel_bytes": uvm.kernel.stat().st_size,
                           "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as tmp:
        doc["boot"] = compare(uvm, args.runs, args.memory, args.accel, Path(tmp), extra)
        if not args.no_importtime:
            doc["imports"] = import_table(uvm, args.memory, args.accel, extra, Path(tmp))
    if not args.no_memory_search:
        doc["memory"] = memory_search(uvm, args.accel)
    if args.hello:
        doc["hello_memory"] = hello_memory_search()
    if args.boots:
        doc["reliability"] = reliability(uvm, args.boots, args.memory, args.accel)
    doc["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["bench_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
