"""Converted layers against real tools: e2fsck, debugfs, GNU tar, gzip/zstd, veritysetup, the kernel's
ext4 and overlayfs (when run as root), and a real Debian minbase rootfs made with mmdebstrap."""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from pathlib import Path

import pytest

from sandbox.images.layout import LAYER_TAR, LayoutWriter, write_layout
from sandbox.images.resolve import resolve_image
from sandbox.layers.convert import convert_layer, convert_tar_to_ext4
from sandbox.layers.tar2ext4 import Ext4Options
from sandbox.run import run
from sandbox.shared.errors import InputError, SandboxError, ToolError
from tests.ext4read import Ext4Image, Item, walk
from tests.layertars import Layer, edge_case_layer, expected_tree, strip_ino
from tests.minbase import minbase_tar

IS_ROOT = os.geteuid() == 0


def e2fsck_clean(image: Path) -> None:
    proc = run(["e2fsck", "-fn", image], check=False)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, out
    assert "Fix?" not in out and "Clear?" not in out, out


def layers() -> dict[str, Layer]:
    lay = {"edge": edge_case_layer()}
    lay["whiteouts"] = (Layer().add("a", tarfile.DIRTYPE).add("a/.wh.gone").add("b/.wh..wh..opq").add("b/k", data=b"k")
                        .add("c/.wh.x").add(".wh.d").add("d/y", data=b"y"))
    lay["duplicates"] = (Layer().add("f", data=b"1" * 9000).add("f", data=b"2").add("t", tarfile.DIRTYPE)
                         .add("t/i", data=b"i" * 5000).add("t", data=b"file").add("h", data=b"h")
                         .add("h2", tarfile.LNKTYPE, link="h").add("h", data=b"new"))
    many = Layer()
    for i in range(2500):
        many.add(f"dir{i % 40}/file-with-a-longish-name-{i:05d}", data=b"x" * (i % 3))
    lay["many"] = many
    lay["empty"] = Layer()
    return lay


@pytest.mark.parametrize("name", list(layers()))
def test_e2fsck_clean(tmp_path: Path, name: str) -> None:
    layer = layers()[name]
    src = layer.write(tmp_path / "l.tar")
    convert_tar_to_ext4(src, tmp_path / "l.ext4")
    e2fsck_clean(tmp_path / "l.ext4")
    res = convert_layer(src, tmp_path / "l.img")
    e2fsck_clean(tmp_path / "l.img")            # trailing verity data does not disturb e2fsck
    run(["veritysetup", "verify", f"--hash-offset={res.ext4_size}", tmp_path / "l.img", tmp_path / "l.img",
         res.root_hash])


def debugfs(image: Path, commands: list[str], tmp: Path) -> str:
    script = tmp / "debugfs.cmds"
    script.write_text("\n".join(commands) + "\n")
    return run(["debugfs", "-f", script, image]).stdout.decode("utf-8", "surrogateescape")


