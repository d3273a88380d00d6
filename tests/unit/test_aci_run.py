"""Running ACI's policies locally: what the launcher asks for under a ccePolicy, how the agent resolves ACI's
mount sources, and which fragments `up` loads (the VM-free parts of `up` on a template with a ccePolicy)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sandbox.aci.ccepolicy import policy_file_bytes, template_ccepolicy_of_file
from sandbox.aci.export import aci_policy, aci_template
from sandbox.aci.fragment_crypto import make_test_issuer, sign_fragment
from sandbox.aci.fragment_sources import INFRASTRUCTURE_FEED, plan_fragments
from sandbox.aci.rego import rego_module
from sandbox.group import validate_group
from sandbox.guest.service import AgentService, base_mounts
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.launch.plan import build_plan
from sandbox.shared.errors import CheckFailed, InputError
from sandbox.shared.messages import MemoryVolumeKind
from sandbox.shared.policy import PolicyEngine, parse_policy
from sandbox.shared.policy.inputs import ROOT, CreateContainerInput, MountDeviceInput, NamedId
from sandbox.shared.policy.model import is_rego
from sandbox.shared.protocol import ProtocolError
from sandbox.shared.seccomp import measure, parse_profile

pytestmark = pytest.mark.unit

GROUP = {
    "name": "shop",
    "volumes": [{"name": "cache", "emptyDir": {}}, {"name": "creds", "secret": {"k": "aGk="}},
                {"name": "share", "files": {"path": "share"}}],
    "containers": [
        {"name": "web", "image": "example.com/web:1", "env": [{"name": "MODE", "value": "prod"}],
         "mounts": [{"name": "cache", "mountPath": "/cache"}, {"name": "creds", "mountPath": "/creds"},
                    {"name": "share", "mountPath": "/share"}]},
        {"name": "worker", "image": "example.com/worker:2", "args": ["--queue", "a"]},
    ]}


def image(ref: str, layers: list[str], **config: object) -> ResolvedImage:
    return ResolvedImage(ref, "sha256:" + "d" * 64, ImageConfig(**config),
                         tuple(LayerInfo("sha256:" + "0" * 64, "m", 1, h, Path(f"/cache/{h}")) for h in layers))


IMAGES = {"web": image("example.com/web:1", ["a1" * 32, "a2" * 32], entrypoint=("/srv/web",),
                       env=("PATH=/usr/bin:/bin",), working_dir="/srv"),
          "worker": image("example.com/worker:2", ["b1" * 32], entrypoint=("/work",))}


@pytest.fixture
def spec(tmp_path: Path):
    (tmp_path / "share").mkdir()
    return validate_group(GROUP, base_dir=tmp_path)


def agent_view(engine: PolicyEngine, plan, devices: dict[str, str]) -> list[bool]:
    """Replay the plan's layer mounts, overlays and creates against the engine, the way the agent builds
    each input (its own base mounts plus the requested binds; root, the runtime's default capabilities)."""
    for d in plan.disks:
        assert engine.enforce(MountDeviceInput(d.target, devices.get(d.target, d.root_hash))).allowed, d.target
    out = []
    for c in plan.containers:
        assert engine.enforce(c.overlay).allowed
        profile = parse_profile(c.create.seccomp_profile) if c.create.seccomp_profile is not None else None
        check = CreateContainerInput.from_request(c.create, mounts=base_mounts() + c.create.mounts, user=ROOT,
                                                  groups=(NamedId("0", "root"),), capabilities=None,
                                                  seccomp_profile_sha256=measure(profile))
        decision = engine.enforce(check)
        assert decision.allowed, decision.reason
        out.append(decision.allowed)
    return out


def test_under_an_exported_aci_policy_the_launchers_requests_use_acis_sources_and_are_allowed(spec) -> None:
    rego = aci_policy(spec, IMAGES).encode()
    policy = parse_policy(rego)
    plan = build_plan(spec, IMAGES, {"share": ("cd" * 32, Path("/cache/share.img"))}, policy=policy)
    web = plan.containers[0].create
    assert [(m.destination, m.source, m.options) for m in web.mounts] == [
        ("/cache", "/run/parma/sandbox/tmp/atlas/emptydir/cache", ("rbind", "rshared", "rw")),
        ("/creds", "/run/parma/sandbox/tmp/atlas/secretsVolume/creds", ("rbind", "rshared", "ro")),
        ("/share", "/run/parma/sandbox/tmp/atlas/azureFileVolume/share", ("rbind", "rshared", "ro"))]
    # The share's device is not pinned by an ACI policy (its content is unmeasured on ACI too), yet it mounts.
    assert agent_view(PolicyEngine.from_bytes(rego), plan, {}) == [True, True]
    # Without a policy (a generated one), the plan keeps the project's own volume paths.
    own = build_plan(spec, IMAGES, {"share": ("cd" * 32, Path("/cache/share.img"))})
    assert own.containers[0].create.mounts[0].source == "/run/parma/volumes/cache"


def test_the_agent_resolves_acis_sources_only_to_volumes_of_that_kind() -> None:
    service = AgentService(host_data=lambda: None)  # type: ignore[arg-type, return-value]
    service.volumes = {"cache": Path("/run/parma/volumes/cache"), "creds": Path("/run/parma/volumes/creds")}
    service.volume_kinds = {"cache": MemoryVolumeKind.empty_dir, "creds": MemoryVolumeKind.secret}
    service.devices = {"/run/parma/volumes/share": object()}  # type: ignore[dict-item]

    def bind(source: str, options=("rbind", "rshared", "rw")):
        from sandbox.shared.messages import ContainerMount
        return service._bind_mounts((ContainerMount("/x", source, "bind", options),))[0]

    base = "/run/parma/sandbox/tmp/atlas"
    policy_view, path = bind(f"{base}/emptydir/cache")
    assert policy_view.source == f"{base}/emptydir/cache" and path == "/run/parma/volumes/cache"
    assert bind(f"{base}/secretsVolume/creds", ("rbind", "rshared", "ro"))[1] == "/run/parma/volumes/creds"
    assert bind(f"{base}/azureFileVolume/share")[1] == bind(f"{base}/gitRepoVolume/share")[1] == \
        "/run/parma/volumes/share"
    for source in (f"{base}/emptydir/creds", f"{base}/secretsVolume/cache", f"{base}/azureFileVolume/cache",
                   f"{base}/emptydir/nope", f"{base}/resolvconf/cache", f"{base}/emptydir/../cache",
                   f"{base}/emptydir/cache/sub"):
        with pytest.raises(ProtocolError, match="not a group volume"):
            bind(source)


def test_a_templates_ccepolicy_is_the_policy_up_runs_byte_for_byte(spec, tmp_path: Path) -> None:
    template = aci_template(spec, IMAGES)
    path = tmp_path / "azuredeploy.json"
    import json
    path.write_text(json.dumps(template.template))
    rego = policy_file_bytes(path)
    assert is_rego(rego) and rego == template.rego.encode()
    assert template_ccepolicy_of_file(path) == rego
    assert hashlib.sha256(rego).hexdigest() == template.host_data
    (tmp_path / "p.b64").write_text(template.template["resources"][0]["properties"]["confidentialComputeProperties"]
                                    ["ccePolicy"])
    assert policy_file_bytes(tmp_path / "p.b64") == rego
    (tmp_path / "empty.json").write_text(json.dumps(template.template).replace(
        template.template["resources"][0]["properties"]["confidentialComputeProperties"]["ccePolicy"], ""))
    assert template_ccepolicy_of_file(tmp_path / "empty.json") is None
    with pytest.raises(InputError, match="ccePolicy is empty"):
        policy_file_bytes(tmp_path / "empty.json")


def fragment_module(namespace: str = "side") -> bytes:
    return (f'package {namespace}\n\nsvn := "3"\nframework_version := "0.2.3"\n\ncontainers := []\n').encode()


def test_up_loads_given_fragments_and_says_why_it_loads_no_other(tmp_path: Path) -> None:
    issuer = make_test_issuer()
    imports = [{"issuer": issuer.did(), "feed": "example.com/side", "minimum_svn": "2", "includes": ["containers"]},
               {"issuer": "did:x509:0:sha256:I__iuL25oXEVFdTP_aBLx_eT1RPHbCQ_ECBQfYZpt9s::eku:1.3.6.1.4.1.311.76.59.1.3",
                "feed": INFRASTRUCTURE_FEED, "minimum_svn": "4", "includes": ["containers", "fragments"]}]
    doc = {"api_version": "0.10.0", "framework_version": "0.2.3", "containers": [],
           **{f: False for f in ("allow_properties_access", "allow_dump_stacks", "allow_runtime_logging",
                                 "allow_environment_variable_dropping", "allow_unencrypted_scratch",
                                 "allow_capability_dropping")}}
    policy = parse_policy(rego_module(doc, imports).encode())
    (tmp_path / "side.cose").write_bytes(sign_fragment(issuer, fragment_module(), feed="example.com/side", svn=3))
    plan = plan_fragments(policy, ["side.cose"], [], base_dir=tmp_path)
    assert [(f.namespace, f.feed) for f in plan.load] == [("side", "example.com/side")]
    assert len(plan.notes) == 1 and "infrastructure fragment" in plan.notes[0] and "--fragment" in plan.notes[0]
    dropped = plan_fragments(policy, [], [], base_dir=tmp_path, fetch=False)
    assert dropped.load == () and any("--drop-fragments" in n for n in dropped.notes)
    broken = bytearray((tmp_path / "side.cose").read_bytes())
    broken[-3] ^= 1
    (tmp_path / "broken.cose").write_bytes(bytes(broken))
    with pytest.raises(CheckFailed, match="broken.cose: the envelope's signature does not verify"):
        plan_fragments(policy, ["broken.cose"], [], base_dir=tmp_path)
    with pytest.raises(InputError, match="no such file"):
        plan_fragments(policy, ["./missing.cose"], [], base_dir=tmp_path)


def test_policy_commands_read_rego_as_it_is(spec, tmp_path: Path, capsys) -> None:
    """show, hash and check take the ccePolicy text itself (hash: of those bytes; check: fragment loads too)."""
    import json

    from tests.clirun import run_cli

    issuer = make_test_issuer()
    rego = aci_policy(spec, IMAGES).replace('"minimum_svn": "4"\n  }\n]', '"minimum_svn": "4"\n  }, {"feed": "f", '
                                            '"includes": ["containers"], "issuer": "' + issuer.did() + '", '
                                            '"minimum_svn": 1}\n]')
    (tmp_path / "p.rego").write_text(rego)
    code, out, err = run_cli(["policy", "hash", str(tmp_path / "p.rego")], capsys)
    assert code == 0 and out.strip() == hashlib.sha256(rego.encode()).hexdigest(), err
    code, out, err = run_cli(["policy", "show", str(tmp_path / "p.rego")], capsys)
    assert code == 0 and "fragments accepted: from " + issuer.did() in out and "container pause-container" in out, err
    trace = [{"ep": "load_fragment", "input": {"issuer": issuer.did(), "feed": "f", "rego": fragment_module().decode()}},
             {"ep": "load_fragment", "input": {"issuer": issuer.did(), "feed": "g", "rego": fragment_module().decode()}}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trace))
    code, out, err = run_cli(["policy", "check", str(tmp_path / "p.rego"), str(tmp_path / "t.jsonl")], capsys)
    assert code == 1 and "feed 'g' is not one the policy accepts" in out, out + err


