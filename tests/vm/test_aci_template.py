"""Acceptance: an ACI ARM template (2 containers, env vars with a secure value, a secret volume, ports)
runs with `up` in emulation on layers converted as ACI converts them, and its policy survives the
ccePolicy export/import round trip."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from test_hello import BUSYBOX_LAYOUT, Cli, cli, ensure_example_image, fetch_page, free_port  # noqa: F401 - cli is a fixture

NAME = "aci-template-vm"
PAGE = b"<html>served from an ACI secret volume</html>\n"


def template(port: int) -> dict:
    return {
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "parameters": {
            "image": {"type": "string"},
            "apiKey": {"type": "securestring"},
            "port": {"type": "int", "defaultValue": port},
        },
        "variables": {"greeting": "[format('hello on {0}', parameters('port'))]"},
        "resources": [{
            "type": "Microsoft.ContainerInstance/containerGroups",
            "apiVersion": "2023-05-01",
            "name": "aci-hello",
            "location": "[resourceGroup().location]",
            "properties": {
                "sku": "Confidential",
                "osType": "Linux",
                "confidentialComputeProperties": {"ccePolicy": ""},
                "containers": [
                    {"name": "web", "properties": {
                        "image": "[parameters('image')]",
                        "command": ["/bin/httpd", "-f", "-v", "-p", "[string(parameters('port'))]", "-h", "/www"],
                        "environmentVariables": [{"name": "GREETING", "value": "[variables('greeting')]"}],
                        "ports": [{"port": "[parameters('port')]"}],
                        "volumeMounts": [{"name": "site", "mountPath": "/www", "readOnly": True}],
                        "livenessProbe": {"exec": {"command": ["/bin/cat", "/www/index.html"]}},
                        "resources": {"requests": {"cpu": 0.5, "memoryInGB": 0.25}}}},
                    {"name": "probe", "properties": {
                        "image": "[parameters('image')]",
                        "command": ["/bin/sh", "-c", "echo \"greeting=$GREETING key=$API_KEY\"; sleep 3600"],
                        "environmentVariables": [
                            {"name": "GREETING", "value": "[variables('greeting')]"},
                            {"name": "API_KEY", "secureValue": "[parameters('apiKey')]"}],
                        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                        "securityContext": {"runAsUser": 65534, "runAsGroup": 65534},
                        "resources": {"requests": {"cpu": 0.5, "memoryInGB": 0.25}}}},
                ],
                "volumes": [{"name": "site", "secret": {"index.html": base64.b64encode(PAGE).decode()}},
                            {"name": "scratch", "emptyDir": {}}],
                "ipAddress": {"type": "Public", "ports": [{"port": "[parameters('port')]", "protocol": "TCP"}]},
            },
        }],
    }


@pytest.fixture(scope="module")
def group(cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811 - the imported fixture
    ensure_example_image()
    port = free_port()
    tmp = tmp_path_factory.mktemp("aci")
    path = tmp / "azuredeploy.json"
    path.write_text(json.dumps(template(port), indent=1))
    (tmp / "azuredeploy.parameters.json").write_text(json.dumps({"parameters": {
        "image": {"value": f"oci:{BUSYBOX_LAYOUT}:latest"}, "apiKey": {"value": "k3y-from-parameters"}}}))
    r = cli("--progress", "plain", "up", "-d", "--name", NAME, "--format", "json", str(path), timeout=600)
    assert r.returncode == 0, r.stderr
    return {"port": port, "summary": json.loads(r.stdout), "path": path, "tmp": tmp}


def test_the_template_runs_and_serves_its_secret_volume(group: dict) -> None:
    s = group["summary"]
    assert s["status"] == "running" and s["tee"] == "emulated" and s["containers"] == ["web", "probe"]
    assert s["ports"] == [f"127.0.0.1:{group['port']}->{group['port']}"]
    assert fetch_page(group["port"]) == PAGE


def test_env_vars_and_the_secure_value_reach_the_container(cli: Cli, group: dict) -> None:  # noqa: F811
    deadline = time.monotonic() + 30
    while True:
        r = cli("logs", NAME, "probe")
        if "greeting=" in r.stdout or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert f"greeting=hello on {group['port']} key=k3y-from-parameters" in r.stdout


def test_probe_exec_is_allowed_and_a_shell_is_not(cli: Cli, group: dict) -> None:  # noqa: F811
    r = cli("exec", NAME, "web", "--", "/bin/cat", "/www/index.html")
    assert r.returncode == 0 and r.stdout.encode() == PAGE, r.stderr
    r = cli("exec", NAME, "web", "--", "/bin/sh")
    assert r.returncode == 77 and "denied by policy" in r.stderr


def test_the_running_policy_round_trips_through_rego(cli: Cli, group: dict) -> None:  # noqa: F811
    info = json.loads(cli("inspect", NAME, "--format", "json").stdout)
    policy = Path(info["state_dir"], "policy.json")
    assert "k3y-from-parameters" not in policy.read_text()     # the secure value never enters the policy
    # layers are converted as ACI converts them (layerFormat aci), so the policy pins ACI's root hashes
    r = cli("image", "layers", "--compat", "aci", f"oci:{BUSYBOX_LAYOUT}:latest", "--format", "json")
    assert r.returncode == 0, r.stderr
    aci_hashes = [layer["root_hash"] for layer in json.loads(r.stdout)]
    assert [c["layers"] for c in json.loads(policy.read_text())["containers"]] == [aci_hashes, aci_hashes]
    rego = group["tmp"] / "policy.rego"
    assert cli("policy", "export", str(policy), "-o", str(rego)).returncode == 0
    r = cli("policy", "import", str(rego))
    assert r.returncode == 0 and r.stdout.encode() == policy.read_bytes(), r.stderr


def test_down(cli: Cli, group: dict) -> None:  # noqa: F811
    r = cli("down", NAME)
    assert r.returncode == 0, r.stderr
