"""Build the image of examples/secret: busybox plus a static `parma-secret` client, as an OCI layout.

    python examples/secret/build_image.py [OUT_DIR]     (default: build/images/secret-client, tag "latest")

Layer 1 is exactly the busybox example image's layer (images/examples/busybox.py), so both examples share
that layer device. Layer 2 holds /usr/local/bin/parma-secret, compiled from parma-secret.c with
`gcc -static`. Entries have owner 0:0 and mtime 0 and the JSON is canonical; the layout is rebuilt only
when the busybox .deb, the client source or the compiler changes.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "images" / "examples"))

import busybox  # noqa: E402 - the busybox example recipe, reused for the base layer

from sandbox.fsutil import atomic_write  # noqa: E402
from sandbox.images.layout import LAYER_TAR, LayoutWriter, write_layout  # noqa: E402
from sandbox.paths import cache_dir  # noqa: E402
from sandbox.progress import ProgressMode, Reporter, set_reporter, step  # noqa: E402
from sandbox.run import run  # noqa: E402

RECIPE_VERSION = "1"
CLIENT_SOURCE = HERE / "parma-secret.c"
CLIENT_PATH = "usr/local/bin/parma-secret"


def compile_client(workdir: Path) -> bytes:
    out = workdir / "parma-secret"
    run(["gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-o", out, CLIENT_SOURCE])
    return out.read_bytes()


def client_layer(binary: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path in ("usr", "usr/local", "usr/local/bin"):
            ti = tarfile.TarInfo(path)
            ti.type, ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = tarfile.DIRTYPE, 0o755, 0, 0, 0, "", ""
            tf.addfile(ti)
        ti = tarfile.TarInfo(CLIENT_PATH)
        ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.size = 0o755, 0, 0, 0, "", "", len(binary)
        tf.addfile(ti, io.BytesIO(binary))
    return buf.getvalue()


def build(out: Path) -> str:
    with step("Fetching busybox-static"):
        deb = busybox.fetch_deb()
    gcc = run(["gcc", "--version"]).stdout.decode().splitlines()[0]
    key = {"recipe": RECIPE_VERSION, "busybox_recipe": busybox.RECIPE_VERSION,
           "deb_sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
           "client_sha256": hashlib.sha256(CLIENT_SOURCE.read_bytes()).hexdigest(), "gcc": gcc}
    stamp = out.parent / f".{out.name}.stamp"
    if stamp.exists() and (out / "index.json").exists():
        try:
            done = json.loads(stamp.read_text())
            if done.get("key") == key:
                return str(done["manifest"])
        except (ValueError, KeyError):
            pass
    with step(f"Building {out}"):
        work = cache_dir() / "tmp"
        work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            binary = busybox.busybox_binary(deb)
            base = busybox.layer_tar(binary, busybox.applets(binary, Path(tmp)))
            client = client_layer(compile_client(Path(tmp)))
        manifest: list[str] = []

        def fill(w: LayoutWriter) -> None:
            layers = [w.add_bytes(base, LAYER_TAR), w.add_bytes(client, LAYER_TAR)]
            diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in (base, client)]
            m = w.add_image(layers, diff_ids, tag="latest",
                            config={"Env": busybox.ENV, "Cmd": ["/bin/sh"], "WorkingDir": "/"})
            manifest.append(m.digest)

        write_layout(out, fill)
    atomic_write(stamp, json.dumps({"key": key, "manifest": manifest[0]}, indent=2).encode() + b"\n")
    return manifest[0]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "build" / "images" / "secret-client"
    set_reporter(Reporter(ProgressMode.plain))
    digest = build(out.resolve())
    print(f"{out} (tag latest): {digest}")


if __name__ == "__main__":
    main()
