"""Layer conversion (tar -> ext4 + dm-verity) throughput and peak memory.

Inputs: a real Debian rootfs tarball (mmdebstrap minbase + python3-minimal, about 200 MB, built once and
cached), and a synthetic layer holding one large file (default 1 GiB) to show that memory does not grow
with the layer. Each conversion runs in a child process so its peak RSS is its own. As a reference, when
run as root, the same rootfs goes through `tar -x`, `mkfs.ext4 -d` and `veritysetup format` (the usual
tool pipeline, which needs root to keep file owners); ratio = reference time / our time.

Prints one JSON document. Goal: peak RSS under 100 MB whatever the layer's size.
Usage: python bench/bench_tar2ext4.py [--large-gib N] [--no-reference]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sandbox.run import run, spawn  # noqa: E402
from tests.minbase import minbase_tar  # noqa: E402

GOAL_RSS_MB = 100
CHILD = ("import json, sys; from pathlib import Path; from sandbox.layers.convert import convert_layer; "
         "r = convert_layer(Path(sys.argv[1]), Path(sys.argv[2])); "
         "print(json.dumps({'root_hash': r.root_hash, 'entries': r.entries, 'ext4_size': r.ext4_size, "
         "'image_size': r.image_size}))")


def convert_in_child(src: Path, out: Path) -> dict:
    import subprocess
    t = time.perf_counter()
    proc = spawn([sys.executable, "-c", CHILD, src, out], stdout=subprocess.PIPE,
                 env={"PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"conversion of {src} failed (exit {proc.returncode})")
    result = json.loads(output)
    tar_size = src.stat().st_size
    return {**result, "tar_bytes": tar_size, "seconds": round(elapsed, 3),
            "mb_per_s": round(tar_size / elapsed / 1e6, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def large_layer(path: Path, size: int) -> None:
    """A tar with one `size`-byte file of zeros, written sparsely (cheap to make, full cost to convert)."""
    info = tarfile.TarInfo("big.bin")
    info.size = size
    with open(path, "wb") as f:
        f.write(info.tobuf(tarfile.PAX_FORMAT))
        f.truncate(f.tell() + size + (-size % 512) + 1024)


def reference(src: Path, work: Path, ext4_size: int) -> dict:
    root = work / "root"
    root.mkdir()
    img = work / "ref.img"
    t = time.perf_counter()
    run(["tar", "-xpf", src, "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", root])
    t_extract = time.perf_counter()
    blocks = ext4_size * 12 // 10 // 4096
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-O", "^has_journal", "-E", "root_owner=0:0",
         "-d", root, img, str(blocks)])
    t_mkfs = time.perf_counter()
    run(["veritysetup", "format", f"--hash-offset={blocks * 4096}", f"--salt={'00' * 32}", img, img])
    t_end = time.perf_counter()
    shutil.rmtree(root)
    return {"tools": "tar -x, mkfs.ext4 -d, veritysetup format", "seconds": round(t_end - t, 3),
            "extract_s": round(t_extract - t, 3), "mkfs_s": round(t_mkfs - t_extract, 3),
            "veritysetup_s": round(t_end - t_mkfs, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large-gib", type=float, default=1.0)
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    rootfs = minbase_tar(include=("python3-minimal",))
    with tempfile.TemporaryDirectory(prefix="bench-tar2ext4.", dir=REPO / "build" if (REPO / "build").is_dir()
                                     else None) as tmp:
        work = Path(tmp)
        debian = convert_in_child(rootfs, work / "rootfs.img")
        (work / "rootfs.img").unlink()
        big_size = int(args.large_gib * (1 << 30))
        large_layer(work / "big.tar", big_size)
        big = convert_in_child(work / "big.tar", work / "big.img")
        (work / "big.img").unlink()
        doc: dict = {"benchmark": "tar2ext4", "debian_rootfs": debian, "large_file_layer": big}
        if args.no_reference:
            doc["reference"] = {"skipped": "--no-reference"}
        elif os.geteuid() != 0:
            doc["reference"] = {"skipped": "needs root to extract with owners"}
        else:
            ref = reference(rootfs, work, debian["ext4_size"])
            doc["reference"] = ref
            doc["ratio"] = round(ref["seconds"] / debian["seconds"], 3)
    doc["goal_peak_rss_mb"] = GOAL_RSS_MB
    doc["peak_rss_ok"] = max(debian["peak_rss_mb"], big["peak_rss_mb"]) < GOAL_RSS_MB
    doc["load_average"] = os.getloadavg()
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
