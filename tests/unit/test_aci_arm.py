"""ACI ARM templates as group input: the mapping, template expressions and clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from clirun import run_cli

from sandbox.cli.template_options import volume_paths
from sandbox.group import load_group, validate_group
from sandbox.group.arm import ccepolicy_of_template, group_document, is_arm_template
from sandbox.group.armexpr import ArmError, Resolver
from sandbox.group.jsonio import ValidationError
from sandbox.group.spec import ProbeSpec, VolumeKind
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.shared.errors import InputError
from sandbox.shared.policy import parse_policy
from tests.imagefixtures import oci_image

TEMPLATE: dict[str, Any] = {
    "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
    "contentVersion": "1.0.0.0",
    "parameters": {
        "groupName": {"type": "string", "defaultValue": "hello-aci"},
        "image": {"type": "string"},
        "apiKey": {"type": "securestring"},
        "port": {"type": "int", "defaultValue": 8080, "allowedValues": [80, 8080]},
        "location": {"type": "string", "defaultValue": "[resourceGroup().location]"},
    },
    "variables": {
        "prefix": "[concat(parameters('groupName'), '-')]",
        "greeting": "[format('hello from {0} on port {1}', parameters('groupName'), parameters('port'))]",
        "names": {"web": "[concat(variables('prefix'), 'web')]"},
    },
    "resources": [
        {"type": "Microsoft.Storage/storageAccounts", "name": "unrelated"},
        {
            "type": "Microsoft.ContainerInstance/containerGroups",
            "apiVersion": "2023-05-01",
            "name": "[parameters('groupName')]",
            "location": "[parameters('location')]",
            "properties": {
                "sku": "Confidential",
                "osType": "Linux",
                "confidentialComputeProperties": {"ccePolicy": ""},
                "containers": [
                    {"name": "[variables('names').web]", "properties": {
                        "image": "[parameters('image')]",
                        "command": ["/bin/httpd", "-f", "-p", "[string(parameters('port'))]", "-h", "/www"],
                        "environmentVariables": [
                            {"name": "GREETING", "value": "[variables('greeting')]"},
                            {"name": "API_KEY", "secureValue": "[parameters('apiKey')]"},
                            {"name": "LITERAL", "value": "[[not an expression]"},
                            {"name": "COUNT", "value": 3}],
                        "ports": [{"port": "[parameters('port')]", "protocol": "TCP"}],
                        "resources": {"requests": {"cpu": 0.5, "memoryInGB": 0.5}},
                        "volumeMounts": [{"name": "secrets", "mountPath": "/www", "readOnly": True},
                                         {"name": "scratch", "mountPath": "/scratch"}],
                        "livenessProbe": {"exec": {"command": ["/bin/cat", "/www/index.html"]}},
                        "readinessProbe": {"exec": {"command": ["/bin/cat", "/www/index.html"]}}}},
                    {"name": "probe", "properties": {
                        "image": "[parameters('image')]",
                        "command": ["/bin/sh", "-c", "sleep 1000"],
                        "resources": {"requests": {"cpu": "1", "memoryInGB": "1.5"}},
                        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                        "securityContext": {"runAsUser": 65534, "runAsGroup": 65534,
                                            "capabilities": {"add": ["NET_ADMIN"], "drop": ["CAP_CHOWN"]}}}},
                ],
                "volumes": [{"name": "secrets", "secret": {"index.html": "aGVsbG8K"}},
                            {"name": "scratch", "emptyDir": {}}],
                "ipAddress": {"type": "Public", "ports": [{"port": "[parameters('port')]", "protocol": "tcp"}]},
            },
        },
    ],
}
PARAMETERS = {"parameters": {"image": {"value": "oci:images/busybox:latest"}, "apiKey": {"value": "s3cr3t"}}}


def write(tmp_path: Path, template: dict = TEMPLATE, parameters: dict | None = PARAMETERS,
          name: str = "azuredeploy") -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(template))
    if parameters is not None:
        (tmp_path / f"{name}.parameters.json").write_text(json.dumps(parameters))
    return path


def edited(**changes: Any) -> dict:
    """TEMPLATE with changes to the container group's properties (None deletes a key)."""
    t = copy.deepcopy(TEMPLATE)
    props = t["resources"][1]["properties"]
    for key, value in changes.items():
        if value is None:
            props.pop(key, None)
        else:
            props[key] = value
    return t


