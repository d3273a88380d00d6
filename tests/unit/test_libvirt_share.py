"""Publishing a domain's files for libvirt's QEMU user (a stock system libvirtd runs QEMU as libvirt-qemu)."""

from __future__ import annotations

import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sandbox.hostcheck import Accel, Tee
from sandbox.shared.errors import InputError
from sandbox.vmm import libvirt_share
from sandbox.vmm.config import Disk, FwCfgFile, VmConfig
from sandbox.vmm.libvirt_probe import can_open
from sandbox.vmm.libvirt_share import QemuUser, parse_dac_label, publish

CAPS = """<capabilities><host>
  <secmodel><model>none</model><doi>0</doi></secmodel>
  <secmodel><model>dac</model><doi>0</doi>
    <baselabel type='kvm'>+64055:+64055</baselabel><baselabel type='qemu'>+64055:+107</baselabel></secmodel>
</host></capabilities>"""


def test_dac_base_label() -> None:
    assert parse_dac_label(CAPS, "kvm") == QemuUser(64055, 64055)
    assert parse_dac_label(CAPS, "qemu") == QemuUser(64055, 107)
    assert parse_dac_label("<capabilities><host/></capabilities>", "kvm") is None


def _config(tmp: Path) -> VmConfig:
    cache = tmp / "home" / ".cache"
    cache.mkdir(parents=True)
    (tmp / "home").chmod(0o700)
    files = {}
    for name, mode in (("bzImage", 0o644), ("rootfs.img", 0o644), ("layer.img", 0o644), ("private.img", 0o600),
                       ("psp.json", 0o600)):
        files[name] = cache / name
        files[name].write_bytes(name.encode() * 100)
        files[name].chmod(mode)
    return VmConfig(name="t", tee=Tee.emulated, accel=Accel.tcg, vcpus=1, memory_mib=64, kernel=files["bzImage"],
                    cmdline="x", disks=(Disk(files["rootfs.img"], "parma-root"), Disk(files["layer.img"], "L0"),
                                        Disk(files["private.img"], "V0")),
                    agent_sockets=(tmp / "a.sock",), console_log=tmp / "c.log", qmp_socket=tmp / "q.sock",
                    fw_cfg=(FwCfgFile("opt/parma/psp", files["psp.json"]),))


def test_publish_links_disks_and_copies_what_libvirt_chowns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(libvirt_share.SHARE_ENV, str(tmp_path / "share"))
    cfg = _config(tmp_path)
    user = QemuUser(uid=os.getuid() + 1, gid=os.getgid())
    published = publish(cfg, "parma-sandbox-t", user)
    d = published.directory
    assert d == tmp_path / "share" / "parma-sandbox-t"
    assert stat.S_IMODE(d.stat().st_mode) == 0o711 and stat.S_IMODE(d.parent.stat().st_mode) == 0o711
    new = published.config
    assert new.kernel == d / "kernel" and new.kernel.stat().st_ino != cfg.kernel.stat().st_ino   # a copy
    assert new.disks[0].path.stat().st_ino == cfg.disks[0].path.stat().st_ino                    # hard links
    assert new.disks[1].path.stat().st_ino == cfg.disks[1].path.stat().st_ino
    private = new.disks[2].path                 # not world-readable: copied, readable for QEMU
    assert private.stat().st_ino != cfg.disks[2].path.stat().st_ino and private.stat().st_mode & 0o004
    fw = new.fw_cfg[0].path
    assert stat.S_IMODE(fw.stat().st_mode) == 0o640 and fw.stat().st_gid == user.gid
    assert fw.read_bytes() == cfg.fw_cfg[0].path.read_bytes()
    assert [d_.serial for d_ in new.disks] == [d_.serial for d_ in cfg.disks]
    assert (new.agent_sockets, new.console_log) == (cfg.agent_sockets, cfg.console_log)  # libvirtd opens these
    # The cache's files are untouched and stay ours.
    assert all(f.stat().st_uid == os.getuid() for f in (cfg.kernel, *(x.path for x in cfg.disks)))
    libvirt_share.remove(d)
    assert not d.exists() and cfg.disks[0].path.exists()


def test_nothing_is_published_when_qemu_runs_as_the_caller(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert publish(cfg, "parma-sandbox-t", QemuUser(os.getuid(), os.getgid())).config is cfg
    assert publish(cfg, "parma-sandbox-t", None).directory is None


def test_publish_replaces_a_stale_directory_and_removes_only_its_own(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(libvirt_share.SHARE_ENV, str(tmp_path / "share"))
    cfg = _config(tmp_path)
    user = QemuUser(os.getuid() + 1, os.getgid())
    first = publish(cfg, "parma-sandbox-t", user).directory
    (first / "leftover").write_text("from a crashed launch")
    second = publish(cfg, "parma-sandbox-t", user).directory
    assert second == first and not (second / "leftover").exists()
    stranger = tmp_path / "share" / "someone-else"
    stranger.mkdir()
    with pytest.raises(InputError, match="refusing to remove"):
        libvirt_share.remove(stranger)


def test_published_xml_marks_read_only_disks_never_relabel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.vmm.libvirt_xml import build_domain_xml

    monkeypatch.setenv(libvirt_share.SHARE_ENV, str(tmp_path / "share"))
    cfg = publish(_config(tmp_path), "parma-sandbox-t", QemuUser(os.getuid() + 1, os.getgid())).config
    dom = ET.fromstring(build_domain_xml(cfg))
    for disk in dom.iter("disk"):
        assert disk.find("source").get("file").startswith(str(tmp_path / "share"))
        assert disk.find("source/seclabel").attrib == {"model": "dac", "relabel": "no"}


def test_can_open_by_mode_bits(tmp_path: Path) -> None:
    """/dev/kvm as libvirt's QEMU user sees it: 0600 root (no udev) versus 0660 root:kvm."""
    f = tmp_path / "kvm"
    f.write_text("")
    owner, group = 4000, 4001
    if os.getuid() == 0:
        os.chown(f, owner, group)
    else:
        owner, group = os.getuid(), os.getgid()
    f.chmod(0o600)
    assert can_open(f, owner, set()) and not can_open(f, owner + 7, {group})
    f.chmod(0o660)
    assert can_open(f, owner + 7, {group}) and not can_open(f, owner + 7, {group + 7})
    assert can_open(f, 0, set()) and not can_open(tmp_path / "missing", 0, set())
