"""The benchmarks keep working: each cheap one runs with its smallest arguments and prints one JSON document.

`make bench` is not part of `make test` (its figures need a quiet machine), so without this a refactor can
leave a benchmark calling an API that no longer exists, or replaying a trace the agent now refuses. The
ones that boot the UVM (bench_boot, bench_up, bench_layers) are left to the vm tier's own tests of what they
drive; bench_tar2ext4 needs the minbase tar.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docblocks import ensure_example_image

pytestmark = pytest.mark.tools

BENCH = Path(__file__).resolve().parents[2] / "bench"

CHEAP = {
    "bench_cli.py": ["--runs", "1"],
    "bench_policy.py": ["--iterations", "20"],
    "bench_kbs.py": ["--iterations", "2"],
    "bench_attest.py": ["--no-guest"],
    "bench_regex.py": ["--budget", "0.1", "--timeout", "1"],
    "bench_verity.py": ["--sizes-mib", "1", "--runs", "1"],
}


@pytest.mark.parametrize("script", sorted(CHEAP))
def test_benchmark_runs_and_prints_json(script: str) -> None:
    if script == "bench_cli.py":
        ensure_example_image()      # it times `validate examples/hello/group.json`, which checks the image exists
    proc = subprocess.run([sys.executable, str(BENCH / script), *CHEAP[script]], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict) and doc


def test_every_benchmark_is_listed_or_boots_a_vm() -> None:
    vm_or_data = {"bench_boot.py", "bench_up.py", "bench_layers.py", "bench_tar2ext4.py"}
    assert {p.name for p in BENCH.glob("bench_*.py")} == set(CHEAP) | vm_or_data
