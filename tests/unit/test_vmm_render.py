"""The VM config renders to QEMU argv and libvirt XML as pure functions; golden files pin both.

Regenerate after an intended change with PARMA_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sandbox.attest.id_keys import load_private_key, make_id_material
from sandbox.vmm.config import Accel, Disk, FwCfgFile, PortForward, SnpLaunch, Tee, VmConfig, VmConfigError
from sandbox.vmm.libvirt_xml import QEMU_NS, build_domain_xml
from sandbox.vmm.qemu import build_argv

GOLDEN = Path(__file__).parent / "golden"
RUN = Path("/run/user/0/parma-sandbox/hello")
CACHE = Path("/root/.cache/parma-sandbox")
HOST_DATA = bytes.fromhex("5e6c6e2dfde7b4f26a6a7b0fd55d0cc8a9a5c3b8a26b8f5e5dc3d3b0a6b1c2d3")
KEYS = Path(__file__).parents[1] / "data" / "snp-id"


def snp_launch(*, with_id: bool = False) -> SnpLaunch:
    """Milan/Genoa/Turin values for cbitpos and reduced-phys-bits (on a host they are read from CPUID)."""
    snp = SnpLaunch(host_data=HOST_DATA, firmware=CACHE / "firmware/OVMF.amdsev.fd", cbitpos=51, reduced_phys_bits=1)
    if not with_id:
        return snp
    material = make_id_material(measurement=bytes(range(48)), policy=snp.policy,
                                id_key=load_private_key(KEYS / "id_key.pem"),
                                author_key=load_private_key(KEYS / "author_key.pem"))   # deterministic signatures
    return dataclasses.replace(snp, id_block=material.block.to_bytes(), id_auth=material.auth.to_bytes(),
                               author_key_enabled=True)


def config(tee: Tee, accel: Accel, *, with_id: bool = False) -> VmConfig:
    snp = snp_launch(with_id=with_id) if tee == Tee.sev_snp else None
    fw_cfg = () if snp else (FwCfgFile("opt/parma/kbs_url", RUN / "kbs_url"),)
    return VmConfig(
        name="hello", tee=tee, accel=accel, vcpus=1, memory_mib=512,
        kernel=CACHE / "uvm/abc/bzImage",
        cmdline='console=ttyS0 panic=-1 dm-mod.create="root,,,ro,0 8 verity 1 /dev/vda /dev/vda 4096 4096 1 1 '
                'sha256 aa bb" root=/dev/dm-0 ro',
        disks=(Disk(CACHE / "uvm/abc/rootfs.img", "parma-root"), Disk(CACHE / "layers/l0.img", "L0"),
               Disk(CACHE / "volumes/www.img", "V0")),
        agent_sockets=tuple(RUN / f"agent-{i}.sock" for i in range(4)),
        console_log=RUN / "console.log", qmp_socket=RUN / "qmp.sock",
        forwards=(PortForward(8080, 18080),), fw_cfg=fw_cfg, snp=snp, pidfile=RUN / "qemu.pid",
        psp_socket=None if snp else RUN / "psp.sock",
    )


MODES = {
    "emulated-tcg": (Tee.emulated, Accel.tcg),
    "emulated-kvm": (Tee.emulated, Accel.kvm),
    "sev-snp": (Tee.sev_snp, Accel.kvm),
    "sev-snp-id": (Tee.sev_snp, Accel.kvm),       # with an ID block and author key
}


def mode_config(mode: str) -> VmConfig:
    return config(*MODES[mode], with_id=mode == "sev-snp-id")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("PARMA_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with PARMA_UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.mark.parametrize("mode", MODES)
def test_qemu_argv_golden(mode: str) -> None:
    argv = build_argv(mode_config(mode))
    check_golden(f"qemu-{mode}.argv", "\n".join(argv) + "\n")


@pytest.mark.parametrize("mode", MODES)
def test_libvirt_xml_golden(mode: str) -> None:
    check_golden(f"libvirt-{mode}.xml", build_domain_xml(mode_config(mode)))


def test_snp_argv_binds_the_policy_hash() -> None:
    argv = build_argv(config(Tee.sev_snp, Accel.kvm))
    snp = argv[argv.index("-object", argv.index("-object") + 1) + 1]
    assert snp.startswith("sev-snp-guest,id=sev0,")
    assert "policy=0x30000" in snp and "kernel-hashes=on" in snp
    assert "host-data=XmxuLf3ntPJqansP1V0MyKmlw7iia49eXcPTsKaxwtM=" in snp
    machine = argv[argv.index("-machine") + 1]
    assert "confidential-guest-support=sev0" in machine and "memory-backend=ram0" in machine
    assert "memory-backend-memfd" in argv[argv.index("-object") + 1]
    assert argv[argv.index("-bios") + 1].endswith("OVMF.amdsev.fd")
    assert "-fw_cfg" not in argv  # nothing host-supplied beyond the measured launch
    assert "org.parma.psp" not in " ".join(argv)   # the real PSP answers an SNP guest
    assert "virtio-rng-pci" not in argv  # nor entropy: the host could feed the guest chosen "random" bytes
    assert build_domain_xml(config(Tee.sev_snp, Accel.kvm)).count("<rng") == 0


def test_emulated_argv_has_the_emulated_psp_port_and_forwards_to_loopback() -> None:
    argv = build_argv(config(Tee.emulated, Accel.tcg))
    assert "socket,id=psp0,path=/run/user/0/parma-sandbox/hello/psp.sock,server=on,wait=off" in argv
    assert "virtserialport,bus=vserial0.0,chardev=psp0,name=org.parma.psp" in argv
    assert not any("opt/parma/psp" in a for a in argv)   # the emulated VCEK key stays on the host
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:18080-:8080" in argv
    assert "sev-snp-guest" not in " ".join(argv)
    assert argv[argv.index("-machine") + 1] == "q35,accel=tcg"
    assert "virtio-rng-pci" in argv  # an emulated guest trusts its host anyway: keep boot entropy quick


def test_qemu_option_values_escape_commas() -> None:
    cfg = config(Tee.emulated, Accel.tcg)
    cfg = VmConfig(**{**cfg.__dict__, "console_log": Path("/tmp/a,b/console.log")})
    argv = build_argv(cfg)
    assert "file,id=console0,path=/tmp/a,,b/console.log" in argv


@pytest.mark.parametrize("mode", MODES)
def test_both_renderings_have_the_same_devices(mode: str) -> None:
    cfg = mode_config(mode)
    argv = build_argv(cfg)
    dom = ET.fromstring(build_domain_xml(cfg))
    disks = [(d.find("source").get("file"), d.find("serial").text) for d in dom.iter("disk")]
    argv_disks = [(a.split("file=")[1].split(",")[0], b.split("serial=")[1])
                  for a, b in zip(argv[argv.index("-drive") + 1::4], argv[argv.index("-drive") + 3::4], strict=False)
                  if a.startswith("if=none")]
    assert disks == argv_disks == [(os.fspath(d.path), d.serial) for d in cfg.disks]
    channels = [(c.find("source").get("path"), c.find("target").get("name")) for c in dom.iter("channel")]
    psp = [(os.fspath(cfg.psp_socket), "org.parma.psp")] if cfg.psp_socket else []
    assert channels == [(os.fspath(s), f"org.parma.agent.{i}") for i, s in enumerate(cfg.agent_sockets)] + psp
    assert all(f"name={n}" in " ".join(argv) for _, n in channels)
    assert dom.find("os/kernel").text == argv[argv.index("-kernel") + 1]
    assert dom.find("os/cmdline").text == argv[argv.index("-append") + 1]
    assert dom.find("devices/serial/source").get("path") == os.fspath(cfg.console_log)
    net = [a.get("value") for a in dom.iter(f"{{{QEMU_NS}}}arg")]
    assert net == argv[argv.index("-netdev"):argv.index("-netdev") + 4]
    fw = [(e.get("name"), e.get("file")) for e in dom.iter("entry")]
    assert fw == [(f.name, os.fspath(f.path)) for f in cfg.fw_cfg]
    ls = dom.find("launchSecurity")
    if cfg.snp is None:
        assert ls is None
    else:
        assert ls.get("type") == "sev-snp" and ls.get("kernelHashes") == "yes"
        assert ls.find("hostData").text == cfg.snp.host_data_b64()
        assert ls.find("policy").text == "0x00030000"
        assert dom.find("memoryBacking/source").get("type") == "memfd"
        sev = argv[argv.index("-object", argv.index("-object") + 1) + 1]
        props = dict(kv.split("=", 1) for kv in sev.split(",")[1:])
        assert (ls.findtext("cbitpos"), ls.findtext("reducedPhysBits")) == (props["cbitpos"], props["reduced-phys-bits"])
        assert int(ls.findtext("policy"), 16) == int(props["policy"], 16)
        assert ls.findtext("idBlock") == props.get("id-block") and ls.findtext("idAuth") == props.get("id-auth")
        assert ls.get("authorKey") == {"on": "yes", "off": "no", None: None}[props.get("author-key-enabled")]
        assert dom.find("os/loader").text == argv[argv.index("-bios") + 1]
    # read-only disks are shared cache files: libvirt must never chown them to its QEMU user
    for d in dom.iter("disk"):
        assert (d.find("source/seclabel") is not None) == (d.find("readonly") is not None)


def test_invalid_configs_are_refused() -> None:
    cfg = config(Tee.emulated, Accel.tcg)
    with pytest.raises(VmConfigError, match="SnpLaunch"):
        VmConfig(**{**cfg.__dict__, "tee": Tee.sev_snp})
    snp = config(Tee.sev_snp, Accel.kvm)
    with pytest.raises(VmConfigError, match="KVM"):
        VmConfig(**{**snp.__dict__, "accel": Accel.tcg})
    with pytest.raises(VmConfigError, match="serials"):
        VmConfig(**{**cfg.__dict__, "disks": cfg.disks + (Disk(Path("/x"), "L0"),)})


def test_a_guest_forward_relays_each_connection_to_a_host_service_in_both_renderings() -> None:
    from sandbox.vmm.config import GuestForward

    cfg = dataclasses.replace(config(Tee.emulated, Accel.tcg),
                              guest_forwards=(GuestForward("10.0.2.53", 53, "127.0.0.1", 5353),))
    relay = "guestfwd=tcp:10.0.2.53:53-cmd:socat STDIO TCP4:127.0.0.1:5353"
    netdev = build_argv(cfg)[build_argv(cfg).index("-netdev") + 1]
    assert relay in netdev.split(",")
    assert relay in ET.tostring(ET.fromstring(build_domain_xml(cfg)), encoding="unicode")
    v6 = GuestForward("10.0.2.53", 53, "::1", 53)
    assert v6.host_address == "::1"
    for bad in (("10.0.3.1", 53, "127.0.0.1", 53), ("10.0.2.53", 53, "localhost; rm -rf /", 53),
                ("10.0.2.53", 0, "127.0.0.1", 53)):
        with pytest.raises(ValueError):
            GuestForward(*bad)


def test_libvirt_refuses_a_network_namespace_it_could_not_honour() -> None:
    cfg = dataclasses.replace(mode_config("emulated-tcg"), netns=Path("/var/run/netns/pod"))
    assert build_argv(cfg, "qemu-system-x86_64")[:3] == ["nsenter", "--net=/var/run/netns/pod", "--"]
    with pytest.raises(VmConfigError, match="needs the qemu backend"):
        build_domain_xml(cfg)
