"""Reading an uncompressed layer (sandbox/layers/decompress.py): a forked process reads and hashes it into
shared buffers when the converter runs a single thread, a thread otherwise. Both hand over the same bytes
in order with the same diff_id, leave no process behind, and give the same image.

The checks that need forking run in a fresh interpreter: a thread another test left in this one would
(rightly) make open_layer use the thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.layertars import edge_case_layer

REPO = Path(__file__).resolve().parents[2]

READ = """
import hashlib, json, os, sys, threading
from pathlib import Path
from sandbox.layers import decompress
if sys.argv[2] == "thread":
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
if sys.argv[2] == "nofork":
    def no_fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")
    os.fork = no_fork
path = Path(sys.argv[1])
out = {"chunks": 0}
h = hashlib.sha256()
with decompress.open_layer(path, what="layer") as layer:
    out["reader"] = type(layer._ahead).__name__
    for chunk in layer.chunks:
        h.update(chunk)
        out["chunks"] += 1
        if sys.argv[3] == "stop":
            break
    if sys.argv[3] != "stop":
        out["diff_id"] = layer.diff_id
out["sha256"] = h.hexdigest()
try:
    os.waitpid(-1, os.WNOHANG)
    out["children_left"] = True
except ChildProcessError:
    out["children_left"] = False
if sys.argv[2] == "thread":
    stop.set()
print(json.dumps(out))
"""


def fresh_python(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_process_and_thread_hand_over_the_same_bytes(tmp_path: Path) -> None:
    data = os.urandom((9 << 20) + 12345)               # more chunks than slots, a partial last one
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    process = fresh_python(READ, str(path), "single", "all")
    thread = fresh_python(READ, str(path), "thread", "all")
    no_fork = fresh_python(READ, str(path), "nofork", "all")        # fork fails: the thread reads
    assert process["reader"] == "_ReadingProcess" and thread["reader"] == no_fork["reader"] == "_ReadAhead"
    for got in (process, thread, no_fork):
        assert got["sha256"] == want and got["diff_id"] == "sha256:" + want
        assert got["chunks"] == 10 and got["children_left"] is False


def test_a_converter_that_stops_early_leaves_no_process(tmp_path: Path) -> None:
    path = tmp_path / "layer.tar"
    path.write_bytes(os.urandom(8 << 20))
    got = fresh_python(READ, str(path), "single", "stop")
    assert got["reader"] == "_ReadingProcess" and got["chunks"] == 1 and got["children_left"] is False


CONVERT = """
import hashlib, sys, threading
from pathlib import Path
from sandbox.layers.convert import convert_layer
if sys.argv[3] == "thread":
    threading.Thread(target=threading.Event().wait, daemon=True).start()
res = convert_layer(Path(sys.argv[1]), Path(sys.argv[2]))
print('{"root_hash": "%s", "diff_id": "%s", "image": "%s"}' % (
    res.root_hash, res.diff_id, hashlib.sha256(Path(sys.argv[2]).read_bytes()).hexdigest()))
"""


def test_same_image_read_by_process_or_thread(tmp_path: Path) -> None:
    src = edge_case_layer().write(tmp_path / "l.tar")
    process = fresh_python(CONVERT, str(src), str(tmp_path / "p.img"), "single")
    thread = fresh_python(CONVERT, str(src), str(tmp_path / "t.img"), "thread")
    assert process == thread
    assert process["diff_id"] == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
