"""The policy's parma-sandbox extension for key release: `key_brokers` pins, and the attestation API mount that
`attestationApi: true` adds to a container's entry (so only those containers may be given the socket)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.group import validate_group
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.policy.gen import generate_policy
from sandbox.shared.errors import InputError, InvalidDocument
from sandbox.shared.kbs_protocol import attestation_api_mount
from sandbox.shared.policy import PolicyEngine, parse_policy

PIN = "5f" * 32
LAYER = "1a" * 32


def _images(spec) -> dict[str, ResolvedImage]:
    layer = LayerInfo(diff_id="sha256:" + "0" * 64, media_type="application/vnd.oci.image.layer.v1.tar", size=1,
                      root_hash=LAYER, device_path=Path("/cache/l.img"))
    return {c.name: ResolvedImage(reference=c.image, digest="sha256:" + "9" * 64,
                                  config=ImageConfig(cmd=("sh",)), layers=(layer,)) for c in spec.containers}


def _spec(tmp_path: Path):
    return validate_group({"name": "secret", "containers": [
        {"name": "app", "image": "busybox", "attestationApi": True},
        {"name": "other", "image": "busybox", "command": ["sleep", "1"]}]}, base_dir=tmp_path)


def _create_input(container_id: str, mounts: list[dict], argv: tuple[str, ...] = ("sh",)) -> dict:
    return {"container_id": container_id, "argv": list(argv),
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "mounts": mounts}


def _engine_with_overlays(raw: bytes) -> PolicyEngine:
    engine = PolicyEngine.from_bytes(raw)
    assert engine.enforce_json("mount_device", {"target": "/run/parma/layers/l0", "device_hash": LAYER}).allowed
    for cid in ("c1", "c2"):
        assert engine.enforce_json("mount_overlay", {"container_id": cid, "layer_paths": ["/run/parma/layers/l0"],
                                                     "target": f"/run/parma/containers/{cid}/rootfs"}).allowed
    return engine


def test_only_containers_with_attestation_api_may_get_the_socket(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    raw = generate_policy(spec, _images(spec), key_brokers=[PIN, PIN])
    doc = json.loads(raw)
    assert doc["key_brokers"] == [{"public_key_sha256": PIN}]
    app, other = doc["containers"]
    assert attestation_api_mount() in app["mounts"] and attestation_api_mount() not in other["mounts"]
    assert parse_policy(raw).key_brokers[0].public_key_sha256 == PIN
    engine = _engine_with_overlays(raw)
    # The host cannot hand the socket to a container whose policy entry does not list it...
    denied = engine.enforce_json("create_container", _create_input("c2", [attestation_api_mount()], ("sleep", "1")))
    assert not denied.allowed and "mount" in denied.reason
    assert engine.enforce_json("create_container", _create_input("c2", [], ("sleep", "1"))).allowed
    # ...and the container whose entry lists it gets it.
    decision = engine.enforce_json("create_container", _create_input("c1", [attestation_api_mount()]))
    assert decision.allowed, decision.reason


def test_a_policy_without_brokers_stays_pure_aci_data(tmp_path: Path) -> None:
    spec = validate_group({"name": "plain", "containers": [{"name": "app", "image": "busybox"}]}, base_dir=tmp_path)
    doc = json.loads(generate_policy(spec, _images(spec)))
    assert "key_brokers" not in doc
    assert all(m["source"] != "/run/parma/attest" for m in doc["containers"][0]["mounts"])


def test_key_broker_pins_are_validated(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    with pytest.raises(InputError, match="not a SHA-256"):
        generate_policy(spec, _images(spec), key_brokers=["ABC"])
    raw = json.loads(generate_policy(spec, _images(spec), key_brokers=[PIN]))
    for bad, problem in (([{"public_key_sha256": "xyz"}], "key_brokers[0].public_key_sha256"),
                         ([{"public_key_sha256": PIN}, {"public_key_sha256": PIN}], "listed twice"),
                         ([{"pin": PIN}], "key_brokers[0].pin: unknown field"),
                         ({"public_key_sha256": PIN}, "key_brokers: expected an array")):
        with pytest.raises(InvalidDocument) as e:
            parse_policy(json.dumps({**raw, "key_brokers": bad}).encode())
        assert any(problem in p for p in e.value.problems), e.value.problems


def test_key_brokers_survive_the_aci_rego_export(tmp_path: Path) -> None:
    from sandbox.aci.rego import export_rego, import_rego

    spec = _spec(tmp_path)
    policy = parse_policy(generate_policy(spec, _images(spec), key_brokers=[PIN]))
    rego = export_rego(policy)
    assert f'key_brokers := [{{"public_key_sha256":"{PIN}"}}]' in rego
    assert import_rego(rego) == policy