def test_template_maps_to_a_group(tmp_path: Path) -> None:
    spec = load_group(write(tmp_path))
    assert spec.name == "hello-aci"
    web, probe = spec.containers
    assert web.name == "hello-aci-web" and web.image == "oci:images/busybox:latest"
    assert web.command == ("/bin/httpd", "-f", "-p", "8080", "-h", "/www") and web.args is None
    env = {v.name: (v.value, v.secure) for v in web.env}
    assert env == {"GREETING": ("hello from hello-aci on port 8080", False), "API_KEY": ("s3cr3t", True),
                   "LITERAL": ("[not an expression]", False), "COUNT": ("3", False)}
    assert [(p.port, p.protocol) for p in web.ports] == [(8080, "TCP")]
    assert [(m.volume, m.mount_path, m.read_only) for m in web.mounts] == [("secrets", "/www", True),
                                                                          ("scratch", "/scratch", False)]
    assert web.exec_processes == ()         # the probes stay probes; the policy lists their command once
    assert web.liveness_probe == web.readiness_probe == ProbeSpec(exec_command=("/bin/cat", "/www/index.html"))
    assert [e.command for e in web.allowed_execs] == [("/bin/cat", "/www/index.html")]   # once, like confcom
    assert probe.user == "65534:65534"
    assert probe.capabilities.add == ("CAP_NET_ADMIN",) and probe.capabilities.drop == ("CAP_CHOWN",)
    kinds = {v.name: v.kind for v in spec.volumes}
    assert kinds == {"secrets": VolumeKind.secret, "scratch": VolumeKind.empty_dir}
    assert dict(spec.volumes[0].items) == {"index.html": b"hello\n"}
    assert [(p.port, p.host_port, p.protocol, p.host_address) for p in spec.ports] == [(8080, 8080, "TCP", "127.0.0.1")]
    assert (spec.resources.vcpus, spec.resources.memory_mib) == (2, 2048)    # 1.5 cpu, 2.0 GB, rounded up
    assert spec.base_dir == tmp_path.resolve()


def test_policy_gen_accepts_a_template(tmp_path: Path, monkeypatch, capsys) -> None:
    layers = (LayerInfo("sha256:" + "0" * 64, "application/vnd.oci.image.layer.v1.tar", 1, "1a" * 32, Path("/x")),)
    image = ResolvedImage("busybox", "sha256:" + "9" * 64, ImageConfig(cmd=("sh",)), layers)
    monkeypatch.setattr("sandbox.policy.sources.resolve_group_images",
                        lambda spec: {c.name: image for c in spec.containers})
    monkeypatch.setattr("sandbox.policy.sources.files_volume_hashes", lambda spec: {})
    code, out, err = run_cli(["policy", "gen", str(write(tmp_path))], capsys)
    assert code == 0, err
    policy = parse_policy(out.encode())
    web = policy.containers[0]
    assert web.name == "hello-aci-web" and web.command == ("/bin/httpd", "-f", "-p", "8080", "-h", "/www")
    rules = {r.pattern: r.strategy.value for r in web.env_rules}
    assert rules["GREETING=hello from hello-aci on port 8080"] == "string"
    assert rules["API_KEY=(?s:.*)"] == "re2" and "s3cr3t" not in out       # the secure value stays out


def test_validate_accepts_a_template(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["validate", str(write(tmp_path))], capsys)
    assert code == 2 and "containers[0].image: oci:images/busybox:latest:" in err  # validate checks local images
    oci_image(tmp_path / "images" / "busybox")
    code, out, _ = run_cli(["validate", str(write(tmp_path))], capsys)
    assert code == 0 and "group 'hello-aci' with 2 container(s): hello-aci-web, probe" in out


