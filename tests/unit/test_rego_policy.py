"""The shared-zone reader of ACI policy modules: syntax, versions, framework defaults, rules."""

from __future__ import annotations

import json

import pytest

from sandbox.shared.errors import InputError, InvalidDocument
from sandbox.shared.rego import framework as fw
from sandbox.shared.rego.policy import RuleKind, read_policy_text
from sandbox.shared.rego.syntax import RegoSyntaxError, parse_modules

pytestmark = pytest.mark.unit

LAYER = "ab" * 32
INFRA = {"feed": "mcr.microsoft.com/aci/aci-cc-infra-fragment", "includes": ["containers", "fragments"],
         "issuer": "did:x509:0:sha256:I__iuL25oXEVFdTP_aBLx_eT1RPHbCQ_ECBQfYZpt9s::eku:1.3.6.1.4.1.311.76.59.1.3",
         "minimum_svn": "4"}


def container(**over):
    c = {"allow_elevated": False, "allow_stdio_access": True, "command": ["/app"], "env_rules": [
         {"pattern": "((?i)FABRIC)_.+=.+", "required": False, "strategy": "re2"}], "exec_processes": [],
         "id": "example.com/app:1", "layers": [LAYER], "mounts": [], "name": "app", "signals": [], "working_dir": "/",
         "no_new_privileges": False, "seccomp_profile_sha256": "", "capabilities": None,
         "user": {"group_idnames": [{"pattern": "", "strategy": "any"}], "umask": "0022",
                  "user_idname": {"pattern": "", "strategy": "any"}}}
    c.update(over)
    return {k: v for k, v in c.items() if v is not ...}


def module(containers, api="0.10.0", framework="0.2.3", fragments=(INFRA,), svn_names=False, rules=None,
           extra="") -> str:
    a, f = ("api_svn", "framework_svn") if svn_names else ("api_version", "framework_version")
    rules = rules if rules is not None else [ep for ep in fw.ENFORCEMENT_POINTS
                                             if fw.ENFORCEMENT_POINTS[ep].introduced <= (0, 10, 0)]
    lines = ["package policy", "", "import future.keywords.every", "import future.keywords.in", "",
             f'{a} := "{api}"', f'{f} := "{framework}"', "",
             f"fragments := {json.dumps(list(fragments), indent=2, sort_keys=True)}", "",
             f"containers := {json.dumps(containers, separators=(',', ':'), sort_keys=True)}", "",
             "allow_properties_access := true", "allow_environment_variable_dropping := true",
             "allow_capability_dropping := true", extra, ""]
    lines += [f"{ep} := data.framework.{ep}" for ep in rules]
    lines += ["", 'reason := {"errors": data.framework.errors}', ""]
    return "\n".join(lines)


def test_confcom_module_with_null_command_fragments_and_inline_flags() -> None:
    p = read_policy_text(module([container(command=None), container(name="pause-container", command=["/pause"])]))
    assert p.containers[0]["command"] is None and p.containers[1]["command"] == ["/pause"]
    assert p.fragments == ({**INFRA, "required_receipts": []},)
    assert p.containers[0]["env_rules"][0]["pattern"] == "((?i)FABRIC)_.+=.+"
    assert p.flags["allow_capability_dropping"] and not p.flags["allow_dump_stacks"]
    assert p.rules["mount_device"].kind == RuleKind.framework
    # api 0.10.0 predates rw_mount_device (framework decides) and host_network (api.rego default: denied)
    assert p.rules["rw_mount_device"].kind == RuleKind.default and p.rules["rw_mount_device"].allowed is None
    assert p.rules["host_network"].kind == RuleKind.default and p.rules["host_network"].allowed is False
    doc = p.document()
    assert doc["containers"][0]["command"] is None and doc["fragments"][0]["minimum_svn"] == "4"


@pytest.mark.parametrize(("framework", "present"), [
    ("0.1.0", []), ("0.2.0", ["no_new_privileges"]), ("0.2.1", ["no_new_privileges", "user"]),
    ("0.2.2", ["no_new_privileges", "user", "capabilities"]),
    ("0.2.3", ["no_new_privileges", "user", "capabilities", "seccomp_profile_sha256"]),
])
def test_older_framework_versions_get_the_frameworks_defaults(framework: str, present: list[str]) -> None:
    versioned = {"no_new_privileges", "user", "capabilities", "seccomp_profile_sha256"}
    raw = container(**{k: ... for k in versioned - set(present)}, signals=[3])
    p = read_policy_text(module([raw], framework=framework, svn_names=True))
    assert sorted(set(p.containers[0]) & versioned) == sorted(present)
    eff = p.effective_containers()[0]
    assert eff["signals"] == [3, 9, 15]                       # check_signals, framework < 0.4.1
    if "user" not in present:
        assert eff["user"] == fw.ANY_USER and eff["no_new_privileges"] is False or "no_new_privileges" in present
    if framework < "0.2.2":
        assert eff["capabilities"] is None and not p.flags["allow_capability_dropping"]


def test_a_container_lacking_a_field_of_its_version_is_dropped_as_aci_drops_it() -> None:
    p = read_policy_text(module([container(user=...), container(name="ok")]))
    assert [c["name"] for c in p.containers] == ["ok"]
    assert any("lacks user" in w and "ACI ignores this container" in w for w in p.warnings)
    assert p.raw_layers == (LAYER,)


