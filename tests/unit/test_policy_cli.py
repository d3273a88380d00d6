"""`parma-sandbox policy gen|show|hash|diff|check`: output, exit codes and bad-input errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sandbox.cli import main as main_mod
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.policy import sources
from sandbox.shared.policy import canonical_bytes

H0, H1 = "1a" * 32, "2b" * 32


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main_mod.main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def write_policy(path: Path, **flags) -> Path:
    doc = {"api_version": "0.12.0", "framework_version": "0.5.0", "containers": [{
        "name": "web", "layers": [H0, H1], "command": ["/bin/httpd", "-f"],
        "env_rules": [{"pattern": "PATH=/bin", "strategy": "string", "required": True}],
        "working_dir": "/", "mounts": [], "exec_processes": [{"command": ["/bin/ls"], "signals": []}], "signals": [15],
        "user": {"user_idname": {"pattern": "", "strategy": "any"},
                 "group_idnames": [{"pattern": "", "strategy": "any"}], "umask": "0022"},
        "capabilities": None, "seccomp_profile_sha256": "", "allow_elevated": False,
        "allow_stdio_access": True, "no_new_privileges": False}], "external_processes": []}
    doc.update(flags)
    path.write_bytes(canonical_bytes(doc))
    return path


def write_trace(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


SETUP = [
    {"ep": "mount_device", "input": {"target": "/run/parma/layers/0", "device_hash": H0}},
    {"ep": "mount_device", "input": {"target": "/run/parma/layers/1", "device_hash": H1}},
    {"ep": "mount_overlay", "input": {"container_id": "web", "target": "/run/parma/containers/web/rootfs",
                                      "layer_paths": ["/run/parma/layers/1", "/run/parma/layers/0"]}},
]
CREATE = {"ep": "create_container", "input": {"container_id": "web", "argv": ["/bin/httpd", "-f"],
                                              "env": ["PATH=/bin"]}}


def test_hash_prints_sha256_of_the_exact_bytes(tmp_path: Path, capsys) -> None:
    p = write_policy(tmp_path / "p.json")
    code, out, _ = run(["policy", "hash", str(p)], capsys)
    assert code == 0 and out.strip() == hashlib.sha256(p.read_bytes()).hexdigest()
    code, out, _ = run(["--format", "json", "policy", "hash", str(p)], capsys)
    assert json.loads(out)["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()


def test_show_flags_debug_mode_loudly(tmp_path: Path, capsys) -> None:
    normal = write_policy(tmp_path / "n.json")
    code, out, err = run(["policy", "show", str(normal)], capsys)
    assert code == 0 and "DEBUG" not in out + err and "container web" in out
    debug = write_policy(tmp_path / "d.json", allow_runtime_logging=True)
    code, out, err = run(["policy", "show", str(debug)], capsys)
    assert code == 0
    assert out.startswith("!!! DEBUG-MODE POLICY") and out.rstrip().endswith("!!!")
    assert "allow_runtime_logging" in out and "DEBUG-MODE" in err
    code, out, _ = run(["policy", "show", "--format", "json", str(debug)], capsys)
    assert json.loads(out)["debug_mode"] is True


def test_diff_names_container_and_field(tmp_path: Path, capsys) -> None:
    a = write_policy(tmp_path / "a.json")
    code, out, _ = run(["policy", "diff", str(a), str(a)], capsys)
    assert (code, out.strip()) == (0, "identical")
    doc = json.loads(a.read_bytes())
    doc["containers"][0]["command"] = ["/bin/httpd", "-v"]
    doc["containers"][0]["env_rules"].append({"pattern": "X=.*", "strategy": "re2", "required": False})
    b = tmp_path / "b.json"
    b.write_bytes(canonical_bytes(doc))
    code, out, _ = run(["policy", "diff", str(a), str(b)], capsys)
    assert code == 1
    assert "container 'web': command: [\"/bin/httpd\", \"-f\"] -> [\"/bin/httpd\", \"-v\"]" in out
    assert "container 'web': env_rules: + " in out and "X=.*" in out
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(json.loads(a.read_bytes()), indent=2))
    code, out, _ = run(["policy", "diff", str(a), str(pretty)], capsys)
    assert code == 1 and "no semantic difference, but the bytes differ" in out


def test_check_all_allowed_exits_0(tmp_path: Path, capsys) -> None:
    p = write_policy(tmp_path / "p.json")
    t = write_trace(tmp_path / "t.jsonl", ["# setup", *SETUP, "", CREATE])
    code, out, err = run(["policy", "check", str(p), str(t)], capsys)
    assert code == 0, err
    assert len(out.splitlines()) == 4 and all("allowed" in line for line in out.splitlines())
    assert "4 request(s), 0 denied" in err


def test_check_denied_exits_1_with_json_lines(tmp_path: Path, capsys) -> None:
    p = write_policy(tmp_path / "p.json")
    bad = {"ep": "create_container", "input": {**CREATE["input"], "env": ["PATH=/bin", "LD_PRELOAD=/x.so"]}}
    t = write_trace(tmp_path / "t.jsonl", [*SETUP, bad, {**CREATE, "action": "fail"}, CREATE])
    code, out, _ = run(["policy", "check", "--format", "json", str(p), str(t)], capsys)
    assert code == 1
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["allowed"] for x in lines] == [True, True, True, False, True, True]
    assert lines[3]["reason"] == "create_container denied for 'web': env 'LD_PRELOAD=/x.so' matches no env_rule"
    assert lines[4]["rolled_back"] and lines[4]["changes"] == []
    assert lines[5]["results"]["env_list"] == ["PATH=/bin"] and lines[5]["changes"]
    assert all(x["reason"] == "" for x in lines if x["allowed"])


@pytest.mark.parametrize(("trace", "message"), [
    (['{"ep": "mount_devices", "input": {}}'], "t.jsonl:1: unknown enforcement point 'mount_devices'"),
    ([*SETUP, {"ep": "create_container", "input": {"container_id": "web"}}],
     "t.jsonl:4: create_container: input.argv: required field is missing"),
    (['{"ep": "mount_device", "input": {"target": "/x"'], "t.jsonl:1: not valid JSON"),
    (['{"input": {}}'], "t.jsonl:1: the field 'ep' (the enforcement point) is missing"),
    (['{"ep": "get_properties", "expect": "deny"}'], "t.jsonl:1: unknown field 'expect'"),
    (["# nothing"], "the trace has no requests"),
])
def test_check_bad_trace_exits_2_without_replaying(tmp_path: Path, capsys, trace, message) -> None:
    p = write_policy(tmp_path / "p.json")
    t = write_trace(tmp_path / "t.jsonl", trace)
    code, out, err = run(["policy", "check", str(p), str(t)], capsys)
    assert code == 2 and out == ""
    assert message in err


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["containers"][0].update(env_rules=[{"pattern": "A=(", "strategy": "re2"}]),
     "containers[0].env_rules[0].pattern: regex 'A=(' is not valid RE2 syntax: missing closing )"),
    (lambda d: d["containers"][0].update(layer=[]), "containers[0].layer: unknown field (did you mean 'layers'?)"),
])
def test_check_bad_policy_exits_2_with_json_path(tmp_path: Path, capsys, mutate, message) -> None:
    doc = json.loads(write_policy(tmp_path / "p.json").read_bytes())
    mutate(doc)
    (tmp_path / "p.json").write_text(json.dumps(doc))
    t = write_trace(tmp_path / "t.jsonl", [CREATE])
    code, _, err = run(["policy", "check", str(tmp_path / "p.json"), str(t)], capsys)
    assert code == 2
    assert "is invalid" in err and message in err


# -- gen -------------------------------------------------------------------------------------------


@pytest.fixture
def group_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "www").mkdir()
    g = tmp_path / "group.json"
    g.write_text(json.dumps({"name": "g", "volumes": [{"name": "www", "files": {"path": "www"}}], "containers": [
        {"name": "web", "image": "busybox:1.36", "command": ["/bin/httpd", "-f"],
         "mounts": [{"name": "www", "mountPath": "/www"}]}]}))
    layers = tuple(LayerInfo("sha256:" + "0" * 64, "tar", 1, h, Path("/x")) for h in (H0, H1))
    resolved = ResolvedImage("busybox:1.36", "sha256:" + "9" * 64, ImageConfig(cmd=("sh",)), layers)
    monkeypatch.setattr("sandbox.policy.sources.resolve_group_images", lambda spec: {"web": resolved})
    monkeypatch.setattr("sandbox.policy.sources.files_volume_hashes", lambda spec: {"www": "3c" * 32})
    return g


def test_gen_writes_canonical_bytes(group_file: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run(["policy", "gen", str(group_file)], capsys)
    assert code == 0 and "policy sha256 (HOST_DATA)" in err
    out_file = tmp_path / "policy.json"
    code, summary, _ = run(["--format", "json", "policy", "gen", str(group_file), "-o", str(out_file)], capsys)
    assert code == 0
    raw = out_file.read_bytes()
    assert raw == out.encode() and not raw.endswith(b"\n")
    assert json.loads(summary)["sha256"] == hashlib.sha256(raw).hexdigest()
    code, out2, _ = run(["policy", "hash", str(out_file)], capsys)
    assert out2.strip() == json.loads(summary)["sha256"]


def test_gen_debug_mode_changes_the_hash_and_warns(group_file: Path, tmp_path: Path, capsys) -> None:
    run(["policy", "gen", str(group_file), "-o", str(tmp_path / "a.json")], capsys)
    code, _, err = run(["policy", "gen", "--debug-mode", str(group_file), "-o", str(tmp_path / "b.json")], capsys)
    assert code == 0 and "DEBUG-MODE" in err
    assert (tmp_path / "a.json").read_bytes() != (tmp_path / "b.json").read_bytes()
    code, out, _ = run(["policy", "diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")], capsys)
    assert code == 1 and "policy: allow_runtime_logging: false -> true" in out


def test_files_volume_hashes_come_from_the_launcher(tmp_path: Path, isolated_dirs: Path) -> None:
    """The same deterministic ext4 + dm-verity device `up` attaches; its hash depends only on content."""
    from sandbox.group import validate_group
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "index.html").write_text("hello\n")
    spec = validate_group({"name": "g", "volumes": [{"name": "a", "files": {"path": "a"}},
                                                    {"name": "b", "files": {"path": "b"}}],
                           "containers": [{"name": "web", "image": "busybox:1.36"}]}, base_dir=tmp_path)
    hashes = sources.files_volume_hashes(spec)
    assert set(hashes) == {"a", "b"} and hashes["a"] == hashes["b"]
    assert len(hashes["a"]) == 64
    (tmp_path / "b" / "index.html").write_text("changed\n")
    assert sources.files_volume_hashes(spec)["b"] != hashes["a"]
