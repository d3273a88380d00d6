"""Seccomp profiles (sandbox/shared/seccomp.py): strict parsing, ACI's measurement, the form crun gets."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from sandbox.shared.seccomp import SeccompError, measure, parse_profile, profile_from_json

DENY_MKDIR = {"defaultAction": "SCMP_ACT_ALLOW",
              "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}

# What Go's json.Marshal(specs.LinuxSeccomp) writes for this profile, written out by hand from the
# struct's field order and omitempty tags (hcsshim vendor/github.com/opencontainers/runtime-spec
# specs-go/config.go): the bytes hcsshim's MeasureSeccompProfile hashes in ACI.
FULL = {"syscalls": [{"args": [{"op": "SCMP_CMP_MASKED_EQ", "valueTwo": 0, "value": 2080505856, "index": 0}],
                      "action": "SCMP_ACT_ALLOW", "names": ["clone"]},
                     {"errnoRet": 38, "names": ["io_uring_setup"], "action": "SCMP_ACT_ERRNO"}],
        "flags": [], "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"], "defaultErrnoRet": 1,
        "defaultAction": "SCMP_ACT_ERRNO"}
FULL_GO = (b'{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,"architectures":["SCMP_ARCH_X86_64",'
           b'"SCMP_ARCH_X86"],"syscalls":[{"names":["clone"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,'
           b'"value":2080505856,"op":"SCMP_CMP_MASKED_EQ"}]},{"names":["io_uring_setup"],"action":"SCMP_ACT_ERRNO",'
           b'"errnoRet":38}]}')


def test_the_canonical_form_is_gos_marshal_of_the_oci_struct() -> None:
    profile = profile_from_json(FULL)
    assert profile.canonical == FULL_GO
    assert profile.sha256 == hashlib.sha256(FULL_GO).hexdigest()
    assert profile.to_oci() == json.loads(FULL_GO)
    # Any spelling of the same profile measures the same: whitespace, key order, empty optional fields.
    spaced = json.dumps(FULL, indent=3).encode()
    assert parse_profile(spaced).canonical == FULL_GO
    assert measure(None) == "" and measure(profile) == profile.sha256


def test_a_valuetwo_is_kept_when_set_and_errnoret_zero_is_kept() -> None:
    p = profile_from_json({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 0, "syscalls": [
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 8, "valueTwo": 9, "op": "SCMP_CMP_EQ"}], "errnoRet": 0}]})
    assert p.canonical == (b'{"defaultAction":"SCMP_ACT_ALLOW","defaultErrnoRet":0,"syscalls":[{"names":'
                           b'["personality"],"action":"SCMP_ACT_ALLOW","errnoRet":0,"args":[{"index":0,"value":8,'
                           b'"valueTwo":9,"op":"SCMP_CMP_EQ"}]}]}')


@pytest.mark.parametrize(("raw", "needle"), [
    (b'{"defaultAction":"SCMP_ACT_ALLOW","defaultAction":"SCMP_ACT_KILL"}', "duplicate key"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","archMap":[]}', "unknown field 'archMap'"),
    (b'{"defaultAction":"SCMP_ACT_NOTIFY"}', "needs a seccomp agent"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/run/agent.sock"}', "needs a seccomp agent"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_NOTIFY"}]}',
     "syscalls[0].action: SCMP_ACT_NOTIFY"),
    (b'{}', "defaultAction: is required"),
    (b'{"defaultAction":"allow"}', "is not one of"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"action":"SCMP_ACT_KILL"}]}', "needs names"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":[],"action":"SCMP_ACT_KILL"}]}', "must not be empty"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["rea d"],"action":"SCMP_ACT_KILL"}]}',
     "is not a syscall name"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["r\\u0000"],"action":"SCMP_ACT_KILL"}]}',
     "is not a syscall name"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["\\ud800"],"action":"SCMP_ACT_KILL"}]}',
     "is not a syscall name"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_KILL",'
     b'"args":[{"index":6,"value":0,"op":"SCMP_CMP_EQ"}]}]}', "index: expected an integer from 0 to 5"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_KILL",'
     b'"args":[{"index":0,"value":18446744073709551616,"op":"SCMP_CMP_EQ"}]}]}', "value: expected an integer"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_KILL",'
     b'"args":[{"index":0,"value":-1,"op":"SCMP_CMP_EQ"}]}]}', "value: expected an integer"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","defaultErrnoRet":true}', "expected an integer"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","defaultErrnoRet":1.0}', "expected an integer"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","defaultErrnoRet":1e400}', "out of range"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","flags":["SECCOMP_FILTER_FLAG_TSYNC"]}', "flags[0]"),
    (b'{"defaultAction":"SCMP_ACT_ALLOW","architectures":"SCMP_ARCH_X86_64"}', "expected an array"),
    (b'[]', "expected an object"),
    (b'{"defaultAction":' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
    (b'\xff', "UTF-8"),
    (b'', "empty"),
])
def test_malformed_profiles_are_refused_with_their_path(raw: bytes, needle: str) -> None:
    with pytest.raises(SeccompError) as e:
        parse_profile(raw)
    assert needle in e.value.message, e.value.message
    assert len(e.value.message) < 400


def test_size_and_count_limits() -> None:
    with pytest.raises(SeccompError, match="larger than"):
        parse_profile(b" " * ((1 << 20) + 1))
    with pytest.raises(SeccompError, match="more than 4096 items"):
        profile_from_json({"defaultAction": "SCMP_ACT_ALLOW",
                           "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL"}] * 4097})


def test_group_spec_arm_policy_and_plan_carry_one_measurement(tmp_path) -> None:
    from sandbox.group.arm import load_template_group
    from sandbox.group.jsonio import ValidationError
    from sandbox.group.spec import validate_group
    from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
    from sandbox.launch.plan import build_plan
    from sandbox.policy.gen import build_policy

    b64 = base64.b64encode(json.dumps(DENY_MKDIR).encode()).decode()
    spec = validate_group({"name": "g", "containers": [{"name": "app", "image": "busybox", "command": ["sh"],
                                                        "seccompProfile": b64}]}, base_dir=tmp_path)
    profile = spec.containers[0].seccomp_profile
    assert profile is not None and profile.canonical == json.dumps(DENY_MKDIR, separators=(",", ":")).encode()
    image = ResolvedImage("busybox", "sha256:" + "0" * 64, ImageConfig(),
                          (LayerInfo("sha256:" + "1" * 64, "tar", 1, "2" * 64, tmp_path / "l.img"),))
    policy = build_policy(spec, {"app": image})
    assert policy.containers[0].seccomp_profile_sha256 == profile.sha256
    assert build_plan(spec, {"app": image}, {}).containers[0].create.seccomp_profile == profile.canonical
    # An ARM template's securityContext.seccompProfile is the same base64 JSON.
    template = {"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
                "contentVersion": "1.0.0.0", "resources": [{
                    "type": "Microsoft.ContainerInstance/containerGroups", "apiVersion": "2023-05-01", "name": "g",
                    "properties": {"osType": "Linux", "containers": [{"name": "app", "properties": {
                        "image": "busybox", "command": ["sh"], "securityContext": {"seccompProfile": b64},
                        "resources": {"requests": {"cpu": 1, "memoryInGB": 1}}}}]}}]}
    arm = load_template_group(tmp_path / "t.json", template)
    assert arm.containers[0].seccomp_profile == profile
    with pytest.raises(ValidationError) as e:
        validate_group({"name": "g", "containers": [{"name": "app", "image": "busybox", "seccompProfile": "bm90IGpzb24="}]})
    assert "containers[0].seccompProfile" in str(e.value.problems)
