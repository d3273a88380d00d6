"""Group-spec fields for restarts, init containers, DNS and the disk scratch, and the device limit that
`validate` enforces with the group's numbers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sandbox.cli.main import main
from sandbox.group import ValidationError, validate_group
from sandbox.group.spec import (
    CONTAINER_FIELDS,
    DEFAULT_SCRATCH_GIB,
    INIT_CONTAINER_FIELDS,
    MAX_DEVICES,
    DnsConfig,
    RestartPolicy,
    check_device_count,
)
from sandbox.images.layout import LAYER_TAR, LayoutWriter, write_layout
from tests.layertars import Layer

SCHEMA = Path(__file__).resolve().parents[2] / "sandbox" / "group" / "group.schema.json"


def group(**top: object) -> dict:
    return {"name": "g", "containers": [{"name": "app", "image": "busybox"}], **top}


def problems(doc: dict) -> list[str]:
    with pytest.raises(ValidationError) as exc:
        validate_group(doc)
    return exc.value.problems


def test_defaults_follow_aci() -> None:
    spec = validate_group(group())
    assert spec.restart_policy == RestartPolicy.always
    assert spec.init_containers == () and spec.dns_config is None
    assert spec.resources.scratch_gib == DEFAULT_SCRATCH_GIB


def test_restart_policy() -> None:
    assert validate_group(group(restartPolicy="OnFailure")).restart_policy == RestartPolicy.on_failure
    assert validate_group(group(restartPolicy="Never")).restart_policy == RestartPolicy.never
    assert problems(group(restartPolicy="always")) == [
        "restartPolicy: must be one of Always, OnFailure, Never; got 'always'"]


def test_init_containers_keep_their_order_and_share_the_name_space() -> None:
    spec = validate_group(group(volumes=[{"name": "v", "emptyDir": {}}], initContainers=[
        {"name": "migrate", "image": "busybox", "command": ["/bin/true"], "mounts": [{"name": "v", "mountPath": "/v"}]},
        {"name": "seed", "image": "busybox", "env": [{"name": "A", "value": "1"}]}]))
    assert [c.name for c in spec.init_containers] == ["migrate", "seed"]
    assert spec.container("seed").env[0].value == "1"
    assert problems(group(initContainers=[{"name": "app", "image": "x"}])) == [
        "containers[0].name: duplicate container name 'app'"]
    assert problems(group(initContainers=[{"name": "i", "image": "x", "ports": [{"port": 80}]}])) == [
        "initContainers[0].ports: unknown field"]
    assert "initContainers[0].mounts[0].name: no volume named 'nope' in the group's 'volumes'" in problems(
        group(initContainers=[{"name": "i", "image": "x", "mounts": [{"name": "nope", "mountPath": "/x"}]}]))


def test_dns_config_in_acis_shape() -> None:
    spec = validate_group(group(dnsConfig={"nameServers": ["10.0.0.10", "2001:db8::1"],
                                           "searchDomains": "svc.local corp.example", "options": "ndots:2 edns0"}))
    assert spec.dns_config == DnsConfig(("10.0.0.10", "2001:db8::1"), ("svc.local", "corp.example"),
                                        ("ndots:2", "edns0"))
    assert problems(group(dnsConfig={"nameServers": ["dns.example"]})) == [
        "dnsConfig.nameServers: name server 'dns.example' is not an IP address"]
    assert problems(group(dnsConfig={"nameServers": ["1.1.1.1"], "options": "ndots:2 evil"})) == [
        "dnsConfig.options: resolver option 'evil' is not one resolv.conf(5) knows"]
    assert problems(group(dnsConfig={"nameServers": ["1.1.1.1"], "searchDomains": " ".join(f"d{i}.x" for i in range(7))})) \
        == ["dnsConfig.searchDomains: at most 6 search domains of 256 characters in all"]
    assert problems(group(dnsConfig={"searchDomains": "a"})) == ["dnsConfig.nameServers: required field is missing"]
    assert problems(group(dnsConfig={"nameServers": []})) == ["dnsConfig.nameServers: must not be an empty array"]


def test_scratch_size() -> None:
    assert validate_group(group(resources={"scratchGiB": 64})).resources.scratch_gib == 64
    assert problems(group(resources={"scratchGiB": 4097})) == ["resources.scratchGiB: must be between 0 and 4096, got 4097"]
    # No scratch disk: the writable layers stay in guest memory, which only an unencrypted-scratch policy allows.
    assert "allowUnencryptedScratch" in problems(group(resources={"scratchGiB": 0}))[0]
    spec = validate_group(group(resources={"scratchGiB": 0}, policy={"allowUnencryptedScratch": True}))
    assert spec.resources.scratch_gib == 0 and spec.policy.allow_unencrypted_scratch


def test_schema_lists_the_same_container_fields() -> None:
    defs = json.loads(SCHEMA.read_text())["$defs"]
    assert set(defs["container"]["properties"]) == CONTAINER_FIELDS
    assert set(defs["initContainer"]["properties"]) == INIT_CONTAINER_FIELDS
    for ref in defs["initContainer"]["properties"].values():
        assert ref["$ref"].startswith("#/$defs/container/properties/")


def test_device_limit_counts_layers_and_files_volumes(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    spec = validate_group(group(volumes=[{"name": "www", "files": {"path": "www"}}]), base_dir=tmp_path)
    check_device_count(spec, MAX_DEVICES - 1)
    with pytest.raises(ValidationError) as exc:
        check_device_count(spec, MAX_DEVICES)
    assert exc.value.problems == [f"the group needs {MAX_DEVICES + 1} layer and volume disks ({MAX_DEVICES} distinct "
                                  f"image layers, 1 files volumes); at most {MAX_DEVICES} can be attached"]


def many_layer_image(dest: Path, n: int, salt: str = "") -> None:
    """An OCI layout whose image has n distinct small layers."""
    tars = [Layer().add(f"f{i}", data=f"{salt}{i}".encode()).tar_bytes() for i in range(n)]

    def build(w: LayoutWriter) -> None:
        layers = [w.add_bytes(t, LAYER_TAR) for t in tars]
        w.add_image(layers, ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars], tag="latest",
                    config={"Cmd": ["/f0"]})

    write_layout(dest, build)


def test_validate_refuses_a_group_beyond_the_limit_with_its_numbers(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    many_layer_image(tmp_path / "a", 200)
    many_layer_image(tmp_path / "b", 57, salt="b")          # 257 distinct layers in all
    many_layer_image(tmp_path / "c", 50)                    # the same layers as a's first 50: shared disks
    doc = {"name": "big", "containers": [{"name": "a", "image": "oci:a"}, {"name": "c", "image": "oci:c"}],
           "initContainers": [{"name": "b", "image": "oci:b"}]}
    (tmp_path / "g.json").write_text(json.dumps(doc))
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(tmp_path / "g.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "the group needs 257 layer and volume disks (257 distinct image layers, 0 files volumes); at most 256" in err
    doc["initContainers"] = []
    (tmp_path / "g.json").write_text(json.dumps(doc))
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(tmp_path / "g.json"), "--format", "json"])
    assert exc.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layerDisks"] == 200 and out["layersNotCounted"] == []


def test_an_arm_template_brings_init_containers_restart_policy_and_dns(tmp_path: Path) -> None:
    from sandbox.group import load_group
    from tests.unit.test_aci_arm import edited, write

    template = edited(
        restartPolicy="[concat('On', 'Failure')]",
        dnsConfig={"nameServers": ["10.1.0.4"], "searchDomains": "corp.example", "options": "ndots:1"},
        initContainers=[{"name": "setup", "properties": {
            "image": "[parameters('image')]", "command": ["/bin/sh", "-c", "echo init"],
            "environmentVariables": [{"name": "STAGE", "value": "init"}],
            "securityContext": {"runAsUser": 1000}}}])
    spec = load_group(write(tmp_path, template))
    assert spec.restart_policy == RestartPolicy.on_failure
    assert spec.dns_config == DnsConfig(("10.1.0.4",), ("corp.example",), ("ndots:1",))
    (init,) = spec.init_containers
    assert (init.name, init.image, init.command, init.user) == (
        "setup", "oci:images/busybox:latest", ("/bin/sh", "-c", "echo init"), "1000")
    assert init.env[0].value == "init"