def test_defaults_apply_without_a_parameters_file(tmp_path: Path) -> None:
    t = copy.deepcopy(TEMPLATE)
    t["parameters"]["image"]["defaultValue"] = "busybox:1.36"
    t["parameters"]["apiKey"]["defaultValue"] = "k"
    spec = load_group(write(tmp_path, t, parameters=None))
    assert spec.containers[0].image == "busybox:1.36"


@pytest.mark.parametrize(("template", "parameters", "match"), [
    (TEMPLATE, {"parameters": {"image": {"value": "busybox"}}},
     r"parameter 'apiKey' has no value"),
    (TEMPLATE, {"parameters": {**PARAMETERS["parameters"], "nope": {"value": 1}}},
     "sets 'nope', which the template does not declare"),
    (TEMPLATE, {"parameters": {**PARAMETERS["parameters"], "port": {"value": 81}}},
     r"parameters.port: 81 is not one of the allowedValues"),
    (TEMPLATE, {"parameters": {"image": {"reference": {"keyVault": {}}}}}, "a Key Vault reference"),
    (edited(initContainers=[{"name": "init"}]), PARAMETERS,
     r"resources\[1\].properties.initContainers\[0\].properties: a container needs 'properties'"),
    (edited(volumes=[{"name": "secrets", "azureFile": {"shareName": "s"}}]), PARAMETERS,
     r"resources\[1\].properties.volumes\[0\].azureFile: azureFile volume 'secrets' needs a local directory"),
    (edited(containers=[]), PARAMETERS, "needs at least one container"),
])
def test_template_errors_name_where(tmp_path: Path, template, parameters, match: str) -> None:
    with pytest.raises(ArmError, match=match):
        load_group(write(tmp_path, template, parameters))


def test_security_context_that_cannot_be_honoured_is_an_error(tmp_path: Path) -> None:
    t = copy.deepcopy(TEMPLATE)
    t["resources"][1]["properties"]["containers"][1]["properties"]["securityContext"] = {
        "allowPrivilegeEscalation": False}
    with pytest.raises(ArmError, match=r"containers\[1\].properties.securityContext.allowPrivilegeEscalation"):
        load_group(write(tmp_path, t))


def test_two_container_groups_need_group(tmp_path: Path) -> None:
    t = copy.deepcopy(TEMPLATE)
    t["resources"].append(copy.deepcopy(t["resources"][1]))
    t["resources"][2]["name"] = "second"
    with pytest.raises(ArmError, match="2 container groups") as e:
        load_group(write(tmp_path, t))
    assert "--group" in e.value.hint
    path = write(tmp_path, t)
    assert load_group(path, template_group="second").name == "second"
    assert load_group(path, template_group="0").name == "hello-aci"
    with pytest.raises(ArmError, match="no container group 'third'"):
        load_group(path, template_group="third")


def test_azurefile_gitrepo_configmap_and_arm_volume_names(tmp_path: Path) -> None:
    t = copy.deepcopy(TEMPLATE)
    props = t["resources"][1]["properties"]
    props["volumes"] = props.get("volumes", []) + [{"name": "Share_1", "azureFile": {"shareName": "s", "storageAccountName": "a"}},
                        {"name": "repo", "gitRepo": {"repository": "https://example.com/r.git"}},
                        {"name": "mySecrets", "secret": {"API.key": "aGk="}}]
    web = props["containers"][0]["properties"]
    web["volumeMounts"] = [{"name": "Share_1", "mountPath": "/mnt/share"}, {"name": "repo", "mountPath": "/src"},
                           {"name": "mySecrets", "mountPath": "/secrets"}]
    web["configMap"] = {"keyValuePairs": {"key1": "value1"}}
    share, repo = tmp_path / "share", tmp_path / "repo"
    share.mkdir()
    repo.mkdir()
    path = write(tmp_path, t)
    with pytest.raises(ArmError, match="needs a local directory") as e:
        load_group(path)
    assert "--volume Share_1=PATH" in e.value.hint
    spec = load_group(path, volume_paths={"Share_1": share, "repo": repo})
    vols = {v.name: v for v in spec.volumes}
    assert vols["share-1"].kind == VolumeKind.files and vols["share-1"].source == share.resolve()
    assert vols["repo"].kind == VolumeKind.files and vols["mysecrets"].items == (("API.key", b"hi"),)
    cm = vols["configmap-hello-aci-web"]
    assert cm.kind == VolumeKind.secret and cm.items == (("key1", b"value1"),)
    mounts = {m.mount_path: (m.volume, m.read_only) for m in spec.containers[0].mounts}
    assert mounts == {"/mnt/share": ("share-1", True), "/src": ("repo", True), "/secrets": ("mysecrets", True),
                      "/mnt/configmap": ("configmap-hello-aci-web", True)}
    with pytest.raises(ArmError, match="no volume of that name"):
        load_group(path, volume_paths={"nope": share, "Share_1": share, "repo": repo})
    with pytest.raises(InputError, match="expected NAME=PATH"):
        volume_paths(("share",))
    with pytest.raises(InputError, match="apply to ARM templates"):
        load_group(write_group(tmp_path), template_group="x")


