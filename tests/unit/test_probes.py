"""Container probes (liveness, readiness, startup) through the group spec, the policy, ARM import, `export aci`
and `export k8s`: exec probes are exec processes of the policy, httpGet probes need nothing in it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sandbox.aci.export import aci_template
from sandbox.group import ValidationError, load_group, validate_group
from sandbox.group.spec import HttpGetAction, HttpScheme, ProbeKind, ProbeSpec
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.k8s.manifest import manifests
from sandbox.policy.gen import generate_policy
from sandbox.shared.errors import InputError
from sandbox.shared.rego.policy import read_policy_text

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "e" * 64
IMAGE = "registry.example/web@" + DIGEST
LIVE = {"exec": {"command": ["/bin/cat", "/tmp/healthy"]}, "initialDelaySeconds": 5, "periodSeconds": 2,
        "failureThreshold": 2}
READY = {"httpGet": {"port": 8080, "path": "/ready", "scheme": "http"}, "timeoutSeconds": 3, "successThreshold": 2}


def group(**container: Any) -> dict[str, Any]:
    return {"name": "g", "containers": [{"name": "web", "image": IMAGE, **container}]}


def image(ref: str = IMAGE) -> ResolvedImage:
    layer = LayerInfo("sha256:" + "0" * 64, "application/vnd.oci.image.layer.v1.tar", 1, "1a" * 32, Path("/x"))
    return ResolvedImage(ref, DIGEST, ImageConfig(entrypoint=("/bin/httpd",), env=("PATH=/bin",)), (layer,))


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as exc:
        validate_group(doc)
    return exc.value.problems


# -- the group spec -----------------------------------------------------------------------------------------

def test_probes_parse_with_acis_defaults() -> None:
    (c,) = validate_group(group(livenessProbe=LIVE, readinessProbe=READY,
                                startupProbe={"exec": {"command": ["/bin/true"]}})).containers
    assert c.liveness_probe == ProbeSpec(exec_command=("/bin/cat", "/tmp/healthy"), initial_delay_s=5, period_s=2,
                                         failure_threshold=2)
    assert c.readiness_probe == ProbeSpec(http_get=HttpGetAction(8080, "/ready", HttpScheme.http), timeout_s=3,
                                          success_threshold=2)
    startup = c.startup_probe
    assert startup is not None
    assert (startup.initial_delay_s, startup.period_s, startup.timeout_s, startup.failure_threshold,
            startup.success_threshold) == (0, 10, 1, 3, 1)       # Kubernetes' and ACI's defaults
    assert [k for k, _ in c.probes] == [ProbeKind.liveness, ProbeKind.readiness, ProbeKind.startup]
    assert ProbeSpec.from_json(c.readiness_probe.to_json()) == c.readiness_probe     # the launch plan carries it


@pytest.mark.parametrize(("probe", "where", "what"), [
    ({}, "livenessProbe", "needs exactly one of 'exec'"),
    ({"exec": {"command": ["/x"]}, "httpGet": {"port": 1}}, "livenessProbe", "needs exactly one of 'exec'"),
    ({"exec": {"command": []}}, "livenessProbe.exec.command", "must not be an empty array"),
    ({"exec": {}}, "livenessProbe.exec.command", "required field is missing"),
    ({"httpGet": {"path": "/"}}, "livenessProbe.httpGet.port", "required field is missing"),
    ({"httpGet": {"port": 70000}}, "livenessProbe.httpGet.port", "must be between 1 and 65535"),
    ({"httpGet": {"port": 80, "path": "healthz"}}, "livenessProbe.httpGet.path", "must start with '/'"),
    ({"httpGet": {"port": 80, "scheme": "ftp"}}, "livenessProbe.httpGet.scheme", "must be HTTP or HTTPS"),
    ({"exec": {"command": ["/x"]}, "periodSeconds": 0}, "livenessProbe.periodSeconds", "between 1 and 86400"),
    ({"exec": {"command": ["/x"]}, "initialDelaySeconds": -1}, "livenessProbe.initialDelaySeconds", "between 0"),
    ({"exec": {"command": ["/x"]}, "timeoutSeconds": "1"}, "livenessProbe.timeoutSeconds", "expected an integer"),
    ({"exec": {"command": ["/x"]}, "successThreshold": 2}, "livenessProbe.successThreshold", "must be 1"),
    ({"tcpSocket": {"port": 80}}, "livenessProbe.tcpSocket", "unknown field"),
])
def test_bad_probes_are_named_with_their_path(probe: dict, where: str, what: str) -> None:
    found = problems(group(livenessProbe=probe))
    assert any(p.startswith(f"containers[0].{where}:") and what in p for p in found), found


def test_init_containers_take_no_probes() -> None:
    doc = {**group(), "initContainers": [{"name": "i", "image": IMAGE, "livenessProbe": LIVE}]}
    assert problems(doc) == ["initContainers[0].livenessProbe: unknown field"]


def test_readiness_may_need_several_successes() -> None:
    (c,) = validate_group(group(readinessProbe={"exec": {"command": ["/x"]}, "successThreshold": 3})).containers
    assert c.readiness_probe is not None and c.readiness_probe.success_threshold == 3


def test_the_schema_knows_the_probe_fields() -> None:
    schema = json.loads((Path(__file__).resolve().parents[2] / "sandbox/group/group.schema.json").read_text())
    container = schema["$defs"]["container"]["properties"]
    assert {"livenessProbe", "readinessProbe", "startupProbe"} <= set(container)
    assert set(schema["$defs"]["probe"]["properties"]) == {
        "exec", "httpGet", "initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold",
        "successThreshold"}


# -- the policy ---------------------------------------------------------------------------------------------

def test_exec_probes_are_exec_processes_of_the_policy_and_http_probes_add_nothing() -> None:
    spec = validate_group(group(execProcesses=[{"command": ["/bin/cat", "/tmp/healthy"], "signals": [9]},
                                               {"command": ["/bin/ls"]}],
                                livenessProbe=LIVE, readinessProbe=READY,
                                startupProbe={"exec": {"command": ["/bin/true"]}}))
    raw = generate_policy(spec, {"web": image()})
    (web,) = json.loads(raw)["containers"]
    # execProcesses first, as written; a probe command already listed keeps its entry (and its signals).
    assert web["exec_processes"] == [{"command": ["/bin/cat", "/tmp/healthy"], "signals": [9]},
                                     {"command": ["/bin/ls"], "signals": []},
                                     {"command": ["/bin/true"], "signals": []}]
    http_only = validate_group(group(readinessProbe=READY))
    assert generate_policy(http_only, {"web": image()}) == generate_policy(validate_group(group()), {"web": image()})


def test_a_group_without_probes_has_the_policy_it_had() -> None:
    # The same group written with the probe's command as an exec process: byte for byte the same policy.
    with_probe = validate_group(group(livenessProbe={"exec": {"command": ["/bin/cat", "/tmp/healthy"]}}))
    with_exec = validate_group(group(execProcesses=[{"command": ["/bin/cat", "/tmp/healthy"]}]))
    assert generate_policy(with_probe, {"web": image()}) == generate_policy(with_exec, {"web": image()})


def test_aci_policy_lists_exec_probes() -> None:
    spec = validate_group(group(livenessProbe=LIVE, readinessProbe=READY))
    rego = aci_template(spec, {"web": image()}).rego
    web = read_policy_text(rego).containers[0]
    assert web["exec_processes"] == [{"command": ["/bin/cat", "/tmp/healthy"], "signals": []}]


# -- ARM import, export aci and the round trip --------------------------------------------------------------

ARM_LIVE = {"exec": {"command": ["/bin/cat", "/tmp/healthy"]}, "initialDelaySeconds": 5, "periodSeconds": 2,
            "failureThreshold": 2, "successThreshold": 1, "timeoutSeconds": 1}
ARM_READY = {"httpGet": {"path": "/ready", "port": 8080, "scheme": "http"}, "initialDelaySeconds": 0,
             "periodSeconds": 10, "failureThreshold": 3, "successThreshold": 2, "timeoutSeconds": 3}


def test_export_aci_writes_probes_with_arm_names() -> None:
    spec = validate_group(group(livenessProbe=LIVE, readinessProbe=READY))
    props = aci_template(spec, {"web": image()}).template["resources"][0]["properties"]["containers"][0]["properties"]
    assert props["livenessProbe"] == ARM_LIVE
    assert props["readinessProbe"] == ARM_READY


def test_aci_has_no_startup_probe() -> None:
    spec = validate_group(group(startupProbe={"exec": {"command": ["/bin/true"]}}))
    with pytest.raises(InputError, match="startupProbe, which ACI does not have") as exc:
        aci_template(spec, {"web": image()})
    assert exc.value.hint and "Kubernetes" in exc.value.hint


def _template(**props: Any) -> dict[str, Any]:
    return {"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
            "contentVersion": "1.0.0.0",
            "resources": [{"type": "Microsoft.ContainerInstance/containerGroups", "apiVersion": "2023-05-01",
                           "name": "g", "properties": {"osType": "Linux", "containers": [
                               {"name": "web", "properties": {"image": IMAGE, **props,
                                                              "resources": {"requests": {"cpu": 1, "memoryInGB": 1}}}}]}}]}


def test_arm_probes_stay_probes_and_the_round_trip_keeps_them(tmp_path: Path) -> None:
    path = tmp_path / "azuredeploy.json"
    # ARM accepts numbers as strings and the scheme in either case.
    path.write_text(json.dumps(_template(livenessProbe={**ARM_LIVE, "periodSeconds": "2"},
                                         readinessProbe={**ARM_READY, "httpGet": {**ARM_READY["httpGet"],
                                                                                  "scheme": "HTTP"}})))
    spec = load_group(path)
    (web,) = spec.containers
    expected = validate_group(group(livenessProbe=LIVE, readinessProbe=READY)).containers[0]
    assert (web.liveness_probe, web.readiness_probe) == (expected.liveness_probe, expected.readiness_probe)
    assert web.exec_processes == () and [e.command for e in web.allowed_execs] == [("/bin/cat", "/tmp/healthy")]
    exported = aci_template(spec, {"web": image()}).template
    props = exported["resources"][0]["properties"]["containers"][0]["properties"]
    assert (props["livenessProbe"], props["readinessProbe"]) == (ARM_LIVE, ARM_READY)
    again = tmp_path / "again.json"
    again.write_text(json.dumps(exported))
    back = load_group(again).containers[0]
    assert (back.liveness_probe, back.readiness_probe) == (web.liveness_probe, web.readiness_probe)


def test_arm_http_headers_are_refused_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "azuredeploy.json"
    path.write_text(json.dumps(_template(livenessProbe={"httpGet": {
        "port": 80, "httpHeaders": [{"name": "X", "value": "y"}]}})))
    with pytest.raises(InputError, match=r"livenessProbe\.httpGet\.httpHeaders: is not supported") as exc:
        load_group(path)
    assert exc.value.hint and "exec" in exc.value.hint


def test_a_bad_arm_probe_is_reported_at_the_groups_path(tmp_path: Path) -> None:
    path = tmp_path / "azuredeploy.json"
    path.write_text(json.dumps(_template(readinessProbe={"exec": {"command": ["/x"]}, "periodSeconds": 0})))
    with pytest.raises(ValidationError) as exc:
        load_group(path)
    assert exc.value.problems == ["containers[0].readinessProbe.periodSeconds: must be between 1 and 86400, got 0"]


# -- export k8s ---------------------------------------------------------------------------------------------

def test_export_k8s_writes_probes_into_the_pod() -> None:
    spec = validate_group(group(livenessProbe=LIVE, readinessProbe=READY,
                                startupProbe={"exec": {"command": ["/bin/true"]}, "failureThreshold": 30}))
    (pod,) = manifests(spec, generate_policy(spec, {"web": image()}))
    (web,) = pod["spec"]["containers"]
    assert web["livenessProbe"] == ARM_LIVE
    assert web["readinessProbe"] == {**ARM_READY, "httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"}}
    assert web["startupProbe"] == {"exec": {"command": ["/bin/true"]}, "initialDelaySeconds": 0, "periodSeconds": 10,
                                   "failureThreshold": 30, "successThreshold": 1, "timeoutSeconds": 1}
