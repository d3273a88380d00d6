"""Pure parts of the guest agent: device-mapper structures, the OCI spec, output buffers, users."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest

from sandbox.guest import devmapper, oci
from sandbox.guest.output import OutputLog
from sandbox.guest.users import UserError, resolve_user


def test_dm_ioctl_numbers_match_the_kernel_header() -> None:
    # _IOWR(0xfd, 3, struct dm_ioctl) with sizeof(struct dm_ioctl) == 312, as the kernel computes it.
    assert devmapper._iowr(devmapper.DM_DEV_CREATE_CMD, devmapper.DM_IOCTL_SIZE) == 0xC138FD03
    assert devmapper._iowr(devmapper.DM_TABLE_LOAD_CMD, devmapper.DM_IOCTL_SIZE) == 0xC138FD09


def test_dm_table_load_buffer_layout() -> None:
    t = devmapper.Target(0, 800, "verity", "1 /dev/vdb /dev/vdb 4096 4096 100 101 sha256 ab cd")
    buf = devmapper._pack("parma-1", flags=devmapper.DM_READONLY_FLAG, targets=(t,))
    hdr = struct.unpack_from(devmapper.DM_IOCTL_FMT, buf)
    assert hdr[:3] == (4, 0, 0)
    assert hdr[3] == len(buf) and hdr[4] == 312 and hdr[5] == 1
    assert hdr[7] == devmapper.DM_READONLY_FLAG
    assert hdr[11].rstrip(b"\0") == b"parma-1"
    start, length, _status, nxt, ttype = struct.unpack_from(devmapper.DM_TARGET_SPEC_FMT, buf, 312)
    assert (start, length, ttype.rstrip(b"\0")) == (0, 800, b"verity")
    assert nxt % 8 == 0 and 312 + nxt == len(buf)
    params = bytes(buf[352:]).split(b"\0")[0]
    assert params == t.params.encode()


def test_dm_name_validation() -> None:
    with pytest.raises(ValueError):
        devmapper._pack("a/b")
    with pytest.raises(ValueError):
        devmapper._pack("x" * 128)


def make_spec(**kw: object) -> dict:
    proc = oci.ProcessSpec(argv=("/bin/httpd", "-f"), env=("PATH=/bin", "GREETING=hello"), cwd="/", uid=65534,
                           gid=65534, capabilities={"bounding": ("CAP_KILL",), "effective": ("CAP_KILL",)})
    return oci.build_spec(oci.BundleSpec("web", "/run/parma/containers/web/rootfs", proc, "parma",
                                            (oci.BindMount("/www", "/run/parma/volumes/www", ("rbind", "rprivate", "nosuid", "nodev", "ro")),), **kw))


def test_oci_spec_has_no_hooks_and_takes_env_and_caps_from_the_decision() -> None:
    spec = make_spec()
    assert "hooks" not in spec and "annotations" not in spec
    assert spec["process"]["env"] == ["PATH=/bin", "GREETING=hello"]
    assert spec["process"]["capabilities"]["bounding"] == ["CAP_KILL"]
    assert spec["process"]["capabilities"]["ambient"] == []
    assert spec["process"]["user"]["uid"] == 65534 and spec["process"]["terminal"] is False
    assert spec["root"] == {"path": "/run/parma/containers/web/rootfs", "readonly": False}
    types = [ns["type"] for ns in spec["linux"]["namespaces"]]
    assert "network" not in types and "pid" in types and "mount" in types
    www = [m for m in spec["mounts"] if m["destination"] == "/www"][0]
    assert www["type"] == "bind" and "ro" in www["options"]
    assert "/proc/kcore" in spec["linux"]["maskedPaths"]
    assert spec["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]


def test_privileged_spec_drops_masks_and_allows_devices() -> None:
    spec = make_spec(privileged=True)
    assert "maskedPaths" not in spec["linux"]
    assert spec["linux"]["resources"]["devices"][0]["allow"] is True


@pytest.mark.parametrize(("path", "clean"), [
    ("/www", "/www"), ("/a/./b/", "/a/b"), ("relative", None), ("/a/../etc", None), ("/x\0y", None),
])
def test_clean_container_path(path: str, clean: str | None) -> None:
    assert oci.clean_container_path(path) == clean


def test_output_log_offsets_bounds_and_eof() -> None:
    log = OutputLog(capacity=11)
    log.append("stdout", b"hello ")
    log.append("stderr", b"world")
    r = log.read(0)
    assert [(c.stream, c.data) for c in r.chunks] == [("stdout", b"hello "), ("stderr", b"world")]
    assert r.next_offset == 11 and r.dropped == 0
    log.append("stdout", b"again")      # pushes the oldest chunk out (capacity 11)
    r = log.read(0)
    assert r.dropped == 6 and r.chunks[0].data == b"world"
    r = log.read(8, max_bytes=4)
    assert b"".join(c.data for c in r.chunks) == b"rlda"
    assert r.next_offset == 12


def test_output_log_pump_and_wait() -> None:
    log = OutputLog()
    r_fd, w_fd = os.pipe()
    log.pump("stdout", r_fd)
    t = threading.Timer(0.1, lambda: (os.write(w_fd, b"late"), os.close(w_fd)))
    t.start()
    res = log.read(0, wait=5)
    assert b"".join(c.data for c in res.chunks) == b"late"
    assert log.wait_closed(5)
    assert log.read(res.next_offset).eof


def write_etc(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nwww:x:33:33::/var/www:/bin/false\n"
                                     "nobody:x:65534:65534::/:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\nadm:x:4:www\n")


@pytest.mark.parametrize(("user", "expect"), [
    ("", (0, 0, "root", "root", ())),
    ("65534:65534", (65534, 65534, "nobody", "nogroup", ())),
    ("www", (33, 33, "www", "www-data", ((4, "adm"),))),
    ("www:nogroup", (33, 65534, "www", "nogroup", ())),
    ("1234", (1234, 0, "", "root", ())),
])
def test_resolve_user(tmp_path: Path, user: str, expect: tuple) -> None:
    write_etc(tmp_path)
    r = resolve_user(str(tmp_path), user)
    assert (r.uid, r.gid, r.user_name, r.group_name, r.additional_gids) == expect


def test_resolve_user_unknown_name_and_symlinked_passwd(tmp_path: Path) -> None:
    write_etc(tmp_path)
    with pytest.raises(UserError):
        resolve_user(str(tmp_path), "ghost")
    (tmp_path / "etc/passwd").unlink()
    (tmp_path / "etc/passwd").symlink_to("/etc/passwd")   # must not be followed out of the rootfs
    with pytest.raises(UserError):
        resolve_user(str(tmp_path), "root")