def write_group(tmp_path: Path) -> Path:
    p = tmp_path / "group.json"
    p.write_text(json.dumps({"name": "g", "containers": [{"name": "c", "image": "busybox"}]}))
    return p


def test_run_as_group_alone_keeps_the_images_user(tmp_path: Path) -> None:
    t = copy.deepcopy(TEMPLATE)
    t["resources"][1]["properties"]["containers"][1]["properties"]["securityContext"] = {"runAsGroup": 3000}
    assert load_group(write(tmp_path, t)).containers[1].user == ":3000"


def test_mapped_group_problems_are_reported_as_validation_errors(tmp_path: Path) -> None:
    t = copy.deepcopy(TEMPLATE)
    t["resources"][1]["properties"]["containers"][1]["name"] = "Bad_Name"
    with pytest.raises(ValidationError) as e:
        load_group(write(tmp_path, t))
    assert e.value.problems == ["containers[1].name: 'Bad_Name' is not a valid name (lowercase letters, digits "
                                "and '-', max 63)"]


def resolver(**template: Any) -> Resolver:
    return Resolver({"parameters": template.get("parameters", {}), "variables": template.get("variables", {})},
                    template.get("values", {}), "t.json")


@pytest.mark.parametrize(("expr", "expected"), [
    ("[concat('a', 'b', 'c')]", "abc"),
    ("[concat(createArray(1), createArray(2, 3))]", [1, 2, 3]),
    ("[format('{0}-{1}-{{x}}', 'a', 7)]", "a-7-{x}"),
    ("[toLower('ABC')]", "abc"),
    ("[toUpper(variables('v'))]", "V"),
    ("[string(true)]", "True"),
    ("[int('42')]", 42),
    ("[if(equals(parameters('p'), 'x'), 'yes', 'no')]", "yes"),
    ("[length(variables('list'))]", 3),
    ("[variables('list')[1]]", "b"),
    ("[variables('obj').inner['key']]", "deep"),
    ("[replace('a-b', '-', '_')]", "a_b"),
    ("[base64('hi')]", "aGk="),
    ("[base64ToString('aGk=')]", "hi"),
    ("[resourceGroup().location]", "local"),
    ("['it''s']", "it's"),
    ("[coalesce(null, 'z')]", "z"),
    ("plain", "plain"),
    ("[[bracket]", "[bracket]"),
])
def test_expressions(expr: str, expected: Any) -> None:
    r = resolver(parameters={"p": {"type": "string", "defaultValue": "x"}},
                 variables={"v": "v", "list": ["a", "b", "c"], "obj": {"inner": {"key": "deep"}}})
    assert r.resolve(expr, "f") == expected


@pytest.mark.parametrize(("expr", "match"), [
    ("[reference('a')]", r"the template function reference\(\) is not supported"),
    ("[parameters('missing')]", "declares no parameter 'missing'"),
    ("[variables('a')]", "circular reference: variables\\('a'\\) -> variables\\('b'\\) -> variables\\('a'\\)"),
    ("[concat('a', ]", "cannot parse"),
    ("[format('{0:N2}', 1)]", "format specifier"),
    ("[variables('list')[5]]", "has no member 5"),
])
def test_expression_errors(expr: str, match: str) -> None:
    r = resolver(variables={"a": "[variables('b')]", "b": "[variables('a')]", "list": [1]})
    with pytest.raises(ArmError, match=match) as e:
        r.resolve(expr, "resources[0].name")
    assert "t.json: resources[0].name" in str(e.value) or "t.json: variables." in str(e.value)


