"""`export aci`: the ARM template and the ccePolicy describing ACI's runtime, and their round trip."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from sandbox.aci.export import ACI_ENV_RULES, INFRA_FRAGMENT, PAUSE_LAYER, aci_template
from sandbox.group import load_group, validate_group
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.shared.errors import InputError
from sandbox.shared.rego.policy import RuleKind, read_policy_text

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "e" * 64
LAYERS = ("a1" * 32, "b2" * 32)


def image(ref: str = "example.com/web:1.2", **config) -> ResolvedImage:
    layers = tuple(LayerInfo("sha256:" + "0" * 64, "m", 1, h, Path("/x")) for h in LAYERS)
    return ResolvedImage(ref, DIGEST, ImageConfig(**({"entrypoint": ("/app",), "env": ("PATH=/bin", "LANG=C")}
                                                     | config)), layers)


GROUP = {
    "name": "shop", "resources": {"vcpus": 2, "memoryMiB": 2048},
    "ports": [{"port": 8080, "hostPort": 18080}],
    "volumes": [{"name": "cache", "emptyDir": {}}, {"name": "creds", "secret": {"token": "aGk="}}],
    "containers": [
        {"name": "web", "image": "example.com/web:1.2", "args": ["--port", "8080"],
         "env": [{"name": "MODE", "value": "prod"}, {"name": "API_KEY", "secureValue": "s3cr3t"}],
         "mounts": [{"name": "cache", "mountPath": "/cache"}, {"name": "creds", "mountPath": "/creds"}],
         "ports": [{"port": 8080}], "execProcesses": [{"command": ["/bin/health"]}], "user": "1000:1000"},
        {"name": "side", "image": "example.com/side@" + DIGEST, "privileged": True},
    ],
}


@pytest.fixture
def exported():
    spec = validate_group(GROUP)
    return spec, aci_template(spec, {"web": image(), "side": image("example.com/side@" + DIGEST, entrypoint=())})


def test_template_is_a_confidential_container_group_with_nothing_local(exported) -> None:
    _, result = exported
    t = result.template
    group = t["resources"][0]
    assert group["type"] == "Microsoft.ContainerInstance/containerGroups"
    props = group["properties"]
    assert props["sku"] == "Confidential" and props["osType"] == "Linux"
    web, side = props["containers"]
    assert web["properties"]["image"] == f"example.com/web@{DIGEST}"
    assert side["properties"]["image"] == f"example.com/side@{DIGEST}"
    assert web["properties"]["command"] == ["/app", "--port", "8080"] and "command" not in side["properties"]
    env = web["properties"]["environmentVariables"]
    assert env == [{"name": "MODE", "value": "prod"}, {"name": "API_KEY", "secureValue": "[parameters('WebAPIKEY')]"}]
    assert t["parameters"]["WebAPIKEY"]["type"] == "secureString"
    assert web["properties"]["securityContext"] == {"runAsUser": 1000, "runAsGroup": 1000}
    assert props["volumes"] == [{"name": "cache", "emptyDir": {}}, {"name": "creds", "secret": {"token": "aGk="}}]
    assert props["ipAddress"]["ports"] == [{"port": 8080, "protocol": "TCP"}]
    text = json.dumps(t)
    assert "s3cr3t" not in text and "/run/parma" not in text
    rego = base64.b64decode(props["confidentialComputeProperties"]["ccePolicy"]).decode()
    assert rego == result.rego
    assert t["metadata"]["hostData"] == result.host_data == hashlib.sha256(rego.encode()).hexdigest()


def test_policy_describes_acis_runtime(exported) -> None:
    _, result = exported
    p = read_policy_text(result.rego)
    assert (p.api_version, p.framework_version) == ("0.10.0", "0.2.3")
    assert p.fragments[0] == {**INFRA_FRAGMENT, "required_receipts": []}
    assert p.flags["allow_environment_variable_dropping"] and not p.flags["allow_unencrypted_scratch"]
    assert all(p.rules[ep].kind == RuleKind.framework for ep in ("mount_device", "create_container", "load_fragment"))
    web, side, pause = p.containers
    assert pause["name"] == "pause-container" and pause["layers"] == [PAUSE_LAYER] and pause["command"] == ["/pause"]
    assert web["layers"] == list(LAYERS) and web["id"] == f"example.com/web@{DIGEST}"
    patterns = {r["pattern"]: r for r in web["env_rules"]}
    assert set(ACI_ENV_RULES) <= set(patterns) and patterns["MODE=prod"]["strategy"] == "string"
    assert patterns["API_KEY=.*"]["strategy"] == "re2" and "API_KEY=s3cr3t" not in patterns
    assert [r["pattern"] for r in web["env_rules"]] == sorted(patterns)
    assert web["mounts"] == [
        {"destination": "/cache", "options": ["rbind", "rshared", "rw"], "source": "sandbox:///tmp/atlas/emptydir/.+",
         "type": "bind"},
        {"destination": "/creds", "options": ["rbind", "rshared", "ro"],
         "source": "sandbox:///tmp/atlas/secretsVolume/.+", "type": "bind"},
        {"destination": "/etc/resolv.conf", "options": ["rbind", "rshared", "rw"],
         "source": "sandbox:///tmp/atlas/resolvconf/.+", "type": "bind"}]
    assert web["user"]["user_idname"] == {"pattern": "1000", "strategy": "id"}
    assert web["exec_processes"] == [{"command": ["/bin/health"], "signals": []}]
    assert side["command"] is None and side["allow_elevated"] and len(side["capabilities"]["bounding"]) > 14


def test_exported_template_runs_here_as_the_same_group(exported, tmp_path: Path) -> None:
    spec, result = exported
    path = tmp_path / "azuredeploy.json"
    path.write_text(json.dumps(result.template))
    (tmp_path / "azuredeploy.parameters.json").write_text(json.dumps({"parameters": {"WebAPIKEY": {"value": "s3cr3t"}}}))
    back = load_group(path)
    assert [(c.name, c.env, c.mounts, c.user, c.privileged) for c in back.containers] == \
        [(c.name, c.env, c.mounts, c.user, c.privileged) for c in spec.containers]


LIFECYCLE_GROUP = {
    **GROUP, "restartPolicy": "OnFailure",
    "dnsConfig": {"nameServers": ["10.0.0.10"], "searchDomains": "svc.local corp.example", "options": "ndots:2"},
    "initContainers": [{"name": "migrate", "image": "example.com/migrate:3", "command": ["/migrate", "--once"],
                        "env": [{"name": "DB_PASS", "secureValue": "pw"}],
                        "mounts": [{"name": "cache", "mountPath": "/cache"}]}],
}


def test_init_containers_restart_policy_and_dns_reach_the_template_and_policy(tmp_path: Path) -> None:
    spec = validate_group(LIFECYCLE_GROUP)
    images = {"web": image(), "side": image("example.com/side@" + DIGEST, entrypoint=()),
              "migrate": image("example.com/migrate:3", entrypoint=("/bin/sh",))}
    result = aci_template(spec, images)
    props = result.template["resources"][0]["properties"]
    assert props["restartPolicy"] == "OnFailure"
    assert props["dnsConfig"] == {"nameServers": ["10.0.0.10"], "searchDomains": "svc.local corp.example",
                                  "options": "ndots:2"}
    assert [c["name"] for c in props["containers"]] == ["web", "side"]
    (init,) = props["initContainers"]
    assert init == {"name": "migrate", "properties": {
        "image": f"example.com/migrate@{DIGEST}", "command": ["/migrate", "--once"],
        "environmentVariables": [{"name": "DB_PASS", "secureValue": "[parameters('MigrateDBPASS')]"}],
        "volumeMounts": [{"name": "cache", "mountPath": "/cache", "readOnly": False}]}}
    assert result.template["parameters"]["MigrateDBPASS"]["type"] == "secureString"
    # the policy lists the init container after the group's containers, as confcom does, and before the pause
    containers = read_policy_text(result.rego).containers
    assert [c["name"] for c in containers] == ["web", "side", "migrate", "pause-container"]
    migrate = containers[2]
    assert migrate["command"] == ["/migrate", "--once"] and migrate["layers"] == list(LAYERS)
    assert migrate["mounts"][0]["source"] == "sandbox:///tmp/atlas/emptydir/.+"
    assert {"pattern": "DB_PASS=.*", "required": False, "strategy": "re2"} in migrate["env_rules"]
    # round trip: the template reads back as the same group
    path = tmp_path / "azuredeploy.json"
    path.write_text(json.dumps(result.template))
    (tmp_path / "azuredeploy.parameters.json").write_text(json.dumps(
        {"parameters": {"WebAPIKEY": {"value": "s3cr3t"}, "MigrateDBPASS": {"value": "pw"}}}))
    back = load_group(path)
    assert back.restart_policy == spec.restart_policy and back.dns_config == spec.dns_config
    assert [(c.name, c.command, c.env, c.mounts) for c in back.init_containers] == \
        [(c.name, c.command, c.env, c.mounts) for c in spec.init_containers]


def test_the_default_restart_policy_is_written_and_no_init_or_dns_fields(exported) -> None:
    _, result = exported
    props = result.template["resources"][0]["properties"]
    assert props["restartPolicy"] == "Always" and "initContainers" not in props and "dnsConfig" not in props


def test_local_images_need_a_registry() -> None:
    spec = validate_group({"name": "g", "containers": [{"name": "c", "image": "oci:build/images/busybox:latest"}]})
    local = {"c": image("oci:build/images/busybox:latest")}
    with pytest.raises(InputError, match="local archive") as e:
        aci_template(spec, local)
    assert "--registry" in e.value.hint
    t = aci_template(spec, local, "myregistry.azurecr.io/team").template
    assert t["resources"][0]["properties"]["containers"][0]["properties"]["image"] == \
        f"myregistry.azurecr.io/team/busybox@{DIGEST}"


def test_cli_export_aci_with_a_local_image(tmp_path: Path, isolated_dirs: Path, capsys) -> None:
    from clirun import run_cli

    from tests.imagefixtures import oci_image

    oci_image(tmp_path / "img")
    group = {"name": "g", "containers": [{"name": "c", "image": "oci:img", "command": ["/bin/true"],
                                          "env": [{"name": "K", "secureValue": "v"}]}]}
    (tmp_path / "group.json").write_text(json.dumps(group))
    code, _, err = run_cli(["export", "aci", str(tmp_path / "group.json")], capsys)
    assert code == 2 and "--registry" in err
    args = ["export", "aci", str(tmp_path / "group.json"), "--registry", "r.example/team"]
    code, out, err = run_cli([*args, "-o", str(tmp_path / "azuredeploy.json")], capsys)
    assert code == 0, err
    t = json.loads((tmp_path / "azuredeploy.json").read_text())
    rego = base64.b64decode(t["resources"][0]["properties"]["confidentialComputeProperties"]["ccePolicy"]).decode()
    assert t["metadata"]["hostData"] == hashlib.sha256(rego.encode()).hexdigest() and t["metadata"]["hostData"] in out
    # the layers pinned are ACI's root hashes (compat aci), as `image layers --compat aci` prints them
    code, out, _ = run_cli(["--format", "json", "image", "layers", "--compat", "aci", "oci:" + str(tmp_path / "img")],
                           capsys)
    assert read_policy_text(rego).containers[0]["layers"] == [x["root_hash"] for x in json.loads(out)]
    code, out, err = run_cli([*args, "--policy-only", "--format", "json"], capsys)
    assert code == 0 and json.loads(out) == {"ccePolicy": base64.b64encode(rego.encode()).decode(),
                                             "host_data": t["metadata"]["hostData"]}
