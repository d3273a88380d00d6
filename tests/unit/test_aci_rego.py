"""ccePolicy Rego export and import: round trips, confcom's layout, the accepted subset, the CLI."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from clirun import run_cli

from sandbox.aci.rego import (
    CONFCOM_RULES,
    ccepolicy_base64,
    decode_policy_text,
    export_rego,
    import_rego,
)
from sandbox.group import load_group
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.policy.gen import build_policy
from sandbox.shared.errors import InputError, InvalidDocument
from sandbox.shared.policy import canonical_bytes, parse_policy
from sandbox.shared.policy.inputs import EnforcementPoint
from sandbox.shared.policy.model import NameValueEnvRule, Policy, Strategy
from sandbox.shared.rego.syntax import RegoSyntaxError

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = ("1a" * 32, "2b" * 32)
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def busybox(ref: str) -> ResolvedImage:
    layers = tuple(LayerInfo("sha256:" + "0" * 64, "application/vnd.oci.image.layer.v1.tar", 1, h, Path(f"/c/{h}"))
                   for h in BUSYBOX)
    return ResolvedImage(ref, "sha256:" + "9" * 64, ImageConfig(cmd=("sh",), env=(PATH_ENV,)), layers)


def hello_policy(debug: bool = False) -> Policy:
    spec = load_group(REPO / "examples" / "hello" / "group.json")
    images = {c.name: busybox(c.image) for c in spec.containers}
    return build_policy(spec, images, debug_mode=debug, volume_hashes={"www": "3c" * 32})


def container(**over) -> dict:
    c = {"name": "app", "id": "example.com/app:1", "layers": list(BUSYBOX), "command": ["/app", "--serve"],
         "env_rules": [{"pattern": "A=1", "strategy": "string", "required": True},
                       {"pattern": "B=.+", "strategy": "re2", "required": False}],
         "working_dir": "/srv", "mounts": [{"destination": "/data", "source": "sandbox:///tmp/atlas/emptydir/.+",
                                            "type": "bind", "options": ["rbind", "rshared", "rw"]}],
         "exec_processes": [{"command": ["/bin/ls"], "signals": [9]}], "signals": [15, 2],
         "allow_elevated": False, "allow_stdio_access": False, "no_new_privileges": True,
         "user": {"user_idname": {"pattern": "1000", "strategy": "id"},
                  "group_idnames": [{"pattern": "app", "strategy": "name"}], "umask": "0077"},
         "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"], "inheritable": [],
                          "permitted": ["CAP_CHOWN"], "ambient": []},
         "seccomp_profile_sha256": "5d" * 32}
    c.update(over)
    return c


def policy_of(**over) -> Policy:
    doc = {"api_version": "0.12.0", "framework_version": "0.5.0", "containers": [container()]}
    doc.update(over)
    return parse_policy(canonical_bytes(doc))


ROUND_TRIP_CASES = {
    "hello": lambda: hello_policy(),
    "hello-debug": lambda: hello_policy(debug=True),
    "all-fields": lambda: policy_of(
        external_processes=[{"command": ["/bin/ps"], "env_rules": [{"pattern": "X=1", "strategy": "string",
                                                                     "required": False}],
                             "working_dir": "/", "allow_stdio_access": True}],
        volumes=[{"name": "www", "target": "/run/parma/volumes/www", "device_hash": "3c" * 32}],
        allow_properties_access=True, allow_dump_stacks=True, allow_runtime_logging=True,
        allow_environment_variable_dropping=True, allow_unencrypted_scratch=True, allow_capability_dropping=True),
    "null-capabilities": lambda: policy_of(containers=[container(capabilities=None)]),
    "framework-0.2.0": lambda: policy_of(api_version="0.10.0", framework_version="0.2.0", containers=[
        {k: v for k, v in container().items() if k not in ("user", "capabilities", "seccomp_profile_sha256")}]),
    "framework-0.1.0": lambda: policy_of(api_version="0.10.0", framework_version="0.1.0", containers=[
        {k: v for k, v in container().items()
         if k not in ("user", "capabilities", "seccomp_profile_sha256", "no_new_privileges")}]),
    "unicode-and-escapes": lambda: policy_of(containers=[{k: v for k, v in container(
        command=["/bin/echo", "grüße \"quoted\" \\ back\tslash", "\u2603"]).items() if k not in ("name", "id")}]),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIP_CASES))
def test_import_of_export_is_the_same_policy(case: str) -> None:
    p = ROUND_TRIP_CASES[case]()
    rego = export_rego(p)
    back = import_rego(rego)
    assert back == p
    assert back.canonical_bytes() == p.canonical_bytes()
    # and via base64 (the ARM template's ccePolicy value)
    assert import_rego(decode_policy_text(ccepolicy_base64(rego).encode(), "b64")) == p


def assignment(rego: str, name: str) -> str:
    lines = [line for line in rego.splitlines() if line.startswith(f"{name} := ")]
    assert len(lines) == 1, name
    return lines[0][len(name) + 4:]


def test_export_has_confcoms_layout() -> None:
    p = hello_policy()
    rego = export_rego(p)
    doc = p.to_document()
    lines = rego.splitlines()
    assert lines[:5] == ["package policy", "", "import future.keywords.every", "import future.keywords.in", ""]
    assert assignment(rego, "api_version") == '"0.12.0"'
    assert assignment(rego, "framework_version") == '"0.5.0"'
    assert assignment(rego, "fragments") == "[]"
    # containers: one line of compact JSON with sorted keys (confcom's print_func)
    assert assignment(rego, "containers") == json.dumps(doc["containers"], separators=(",", ":"), sort_keys=True)
    assert assignment(rego, "volumes") == json.dumps(doc["volumes"], separators=(",", ":"), sort_keys=True)
    assert "external_processes :=" not in rego   # none in this policy: confcom does not write it either
    for flag in ("allow_properties_access", "allow_dump_stacks", "allow_runtime_logging",
                 "allow_environment_variable_dropping", "allow_unencrypted_scratch", "allow_capability_dropping"):
        assert assignment(rego, flag) == json.dumps(doc[flag])
    for ep in CONFCOM_RULES + ("mount_blockdev", "host_network"):
        assert assignment(rego, ep) == f"data.framework.{ep}"
    assert lines[-1] == 'reason := {"errors": data.framework.errors}'
    # the container objects carry exactly the fields that confcom writes for framework >= 0.2.3
    assert {k for c in doc["containers"] for k in c} == {
        "allow_elevated", "allow_stdio_access", "capabilities", "command", "env_rules", "exec_processes", "id",
        "layers", "mounts", "name", "no_new_privileges", "seccomp_profile_sha256", "signals", "user", "working_dir"}


def test_export_lists_only_rules_the_api_version_knows_beyond_confcoms() -> None:
    old = export_rego(ROUND_TRIP_CASES["framework-0.2.0"]())
    assert "rw_mount_device :=" not in old      # api 0.10.0 predates it, and confcom's template lacks it
    assert "host_network :=" not in old and "log_provider :=" not in old


# A module in the layout az confcom writes (hand-written here, with our own values): pretty-printed
# fragments, compact containers, flags, the template's rules and a trailing blank line.
CONFCOM_STYLE = """package policy