def test_detection_and_ccepolicy(tmp_path: Path) -> None:
    assert is_arm_template(TEMPLATE) and not is_arm_template({"name": "g", "containers": []})
    t = edited(confidentialComputeProperties={"ccePolicy": "[parameters('policy')]"})
    t["parameters"]["policy"] = {"type": "string", "defaultValue": "cGFja2FnZSBwb2xpY3k="}
    path = write(tmp_path, t)
    assert ccepolicy_of_template(path, t) == "cGFja2FnZSBwb2xpY3k="
    assert ccepolicy_of_template(path, TEMPLATE) is None
    values = {k: v["value"] for k, v in PARAMETERS["parameters"].items()}
    assert group_document(TEMPLATE, "t", values)["name"] == "hello-aci"


def test_policy_import_reads_a_templates_ccepolicy(tmp_path: Path, capsys) -> None:
    from test_aci_rego import policy_of

    from sandbox.aci.rego import ccepolicy_base64, export_rego
    policy = policy_of()
    t = edited(confidentialComputeProperties={"ccePolicy": ccepolicy_base64(export_rego(policy))})
    code, out, err = run_cli(["policy", "import", str(write(tmp_path, t))], capsys)
    assert code == 0, err
    assert out.encode() == policy.canonical_bytes()
    code, _, err = run_cli(["policy", "import", str(write(tmp_path, TEMPLATE, name="empty"))], capsys)
    assert code == 2 and "ccePolicy is empty" in err


def test_templates_use_acis_layer_format_and_the_launcher_passes_it_on(tmp_path: Path, monkeypatch) -> None:
    from sandbox.group.spec import LayerFormat
    from sandbox.policy import sources
    spec = load_group(write(tmp_path))
    assert spec.layer_format == LayerFormat.aci
    calls = []
    layers = (LayerInfo("sha256:" + "0" * 64, "application/vnd.oci.image.layer.v1.tar", 1, "1a" * 32, Path("/x")),)
    image = ResolvedImage("busybox", "sha256:" + "9" * 64, ImageConfig(cmd=("sh",)), layers)

    def fake_resolve(ref: str, **kw: Any) -> ResolvedImage:
        calls.append(kw)
        return image

    monkeypatch.setattr("sandbox.images.resolve.resolve_image", fake_resolve)
    sources.resolve_group_images(spec)
    assert calls == [{"base_dir": spec.base_dir, "compat": "aci"}]
    calls.clear()
    doc = {"name": "g", "containers": [{"name": "c", "image": "busybox"}]}
    sources.resolve_group_images(validate_group(doc, base_dir=tmp_path))
    assert calls == [{"base_dir": tmp_path}]
    with pytest.raises(ValidationError, match="invalid"):
        validate_group({**doc, "layerFormat": "kata"}, base_dir=tmp_path)
    assert validate_group({**doc, "layerFormat": "aci"}, base_dir=tmp_path).layer_format == LayerFormat.aci


@pytest.mark.parametrize(("expr", "expected"), [
    ("[substring('confidential', 3, 4)]", "fide"),
    ("[join(split('a,b,c', ','), '-')]", "a-b-c"),
    ("[padLeft(string(7), 3, '0')]", "007"),
    ("[union(createObject('a', 1), createObject('b', 2))]", {"a": 1, "b": 2}),
    ("[if(contains('hello', 'ell'), add(1, 2), 0)]", 3),
    ("[length(uniqueString('a', 'b'))]", 13),
    ("[equals(guid('x', 'y'), guid('x', 'y'))]", True),
    ("[deployment().name]", "t"),
    ("[last(range(1, 3))]", 3),
])
def test_pure_template_functions(expr: str, expected: Any) -> None:
    r = Resolver({"contentVersion": "1.0.0.0"}, {}, "t.json", deployment_name="t")
    assert r.resolve(expr, "x") == expected