def test_a_framework_version_newer_than_acis_leaves_nothing_to_evaluate() -> None:
    p = read_policy_text(module([container()], framework="1.0.0", svn_names=True))
    assert p.containers == () and p.fragments == () and "ignores every container" in p.warnings[0]
    assert p.document()["framework_version"] == "1.0.0" and p.raw_layers == (LAYER,)
    # the model holds it as it is: nothing to evaluate, the layers still mount
    from sandbox.shared.policy import PolicyEngine, validate_policy
    held = validate_policy(p.policy_document())
    assert held.containers == () and held.ignored_container_layers == (LAYER,)
    engine = PolicyEngine(held)
    assert engine.enforce_json("mount_device", {"target": "/run/parma/layers/l0", "device_hash": LAYER}).allowed
    with pytest.raises(InvalidDocument) as e:
        validate_policy({**p.policy_document(), "containers": [container()]})
    assert "framework_version: 1.0.0 is newer than this engine supports (0.5.0)" in e.value.problems


def test_containers_of_the_frameworks_own_version_are_read_as_written() -> None:
    """Framework 0.5.0 evaluates its own version's data without check_container: an object lacking fields
    still matches overlays (never created, unless it lacks only signals or exec_processes)."""
    partial = {k: v for k, v in container().items() if k != "user"}
    no_signals = {k: v for k, v in container(name="b").items() if k != "signals"}
    p = read_policy_text(module([partial, no_signals], framework="0.5.0"))
    assert [c["command"] for c in p.containers] == [None, container()["command"]]
    assert p.containers[1]["signals"] == [] and "never creates it" in p.warnings[0]


def test_multi_group_output_needs_a_module_choice() -> None:
    text = module([container(name="a")]) + "\n\n" + module([container(name="b")])
    assert [m.package for m in parse_modules(text)] == ["policy", "policy"]
    with pytest.raises(InputError, match="2 policy modules") as e:
        read_policy_text(text)
    assert "--group" in e.value.hint
    assert read_policy_text(text, module_index=1).containers[0]["name"] == "b"
    m = parse_modules(text)[1]
    assert read_policy_text(text[m.start:m.end]).containers[0]["name"] == "b"


def test_rules_missing_constant_and_default() -> None:
    rules = ["mount_device", "mount_overlay", "create_container"]
    extra = 'exec_external := {"allowed": true, "allow_stdio_access": false}'
    p = read_policy_text(module([container()], api="0.2.0", rules=rules, extra=extra))
    assert p.rules["unmount_device"].kind == RuleKind.missing          # 0.2.0 has it: denied
    assert p.rules["exec_external"].kind == RuleKind.constant and p.rules["exec_external"].allowed
    assert p.rules["get_properties"].kind == RuleKind.default and p.rules["get_properties"].allowed   # predates 0.7.0


def test_second_env_rule_form_and_strict_types() -> None:
    rule = {"name": "LOG", "name_strategy": "string", "value": "debug|info", "value_strategy": "re2"}
    p = read_policy_text(module([container(env_rules=[rule])]))
    assert p.containers[0]["env_rules"] == [{**rule, "required": False}]
    with pytest.raises(InputError, match=r"containers\[0\].allow_elevated: expected true or false"):
        read_policy_text(module([container(allow_elevated="no")]))


@pytest.mark.parametrize(("text", "match"), [
    ('package policy\nframework_svn := 0.2.2\n', "'0.2.2' is not an integer"),
    ('package policy\napi_version := "0.10.0"\nframework_version := "0.2.3"\n', None),
    ('package policy\nframework_version := "0.2.3"\n', "no api_version"),
    ('package policy\napi_svn := "0.9.0"\napi_version := "0.10.0"\nframework_version := "0.2.3"\n', "disagree"),
    ('package policy\ndefault mount_device := {"allowed": false}\n', "custom rule logic"),
    ('package policy\nallow { true }\n', "expected ':='"),
    ('package fragment\nsvn := 1\n', "a policy module is 'package policy'"),
])
def test_module_level_refusals(text: str, match: str | None) -> None:
    if match is None:
        assert read_policy_text(text).containers == ()
        return
    with pytest.raises(InputError, match=match):
        read_policy_text(text)


def test_syntax_fast_path_refuses_floats_and_duplicate_keys_like_the_slow_path() -> None:
    with pytest.raises(RegoSyntaxError, match="not an integer"):
        parse_modules('package p\nx := [{"a": 1.5}]\n')
    with pytest.raises(RegoSyntaxError, match="duplicate key 'a'"):
        parse_modules('package p\nx := {"a": 1, "a": 2}\n')
    m = parse_modules('package p\nx := [1, 2,] # trailing\ny := `raw\\n`\n')[0]
    assert m.assignments()["x"].value == [1, 2] and m.assignments()["y"].value == "raw\\n"


def test_hostile_text_gives_errors_never_crashes() -> None:
    import random
    base = module([container(command=None), container(name="pause-container")])
    r = random.Random(3)
    for _ in range(400):
        text = list(base)
        for _ in range(r.randint(1, 8)):
            i = r.randrange(len(text))
            text[i] = r.choice(['"', "[", "{", "}", "]", ",", ":", "\n", "`", "#", "\x00", "é", "1.5", "x"])
        try:
            for m in parse_modules("".join(text)):
                read_policy_text("".join(text)[m.start:m.end])
        except InputError:
            pass
    with pytest.raises(RegoSyntaxError, match="nested deeper"):
        parse_modules("package p\nx := " + "[" * 100000 + "]" * 100000)
