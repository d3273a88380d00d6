"""Policy regex matching: the linear-time RE2 matcher against Python's backtracking `re`, in the same run.

Two parts, one JSON document:
- pathological: patterns that make a backtracker quadratic or exponential, on host-made values.
  Ours runs on 100 KB and 1 MB; `re` (the matcher policies used before) runs in a child process on
  growing sizes until one run exceeds --budget seconds or the child is killed at --timeout, so the
  growth is visible without waiting for ever.
- typical: the env rules confcom writes, on ordinary values (microseconds per match; `re` is C, so
  the ratio shows what linear time costs on the common path).

Usage: python bench/bench_regex.py [--budget S] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.shared.policy.regex import compile_regex

# (name, RE2 pattern, the same pattern for Python's re or None, text maker, expected)
PATHOLOGICAL = [
    ("fabric-quadratic", "FABRIC_.+=.+", "FABRIC_.+=.+", "lambda n: 'FABRIC_' + '=' * n + chr(10)", False),
    ("alternation-exponential", "(A|AA)+=1", "(A|AA)+=1", "lambda n: 'A' * n", False),
    ("nested-star", "(a*)*b", "(a*)*b", "lambda n: 'a' * n", False),
    ("nested-plus", "(x+x+)+y", "(x+x+)+y", "lambda n: 'x' * n", False),
]
TYPICAL = [
    ("((?i)FABRIC)_.+=.+", "(?i:FABRIC)_.+=.+", "Fabric_NodeName=_Node_0"),
    ("((?i)FABRIC)_.+=.+", "(?i:FABRIC)_.+=.+", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"),
    ("HOSTNAME=.+", "HOSTNAME=.+", "HOSTNAME=sandbox-7f3a"),
    ("T(E)?MP=.+", "T(E)?MP=.+", "TEMP=/tmp"),
    ("LOG_LEVEL=(debug|info|warn|error)", "LOG_LEVEL=(debug|info|warn|error)", "LOG_LEVEL=info"),
    ("TEST_REGEXP_ENV=test_regexp_env_[[:alpha:]]*", "TEST_REGEXP_ENV=test_regexp_env_[A-Za-z]*",
     "TEST_REGEXP_ENV=test_regexp_env_abc"),
    (".+=.+", ".+=.+", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
]

_CHILD = """
import re, sys, time
pattern, maker, n = sys.argv[1], eval(sys.argv[2]), int(sys.argv[3])
text = maker(n)
r = re.compile(pattern, re.ASCII)
t = time.process_time()
r.fullmatch(text)
print(time.process_time() - t)
"""


def _ours(pattern: str, text: str, expected: bool) -> dict[str, Any]:
    regex = compile_regex(pattern)
    start = time.process_time()
    result = regex.fullmatch(text)
    elapsed = time.process_time() - start
    if result is not expected:
        raise SystemExit(f"{pattern}: wrong answer on {len(text)} characters")
    return {"chars": len(text), "cpu_ms": round(elapsed * 1000, 2)}


def _python_re(pattern: str, maker: str, budget: float, timeout: float) -> list[dict[str, Any]]:
    runs = []
    n = 8
    while n <= 1_000_000:
        try:
            done = subprocess.run([sys.executable, "-c", _CHILD, pattern, maker, str(n)], capture_output=True,
                                  text=True, timeout=timeout, check=True)
        except subprocess.TimeoutExpired:
            runs.append({"chars": n, "cpu_ms": None, "note": f"killed after {timeout:.0f} s"})
            break
        elapsed = float(done.stdout)
        runs.append({"chars": n, "cpu_ms": round(elapsed * 1000, 2)})
        if elapsed > budget:
            break
        n *= 2
    return runs


def run(budget: float, timeout: float) -> dict[str, Any]:
    pathological = []
    for name, pattern, py_pattern, maker, expected in PATHOLOGICAL:
        make = eval(maker)  # our own literal lambdas, shared with the child process
        pathological.append({
            "name": name, "pattern": pattern,
            "ours": [_ours(pattern, make(n), expected) for n in (100_000, 1_000_000)],
            "python_re": _python_re(py_pattern, maker, budget, timeout),
        })
    typical = []
    for pattern, py_pattern, value in TYPICAL:
        regex = compile_regex(pattern)
        theirs = re.compile(py_pattern, re.ASCII)
        if regex.fullmatch(value) is not (theirs.fullmatch(value) is not None):
            raise SystemExit(f"{pattern}: the two matchers disagree on {value!r}")
        number = 20_000
        ours_us = min(timeit.repeat(lambda r=regex, v=value: r.fullmatch(v), number=number, repeat=3)) / number * 1e6
        re_us = min(timeit.repeat(lambda r=theirs, v=value: r.fullmatch(v), number=number, repeat=3)) / number * 1e6
        typical.append({"pattern": pattern, "value_chars": len(value), "ours_us": round(ours_us, 2),
                        "python_re_us": round(re_us, 2), "ratio": round(ours_us / re_us, 1)})
    return {"benchmark": "policy regex matching", "python": platform.python_version(),
            "machine": platform.machine(), "loadavg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
            "budget_s": budget, "timeout_s": timeout, "pathological": pathological, "typical": typical}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=2.0, help="stop growing re's input after a run this long")
    parser.add_argument("--timeout", type=float, default=30.0, help="kill re's child process after this long")
    args = parser.parse_args()
    print(json.dumps(run(args.budget, args.timeout), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
