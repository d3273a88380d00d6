"""Deterministic layer tars for the tar2ext4 comparison (tests/data/aci-layer-hashes.json).

Each function returns the bytes of one layer tar; the same code gives the same bytes on every
machine (fixed times, owners and contents, no compression). `python tests/acilayers.py OUTDIR`
writes them all as OUTDIR/<name>.tar, which is how the recorded root hashes were produced with
hcsshim's tar2ext4 (see the provenance in the JSON file).
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

T0 = 1_700_000_000          # 2023-11-14, the default mtime
PAX = tarfile.PAX_FORMAT
GNU = tarfile.GNU_FORMAT


def _data(seed: str, size: int) -> bytes:
    """Deterministic incompressible-looking content of `size` bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


class _Tar:
    def __init__(self, fmt: int = PAX) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=fmt, encoding="utf-8")

    def add(self, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int | None = None,
            uid: int = 0, gid: int = 0, mtime: float = T0, link: str = "", pax: dict[str, str] | None = None,
            devmajor: int = 0, devminor: int = 0) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode if mode is not None else (0o755 if kind in (tarfile.DIRTYPE, tarfile.SYMTYPE) else 0o644)
        info.uid, info.gid = uid, gid
        info.uname = info.gname = ""
        info.mtime = mtime
        info.linkname = link
        info.devmajor, info.devminor = devmajor, devminor
        if pax:
            info.pax_headers = dict(pax)
        if kind == tarfile.REGTYPE:
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))
        else:
            self.tar.addfile(info)

    def dir(self, name: str, **kw) -> None:
        self.add(name, tarfile.DIRTYPE, **kw)

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def empty() -> bytes:
    """The empty layer as Docker writes it: two zero blocks."""
    return bytes(1024)


def basic() -> bytes:
    t = _Tar()
    t.dir("bin/")
    t.dir("etc/", mode=0o755)
    t.add("etc/hosts", data=b"127.0.0.1 localhost\n")
    t.add("etc/empty")
    for size in (1, 4095, 4096, 4097, 8192, 200_000):
        t.add(f"etc/size-{size}", data=_data(f"size{size}", size))
    t.add("bin/tool", data=_data("tool", 70_000), mode=0o4755)
    t.add("bin/sgid", data=b"#!/bin/sh\n", mode=0o2711, uid=1000, gid=1000)
    t.dir("tmp/", mode=0o1777)
    t.add("bin/sh", tarfile.SYMTYPE, link="busybox")
    t.add("bin/long-link", tarfile.SYMTYPE, link="/" + "x" * 59)           # 60 bytes: not a fast symlink
    t.add("bin/edge-link", tarfile.SYMTYPE, link="/" + "y" * 58)           # 59 bytes: the fast limit
    t.dir("dev/")
    t.add("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
    t.add("dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, devmajor=8, devminor=0)
    t.add("dev/big", tarfile.CHRTYPE, mode=0o600, devmajor=300, devminor=70000)
    t.add("dev/fifo", tarfile.FIFOTYPE, mode=0o600)
    t.add("home/user/.profile", data=b"export A=1\n", uid=100_000, gid=200_000)
    return t.bytes()


def whiteouts() -> bytes:
    t = _Tar()
    t.dir("etc/")
    t.add("etc/.wh.passwd-")
    t.add("etc/.wh.shadow-")
    t.dir("var/cache/apt/")
    t.add("var/cache/apt/.wh..wh..opq")
    t.add("var/cache/apt/pkgcache.bin", data=b"cache\n")
    t.dir("usr/share/doc/")
    t.add("usr/share/doc/a/file", data=b"a\n")
    t.add("usr/share/doc/.wh..wh..opq")          # after its children: still makes the dir opaque
    t.add("opt/new/.wh.gone")                    # whiteout in a directory the tar never declares
    t.add("opt/new/.wh..wh..opq")
    t.add(".wh.rootfile")
    return t.bytes()


def hardlinks() -> bytes:
    t = _Tar()
    t.dir("usr/bin/")
    t.add("usr/bin/perl5.36", data=_data("perl", 5000), mode=0o755)
    t.add("usr/bin/perl", tarfile.LNKTYPE, link="usr/bin/perl5.36")
    t.add("usr/bin/perl-again", tarfile.LNKTYPE, link="usr/bin/perl5.36")
    t.add("usr/lib/link-in-implicit-dir", tarfile.LNKTYPE, link="usr/bin/perl5.36")
    t.add("usr/bin/sym", tarfile.SYMTYPE, link="perl")
    t.add("usr/bin/link-to-sym", tarfile.LNKTYPE, link="usr/bin/sym")
    t.add("usr/share/empty", data=b"")
    t.add("usr/share/empty-link", tarfile.LNKTYPE, link="usr/share/empty")
    return t.bytes()


def longnames_gnu() -> bytes:
    t = _Tar(GNU)
    deep = "/".join(f"d{i:02}-" + "n" * 40 for i in range(6))
    t.add(f"{deep}/file", data=b"deep\n")
    t.add("a/" + "f" * 255, data=b"255-byte name\n")
    t.add("a/link-long", tarfile.SYMTYPE, link="t" * 1000)
    t.add("a/hard-long", tarfile.LNKTYPE, link=f"{deep}/file")
    return t.bytes()


def longnames_pax() -> bytes:
    t = _Tar()
    t.add("b/" + "é" * 120 + ".txt", data=b"utf-8 name, 244 bytes\n")
    t.add("b/" + "p" * 200 + "/" + "q" * 200, data=b"long path\n")
    t.add("b/link-long", tarfile.SYMTYPE, link="/" + "u" * 4000)
    t.add("b/ünïcode-dir/", tarfile.DIRTYPE)
    return t.bytes()


def xattrs() -> bytes:
    t = _Tar()
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)
    t.add("bin/ping", data=_data("ping", 3000), mode=0o755,
          pax={"SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape")})
    t.dir("data/", pax={"SCHILY.xattr.trusted.overlay.opaque": "y", "SCHILY.xattr.user.note": "dir xattr"})
    t.add("data/small", data=b"x", pax={"SCHILY.xattr.user.a": "1", "SCHILY.xattr.user.b": "22"})
    many = {f"SCHILY.xattr.user.key{i:02}": f"value-{i}-" + "v" * (i * 3) for i in range(20)}
    t.add("data/many", data=b"many xattrs\n", pax=many)
    big = {"SCHILY.xattr.user.big": "B" * 2000, "SCHILY.xattr.trusted.t": "t", "SCHILY.xattr.security.s": "s"}
    t.add("data/big", data=b"big xattr\n", pax=big)
    mixed = {"SCHILY.xattr.user.zz": "1", "SCHILY.xattr.user.a": "2" * 50, "SCHILY.xattr.trusted.m": "3" * 60,
             "SCHILY.xattr.security.selinux": "system_u:object_r:bin_t:s0", "SCHILY.xattr.user.mm": "4" * 70}
    t.add("data/mixed", data=b"", pax=mixed)
    t.add("data/sym", tarfile.SYMTYPE, link="small", pax={"SCHILY.xattr.trusted.sym": "on a symlink"})
    return t.bytes()