import future.keywords.every
import future.keywords.in

api_version := "0.11.0"
framework_version := "0.2.3"

fragments := [
  {
    "feed": "example.com/infra-fragment",
    "includes": [
      "containers",
      "fragments"
    ],
    "issuer": "did:x509:0:sha256:AAAA::eku:1.2.3",
    "minimum_svn": "4"
  }
]

containers := @CONTAINERS@

allow_properties_access := true
allow_dump_stacks := false
allow_runtime_logging := false
allow_environment_variable_dropping := true
allow_unencrypted_scratch := false
allow_capability_dropping := true

@RULES@

reason := {"errors": data.framework.errors}


""".replace("@CONTAINERS@", json.dumps([container(), {k: v for k, v in container(
    name="pause-container", command=["/pause"], mounts=[], layers=["16" * 32]).items() if k != "id"}],
    separators=(",", ":"), sort_keys=True)).replace(
    "@RULES@", "\n".join(f"{ep} := data.framework.{ep}" for ep in CONFCOM_RULES))


def test_confcom_style_module_imports_and_its_data_exports_byte_for_byte() -> None:
    p = import_rego(CONFCOM_STYLE, source="cc.rego")
    assert [(f.feed, f.minimum_svn, f.includes) for f in p.fragments] == [
        ("example.com/infra-fragment", "4", ("containers", "fragments"))]
    assert import_rego(CONFCOM_STYLE, source="cc.rego", drop_fragments=True).fragments == ()
    assert [c.name for c in p.containers] == ["app", "pause-container"]
    assert p.api_version == "0.11.0" and p.allow_environment_variable_dropping and not p.allow_dump_stacks
    rego = export_rego(p)
    assert assignment(rego, "containers") == assignment(CONFCOM_STYLE, "containers")
    for name in ("api_version", "framework_version", "fragments", "allow_properties_access",
                 "allow_capability_dropping"):
        assert assignment(rego, name) == assignment(CONFCOM_STYLE, name)


# hcsshim's own marshaller writes Rego literals: multi-line objects with trailing commas.
HCSSHIM_STYLE = """package policy

