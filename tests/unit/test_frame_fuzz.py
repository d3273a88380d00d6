"""The frame fuzzer (bench/fuzz_frames.py) against the offline agent: a short run in the default tier,
the full million frames in the slow tier. Every frame answered once, in order; no internal error,
no hang over a second, the port and the agent alive at the end."""

from __future__ import annotations

import pytest

from bench.fuzz_frames import run
from tests.offline_agent import available

pytestmark = pytest.mark.skipif(available() is not None, reason=f"offline agent: {available()}")


def _assert_clean(result: dict) -> None:
    assert result["ok"], result
    assert result["replies"] == result["frames"]
    assert result["crashes"] == result["hangs"] == result["misordered"] == 0
    assert result["agent_alive"] and not result["port_closed"]


def test_twenty_thousand_fuzzed_frames() -> None:
    result = run(20_000, seed=1313)
    _assert_clean(result)
    # The corpus reaches the dispatcher and the handlers, not only the parser.
    codes = result["reply_codes"]
    for code in ("ok", "invalid_request", "policy_denied", "conflict", "not_found", "unknown_op",
                 "unsupported_version", "malformed_frame"):
        assert codes.get(code, 0) > 0, codes


@pytest.mark.slow
def test_a_million_fuzzed_frames() -> None:
    _assert_clean(run(1_000_000, seed=13))
