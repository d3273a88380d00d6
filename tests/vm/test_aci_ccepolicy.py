"""Acceptance (issue 15): an ACI ARM template with a ccePolicy runs locally under that very policy.

The template comes from `export aci` (ACI's runtime shapes: the pause container, ACI's volume sources,
ACI's env rules, the infrastructure fragment import), with one container moved out of the policy into
a signed fragment that the policy imports, and its images pointed at the local busybox layout (the
policy pins layers, not registry names). Then:

- `up` launches with HOST_DATA = SHA-256 of the Rego text, the agent reads and enforces it, loads the
  fragment given with --fragment (and not ACI's infrastructure fragment), and every container starts,
  the fragment's included; the volumes are bound from ACI's sources;
- `attest report` shows that HOST_DATA, and `attest verify --host-data` (and `--policy` with the
  template) passes with --allow-emulated;
- through the agent in the UVM, fragments from an issuer the policy does not name, with a lower SVN,
  or with a broken signature are refused, each with its own reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import pytest
from test_hello import BUSYBOX_LAYOUT, Cli, cli, ensure_example_image  # noqa: F401 - cli is a fixture

from sandbox.aci.rego import import_rego, rego_module
from sandbox.launch.agent_client import AgentClient
from sandbox.launch.pipeline import agent_sockets
from sandbox.shared.errors import PolicyDenied
from sandbox.shared.messages import LoadFragmentRequest

NAME = "aci-cce-vm"
FEED = "example.com/aci-cce/side"
SECRET = b"s3cret from a secret volume\n"


def group() -> dict:
    image = f"oci:{BUSYBOX_LAYOUT}:latest"
    return {"name": "aci-cce", "volumes": [{"name": "creds", "secret": {"token": base64.b64encode(SECRET).decode()}},
                                           {"name": "cache", "emptyDir": {}}],
            "containers": [
                {"name": "web", "image": image, "command": ["/bin/sh", "-c", "echo web-up > /cache/up; sleep 3600"],
                 "mounts": [{"name": "creds", "mountPath": "/creds"}, {"name": "cache", "mountPath": "/cache"}],
                 "execProcesses": [{"command": ["/bin/cat", "/creds/token"]}, {"command": ["/bin/cat", "/cache/up"]}]},
                {"name": "side", "image": image, "command": ["/bin/sh", "-c", "echo side-up; sleep 3600"]}]}


def fragment_module(container: dict, svn: int) -> str:
    return (f'package side\n\nsvn := "{svn}"\nframework_version := "0.2.3"\n\n'
            f'containers := {json.dumps([container], separators=(",", ":"), sort_keys=True)}\n')


@pytest.fixture(scope="module")
def deployment(cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811 - the imported fixture
    ensure_example_image()
    tmp = tmp_path_factory.mktemp("aci-cce")
    (tmp / "group.json").write_text(json.dumps(group()))
    r = cli("export", "aci", str(tmp / "group.json"), "--registry", "registry.example/aci-cce",
            "-o", str(tmp / "exported.json"), timeout=600)
    assert r.returncode == 0, r.stderr
    template = json.loads((tmp / "exported.json").read_text())
    props = template["resources"][0]["properties"]
    policy = import_rego(base64.b64decode(props["confidentialComputeProperties"]["ccePolicy"]).decode())
    doc = policy.to_document()
    side = next(c for c in doc["containers"] if c.get("name") == "side")
    doc["containers"].remove(side)
    # ACI encrypts scratch, and so do confcom's policies; this agent's encrypted scratch needs the group's
    # scratch disk, which this launch does not set up: allow the in-memory scratch.
    doc["allow_unencrypted_scratch"] = True
    for issuer in ("issuer", "other"):
        r = cli("policy", "fragment", "issuer", str(tmp / issuer), "--format", "json")
        assert r.returncode == 0, r.stderr
    issuer_did = _did(tmp / "issuer")
    fragments = [*doc["fragments"], {"issuer": issuer_did, "feed": FEED, "minimum_svn": "3", "includes": ["containers"]}]
    rego = rego_module(doc, fragments)
    props["confidentialComputeProperties"]["ccePolicy"] = base64.b64encode(rego.encode()).decode()
    for c in props["containers"]:      # the same layers, from the local layout
        c["properties"]["image"] = f"oci:{BUSYBOX_LAYOUT}:latest"
    path = tmp / "azuredeploy.json"
    path.write_text(json.dumps(template, indent=1))

    def signed(name: str, svn: int, key_dir: str = "issuer", header_svn: int | None = None) -> Path:
        (tmp / f"{name}.rego").write_text(fragment_module(side, svn))
        out = tmp / f"{name}.cose"
        r = cli("policy", "fragment", "sign", str(tmp / f"{name}.rego"), "--key", str(tmp / key_dir / "key.pem"),
                "--chain", str(tmp / key_dir / "chain.pem"), "--feed", FEED, "--svn", str(header_svn or svn),
                "-o", str(out))
        assert r.returncode == 0, r.stderr
        return out

    good = signed("side", 3)
    r = cli("--progress", "plain", "up", "-d", "--name", NAME, "--format", "json", "--fragment", str(good), str(path),
            timeout=900)
    assert r.returncode == 0, r.stderr
    info = json.loads(cli("inspect", NAME, "--format", "json").stdout)
    return {"summary": json.loads(r.stdout), "stderr": r.stderr, "rego": rego, "template": path, "tmp": tmp,
            "info": info, "signed": signed}


def _did(directory: Path) -> str:
    """The did:x509 of a test issuer made with `policy fragment issuer` (its chain.pem, the test EKU)."""
    from sandbox.aci.fragment_crypto import load_issuer
    return load_issuer(directory / "key.pem", directory / "chain.pem").did()


def test_up_runs_under_the_templates_ccepolicy_with_the_fragments_container(cli: Cli, deployment: dict) -> None:  # noqa: F811
    s = deployment["summary"]
    rego = deployment["rego"].encode()
    assert s["status"] == "running" and s["containers"] == ["web", "side"] and s["fragments"] == ["side"]
    assert s["policy_hash"] == hashlib.sha256(rego).hexdigest()
    assert (Path(deployment["info"]["state_dir"]) / "policy.rego").read_bytes() == rego
    assert "infrastructure fragment" in deployment["stderr"]      # not loaded, and said so
    deadline = time.monotonic() + 60
    while "side-up" not in (r := cli("logs", NAME, "side")).stdout and time.monotonic() < deadline:
        time.sleep(1)
    assert "side-up" in r.stdout, r.stderr


def test_volumes_are_bound_from_acis_sources(cli: Cli, deployment: dict) -> None:  # noqa: F811
    r = cli("exec", NAME, "web", "--", "/bin/cat", "/creds/token")
    assert r.returncode == 0 and r.stdout.encode() == SECRET, r.stderr
    deadline = time.monotonic() + 30
    while (r := cli("exec", NAME, "web", "--", "/bin/cat", "/cache/up")).returncode != 0 and time.monotonic() < deadline:
        time.sleep(1)
    assert r.stdout == "web-up\n", r.stderr


def test_the_report_carries_acis_host_data_and_verifies(cli: Cli, deployment: dict) -> None:  # noqa: F811
    host_data = hashlib.sha256(deployment["rego"].encode()).hexdigest()
    evidence = deployment["tmp"] / "evidence.json"
    r = cli("attest", "report", NAME, "-o", str(evidence), "--format", "json", timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["host_data"] == host_data
    measurement = deployment["info"]["expected_measurement"]
    for policy in (("--host-data", host_data), ("--policy", str(deployment["template"]))):
        r = cli("attest", "verify", str(evidence), *policy, "--measurement", measurement, "--allow-emulated",
                "--format", "json")
        assert r.returncode == 0, r.stdout + r.stderr
    r = cli("attest", "verify", str(evidence), "--host-data", "00" * 32, "--measurement", measurement,
            "--allow-emulated")
    assert r.returncode == 1


def test_the_agent_refuses_bad_fragments_each_with_its_own_reason(deployment: dict) -> None:
    tmp, signed = deployment["tmp"], deployment["signed"]
    broken = bytearray(signed("broken", 3).read_bytes())
    broken[-7] ^= 0x01
    cases = [(signed("stranger", 3, key_dir="other").read_bytes(), "is not one the policy accepts fragments from"),
             (signed("old", 2).read_bytes(), "the envelope's SVN 2 is below the minimum_svn 3"),
             (bytes(broken), "the envelope's signature does not verify")]
    with AgentClient.connect(agent_sockets(Path(deployment["info"]["state_dir"]))) as client:
        for envelope, reason in cases:
            with pytest.raises(PolicyDenied) as e:
                client.call(LoadFragmentRequest(envelope))
            assert reason in e.value.message and "load_fragment denied" in e.value.message
        again = client.call(LoadFragmentRequest((tmp / "side.cose").read_bytes()))
        assert again.namespace == "side"


def test_down(cli: Cli) -> None:  # noqa: F811
    r = cli("down", NAME)
    assert r.returncode == 0, r.stderr