api_version := "0.10.0"
framework_version := "0.2.3"

fragments := []

containers := [
    {
        "command": ["/app","--serve"],   # the init process
        "env_rules": [{"pattern": `A=1`, "strategy": "string", "required": true},],
        "layers": ["@L0@","@L1@",],
        "mounts": [],
        "exec_processes": [],
        "signals": [],
        "user": {
            "user_idname": {"pattern": ``, "strategy": "any"},
            "group_idnames": [{"pattern": ``, "strategy": "any"},],
            "umask": "0022",
        },
        "capabilities": null,
        "seccomp_profile_sha256": "",
        "allow_elevated": false,
        "working_dir": "/",
        "allow_stdio_access": true,
        "no_new_privileges": false,
    },
]
external_processes := [
    {"command": ["bash"], "env_rules": [{"pattern": `PATH=/usr/bin`, "strategy": "string", "required": true},],
     "working_dir": "/", "allow_stdio_access": true},
]

allow_properties_access := false
allow_dump_stacks := false
allow_runtime_logging := false
allow_environment_variable_dropping := false
allow_unencrypted_scratch := false
allow_capability_dropping := false
allow_host_network := false

@RULES@
reason := data.framework.reason
""".replace("@L0@", BUSYBOX[0]).replace("@L1@", BUSYBOX[1]).replace(
    "@RULES@", "\n".join(f"{ep} := data.framework.{ep}" for ep in CONFCOM_RULES))


def test_hcsshim_style_module_with_trailing_commas_comments_and_raw_strings() -> None:
    p = import_rego(HCSSHIM_STYLE)
    c = p.containers[0]
    assert c.command == ("/app", "--serve") and c.layers == BUSYBOX and c.capabilities is None
    assert c.env_rules[0].pattern == "A=1" and p.external_processes[0].command == ("bash",)
    assert import_rego(export_rego(p)) == p


def rejected(text: str, match: str, exc: type[Exception] = InputError) -> None:
    with pytest.raises(exc, match=match):
        import_rego(text, source="p.rego")


BASE = export_rego(policy_of())


@pytest.mark.parametrize(("edit", "match"), [
    (lambda t: t.replace("mount_device := data.framework.mount_device",
                         'mount_device := {"allowed": true, "metadata": []}'), r"p.rego \(data\) is invalid"),
    (lambda t: t.replace("mount_device := data.framework.mount_device",
                         "mount_device := data.framework.mount_overlay"), "delegating one enforcement point"),
    (lambda t: t + "\nallow { true }\n", "expected ':='"),
    (lambda t: t + "\nx := 1 if { true }\n", r"unexpected 'if'"),
    (lambda t: t.replace("package policy", "package other"), "a policy module is 'package policy'"),
    (lambda t: t + "\npackage policy\n", "2 policy modules"),
    (lambda t: t.replace("fragments := []", 'fragments := {"a", "b"}'), "sets are not accepted"),
    (lambda t: t.replace("fragments := []", "fragments := [1.5]"), "not an integer"),
    (lambda t: t.replace("fragments := []", "fragments := data.other"), "references are accepted only"),
    (lambda t: t.replace("fragments := []", "fragments := [count(x)]"), "only plain references"),
    (lambda t: t + "\nallow_host_network := true\n", "not supported"),
    (lambda t: t + "\napi_version := \"0.12.0\"\n", "assigned twice"),
    (lambda t: t.replace("import future.keywords.in", "import data.lib"), "import data.lib is not accepted"),
    (lambda t: t.replace('"0.12.0"', '"0.12.0" + "x"', 1), "unexpected '\\+' after the statement"),
    (lambda t: "# no package\n" + t.split("\n", 1)[1], "starts with a 'package' statement"),
])
def test_outside_the_subset_is_refused_with_where(edit, match: str) -> None:
    rejected(edit(BASE), match)


def test_constant_and_missing_rules_import_and_export_back() -> None:
    text = BASE.replace("mount_device := data.framework.mount_device", 'mount_device := {"allowed": true}').replace(
        "exec_external := data.framework.exec_external\n", "")
    p = import_rego(text, source="p.rego")
    assert p.to_document()["rules"] == {"mount_device": {"allowed": True}, "exec_external": None}
    again = export_rego(p)
    assert 'mount_device := {"allowed":true}' in again and "exec_external :=" not in again
    assert import_rego(again) == p


def test_invalid_data_is_reported_with_json_paths() -> None:
    bad = BASE.replace('"command":["/app","--serve"]', '"command":[]')
    with pytest.raises(InvalidDocument) as e:
        import_rego(bad, source="p.rego")
    assert e.value.problems == ["containers[0].command: must not be an empty array"]


def test_null_commands_and_the_second_env_rule_form_import_and_export_back() -> None:
    rule = {"name": "LOG", "name_strategy": "string", "value": "(debug|info)", "value_strategy": "re2"}
    text = BASE.replace('"command":["/app","--serve"]', '"command":null').replace(
        '"env_rules":[', '"env_rules":[' + json.dumps(rule) + ",", 1)
    p = import_rego(text, source="p.rego")
    assert p.containers[0].command is None
    assert p.containers[0].env_rules[0] == NameValueEnvRule("LOG", Strategy.string, "(debug|info)", Strategy.re2)
    assert import_rego(export_rego(p)) == p


def test_syntax_errors_carry_line_and_column() -> None:
    with pytest.raises(RegoSyntaxError, match=r"p.rego:3:17: expected ',' or '\]'"):
        import_rego('package policy\n\nfragments := [1 2]\n', source="p.rego")


def test_legacy_svn_names_are_read_as_versions() -> None:
    legacy = BASE.replace("api_version :=", "api_svn :=").replace("framework_version :=", "framework_svn :=")
    assert import_rego(legacy) == policy_of()


def test_decode_policy_text_accepts_base64_with_line_breaks() -> None:
    wrapped = base64.encodebytes(BASE.encode()).decode()
    assert decode_policy_text(wrapped.encode(), "x") == BASE
    assert decode_policy_text(BASE.encode(), "x") == BASE


def test_cli_export_and_import(tmp_path: Path, capsys) -> None:
    src = tmp_path / "p.json"
    src.write_bytes(hello_policy().canonical_bytes())
    code, out, err = run_cli(["policy", "export", str(src)], capsys)
    assert code == 0 and out == export_rego(hello_policy())
    assert hashlib.sha256(out.encode()).hexdigest() in err
    code, out64, _ = run_cli(["policy", "export", "--base64", str(src)], capsys)
    assert code == 0 and base64.b64decode(out64).decode() == out
    rego_file = tmp_path / "p.rego"
    code, _, _ = run_cli(["policy", "export", "--base64", "-o", str(rego_file), str(src)], capsys)
    assert code == 0
    code, out, err = run_cli(["policy", "import", str(rego_file)], capsys)
    assert code == 0 and out.encode() == src.read_bytes()
    assert hashlib.sha256(src.read_bytes()).hexdigest() in err
    without = tmp_path / "without.rego"
    without.write_text(BASE.replace("exec_external := data.framework.exec_external\n", ""))
    code, out, err = run_cli(["policy", "import", str(without)], capsys)
    assert code == 0 and json.loads(out)["rules"] == {"exec_external": None}, err


def test_every_aci_point_the_engine_enforces_is_in_confcoms_template() -> None:
    """So a point missing from `rules` is always the framework's for the engine (the layout delegates it).
    The engine's own points (parma-sandbox extensions) are not ACI's: `rules` cannot name them."""
    from sandbox.shared.rego.framework import ENFORCEMENT_POINTS
    aci = {ep.value for ep in EnforcementPoint if ep.value in ENFORCEMENT_POINTS}
    assert aci and aci <= set(CONFCOM_RULES)


def test_cli_import_picks_a_module_of_multi_group_output(tmp_path: Path, capsys) -> None:
    one = export_rego(policy_of())
    (tmp_path / "multi.rego").write_text(one + "\n\n" + one.replace('"0.12.0"', '"0.11.0"', 1))
    code, _, err = run_cli(["policy", "import", str(tmp_path / "multi.rego")], capsys)
    assert code == 2 and "2 policy modules" in err and "--group" in err
    code, out, err = run_cli(["policy", "import", str(tmp_path / "multi.rego"), "--group", "1"], capsys)
    assert code == 0 and json.loads(out)["api_version"] == "0.11.0", err
