"""The policy document: strict validation with JSON paths, canonical bytes, and a stable hash."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from sandbox.shared.errors import InputError, InvalidDocument
from sandbox.shared.policy import canonical_bytes, parse_policy, policy_hash, validate_policy

H = "ab" * 32


def minimal(**top: Any) -> dict[str, Any]:
    doc = {
        "api_version": "0.12.0", "framework_version": "0.5.0",
        "containers": [{
            "name": "app", "id": "example/app:1", "layers": [H], "command": ["/app", "--serve"],
            "env_rules": [{"pattern": "PATH=/bin", "strategy": "string", "required": True},
                          {"pattern": "LOG=(debug|info)", "strategy": "re2", "required": False}],
            "working_dir": "/", "mounts": [{"destination": "/data", "source": "sandbox:///volumes/data",
                                            "type": "bind", "options": ["rbind", "rw"]}],
            "exec_processes": [{"command": ["/bin/sh"], "signals": [9]}], "signals": [15],
            "user": {"user_idname": {"pattern": "1000", "strategy": "id"},
                     "group_idnames": [{"pattern": "", "strategy": "any"}], "umask": "0022"},
            "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"], "inheritable": [],
                             "permitted": ["CAP_CHOWN"], "ambient": []},
            "seccomp_profile_sha256": "", "allow_elevated": False, "allow_stdio_access": True,
            "no_new_privileges": True,
        }],
        "external_processes": [],
        "allow_properties_access": False, "allow_dump_stacks": False, "allow_runtime_logging": False,
        "allow_environment_variable_dropping": False, "allow_unencrypted_scratch": True,
        "allow_capability_dropping": False,
    }
    doc.update(top)
    return doc


# The canonical bytes of minimal() hash to this forever: HOST_DATA of existing deployments depends on it.
GOLDEN_HASH = "4c13f5baa7eaa9ce2a9eddb6f473eab489522766e1766a5e5816c73a19a71611"


def test_canonical_form_is_sorted_compact_ascii_without_newline() -> None:
    raw = canonical_bytes({"b": 1, "a": ["é", {"d": True, "c": None}]})
    assert raw == b'{"a":["\\u00e9",{"c":null,"d":true}],"b":1}'
    with pytest.raises(ValueError, match="floats"):
        canonical_bytes({"x": 1.5})


def test_golden_hash_is_stable() -> None:
    raw = validate_policy(minimal()).canonical_bytes()
    assert raw == canonical_bytes(minimal())
    assert policy_hash(raw) == hashlib.sha256(raw).hexdigest()
    assert policy_hash(raw) == GOLDEN_HASH


def test_round_trip_through_the_model_is_identity_on_canonical_bytes() -> None:
    raw = canonical_bytes(minimal())
    assert parse_policy(raw).canonical_bytes() == raw
    pretty = json.dumps(minimal(), indent=2).encode()
    assert parse_policy(pretty).canonical_bytes() == raw
    assert policy_hash(pretty) != policy_hash(raw), "the hash is over the exact bytes, not the meaning"


@pytest.mark.parametrize("change", [
    lambda d: d["containers"][0]["command"].append("-v"),
    lambda d: d["containers"][0]["layers"].append("cd" * 32),
    lambda d: d["containers"][0]["env_rules"][0].update(required=False),
    lambda d: d["containers"][0]["mounts"][0]["options"].reverse(),
    lambda d: d["containers"][0]["signals"].append(9),
    lambda d: d["containers"][0].update(allow_stdio_access=False),
    lambda d: d["containers"][0]["user"].update(umask="0077"),
    lambda d: d["containers"][0]["capabilities"]["ambient"].append("CAP_CHOWN"),
    lambda d: d.update(allow_runtime_logging=True),
    lambda d: d.update(framework_version="0.4.1"),
])
def test_every_semantic_change_changes_the_hash(change) -> None:
    doc = minimal()
    change(doc)
    assert policy_hash(validate_policy(doc).canonical_bytes()) != GOLDEN_HASH


@pytest.mark.parametrize(("mutate", "problem"), [
    (lambda d: d.update(allow_everything=True), "allow_everything: unknown field"),
    (lambda d: d["containers"][0].update(env=[]), "containers[0].env: unknown field"),
    (lambda d: d["containers"][0].update(workingDir="/"), "containers[0].workingDir: unknown field (did you mean "
                                                          "'working_dir'?)"),
    (lambda d: d["containers"][0].pop("command"), "containers[0].command: required field is missing"),
    (lambda d: d["containers"][0]["env_rules"][1].update(pattern="LOG=(debug"),
     "containers[0].env_rules[1].pattern: regex 'LOG=(debug' is not valid RE2 syntax: missing closing )"),
    (lambda d: d["containers"][0]["env_rules"][1].update(pattern="(?=x)A"),
     "containers[0].env_rules[1].pattern: regex '(?=x)A' is not valid RE2 syntax: lookahead"),
    (lambda d: d["containers"][0]["env_rules"][0].update(strategy="glob"),
     "containers[0].env_rules[0].strategy: must be 'string' or 're2'"),
    (lambda d: d["containers"][0]["mounts"][0].update(source="sandbox:///volumes/[a"),
     "containers[0].mounts[0].source: regex"),
    (lambda d: d["containers"][0]["layers"].append("ABC"), "containers[0].layers[1]: 'ABC' is not a dm-verity"),
    (lambda d: d["containers"][0]["signals"].append(99), "containers[0].signals[1]: expected a signal number"),
    (lambda d: d["containers"][0]["user"].update(umask="22"), "containers[0].user.umask"),
    (lambda d: d["containers"][0]["capabilities"]["bounding"].append("CAP_CHOWN"), "is listed twice"),
    (lambda d: d["containers"][0].update(allow_elevated="no"), "containers[0].allow_elevated: expected true or false"),
    (lambda d: d.update(framework_version="0.6.0"), "framework_version: 0.6.0 is newer than this engine supports"),
    (lambda d: d.update(framework_version="latest"), "framework_version: 'latest' is not a version"),
    (lambda d: d.update(framework_version="0.2.0"), "containers[0].user: needs framework_version 0.2.1"),
    (lambda d: d.update(fragments=[{"issuer": "x"}]), "fragments[0].feed: required field is missing"),
    (lambda d: d.update(rules={"mount_devices": None}), "rules.mount_devices: not an enforcement point"),
    (lambda d: d.update(rules={"mount_device": {"allowed": "yes"}}), 'rules.mount_device: expected null (no rule)'),
    (lambda d: d.update(rules={"create_container": {"allowed": True, "metadata": []}}), "changes the framework's"),
    (lambda d: d.update(volumes=[{"name": "v", "target": "/run/parma/layers/3", "device_hash": H}]),
     "volumes[0].target: '/run/parma/layers/3' must be an absolute path outside the layer mount targets"),
    (lambda d: d.update(containers={}), "containers: expected an array, got an object"),
])
def test_schema_errors_name_the_json_path(mutate, problem) -> None:
    doc = minimal()
    mutate(doc)
    with pytest.raises(InvalidDocument) as exc:
        validate_policy(doc, source="p.json")
    assert any(problem in p for p in exc.value.problems), exc.value.problems
    assert exc.value.source == "p.json"


def test_every_problem_is_reported_at_once() -> None:
    doc = minimal(extra=1)
    doc["containers"][0]["working_dir"] = "relative"
    doc["containers"][0]["seccomp_profile_sha256"] = "nope"
    with pytest.raises(InvalidDocument) as exc:
        validate_policy(doc)
    assert len(exc.value.problems) == 3


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "is empty"),
    (b"{", "not valid JSON"),
    (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    (b"\xff", "not UTF-8"),
    (b'{"api_version": NaN}', "NaN is not valid JSON"),
])
def test_malformed_bytes(raw: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_policy(raw, "p.json")


def test_older_framework_policies_load_without_later_fields() -> None:
    doc = minimal(framework_version="0.2.0")
    for key in ("user", "capabilities", "seccomp_profile_sha256"):
        doc["containers"][0].pop(key)
    policy = validate_policy(doc)
    assert policy.containers[0].user is None
    out = json.loads(policy.canonical_bytes())
    assert "user" not in out["containers"][0] and out["containers"][0]["no_new_privileges"] is True


def test_null_capabilities_mean_runtime_defaults_and_round_trip() -> None:
    doc = minimal()
    doc["containers"][0]["capabilities"] = None
    policy = validate_policy(doc)
    assert policy.containers[0].capabilities is None
    assert json.loads(policy.canonical_bytes())["containers"][0]["capabilities"] is None


# ---------------------------------------------------------------------------------------------------------
# Regexes (the matcher itself: test_policy_regex.py)


def test_regex_errors_name_the_pattern_and_the_path() -> None:
    doc = minimal()
    doc["containers"][0]["env_rules"][1]["pattern"] = "A=(?<!x)y"
    with pytest.raises(InvalidDocument) as exc:
        validate_policy(doc)
    assert exc.value.problems == ["containers[0].env_rules[1].pattern: regex 'A=(?<!x)y' is not valid RE2 syntax: "
                                  "negative lookbehind (?<! is not RE2 syntax (at position 2)"]
