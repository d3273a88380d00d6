"""Progress reporting for long steps, always on stderr.

Modes: 'tty' draws a spinner/bar that redraws in place, 'plain' prints one line when a step starts and
one when it ends, 'json' prints one JSON object per event (start/progress/done/fail), 'quiet' prints
nothing. 'auto' picks tty when stderr is a terminal, plain otherwise.
"""

from __future__ import annotations

import contextvars
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import TextIO


class ProgressMode(StrEnum):
    auto = "auto"
    tty = "tty"
    plain = "plain"
    json = "json"
    quiet = "quiet"


SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def _human(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:g}"
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or suffix == "GiB":
            return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.1f} {suffix}"
        n /= 1024
    return f"{n:.1f} GiB"


class ProgressTask:
    """One running step; call advance() as work completes."""

    def __init__(self, reporter: Reporter, name: str, total: float | None, unit: str) -> None:
        self.reporter = reporter
        self.name = name
        self.total = total
        self.unit = unit
        self.done = 0.0
        self.started = time.monotonic()
        self._last_draw = 0.0

    def advance(self, amount: float = 1) -> None:
        self.done += amount
        now = time.monotonic()
        if now - self._last_draw >= self.reporter.interval:
            self._last_draw = now
            self.reporter.update(self)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Reporter:
    def __init__(self, mode: ProgressMode = ProgressMode.auto, stream: TextIO | None = None) -> None:
        self._stream = stream           # None: whatever sys.stderr is when writing (it may be swapped)
        if mode == ProgressMode.auto:
            mode = ProgressMode.tty if self.stream.isatty() else ProgressMode.plain
        self.mode = mode
        self.interval = {ProgressMode.tty: 0.1, ProgressMode.json: 0.5}.get(mode, 3600.0)
        self._frame = 0

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _event(self, **fields: object) -> None:
        self._write(json.dumps(fields, sort_keys=True) + "\n")

    def start(self, task: ProgressTask) -> None:
        if self.mode == ProgressMode.plain:
            self._write(f"{task.name}...\n")
        elif self.mode == ProgressMode.json:
            self._event(event="start", step=task.name, total=task.total, unit=task.unit)
        elif self.mode == ProgressMode.tty:
            self.update(task)

    def update(self, task: ProgressTask) -> None:
        if self.mode == ProgressMode.json:
            self._event(event="progress", step=task.name, done=task.done, total=task.total, unit=task.unit)
        elif self.mode == ProgressMode.tty:
            self._frame = (self._frame + 1) % len(SPINNER)
            detail = ""
            if task.total:
                pct = min(100.0, 100.0 * task.done / task.total)
                width = 24
                fill = int(width * pct / 100)
                detail = (f" [{'#' * fill}{'.' * (width - fill)}] {pct:5.1f}% "
                          f"{_human(task.done, task.unit)}/{_human(task.total, task.unit)}")
            elif task.done:
                detail = f" {_human(task.done, task.unit)}"
            self._write(f"\r\x1b[K{SPINNER[self._frame]} {task.name}{detail} {task.elapsed:.1f}s")

    def finish(self, task: ProgressTask, error: BaseException | None) -> None:
        secs = task.elapsed
        if self.mode == ProgressMode.json:
            if error is None:
                self._event(event="done", step=task.name, seconds=round(secs, 3))
            else:
                self._event(event="fail", step=task.name, seconds=round(secs, 3), error=str(error))
        elif self.mode == ProgressMode.tty:
            mark = "✓" if error is None else "✗"
            self._write(f"\r\x1b[K{mark} {task.name} ({secs:.1f}s)\n")
        elif self.mode == ProgressMode.plain:
            self._write(f"{task.name}: {'done' if error is None else 'failed'} ({secs:.1f}s)\n")

    @contextmanager
    def step(self, name: str, total: float | None = None, unit: str = "") -> Iterator[ProgressTask]:
        task = ProgressTask(self, name, total, unit)
        self.start(task)
        try:
            yield task
        except BaseException as e:
            self.finish(task, e)
            raise
        self.finish(task, None)


_CURRENT: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("parma_progress", default=None)


def set_reporter(reporter: Reporter) -> None:
    _CURRENT.set(reporter)


def reporter() -> Reporter:
    current = _CURRENT.get()
    if current is None:
        current = Reporter(ProgressMode.quiet)
        _CURRENT.set(current)
    return current


def step(name: str, total: float | None = None, unit: str = ""):  # context manager
    """Report a long-running step through the current reporter: `with step("Pull x", total) as t: ...`."""
    return reporter().step(name, total, unit)