def test_debugfs_sees_the_tar(tmp_path: Path) -> None:
    """debugfs (e2fsprogs' own parser) lists the same types, modes, owners and sizes, and dumps the same bytes."""
    layer = edge_case_layer()
    src = layer.write(tmp_path / "l.tar")
    convert_tar_to_ext4(src, tmp_path / "l.ext4")
    want = expected_tree(layer)
    dirs = [b""] + [p for p, it in want.items() if it.type == "directory"]
    out = debugfs(tmp_path / "l.ext4", [f"ls -p /{d.decode('utf-8', 'surrogateescape')}" for d in dirs], tmp_path)
    seen: dict[bytes, tuple[int, int, int, int]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("debugfs: ls -p /"):
            current = line[len("debugfs: ls -p /"):].encode("utf-8", "surrogateescape")
        elif line.startswith("/") and current is not None:
            # /ino/mode/uid/gid/name/size/
            ino, mode, uid, gid, *name_parts, size, _ = line[1:].split("/")
            name = "/".join(name_parts).encode("utf-8", "surrogateescape")
            if name in (b".", b"..") or ino == "0":     # inode 0: the empty entry ending a block
                continue
            path = current + b"/" + name if current else name
            seen[path] = (int(mode, 8), int(uid), int(gid), int(size or 0))
    assert set(seen) == set(want)
    types = {"file": stat.S_IFREG, "directory": stat.S_IFDIR, "symlink": stat.S_IFLNK, "char": stat.S_IFCHR,
             "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}
    for path, item in want.items():
        mode, uid, gid, size = seen[path]
        assert (stat.S_IFMT(mode), stat.S_IMODE(mode), uid, gid) == (types[item.type], item.perm, item.uid,
                                                                      item.gid), path
        if item.type in ("file", "symlink"):
            assert size == item.size, path
    dump = tmp_path / "dump"
    dump.mkdir()
    debugfs(tmp_path / "l.ext4", [f"rdump / {dump}"], tmp_path)
    for path, item in want.items():
        p = dump / os.fsdecode(path)
        if item.type == "file":
            assert hashlib.sha256(p.read_bytes()).hexdigest() == item.digest, path
        elif item.type == "symlink":
            assert os.fsencode(os.readlink(p)) == item.target, path
    out = debugfs(tmp_path / "l.ext4", ["ea_list /bin/ping", "ea_list /x"], tmp_path)
    assert "security.capability" in out and "user.one" in out and "trusted.t" in out


def make_sparse_source(root: Path) -> bytes:
    root.mkdir()
    f = root / "sparse"
    with open(f, "wb") as fh:
        fh.truncate(50 << 20)
        for off in (0, 5 << 20, (20 << 20) + 123, (50 << 20) - 10):
            fh.seek(off)
            fh.write(b"data@" + str(off).encode())
    (root / "dense").write_bytes(os.urandom(10000))
    return f.read_bytes()


@pytest.mark.parametrize("flags", [["--format=gnu"], ["--format=posix", "--sparse-version=0.0"],
                                   ["--format=posix", "--sparse-version=0.1"],
                                   ["--format=posix", "--sparse-version=1.0"]],
                         ids=["gnu", "pax-0.0", "pax-0.1", "pax-1.0"])
def test_gnu_tar_sparse_formats(tmp_path: Path, flags: list[str]) -> None:
    content = make_sparse_source(tmp_path / "src")
    tar = tmp_path / "s.tar"
    run(["tar", "--sparse", *flags, "-cf", tar, "-C", tmp_path / "src", "sparse", "dense"])
    convert_tar_to_ext4(tar, tmp_path / "s.ext4")
    e2fsck_clean(tmp_path / "s.ext4")
    img = Ext4Image(tmp_path / "s.ext4")
    tree = walk(img)
    assert tree[b"sparse"].digest == hashlib.sha256(content).hexdigest()
    node = img.inode(tree[b"sparse"].ino)
    assert node.blocks < 10                         # the holes stay holes
    assert tree[b"dense"].digest == hashlib.sha256((tmp_path / "src" / "dense").read_bytes()).hexdigest()


def test_compression_tools_give_the_same_layer(tmp_path: Path) -> None:
    raw = edge_case_layer().tar_bytes()
    (tmp_path / "l.tar").write_bytes(raw)
    run(["gzip", "-k", "-9", tmp_path / "l.tar"])
    run(["zstd", "-q", "-19", tmp_path / "l.tar", "-o", tmp_path / "l.tar.zst"])
    results = {n: convert_layer(tmp_path / n, tmp_path / f"{n}.img") for n in ("l.tar", "l.tar.gz", "l.tar.zst")}
    assert len({r.root_hash for r in results.values()}) == 1
    assert {r.diff_id for r in results.values()} == {"sha256:" + hashlib.sha256(raw).hexdigest()}
    assert [r.compression for r in results.values()] == ["none", "gzip", "zstd"]


def _mount(image: Path, where: Path) -> None:
    where.mkdir()
    run(["mount", "-o", "loop,ro,noload", "-t", "ext4", image, where])


@pytest.mark.skipif(not IS_ROOT, reason="mounting ext4 and overlayfs needs root")
def test_kernel_overlay_shows_no_ghost_whiteouts(tmp_path: Path) -> None:
    lower = (Layer().add("a", tarfile.DIRTYPE, mode=0o755).add("a/x", data=b"x").add("a/keep", data=b"k")
             .add("b", tarfile.DIRTYPE, mode=0o755).add("b/y", data=b"y"))
    upper = (Layer().add("a", tarfile.DIRTYPE, mode=0o755).add("a/.wh.x")
             .add("b", tarfile.DIRTYPE, mode=0o755).add("b/.wh..wh..opq").add("b/.wh.ghost").add("b/new", data=b"n")
             .add("c", tarfile.DIRTYPE, mode=0o755).add("c/.wh.nothing").add("c/f", data=b"f"))
    for name, layer in (("lower", lower), ("upper", upper)):
        convert_tar_to_ext4(layer.write(tmp_path / f"{name}.tar"), tmp_path / f"{name}.ext4")
    mounted: list[Path] = []
    try:
        for name in ("lower", "upper"):
            _mount(tmp_path / f"{name}.ext4", tmp_path / name)
            mounted.append(tmp_path / name)
        (tmp_path / "m").mkdir()
        try:
            run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={tmp_path / 'upper'}:{tmp_path / 'lower'}",
                 tmp_path / "m"])
        except ToolError as e:
            pytest.skip(f"overlayfs unavailable here: {e.hint}")
        mounted.append(tmp_path / "m")
        m = tmp_path / "m"
        assert sorted(os.listdir(m / "a")) == ["keep"]
        assert sorted(os.listdir(m / "b")) == ["new"]
        assert sorted(os.listdir(m / "c")) == ["f"]
    finally:
        for p in reversed(mounted):
            run(["umount", p], check=False)