def xattr_order() -> bytes:
    """Xattr blocks with entries that tar2ext4's comparator (not a strict order) finds each less than the
    other, and empty values (whose e_value_offs tar2ext4 sets), in the inode and in the block."""
    t = _Tar()
    fill = {"SCHILY.xattr.user.fill": "f" * 40, "SCHILY.xattr.user.empty": ""}   # the inode holds these
    for i, names in enumerate((["user.zz", "trusted.a", "user.b"],
                               ["security.q", "user.longer-name", "trusted.bb", "user.c", "trusted.zzzz"],
                               [f"user.{'k' * (12 - n)}{n}" for n in range(6)] + ["trusted.x", "security.yy"])):
        pax = dict(fill)
        pax.update({f"SCHILY.xattr.{n}": "v" * (10 + 3 * j) * (j % 3 != 1) for j, n in enumerate(names)})
        t.add(f"order/f{i}", data=b"x\n", pax=pax)
    return t.bytes()


def timestamps() -> bytes:
    t = _Tar()
    t.add("t/epoch", data=b"0\n", mtime=0)
    t.add("t/fraction", data=b"f\n", mtime=T0 + 0.123456789)
    t.add("t/before-1970", data=b"b\n", mtime=-86400 * 365)
    t.add("t/after-2038", data=b"a\n", mtime=2**31 + 1000)
    t.add("t/far-future", data=b"ff\n", mtime=2**33 + 5)
    t.add("t/atime-ctime", data=b"ac\n", pax={"atime": "1600000000.5", "ctime": "1650000000.25"})
    t.dir("t/", mtime=12345)
    return t.bytes()


def implicit_parents() -> bytes:
    t = _Tar()
    t.add("x/y/z/file", data=b"no parents declared\n", uid=7, gid=8, mode=0o600, mtime=T0 + 60)
    t.dir("x/y/", mode=0o700, uid=1, gid=2, mtime=T0 + 120)        # declared after its child
    t.dir("x/y/", mode=0o750, uid=3, gid=4, mtime=T0 + 180)        # declared twice
    t.add("x/sym", tarfile.SYMTYPE, link="y")
    t.add("x/sym", tarfile.SYMTYPE, link="y/z")                    # a symlink appearing twice
    t.dir("./", mode=0o700, mtime=T0 + 240)                        # the root itself
    t.add("./dot/prefixed", data=b"./ prefix\n")
    return t.bytes()


def many_files() -> bytes:
    t = _Tar()
    t.dir("many/")
    for i in range(3000):
        t.add(f"many/file-{i:05d}-with-a-longer-name", data=b"" if i % 3 else _data(f"m{i}", i % 5000))
    for i in range(300):
        t.dir(f"dirs/d{i:03d}/")
        t.add(f"dirs/d{i:03d}/f", data=b"f\n")
    return t.bytes()


def big_file() -> bytes:
    """One 130 MiB file: more than one 32768-block extent, crossing a block group boundary."""
    t = _Tar()
    block = _data("big", 1 << 20)
    t.add("big/blob", data=block * 130)
    t.add("big/after", data=b"after the big file\n")
    return t.bytes()


GENERATED: dict[str, Callable[[], bytes]] = {
    "empty": empty,
    "basic": basic,
    "whiteouts": whiteouts,
    "hardlinks": hardlinks,
    "longnames-gnu": longnames_gnu,
    "longnames-pax": longnames_pax,
    "xattrs": xattrs,
    "timestamps": timestamps,
    "xattr-order": xattr_order,
    "implicit-parents": implicit_parents,
    "many-files": many_files,
    "big-file": big_file,
}


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(".")
    out.mkdir(parents=True, exist_ok=True)
    for name, make in GENERATED.items():
        data = make()
        (out / f"{name}.tar").write_bytes(data)
        print(f"{name}.tar {len(data)} sha256:{hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
