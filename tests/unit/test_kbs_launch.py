"""How `up --kbs` wires key release: the policy pins the broker, the plan mounts the API only where the group
asks, the guest learns the broker's address through fw_cfg (loopback rewritten for QEMU user networking)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from sandbox.group import validate_group
from sandbox.hostcheck import Accel, Tee
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.kbs.client import broker_pins, check_url, guest_url
from sandbox.launch import pipeline
from sandbox.launch.pipeline import _vm_config
from sandbox.launch.plan import build_plan
from sandbox.shared.errors import InputError, NetworkError
from sandbox.shared.kbs_protocol import FW_CFG_KBS_URL, attestation_api_mount
from sandbox.shared.messages import ContainerMount


def _image() -> ResolvedImage:
    layer = LayerInfo("sha256:" + "1" * 64, "application/vnd.oci.image.layer.v1.tar", 1, "1" * 64,
                      Path("/cache/l.img"))
    return ResolvedImage("img", "sha256:" + "0" * 64, ImageConfig(cmd=("sh",)), (layer,))


API_MOUNT = ContainerMount.from_json(attestation_api_mount())


def _spec(tmp_path: Path):
    return validate_group({"name": "secret", "containers": [
        {"name": "app", "image": "busybox", "attestationApi": True},
        {"name": "side", "image": "busybox"}]}, base_dir=tmp_path)


def test_only_attestation_api_containers_get_the_mount(tmp_path: Path) -> None:
    plan = build_plan(_spec(tmp_path), {"app": _image(), "side": _image()}, {})
    app, side = plan.containers
    assert API_MOUNT in app.create.mounts
    assert API_MOUNT not in side.create.mounts


def test_the_guest_gets_the_broker_address_through_fw_cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline.measured, "write_emulated_psp", lambda *a, **k: None)  # no emulated CA needed here
    identity = pipeline.measured.LaunchIdentity(Tee.emulated, bytes(32), None)
    spec = _spec(tmp_path)
    plan = build_plan(spec, {"app": _image(), "side": _image()}, {})
    uvm = SimpleNamespace(rootfs=tmp_path / "rootfs", kernel=tmp_path / "bzImage", cmdline="console=ttyS0")
    state = tmp_path / "state"
    state.mkdir()
    cfg = _vm_config("secret", spec, plan, uvm, Tee.emulated, Accel.tcg, state, identity, "http://127.0.0.1:8300")
    entry = next(f for f in cfg.fw_cfg if f.name == FW_CFG_KBS_URL)
    assert entry.path.read_text() == "http://10.0.2.2:8300"
    cfg = _vm_config("secret", spec, plan, uvm, Tee.emulated, Accel.tcg, state, identity)
    assert all(f.name != FW_CFG_KBS_URL for f in cfg.fw_cfg)


def test_urls_and_pins() -> None:
    assert guest_url("http://localhost:9/") == "http://10.0.2.2:9"
    assert guest_url("http://192.168.1.5:8300") == "http://192.168.1.5:8300"
    assert guest_url("http://kbs.example:8300") == "http://kbs.example:8300"
    for inside in ("http://127.0.0.2:8300", "http://10.0.2.15:8300", "http://169.254.169.254", "http://0.0.0.0:1",
                   "http://[fe80::1]:8300", "http://224.0.0.1:1"):
        with pytest.raises(InputError, match="not reachable as a key broker from the guest"):
            guest_url(inside)
    for bad in ("https://x:1", "127.0.0.1:8300", "http://x:99999", "http://x:1/?a=b"):
        with pytest.raises(InputError):
            check_url(bad)
    assert broker_pins(None, ["AB" * 32]) == ["ab" * 32]
    assert broker_pins(None, []) == []
    with pytest.raises(InputError, match="not a broker pin"):
        broker_pins(None, ["abc"])
    with pytest.raises(NetworkError, match="cannot get the identity"):
        broker_pins("http://127.0.0.1:9", [])  # nothing listens on the discard port here


def test_the_agent_binds_the_api_directory_read_only_and_nothing_beside_it() -> None:
    from sandbox.guest.service import AgentService
    from sandbox.shared.protocol import ProtocolError

    service = AgentService(host_data=lambda: None)  # type: ignore[arg-type, return-value]
    service.attest_api_started.set()
    binds = service._bind_mounts((API_MOUNT,))
    assert binds == ((API_MOUNT, API_MOUNT.source),)
    bind = binds[0][0]
    assert bind.source == bind.destination == "/run/parma/attest" and "ro" in bind.options
    with pytest.raises(ProtocolError, match="read-only"):
        service._bind_mounts((replace(API_MOUNT, options=("rbind", "rw")),))
    for source in ("/run/parma", "/run/parma/attest/..", "/run/parma/attest/api.sock"):
        with pytest.raises(ProtocolError, match="not a group volume"):
            service._bind_mounts((replace(API_MOUNT, source=source),))


def test_binding_the_api_waits_for_it_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent starts the API after 'ready'; a create that binds it waits, and fails clearly if it never came."""
    from sandbox.guest import service as service_mod
    from sandbox.shared.protocol import ErrorCode, ProtocolError

    monkeypatch.setattr(service_mod, "ATTEST_API_START_TIMEOUT", 0.05)
    service = service_mod.AgentService(host_data=lambda: None)  # type: ignore[arg-type, return-value]
    with pytest.raises(ProtocolError, match="has not started") as exc:
        service._bind_mounts((API_MOUNT,))
    assert exc.value.code == ErrorCode.unavailable
