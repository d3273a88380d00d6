"""Build the example image: busybox from Debian's busybox-static package, as a deterministic OCI layout.

    python images/examples/busybox.py [OUT_DIR]      (default: build/images/busybox, tag "latest")

The image has one uncompressed layer: /bin/busybox, a symlink /bin/<applet> per applet (from `busybox --list`;
all in /bin, as in Docker's busybox image, so groups can say /bin/httpd or /bin/sh), a
minimal /etc/passwd and /etc/group (root, and nobody 65534), /root and a sticky /tmp. Every entry has owner
0:0 and mtime 0, entries are sorted, the JSON documents are canonical: the layout (and so every digest and
the layer's dm-verity root hash) is a pure function of the .deb. The .deb is fetched with `apt-get download`
and kept in the cache; the layout is rebuilt only when the .deb or this recipe changes.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from sandbox.fsutil import atomic_write, file_lock  # noqa: E402
from sandbox.images.layout import LAYER_TAR, LayoutWriter, write_layout  # noqa: E402
from sandbox.paths import cache_dir  # noqa: E402
from sandbox.progress import ProgressMode, Reporter, set_reporter, step  # noqa: E402
from sandbox.run import run  # noqa: E402

RECIPE_VERSION = "2"
PACKAGE = "busybox-static"
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnobody:x:65534:\n"
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]


def fetch_deb() -> Path:
    """The package's .deb, downloaded once per version into the cache."""
    version = run(["apt-cache", "policy", PACKAGE]).stdout.decode()
    candidate = next((line.split(":", 1)[1].strip() for line in version.splitlines()
                      if line.strip().startswith("Candidate:")), "")
    if not candidate or candidate == "(none)":
        raise SystemExit(f"error: apt knows no candidate for {PACKAGE}; run 'apt-get update'")
    dest_dir = cache_dir() / "downloads"
    dest_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(dest_dir / f".{PACKAGE}.lock"):
        found = sorted(dest_dir.glob(f"{PACKAGE}_{candidate.replace(':', '%3a')}_*.deb"))
        if found:
            return found[0]
        run(["apt-get", "download", f"{PACKAGE}={candidate}"], cwd=dest_dir)
        found = sorted(dest_dir.glob(f"{PACKAGE}_*.deb"))
        match = [p for p in found if candidate.replace(":", "%3a") in p.name]
        if not match:
            raise SystemExit(f"error: apt-get download left no {PACKAGE} .deb in {dest_dir}")
        return match[0]


def busybox_binary(deb: Path) -> bytes:
    data = run(["dpkg-deb", "--fsys-tarfile", deb]).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        member = tf.getmember("./bin/busybox")
        f = tf.extractfile(member)
        assert f is not None
        return f.read()


def applets(binary: bytes, workdir: Path) -> list[str]:
    exe = workdir / "busybox"
    exe.write_bytes(binary)
    exe.chmod(0o755)
    listed = run([exe, "--list"]).stdout.decode().split()
    return sorted({f"bin/{a}" for a in listed if a and "/" not in a and a != "busybox"})


Entries = dict[str, tuple[bytes, int, bytes | str]]   # path -> (tar type, mode, data or link target)


def tar_of(entries: Entries) -> bytes:
    """A reproducible uncompressed tar: sorted entries, owner 0:0, mtime 0, PAX format."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted(entries):
            kind, mode, payload = entries[path]
            ti = tarfile.TarInfo(path)
            ti.type, ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = kind, mode, 0, 0, 0, "", ""
            if kind == tarfile.SYMTYPE:
                assert isinstance(payload, str)
                ti.linkname = payload
                tf.addfile(ti)
            elif kind == tarfile.REGTYPE:
                assert isinstance(payload, bytes)
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def layer_tar(binary: bytes, links: list[str]) -> bytes:
    entries: Entries = {}
    for d in ("bin", "etc", "root", "tmp"):
        entries[d] = (tarfile.DIRTYPE, 0o700 if d == "root" else 0o1777 if d == "tmp" else 0o755, b"")
    for link in links:
        parent = link.rsplit("/", 1)[0] if "/" in link else ""
        if parent and parent not in entries:
            entries[parent] = (tarfile.DIRTYPE, 0o755, b"")
        entries[link] = (tarfile.SYMTYPE, 0o777, "/bin/busybox")
    entries["bin/busybox"] = (tarfile.REGTYPE, 0o755, binary)
    entries["etc/passwd"] = (tarfile.REGTYPE, 0o644, PASSWD)
    entries["etc/group"] = (tarfile.REGTYPE, 0o644, GROUP)
    return tar_of(entries)


def write_image(out: Path, key: dict[str, str], make_layers: Callable[[Path], list[bytes]]) -> str:
    """Write an OCI layout (tag "latest") of the uncompressed layers `make_layers(workdir)` returns.

    A stamp next to `out` records `key` and the manifest digest, so an unchanged recipe is not rebuilt.
    Returns the manifest digest.
    """
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
            tars = make_layers(Path(tmp))
        manifest: list[str] = []

        def fill(w: LayoutWriter) -> None:
            layers = [w.add_bytes(t, LAYER_TAR) for t in tars]
            diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
            m = w.add_image(layers, diff_ids, tag="latest",
                            config={"Env": ENV, "Cmd": ["/bin/sh"], "WorkingDir": "/"})
            manifest.append(m.digest)

        write_layout(out, fill)
    atomic_write(stamp, json.dumps({"key": key, "manifest": manifest[0]}, indent=2).encode() + b"\n")
    return manifest[0]


def build(out: Path) -> str:
    with step("Fetching busybox-static"):
        deb = fetch_deb()
    key = {"recipe": RECIPE_VERSION, "deb": deb.name, "deb_sha256": hashlib.sha256(deb.read_bytes()).hexdigest()}

    def layers(workdir: Path) -> list[bytes]:
        binary = busybox_binary(deb)
        return [layer_tar(binary, applets(binary, workdir))]

    return write_image(out, key, layers)


def main_for(build: Callable[[Path], str], default_name: str) -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "build" / "images" / default_name
    set_reporter(Reporter(ProgressMode.plain))
    digest = build(out.resolve())
    print(f"{out} (tag latest): {digest}")


if __name__ == "__main__":
    main_for(build, "busybox")