def test_validate_reads_a_templates_ccepolicy(spec, tmp_path: Path, capsys) -> None:
    import json

    from tests.clirun import run_cli

    template = aci_template(spec, IMAGES).template
    for c in template["resources"][0]["properties"]["containers"]:
        c["properties"]["image"] = "example.com/x:1"      # a registry image: validate does not contact it
    (tmp_path / "azuredeploy.json").write_text(json.dumps(template))
    code, out, err = run_cli(["--format", "json", "validate", str(tmp_path / "azuredeploy.json"),
                              "--volume", f"share={tmp_path / 'share'}"], capsys)
    assert code == 0, err
    rego = policy_file_bytes(tmp_path / "azuredeploy.json")
    assert json.loads(out)["ccePolicy"]["host_data"] == hashlib.sha256(rego).hexdigest()
    props = template["resources"][0]["properties"]["confidentialComputeProperties"]
    props["ccePolicy"] = __import__("base64").b64encode(b"package policy\n\napi_version := 1\n").decode()
    (tmp_path / "azuredeploy.json").write_text(json.dumps(template))
    code, _, err = run_cli(["validate", str(tmp_path / "azuredeploy.json"), "--volume",
                            f"share={tmp_path / 'share'}"], capsys)
    assert code == 2 and "ccePolicy" in err, err