@pytest.mark.skipif(not IS_ROOT, reason="mounting ext4 needs root")
def test_kernel_mounts_edge_cases(tmp_path: Path) -> None:
    layer = edge_case_layer()
    convert_tar_to_ext4(layer.write(tmp_path / "l.tar"), tmp_path / "l.ext4")
    _mount(tmp_path / "l.ext4", tmp_path / "m")
    try:
        m = tmp_path / "m"
        assert os.getxattr(m / "bin/ping", "security.capability")[:4] == b"\x01\x00\x00\x02"
        assert os.getxattr(m / "x/bin", "user.bin") == b"\x00\xff\x80\xfe"
        assert len(os.listxattr(m / "x/many")) == 30
        st = os.lstat(m / "dev/big")
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (300, 70000)
        assert os.stat(m / "times/nanos").st_mtime_ns == 1700000000123456789
        assert (m / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n"
    finally:
        run(["umount", tmp_path / "m"], check=False)


def tar_tree(path: Path) -> dict[bytes, Item]:
    """The tree a tar describes, read with Python's tarfile (last entry wins, hard links share items)."""
    out: dict[bytes, Item] = {}
    kinds = {tarfile.REGTYPE: "file", tarfile.DIRTYPE: "directory", tarfile.SYMTYPE: "symlink",
             tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}
    with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tf:
        for ti in tf:
            name = os.fsencode(ti.name).removeprefix(b"./").strip(b"/")
            if name in (b"", b"."):
                continue
            if ti.type == tarfile.LNKTYPE:
                out[name] = out[os.fsencode(ti.linkname).removeprefix(b"./")]
                continue
            kind = kinds[ti.type]
            digest = hashlib.sha256(tf.extractfile(ti).read()).hexdigest() if kind == "file" else None
            target = os.fsencode(ti.linkname) if kind == "symlink" else None
            xattrs = tuple(sorted((k[len("SCHILY.xattr."):].encode(), v.encode("utf-8", "surrogateescape"))
                                  for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")))
            out[name] = Item(type=kind, perm=ti.mode | (0o777 if kind == "symlink" else 0), uid=ti.uid, gid=ti.gid,
                             mtime=int(ti.mtime), size=ti.size if kind == "file" else
                             (len(target) if target is not None else 0), digest=digest, target=target,
                             device=(ti.devmajor, ti.devminor) if kind in ("char", "block") else None,
                             xattrs=xattrs)
    return out


def test_debian_minbase_rootfs(tmp_path: Path) -> None:
    try:
        src = minbase_tar()
    except ToolError as e:
        pytest.skip(f"cannot build the Debian minbase tarball here (mmdebstrap needs the mirror): {e.message}")
    res = convert_layer(src, tmp_path / "minbase.img")
    e2fsck_clean(tmp_path / "minbase.img")
    img = Ext4Image(tmp_path / "minbase.img")
    got = walk(img)
    want = tar_tree(src)
    assert len(want) > 5000
    assert strip_ino(got) == strip_ino(want)
    # Hard links in the tar share one inode in the image.
    by_item: dict[int, set[int]] = {}
    with tarfile.open(src) as tf:
        links = [(os.fsencode(t.name).removeprefix(b"./"), os.fsencode(t.linkname).removeprefix(b"./"))
                 for t in tf if t.type == tarfile.LNKTYPE]
    for name, target in links:
        by_item.setdefault(got[target].ino, set()).add(got[name].ino)
        assert got[name].ino == got[target].ino
    assert res.entries >= len(want)


def test_plain_ext4_for_a_rootfs(tmp_path: Path) -> None:
    """The UVM rootfs variant: no whiteout conversion, lost+found present, still e2fsck clean."""
    layer = Layer().add("etc", tarfile.DIRTYPE).add("etc/.wh.keep", data=b"literal")
    convert_tar_to_ext4(layer.write(tmp_path / "r.tar"), tmp_path / "r.ext4",
                        options=Ext4Options(whiteouts=False, lost_and_found=True))
    e2fsck_clean(tmp_path / "r.ext4")
    tree = walk(Ext4Image(tmp_path / "r.ext4"))
    assert tree[b"etc/.wh.keep"].type == "file" and tree[b"lost+found"].perm == 0o700


@pytest.mark.skipif(not IS_ROOT, reason="mounting a small tmpfs needs root")
def test_full_disk_leaves_a_consistent_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = tmp_path / "small"
    small.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", small])
    try:
        monkeypatch.setenv("PARMA_SANDBOX_CACHE", str(small / "cache"))
        lay = Layer().add("big", data=os.urandom(1 << 20))
        oci_dir = tmp_path / "img"

        def build(w: LayoutWriter) -> None:
            raw = lay.tar_bytes()
            w.add_image([w.add_bytes(raw, LAYER_TAR)], ["sha256:" + hashlib.sha256(raw).hexdigest()], tag="latest")

        write_layout(oci_dir, build)
        with pytest.raises(SandboxError, match="no space left") as exc:
            resolve_image("oci:img", base_dir=tmp_path)
        assert "PARMA_SANDBOX_CACHE" in (exc.value.hint or "")
        leftovers = [p for p in (small / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
        assert leftovers == []
    finally:
        run(["umount", small], check=False)


def test_truncated_and_corrupt_zstd(tmp_path: Path) -> None:
    (tmp_path / "l.tar").write_bytes(edge_case_layer().tar_bytes())
    run(["zstd", "-q", tmp_path / "l.tar", "-o", tmp_path / "l.tar.zst"])
    data = (tmp_path / "l.tar.zst").read_bytes()
    broken = bytearray(data)
    broken[len(data) // 2] ^= 0xFF
    for name, content in (("cut.zst", data[:len(data) // 2]), ("flipped.zst", bytes(broken))):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match="zstd|tar stream") as exc:
            convert_layer(tmp_path / name, tmp_path / f"{name}.img", name=f"layer {name}")
        assert exc.value.message.startswith(f"layer {name}: ")
        assert not (tmp_path / f"{name}.img").exists()
