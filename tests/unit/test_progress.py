from __future__ import annotations

import io
import json

from sandbox.progress import ProgressMode, Reporter


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines() -> None:
    out = io.StringIO()
    r = Reporter(ProgressMode.auto, out)
    assert r.mode == ProgressMode.plain
    with r.step("Converting layer", total=10, unit="B") as t:
        t.advance(5)
    lines = out.getvalue().splitlines()
    assert lines[0] == "Converting layer..."
    assert lines[1].startswith("Converting layer: done (")


def test_tty_redraws_in_place() -> None:
    out = FakeTTY()
    r = Reporter(ProgressMode.auto, out)
    assert r.mode == ProgressMode.tty
    r.interval = 0
    with r.step("Pulling", total=2048, unit="B") as t:
        t.advance(1024)
    text = out.getvalue()
    assert "\r\x1b[K" in text and "50.0%" in text and "✓ Pulling" in text


def test_json_events() -> None:
    out = io.StringIO()
    r = Reporter(ProgressMode.json, out)
    r.interval = 0
    try:
        with r.step("Boot", total=None) as t:
            t.advance(1)
            raise ValueError("no")
    except ValueError:
        pass
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["start", "progress", "fail"]
    assert events[-1]["error"] == "no"


def test_quiet() -> None:
    out = io.StringIO()
    with Reporter(ProgressMode.quiet, out).step("x"):
        pass
    assert out.getvalue() == ""
