"""The layers of one image convert in worker processes (sandbox/images/parallel.py): same devices and root
hashes as one after the other, typed errors back from the workers, nothing left behind by a failure.

The checks that need forking run in a fresh interpreter: a thread another test left in this one would
(rightly) make the workers run in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sandbox.images.parallel import Workers
from sandbox.images.resolve import pull_image
from sandbox.shared.errors import InputError
from tests.imagefixtures import oci_image

REPO = Path(__file__).resolve().parents[2]


def fresh_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


WORKERS = """
import json, os, sys
from sandbox.images.parallel import Workers
from sandbox.shared.errors import InputError
parent = os.getpid()
done = []
def job(i):
    if i == 3:
        raise InputError("job 3 is bad", hint="the hint survives")
    if i == 5:
        raise KeyError("job 5")
    return (i, os.getpid() != parent)
out = {}
with Workers(2) as w:
    for i in range(7):
        w.submit(lambda i=i: job(i), on_done=lambda i=i: done.append(i))
    try:
        w.results()
    except InputError as e:
        out["error"] = [type(e).__name__, e.message, e.hint]
ok = Workers(2)
for i in (0, 1, 2):
    ok.submit(lambda i=i: job(i))
out["results"] = ok.results()
out["done"] = sorted(done)
print(json.dumps(out))
"""


def test_workers_run_jobs_in_children_and_return_results_in_order() -> None:
    out = json.loads(fresh_python(WORKERS))
    assert out["results"] == [[0, True], [1, True], [2, True]]
    assert out["error"] == ["InputError", "job 3 is bad", "the hint survives"]    # the earliest failure, typed
    assert out["done"] == list(range(7))        # every job's on_done ran, started or not


def test_workers_run_in_process_while_another_thread_runs() -> None:
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        with Workers[int](4) as w:
            for i in range(3):
                w.submit(lambda i=i: i * os.getpid())
            assert w.results() == [0, os.getpid(), 2 * os.getpid()]
            with pytest.raises(InputError, match="boom"):
                w.submit(lambda: (_ for _ in ()).throw(InputError("boom")))
    finally:
        release.set()
        other.join()


PULL = """
import hashlib, json, os, sys
from pathlib import Path
import sandbox.images.resolve as R
import sandbox.layers.convert as C
base, mode, log = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
if mode == "serial":
    R.usable_cpus = lambda: 1
real_convert = C.convert_layer
def convert_layer(*args, **kwargs):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    return real_convert(*args, **kwargs)
C.convert_layer = convert_layer
result = R.pull_image("oci:img", base_dir=base)
pids = log.read_text().split() if log.exists() else []
print(json.dumps({"in_workers": len(set(pids) - {str(os.getpid())}), "converted": result.converted,
                  "layers": [[layer.diff_id, layer.root_hash, hashlib.sha256(layer.device_path.read_bytes()).hexdigest()]
                             for layer in result.image.layers]}))
"""


def pull(tmp_path: Path, mode: str, run: int = 0) -> dict:
    log = tmp_path / f"converted-{mode}-{run}"
    proc = subprocess.run([sys.executable, "-c", PULL, str(tmp_path), mode, str(log)], capture_output=True,
                          text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PARMA_SANDBOX_CACHE": str(tmp_path / mode)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_an_image_converts_in_parallel_as_it_does_serially(tmp_path: Path) -> None:
    oci_image(tmp_path / "img", compressions=("gzip", "none", "gzip"))
    parallel, serial = pull(tmp_path, "parallel"), pull(tmp_path, "serial")
    assert parallel["in_workers"] == 3 and serial["in_workers"] == 0     # one worker process per layer
    assert parallel["converted"] == serial["converted"] == 3
    assert parallel["layers"] == serial["layers"]                       # same devices, byte for byte
    again = pull(tmp_path, "parallel", run=1)
    assert again["in_workers"] == again["converted"] == 0               # all cached


def test_a_layer_listed_twice_converts_once(tmp_path: Path, isolated_dirs: Path) -> None:
    built = oci_image(tmp_path / "img")
    index = json.loads((built.path / "index.json").read_text())
    blobs = built.path / "blobs" / "sha256"
    manifest_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((blobs / manifest_digest).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    manifest["layers"].append(manifest["layers"][0])
    config["rootfs"]["diff_ids"].append(config["rootfs"]["diff_ids"][0])
    raw_config = json.dumps(config).encode()
    config_digest = hashlib.sha256(raw_config).hexdigest()
    (blobs / config_digest).write_bytes(raw_config)
    manifest["config"] = {**manifest["config"], "digest": f"sha256:{config_digest}", "size": len(raw_config)}
    raw_manifest = json.dumps(manifest).encode()
    digest = hashlib.sha256(raw_manifest).hexdigest()
    (blobs / digest).write_bytes(raw_manifest)
    index["manifests"][0] = {**index["manifests"][0], "digest": f"sha256:{digest}", "size": len(raw_manifest)}
    (built.path / "index.json").write_text(json.dumps(index))
    result = pull_image("oci:img", base_dir=tmp_path)
    assert result.converted == 3 and len(result.image.layers) == 4
    assert result.image.layers[3] == result.image.layers[0]
