"""Build the image of examples/secret: busybox plus a static `parma-secret` client, as an OCI layout.

    python examples/secret/build_image.py [OUT_DIR]     (default: build/images/secret-client, tag "latest")

Layer 1 is exactly the busybox example image's layer (images/examples/busybox.py), so both examples share
that layer device. Layer 2 holds /usr/local/bin/parma-secret, compiled from parma-secret.c with
`gcc -static`. Entries have owner 0:0 and mtime 0 and the JSON is canonical; the layout is rebuilt only
when the busybox .deb, the client source or the compiler changes.
"""

from __future__ import annotations

import hashlib
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "images" / "examples"))

import busybox  # noqa: E402 - the busybox example recipe, reused for the base layer

from sandbox.progress import step  # noqa: E402
from sandbox.run import run  # noqa: E402

RECIPE_VERSION = "1"
CLIENT_SOURCE = HERE / "parma-secret.c"
CLIENT_PATH = "usr/local/bin/parma-secret"


def compile_client(workdir: Path) -> bytes:
    out = workdir / "parma-secret"
    run(["gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-o", out, CLIENT_SOURCE])
    return out.read_bytes()


def client_layer(binary: bytes) -> bytes:
    dirs = {d: (tarfile.DIRTYPE, 0o755, b"") for d in ("usr", "usr/local", "usr/local/bin")}
    return busybox.tar_of({**dirs, CLIENT_PATH: (tarfile.REGTYPE, 0o755, binary)})


def build(out: Path) -> str:
    with step("Fetching busybox-static"):
        deb = busybox.fetch_deb()
    gcc = run(["gcc", "--version"]).stdout.decode().splitlines()[0]
    key = {"recipe": RECIPE_VERSION, "busybox_recipe": busybox.RECIPE_VERSION,
           "deb_sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
           "client_sha256": hashlib.sha256(CLIENT_SOURCE.read_bytes()).hexdigest(), "gcc": gcc}

    def layers(workdir: Path) -> list[bytes]:
        binary = busybox.busybox_binary(deb)
        return [busybox.layer_tar(binary, busybox.applets(binary, workdir)), client_layer(compile_client(workdir))]

    return busybox.write_image(out, key, layers)


if __name__ == "__main__":
    busybox.main_for(build, "secret-client")
