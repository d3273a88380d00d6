"""Layer conversion (tar -> ext4 + dm-verity) against hcsshim's tar2ext4, as commands, in one run; peak memory.

Input: the Debian minbase tar of tests/data/aci-layer-hashes.json (scripts/aci-reference-minbase.sh stores it
in the cache; PARMA_SANDBOX_ACI_MINBASE names a copy), else a minbase + python3-minimal tar made with
mmdebstrap (tests/minbase.py). Each sample is one process, timed from spawn to exit, with its CPU time; the
page cache is warm; samples of ours and the reference alternate, and the median of --runs counts.

Ours: `parma-sandbox image convert [--compat aci] [--no-verity] LAYER -o OUT` (its output is fsynced before
it is renamed into place). The reference, when hcsshim's tar2ext4 is at hand (PARMA_SANDBOX_TAR2EXT4, or
`tar2ext4` on PATH; build it from github.com/microsoft/hcsshim cmd/tar2ext4, nothing here builds it):
- ext4 only: `tar2ext4 -overlay -i LAYER -o OUT` (it does not fsync); also reported with `sync OUT` after it;
- ext4 + dm-verity: that, then `veritysetup format --hash-offset=SIZE OUT OUT` (which fsyncs OUT), the
  layout ACI hashes.
Checks in the same run: in --compat aci mode our ext4 equals tar2ext4's byte for byte (same maximum disk
size as its CLI, 16 GiB) and our root hash equals the recorded ACI root hash for the recorded tar. Without
tar2ext4 the reference is `tar -x` + `mkfs.ext4 -d` + `veritysetup format` (needs root to keep owners).
ratio = reference median / our median (>= 1.0: we are as fast); cpu_ratio the same for CPU time, which
tells how the two compare when no core is free (then the wall-time ratio tends to it). `goal` names the rows
the speed goal counts (ext4 + dm-verity, both modes) and whether they, the root hash and the memory hold;
the ext4-only rows are context (`all_ratios_ok` covers them too).

Memory: peak RSS of our conversion of a synthetic layer of --entries entries (default 200,000) and of a
layer holding one 1 GiB file, against the 64 MiB goal (tar2ext4 + veritysetup on the same layer for context).

Usage: python bench/bench_tar2ext4.py [--runs N] [--entries N] [--large-gib N] [--no-reference]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sandbox.aci.ext4compat import ACI_OPTIONS  # noqa: E402
from sandbox.layers.convert import convert_tar_to_ext4  # noqa: E402
from sandbox.paths import cache_dir  # noqa: E402
from sandbox.shared.verity import file_reader, read_verity_layout  # noqa: E402
from tests.minbase import minbase_tar  # noqa: E402

GOAL_RSS_MIB = 64
TAR2EXT4_CLI_DISK_SIZE = 16 << 30       # compactext4's default maximum disk size, which its CLI keeps
RECORDED = {layer["name"]: layer for layer in
            json.loads((REPO / "tests" / "data" / "aci-layer-hashes.json").read_text())["layers"]}


def debian_tar() -> tuple[Path, str | None]:
    """The recorded ACI minbase tar and its recorded root hash, else a freshly made minbase tar and None."""
    want = RECORDED["debian-minbase"]["tar_sha256"]
    for candidate in [os.environ.get("PARMA_SANDBOX_ACI_MINBASE"),
                      str(cache_dir() / "aci-reference-layers" / f"{want}.tar")]:
        if candidate and Path(candidate).is_file():
            return Path(candidate), RECORDED["debian-minbase"]["root_hash"]
    return minbase_tar(include=("python3-minimal",)), None


def tar2ext4_tool() -> str | None:
    return os.environ.get("PARMA_SANDBOX_TAR2EXT4") or shutil.which("tar2ext4")


def cli() -> list[str]:
    script = Path(sys.executable).parent / "parma-sandbox"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "sandbox"]


# A small process runs each command: a child's peak RSS counts the memory of whatever forked it (Linux takes
# the old address space's high-water mark at exec), and this benchmark process is large.
_LAUNCHER = """
import os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - t} {usage.ru_utime + usage.ru_stime} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int, bytes]:
    """(wall s, CPU s, peak RSS KiB, stdout) of one command, from its rusage; it must succeed."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as report:
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, report.name, *map(str, argv)], stdout=out,
                              stderr=err, env=env, check=False)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(map(str, argv))} failed (exit {proc.returncode}): "
                             f"{err.read().decode(errors='replace')[-2000:]}")
        wall, cpu, rss = report.read().split()
        return float(wall), float(cpu), int(rss), out.read()


class Pipeline:
    """One way of converting a layer: a list of commands run one after the other."""

    def __init__(self, name: str, commands: list[list[str]], out: Path) -> None:
        self.name = name
        self.commands = commands
        self.out = out
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.rss_kib = 0

    def sample(self, env: dict[str, str]) -> None:
        self.out.unlink(missing_ok=True)
        wall = cpu = 0.0
        for argv in self.commands:
            w, c, rss, _ = run_child(argv, env)
            wall += w
            cpu += c
            self.rss_kib = max(self.rss_kib, rss)
        self.wall.append(wall)
        self.cpu.append(cpu)

    def summary(self, size: int) -> dict:
        med = statistics.median(self.wall)
        return {"commands": [" ".join(map(str, c)) for c in self.commands],
                "median_s": round(med, 3), "min_s": round(min(self.wall), 3),
                "cpu_median_s": round(statistics.median(self.cpu), 3), "mb_per_s": round(size / med / 1e6, 1),
                "peak_rss_mib": round(self.rss_kib / 1024, 1)}


def verity_append(img: Path) -> list[str]:
    size = img.stat().st_size if img.exists() else 0
    return ["veritysetup", "format", f"--hash-offset={size}", f"--salt={'00' * 32}", str(img), str(img)]


class VerityAfter(Pipeline):
    """A converter, then veritysetup appending the tree (its hash offset is the converter's output size)."""

    def sample(self, env: dict[str, str]) -> None:
        self.out.unlink(missing_ok=True)
        w1, c1, r1, _ = run_child(self.commands[0], env)
        w2, c2, r2, _ = run_child(verity_append(self.out), env)
        self.wall.append(w1 + w2)
        self.cpu.append(c1 + c2)
        self.rss_kib = max(self.rss_kib, r1, r2)


def compare(ours: Pipeline, reference: Pipeline, size: int) -> dict:
    o, r = ours.summary(size), reference.summary(size)
    return {"ours": o, "reference": r, "ratio": round(r["median_s"] / o["median_s"], 3),
            "cpu_ratio": round(r["cpu_median_s"] / o["cpu_median_s"], 3)}


# Issue 17's goal is about layer conversion: the ext4 image and its dm-verity tree, the device ACI hashes
# (hcsshim computes a layer's root hash as tar2ext4 then a Merkle tree: ConvertAndComputeRootDigest), in
# --compat aci mode with the recorded root hash, and in the default mode. The ext4-only rows are context:
# tar2ext4 alone against our converter with the tree left out.
GOAL_ROWS = ("aci_verity", "default_verity")


def goal_summary(doc: dict) -> dict:
    """Which rows the goal counts, their ratios, and whether the goal holds in this run."""
    ratios = {k: doc[k]["ratio"] for k in GOAL_ROWS if k in doc}
    if not ratios and "ratio" in doc:          # no tar2ext4: ours (default mode) against the tools pipeline
        ratios = {"default_verity_vs_tools": doc["ratio"]}
    same_hash = doc.get("checks", {}).get("aci_root_hash_equals_recorded")
    ok = bool(ratios) and all(r >= 1.0 for r in ratios.values()) and doc["peak_rss_ok"] and same_hash is not False
    return {"rows": list(ratios), "ratios": ratios, "goal_ratio": 1.0, "root_hash_equals_recorded": same_hash,
            "peak_rss_ok": doc["peak_rss_ok"], "ok": ok,
            "context_rows": [k for k in ("aci_ext4", "default_ext4") if k in doc]}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def many_entries_layer(path: Path, count: int) -> None:
    """`count` entries: directories of 1000 small files (one in ten a symlink), each with its own mtime."""
    if path.exists():
        return
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        n = d = 0
        while n < count:
            info = tarfile.TarInfo(f"usr/share/dir{d:05d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000 + d
            tar.addfile(info)
            n += 1
            for i in range(min(1000, count - n)):
                info = tarfile.TarInfo(f"usr/share/dir{d:05d}/file-{i:05d}.txt")
                info.mtime, info.mode = 1_700_000_000 + n, 0o644
                if i % 10 == 9:
                    info.type, info.linkname = tarfile.SYMTYPE, f"file-{i - 1:05d}.txt"
                    tar.addfile(info)
                else:
                    data = (info.name.encode() * 2)[:(i * 7) % 97]
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1
            d += 1
    tmp.replace(path)


def large_file_layer(path: Path, size: int) -> None:
    """A tar with one `size`-byte file of zeros, written sparsely (cheap to make, full cost to convert)."""
    info = tarfile.TarInfo("big.bin")
    info.size = size
    with open(path, "wb") as f:
        f.write(info.tobuf(tarfile.PAX_FORMAT))
        f.truncate(f.tell() + size + (-size % 512) + 1024)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def identity_checks(src: Path, work: Path, tool: str | None, recorded_root: str | None, env: dict[str, str],
                    ours_full: Path) -> dict:
    """Byte identity with tar2ext4 (same maximum disk size) and the recorded ACI root hash."""
    doc: dict = {}
    if recorded_root is not None:
        got = read_verity_layout(file_reader(ours_full)).root_hash
        doc["aci_root_hash"] = got
        doc["aci_root_hash_equals_recorded"] = got == recorded_root
    if tool:
        ours, theirs = work / "ident-ours.ext4", work / "ident-tar2ext4.ext4"
        convert_tar_to_ext4(src, ours, options=replace(ACI_OPTIONS, max_disk_size=TAR2EXT4_CLI_DISK_SIZE))
        run_child([tool, "-overlay", "-i", str(src), "-o", str(theirs)], env)
        doc["ext4_sha256_ours"] = sha256_file(ours)
        doc["ext4_sha256_tar2ext4"] = sha256_file(theirs)
        doc["ext4_identical_to_tar2ext4"] = doc["ext4_sha256_ours"] == doc["ext4_sha256_tar2ext4"]
        ours.unlink()
        theirs.unlink()
    return doc


def tools_pipeline(src: Path, work: Path, ext4_size: int) -> dict:
    """tar -x, mkfs.ext4 -d, veritysetup format: the reference when tar2ext4 is not at hand."""
    root = work / "root"
    root.mkdir()
    img = work / "ref.img"
    t = time.perf_counter()
    run_child(["tar", "-xpf", str(src), "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(root)])
    t_extract = time.perf_counter()
    blocks = ext4_size * 12 // 10 // 4096
    run_child(["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-O", "^has_journal", "-E", "root_owner=0:0",
               "-d", str(root), str(img), str(blocks)])
    t_mkfs = time.perf_counter()
    run_child(["veritysetup", "format", f"--hash-offset={blocks * 4096}", f"--salt={'00' * 32}", str(img),
               str(img)])
    t_end = time.perf_counter()
    shutil.rmtree(root)
    img.unlink()
    return {"tools": "tar -x, mkfs.ext4 -d, veritysetup format", "seconds": round(t_end - t, 3),
            "extract_s": round(t_extract - t, 3), "mkfs_s": round(t_mkfs - t_extract, 3),
            "veritysetup_s": round(t_end - t_mkfs, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--entries", type=int, default=200_000)
    ap.add_argument("--large-gib", type=float, default=1.0)
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    src, recorded_root = debian_tar()
    tool = None if args.no_reference else tar2ext4_tool()
    size = src.stat().st_size
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    build = REPO / "build"
    build.mkdir(exist_ok=True)
    doc: dict = {"benchmark": "tar2ext4", "input": {"tar": str(src), "bytes": size,
                                                     "recorded_aci_layer": recorded_root is not None}}
    with tempfile.TemporaryDirectory(prefix="bench-tar2ext4.", dir=build) as tmp:
        work = Path(tmp)
        warm(src)
        out = work / "out.img"
        ps = cli()
        ours = {
            "aci_ext4": Pipeline("ours", [[*ps, "image", "convert", "--compat", "aci", "--no-verity", str(src),
                                           "-o", str(out)]], out),
            "aci_verity": Pipeline("ours", [[*ps, "image", "convert", "--compat", "aci", str(src), "-o", str(out)]],
                                   out),
            "default_ext4": Pipeline("ours", [[*ps, "image", "convert", "--no-verity", str(src), "-o", str(out)]], out),
            "default_verity": Pipeline("ours", [[*ps, "image", "convert", str(src), "-o", str(out)]], out),
        }
        references: dict[str, Pipeline] = {}
        if tool:
            ref_out = work / "ref.img"
            references = {
                "ext4": Pipeline("tar2ext4", [[tool, "-overlay", "-i", str(src), "-o", str(ref_out)]], ref_out),
                "ext4_synced": Pipeline("tar2ext4 + sync", [[tool, "-overlay", "-i", str(src), "-o", str(ref_out)],
                                                           ["sync", str(ref_out)]], ref_out),
                "verity": VerityAfter("tar2ext4 + veritysetup",
                                      [[tool, "-overlay", "-i", str(src), "-o", str(ref_out)]], ref_out),
            }
        everything = [*ours.values(), *references.values()]
        for p in everything:                    # warm-up: bytecode caches, page cache
            p.sample(env)
            p.wall.clear()
            p.cpu.clear()
        for _ in range(args.runs):
            for p in everything:
                p.sample(env)
        ours["aci_verity"].sample(env)          # leave its output for the identity checks
        doc["checks"] = identity_checks(src, work, tool, recorded_root, env, out)
        if references:
            doc["reference_tool"] = {"tar2ext4": tool}
            doc["aci_ext4"] = compare(ours["aci_ext4"], references["ext4"], size)
            doc["aci_ext4"]["ratio_reference_synced"] = round(
                references["ext4_synced"].summary(size)["median_s"] / ours["aci_ext4"].summary(size)["median_s"], 3)
            doc["aci_verity"] = compare(ours["aci_verity"], references["verity"], size)
            doc["default_ext4"] = compare(ours["default_ext4"], references["ext4"], size)
            doc["default_verity"] = compare(ours["default_verity"], references["verity"], size)
        else:
            doc["ours"] = {k: p.summary(size) for k, p in ours.items()}
            if args.no_reference:
                doc["reference"] = {"skipped": "--no-reference"}
            elif os.geteuid() != 0:
                doc["reference"] = {"skipped": "no tar2ext4 (PARMA_SANDBOX_TAR2EXT4 or PATH), and the tools "
                                               "pipeline needs root to extract with owners"}
            else:
                ext4_size = ours["default_ext4"].out.stat().st_size if ours["default_ext4"].out.exists() else size
                ref = tools_pipeline(src, work, ext4_size)
                doc["reference"] = ref
                doc["ratio"] = round(ref["seconds"] / doc["ours"]["default_verity"]["median_s"], 3)
        out.unlink(missing_ok=True)

        many = build / f"bench-layer-{args.entries}-entries.tar"
        many_entries_layer(many, args.entries)
        big = work / "big.tar"
        large_file_layer(big, int(args.large_gib * (1 << 30)))
        memory: dict = {}
        for name, layer in ((f"{args.entries}_entries", many), ("large_file", big)):
            warm(layer)
            p = Pipeline("ours", [[*ps, "image", "convert", str(layer), "-o", str(out)]], out)
            p.sample(env)
            entry = {"tar_bytes": layer.stat().st_size, **p.summary(layer.stat().st_size)}
            out.unlink(missing_ok=True)
            if tool:
                # like for like: ours appends the verity tree, so the reference does too
                r = VerityAfter("tar2ext4 + veritysetup", [[tool, "-overlay", "-i", str(layer), "-o", str(out)]], out)
                r.sample(env)
                entry["tar2ext4_veritysetup"] = {k: v for k, v in r.summary(layer.stat().st_size).items()
                                                 if k != "commands"}
                entry["ratio"] = round(entry["tar2ext4_veritysetup"]["median_s"] / entry["median_s"], 3)
                out.unlink(missing_ok=True)
            memory[name] = entry
        doc["memory"] = memory
    doc["goal_peak_rss_mib"] = GOAL_RSS_MIB
    doc["peak_rss_ok"] = all(m["peak_rss_mib"] <= GOAL_RSS_MIB for m in memory.values())
    ratios = [doc[k]["ratio"] for k in ("aci_ext4", "aci_verity", "default_ext4", "default_verity") if k in doc]
    doc["all_ratios_ok"] = bool(ratios) and all(r >= 1.0 for r in ratios)
    doc["goal"] = goal_summary(doc)
    doc["load_average"] = os.getloadavg()
    doc["python"] = platform.python_version()
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
