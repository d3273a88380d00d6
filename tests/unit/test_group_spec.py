"""group.json validation: precise, path-named errors, exit code 2, no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sandbox.cli.main import cli, main
from sandbox.group import ValidationError, load_group, validate_group
from sandbox.group.spec import TeeMode, VolumeKind

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "sandbox" / "group" / "group.schema.json"


def good() -> dict:
    return {
        "name": "g",
        "containers": [{"name": "a", "image": "busybox:1.36"}, {"name": "b", "image": "registry.local:5000/x/y@sha256:" + "a" * 64}],
    }


def with_container(**fields: object) -> dict:
    doc = good()
    doc["containers"][1].update(fields)
    return doc


# Each case: (document or raw text, substring that must appear in the error output).
INVALID = {
    "non-json": ("{name: 'x'}", "not valid JSON"),
    "empty-file": ("", "is empty"),
    "whitespace-only": ("   \n", "is empty"),
    "top-level-array": ("[]", "expected an object"),
    "duplicate-json-key": ('{"name": "a", "name": "b", "containers": []}', "duplicate key 'name'"),
    "missing-name": ({"containers": [{"name": "a", "image": "x"}]}, "name: required field is missing"),
    "missing-containers": ({"name": "g"}, "containers: required field is missing"),
    "empty-containers": ({"name": "g", "containers": []}, "containers: a group needs at least one container"),
    "bad-group-name": ({**good(), "name": "Bad_Name"}, "name: 'Bad_Name' is not a valid group name"),
    "unknown-top-field": ({**good(), "replicas": 3}, "replicas: unknown field"),
    "unknown-container-field": (with_container(cpu=2), "containers[1].cpu: unknown field"),
    "missing-image": ({"name": "g", "containers": [{"name": "a"}]}, "containers[0].image: required field is missing"),
    "image-wrong-type": (with_container(image=42), "containers[1].image: expected a string, got an integer"),
    "bad-image-ref": (with_container(image="UPPER/Case::tag"), "containers[1].image: is not a valid image reference"),
    "duplicate-container-names": ({"name": "g", "containers": [{"name": "a", "image": "x"}, {"name": "a", "image": "y"}]},
                                  "containers[1].name: duplicate container name 'a'"),
    "command-not-list": (with_container(command="sh -c x"), "containers[1].command: expected an array, got a string"),
    "command-empty": (with_container(command=[]), "containers[1].command: must not be an empty array"),
    "args-item-type": (with_container(args=["ok", 3]), "containers[1].args[1]: expected a string, got an integer"),
    "invalid-env-name": (with_container(env=[{"name": "1BAD", "value": "x"}]), "containers[1].env.1BAD: invalid environment variable name"),
    "env-value-and-secure": (with_container(env=[{"name": "FOO", "value": "x", "secureValue": "y"}]),
                             "containers[1].env.FOO: needs exactly one of 'value' and 'secureValue'"),
    "env-duplicate": (with_container(env=[{"name": "FOO", "value": "1"}, {"name": "FOO", "value": "2"}]),
                      "containers[1].env.FOO: duplicate environment variable"),
    "env-value-type": (with_container(env=[{"name": "FOO", "value": 1}]), "containers[1].env.FOO.value: expected a string"),
    "bad-port-range": ({**good(), "ports": [{"port": 70000}]}, "ports[0].port: must be between 1 and 65535, got 70000"),
    "bad-port-type": (with_container(ports=[{"port": "80"}]), "containers[1].ports[0].port: expected an integer, got a string"),
    "bad-protocol": ({**good(), "ports": [{"port": 80, "protocol": "SCTP"}]}, "ports[0].protocol: must be TCP or UDP"),
    "bad-host-address": ({**good(), "ports": [{"port": 80, "hostAddress": "localhost"}]}, "ports[0].hostAddress: 'localhost' is not an IP address"),
    "duplicate-host-port": ({**good(), "ports": [{"port": 80, "hostPort": 8080}, {"port": 81, "hostPort": 8080}]},
                            "ports[1].hostPort: host port 8080/TCP is forwarded twice"),
    "privileged-type": (with_container(privileged="yes"), "containers[1].privileged: expected true or false, got a string"),
    "unknown-capability": (with_container(capabilities={"add": ["CAP_FLY"]}), "containers[1].capabilities.add[0]: unknown capability 'CAP_FLY'"),
    "unknown-signal": (with_container(signals=["SIGNOPE"]), "containers[1].signals[0]: unknown signal 'SIGNOPE'"),
    "relative-workdir": (with_container(workingDir="app"), "containers[1].workingDir: must be an absolute path"),
    "mount-unknown-volume": (with_container(mounts=[{"name": "nope", "mountPath": "/x"}]),
                             "containers[1].mounts[0].name: no volume named 'nope'"),
    "mount-relative-path": ({**good(), "volumes": [{"name": "v", "emptyDir": {}}],
                             "containers": [{"name": "a", "image": "x", "mounts": [{"name": "v", "mountPath": "data"}]}]},
                            "containers[0].mounts[0].mountPath: must be an absolute path"),
    "volume-two-kinds": ({**good(), "volumes": [{"name": "v", "emptyDir": {}, "tmpfs": {}}]}, "volumes[0]: needs exactly one of"),
    "secret-not-base64": ({**good(), "volumes": [{"name": "v", "secret": {"key": "not base64!"}}]}, "volumes[0].secret.key: is not valid base64"),
    "files-missing-dir": ({**good(), "volumes": [{"name": "v", "files": {"path": "does-not-exist"}}]}, "volumes[0].files.path: 'does-not-exist' is not a directory"),
    "resources-range": ({**good(), "resources": {"memoryMiB": 16}}, "resources.memoryMiB: must be between 128 and 65536, got 16"),
    "bad-tee": ({**good(), "tee": "tdx"}, "tee: must be one of auto, sev-snp, emulated; got 'tdx'"),
    "policy-unknown-flag": ({**good(), "policy": {"allowAll": True}}, "policy.allowAll: unknown field"),
    "container-not-object": ({"name": "g", "containers": ["busybox"]}, "containers[0]: expected an object, got a string"),
    "user-invalid": (with_container(user="root:wheel:extra"), "containers[1].user: 'root:wheel:extra' is not a valid user"),
    "nul-in-string": (with_container(args=["a\u0000b"]), "containers[1].args[0]: must not contain NUL characters"),
    "nan": ('{"name": "g", "containers": [], "x": NaN}', "NaN is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_group_exits_2_naming_the_field(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc, expected = INVALID[case]
    path = tmp_path / "group.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.startswith("error: ")
    assert "Traceback" not in err


def test_at_least_fifteen_kinds_of_invalid_input() -> None:
    assert len(INVALID) >= 15


def test_all_problems_are_reported_at_once() -> None:
    doc = {"name": "Bad", "containers": [{"name": "a"}, {"name": "a", "image": 5}], "extra": 1}
    with pytest.raises(ValidationError) as exc:
        validate_group(doc)
    problems = exc.value.problems
    assert any(p.startswith("name:") for p in problems)
    assert any(p.startswith("extra:") for p in problems)
    assert any(p.startswith("containers[0].image:") for p in problems)
    assert any(p.startswith("containers[1].image:") for p in problems)


def test_valid_examples_load() -> None:
    hello = load_group(REPO / "examples" / "hello" / "group.json")
    assert [c.name for c in hello.containers] == ["web", "probe"]
    assert hello.ports[0].host_address == "127.0.0.1"
    assert hello.volumes[0].kind == VolumeKind.files
    web = hello.container("web")
    assert web.mounts[0].read_only
    assert web.signals == (15,)
    assert hello.tee == TeeMode.auto


def test_secure_env_is_hidden_in_display() -> None:
    spec = validate_group(with_container(env=[{"name": "TOKEN", "secureValue": "hunter2"}]))
    var = spec.containers[1].env[0]
    assert var.secure and var.value == "hunter2"
    assert "hunter2" not in var.shown()


def test_normalisation() -> None:
    spec = validate_group(with_container(signals=["term", 9, "SIGHUP"], capabilities={"add": ["net_admin"]}))
    c = spec.containers[1]
    assert c.signals == (15, 9, 1)
    assert c.capabilities.add == ("CAP_NET_ADMIN",)


def test_validate_json_output(tmp_path: Path) -> None:
    path = tmp_path / "g.json"
    path.write_text(json.dumps(good()))
    result = CliRunner().invoke(cli, ["validate", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["valid"] is True and [c["name"] for c in data["containers"]] == ["a", "b"]


def _schema_props(node: dict, defs: dict) -> set[str]:
    if "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[1]]
    return set(node.get("properties", {}))


def test_schema_and_validator_agree_on_fields() -> None:
    """Every field the validator accepts is in the shipped JSON Schema, and vice versa."""
    schema = json.loads(SCHEMA.read_text())
    defs = schema["$defs"]
    assert _schema_props(schema, defs) == {"$schema", "name", "containers", "ports", "volumes", "resources", "policy",
                                           "tee", "layerFormat", "initContainers", "restartPolicy", "dnsConfig"}
    container_fields = _schema_props(defs["container"], defs)
    full = {"name": "a", "image": "x", **{k: None for k in container_fields if k not in ("name", "image")}}
    with pytest.raises(ValidationError) as exc:
        validate_group({"name": "g", "containers": [full]})
    assert not any("unknown field" in p for p in exc.value.problems)
    assert set(schema["properties"]["policy"]["properties"]) == {
        "debugMode", "allowEnvironmentVariableDropping", "allowCapabilityDropping", "allowUnencryptedScratch"}
