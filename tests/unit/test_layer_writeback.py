"""Early writeback while a layer image is written (sandbox/layers/writeback.py): a hint that never changes
the image's bytes, passes every notice on, and hands the kernel each written stretch once, in order."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from sandbox.layers import writeback
from sandbox.layers.tar2ext4 import convert_tar_stream
from tests.layertars import edge_case_layer


class Recorder:
    def __init__(self) -> None:
        self.notices: list[tuple[str, int]] = []

    def written(self, end: int) -> None:
        self.notices.append(("written", end))

    def rewritten(self, block: int) -> None:
        self.notices.append(("rewritten", block))


def test_stretches_are_handed_over_once_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(writeback, "start_writeback", lambda fd, off, n: calls.append((fd, off, n)))
    inner = Recorder()
    threads = threading.active_count()
    with writeback.Writeback(7, inner, step=100) as w:
        for end in (50, 120, 150, 260, 400):
            w.written(end)
        w.rewritten(3)
    assert threading.active_count() == threads         # the thread ends with the conversion
    assert calls == [(7, 0, 120), (7, 120, 140), (7, 260, 140)]
    assert inner.notices == [("written", 50), ("written", 120), ("written", 150), ("written", 260),
                             ("written", 400), ("rewritten", 3)]


def test_start_writeback_is_only_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(1 << 16))
    fd = os.open(path, os.O_RDWR)
    try:
        writeback.start_writeback(fd, 0, 1 << 16)
        writeback.start_writeback(fd, 0, 0)
    finally:
        os.close(fd)
    writeback.start_writeback(fd, 0, 4096)          # a closed descriptor: ignored, as any error
    assert path.stat().st_size == 1 << 16


def test_same_image_with_and_without_writeback(tmp_path: Path) -> None:
    tar = edge_case_layer().tar_bytes()
    images = []
    for name, watcher in (("plain", None), ("writeback", True)):
        out = tmp_path / name
        fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if watcher:
                with writeback.Writeback(fd, step=4096) as w:
                    convert_tar_stream([tar], fd, watcher=w)
            else:
                convert_tar_stream([tar], fd)
        finally:
            os.close(fd)
        images.append(out.read_bytes())
    assert images[0] == images[1]
