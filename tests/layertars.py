"""Edge-case layer tarballs for the converter tests, built with Python's tarfile (an independent writer),
and the tree each one should produce."""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.ext4read import Item


@dataclass
class Spec:
    """A tar member plus the content for regular files."""

    info: tarfile.TarInfo
    data: bytes = b""


@dataclass
class Layer:
    members: list[Spec] = field(default_factory=list)

    def add(self, name: str | bytes, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int = 0o644,
            uid: int = 0, gid: int = 0, mtime: float = 1_700_000_000, link: str = "", dev: tuple[int, int] = (0, 0),
            xattrs: dict[str, str] | None = None, pax: dict[str, str] | None = None) -> Layer:
        if isinstance(name, bytes):
            name = name.decode("utf-8", "surrogateescape")
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.mtime = mtime
        ti.linkname = link
        ti.devmajor, ti.devminor = dev
        ti.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
        headers = dict(pax or {})
        for k, v in (xattrs or {}).items():
            headers[f"SCHILY.xattr.{k}"] = v
        ti.pax_headers = headers
        self.members.append(Spec(ti, data))
        return self

    def tar_bytes(self, fmt: int = tarfile.PAX_FORMAT) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
            for spec in self.members:
                tf.addfile(spec.info, io.BytesIO(spec.data) if spec.data else None)
        return buf.getvalue()

    def write(self, path: Path, fmt: int = tarfile.PAX_FORMAT) -> Path:
        path.write_bytes(self.tar_bytes(fmt))
        return path


def xattr_bytes(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def expected_tree(layer: Layer) -> dict[bytes, Item]:
    """The tree for a layer without duplicates, implicit parents or whiteouts: one item per member."""
    out: dict[bytes, Item] = {}
    kinds = {tarfile.REGTYPE: "file", tarfile.DIRTYPE: "directory", tarfile.SYMTYPE: "symlink",
             tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}
    for spec in layer.members:
        ti = spec.info
        name = ti.name.encode("utf-8", "surrogateescape").strip(b"/")
        if name.startswith(b"./"):
            name = name[2:]
        if ti.type == tarfile.LNKTYPE:
            target = out[ti.linkname.encode("utf-8", "surrogateescape")]
            out[name] = target
            continue
        kind = kinds[ti.type]
        xattrs = tuple(sorted((k[len("SCHILY.xattr."):].encode(), xattr_bytes(v))
                              for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")))
        out[name] = Item(
            type=kind, perm=ti.mode | (0o777 if kind == "symlink" else 0), uid=ti.uid, gid=ti.gid,
            mtime=int(ti.mtime // 1), size=len(spec.data) if kind == "file" else
            (len(ti.linkname.encode("utf-8", "surrogateescape")) if kind == "symlink" else 0),
            digest=hashlib.sha256(spec.data).hexdigest() if kind == "file" else None,
            target=ti.linkname.encode("utf-8", "surrogateescape") if kind == "symlink" else None,
            device=(ti.devmajor, ti.devminor) if kind in ("char", "block") else None, xattrs=xattrs)
    return out


def strip_ino(tree: dict[bytes, Item]) -> dict[bytes, Item]:
    return {k: Item(**{**v.__dict__, "ino": 0}) for k, v in tree.items()}


def edge_case_layer() -> Layer:
    """Every entry type and attribute the converter must carry over."""
    r = random.Random(7)
    cap = "\x01\x00\x00\x02\x00\x20\x00\x00" + "\x00" * 12          # security.capability, binary
    lay = Layer()
    lay.add("etc", tarfile.DIRTYPE, mode=0o755)
    lay.add("etc/hosts", data=b"127.0.0.1 localhost\n", mode=0o644, mtime=1_600_000_000.5)
    lay.add("etc/empty", data=b"", mode=0o600, uid=1000, gid=1000)
    lay.add("etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42)
    lay.add("bin", tarfile.DIRTYPE, mode=0o755)
    for size in (1, 4095, 4096, 4097, 65536 + 3, 1 << 20):
        lay.add(f"bin/blob{size}", data=r.randbytes(size), mode=0o755)
    lay.add("bin/ping", data=b"\x7fELF" + bytes(5000), mode=0o4755,
            xattrs={"security.capability": cap})
    lay.add("bin/sh", tarfile.SYMTYPE, link="busybox")
    lay.add("bin/busybox", data=b"#!busybox\n", mode=0o755)
    lay.add("bin/hl", tarfile.LNKTYPE, link="bin/busybox")
    lay.add("bin/hl-to-symlink", tarfile.LNKTYPE, link="bin/sh")
    lay.add("tmp", tarfile.DIRTYPE, mode=0o1777)
    lay.add("srv", tarfile.DIRTYPE, mode=0o2775, uid=100000, gid=70000)
    lay.add("dev", tarfile.DIRTYPE, mode=0o755)
    lay.add("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
    lay.add("dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, dev=(8, 0))
    lay.add("dev/big", tarfile.CHRTYPE, mode=0o600, dev=(300, 70000))
    lay.add("dev/fifo", tarfile.FIFOTYPE, mode=0o644)
    lay.add("links", tarfile.DIRTYPE)
    for n in (1, 59, 60, 200, 4000):
        lay.add(f"links/len{n}", tarfile.SYMTYPE, link="t" * n)
    lay.add("links/abs", tarfile.SYMTYPE, link="/etc/hosts")
    long_dir = "d" * 120
    lay.add(long_dir, tarfile.DIRTYPE)
    lay.add(f"{long_dir}/{'f' * 255}", data=b"long name\n")
    lay.add(f"{long_dir}/lnk", tarfile.SYMTYPE, link="x/" * 300)
    lay.add("utf8-ü-日本", data=b"unicode\n")
    lay.add(b"raw-\xff\xfe-name", data=b"not utf-8\n")
    lay.add("x", tarfile.DIRTYPE, xattrs={"user.one": "1", "user.two": "two", "trusted.t": "v"})
    lay.add("x/many", data=b"m", xattrs={f"user.attr{i:02d}": "v" * 40 for i in range(30)})
    # Raw bytes that are not UTF-8: tarfile writes them with hdrcharset=BINARY.
    lay.add("x/bin", data=b"b", xattrs={"user.bin": b"\x00\xff\x80\xfe".decode("utf-8", "surrogateescape")})
    lay.add("x/empty-value", data=b"e", xattrs={"user.empty": ""})
    lay.add("times", tarfile.DIRTYPE)
    lay.add("times/old", data=b"o", mtime=-86400 * 365 * 10)
    lay.add("times/future", data=b"f", mtime=4_000_000_000)
    lay.add("times/nanos", data=b"n", pax={"mtime": "1700000000.123456789"})
    return lay
