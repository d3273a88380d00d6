"""Pinned downloads against a real HTTP server on 127.0.0.1: verified, cached, refused when wrong."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.shared.errors import CheckFailed, NetworkError
from sandbox.uvm.fetch import downloads_dir, fetch_pinned
from sandbox.uvm.pins import PinnedFile

PAYLOAD = b"pinned source tarball\n" * 1000


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "good.tar.xz").write_bytes(PAYLOAD)
    requests_seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, fmt: str, *args: object) -> None:
            requests_seen.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", requests_seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_fetch_verifies_and_caches(server: tuple[str, list[str]], isolated_dirs: Path) -> None:
    base, seen = server
    pin = PinnedFile(f"{base}/good.tar.xz", hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD))
    path = fetch_pinned(pin, what="test source", bump_hint="n/a")
    assert path.read_bytes() == PAYLOAD and path.is_relative_to(downloads_dir())
    assert fetch_pinned(pin, what="test source", bump_hint="n/a") == path
    assert len(seen) == 1   # the second call is served from the cache


def test_a_hash_mismatch_is_refused_and_leaves_nothing(server: tuple[str, list[str]], isolated_dirs: Path) -> None:
    base, _ = server
    pin = PinnedFile(f"{base}/good.tar.xz", "00" * 32, len(PAYLOAD))
    with pytest.raises(CheckFailed, match="expected the pinned"):
        fetch_pinned(pin, what="test source", bump_hint="n/a")
    assert not any(p.is_file() and not p.name.startswith(".") for p in downloads_dir().rglob("*"))


def test_a_vanished_pin_says_how_to_move_it(server: tuple[str, list[str]], isolated_dirs: Path) -> None:
    base, _ = server
    pin = PinnedFile(f"{base}/gone_1.0.tar.xz", "11" * 32, 10)
    with pytest.raises(NetworkError, match="no longer available") as e:
        fetch_pinned(pin, what="test source", bump_hint="update pins.py")
    assert "update pins.py" in (e.value.hint or "")
