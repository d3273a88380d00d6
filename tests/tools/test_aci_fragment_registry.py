"""Fragments attached to an image in a real registry (Debian's docker-registry), found and verified."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from sandbox.aci.fragment_crypto import make_test_issuer, sign_fragment
from sandbox.aci.fragment_oci import fetch_fragments
from sandbox.shared.cose import FRAGMENT_ARTIFACT_TYPE, FRAGMENT_MEDIA_TYPE
from tests.clirun import run_cli
from tests.registry import Registry, serve

pytestmark = pytest.mark.tools

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
EMPTY = b"{}"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from serve(tmp_path_factory, token_auth=False)


def push_blob(reg: Registry, repo: str, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = requests.post(f"http://{reg.host}/v2/{repo}/blobs/uploads/", timeout=10)
    location = start.headers["Location"]
    url = location if location.startswith("http") else f"http://{reg.host}{location}"
    sep = "&" if "?" in url else "?"
    done = requests.put(f"{url}{sep}digest={digest}", data=data, timeout=10,
                        headers={"Content-Type": "application/octet-stream"})
    assert done.status_code == 201, done.text
    return {"digest": digest, "size": len(data)}


def push_manifest(reg: Registry, repo: str, ref: str, manifest: dict, media_type: str = OCI_MANIFEST) -> dict:
    raw = json.dumps(manifest).encode()
    resp = requests.put(f"http://{reg.host}/v2/{repo}/manifests/{ref}", data=raw, timeout=10,
                        headers={"Content-Type": media_type})
    assert resp.status_code == 201, resp.text
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(raw).hexdigest(), "size": len(raw)}


def attach(reg: Registry, repo: str, subject: dict, envelope: bytes) -> dict:
    """What `oras attach --artifact-type application/x-ms-ccepolicy-frag` writes on a registry without the
    referrers API: the artifact manifest, and the referrers index under the tag sha256-<hex>."""
    config = push_blob(reg, repo, EMPTY) | {"mediaType": "application/vnd.oci.empty.v1+json"}
    layer = push_blob(reg, repo, envelope) | {"mediaType": FRAGMENT_MEDIA_TYPE}
    desc = push_manifest(reg, repo, "fragment", {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": FRAGMENT_ARTIFACT_TYPE,
        "config": config, "layers": [layer], "subject": subject})
    return desc | {"artifactType": FRAGMENT_ARTIFACT_TYPE}


def test_attached_fragment_is_found_verified_and_written(registry: Registry, tmp_path: Path, capsys) -> None:
    repo = "shop/web"
    config = push_blob(registry, repo, b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers",'
                                       b'"diff_ids":[]}}') | {"mediaType": "application/vnd.oci.image.config.v1+json"}
    image = push_manifest(registry, repo, "1", {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
                                                "layers": []})
    issuer = make_test_issuer()
    rego = b'package sidecar\n\nsvn := "2"\nframework_version := "0.2.3"\n\ncontainers := []\n'
    envelope = sign_fragment(issuer, rego, feed=f"{registry.host}/{repo}")
    artifact = attach(registry, repo, image, envelope)
    push_manifest(registry, repo, image["digest"].replace(":", "-"),
                  {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                   "manifests": [artifact]}, "application/vnd.oci.image.index.v1+json")
    found = fetch_fragments(f"{registry.host}/{repo}:1")
    assert [f.envelope for f in found] == [envelope] and found[0].manifest_digest == artifact["digest"]
    assert fetch_fragments(f"{registry.host}/{repo}@{image['digest']}")[0].envelope == envelope
    code, out, err = run_cli(["--format", "json", "policy", "fragment", "fetch", f"{registry.host}/{repo}:1",
                              "-o", str(tmp_path / "frags")], capsys)
    assert code == 0, err
    [summary] = json.loads(out)
    assert summary["issuer"] == issuer.did() and summary["namespace"] == "sidecar"
    assert (tmp_path / "frags" / "0.cose").read_bytes() == envelope


def test_image_without_fragments(registry: Registry, tmp_path: Path, capsys) -> None:
    repo = "plain/app"
    config = push_blob(registry, repo, b'{"os":"linux"}') | {"mediaType": "application/vnd.oci.image.config.v1+json"}
    push_manifest(registry, repo, "1", {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": []})
    assert fetch_fragments(f"{registry.host}/{repo}:1") == []
    code, _, err = run_cli(["policy", "fragment", "fetch", f"{registry.host}/{repo}:1", "-o", str(tmp_path)], capsys)
    assert code == 1 and "no policy fragment is attached" in err


def push_standalone(reg: Registry, repo: str, tag: str, envelope: bytes) -> dict:
    """What `oras push REF --artifact-type application/x-ms-ccepolicy-frag FILE:application/cose-x509+rego`
    writes (confcom's `fragment push`): the manifest at the reference is the artifact itself."""
    config = push_blob(reg, repo, EMPTY) | {"mediaType": "application/vnd.oci.empty.v1+json"}
    layer = push_blob(reg, repo, envelope) | {"mediaType": FRAGMENT_MEDIA_TYPE}
    return push_manifest(reg, repo, tag, {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                          "artifactType": FRAGMENT_ARTIFACT_TYPE, "config": config, "layers": [layer]})


def test_up_finds_standalone_and_attached_fragments_of_the_policys_imports(registry: Registry, tmp_path: Path) -> None:
    """plan_fragments, as `up` runs it: the standalone fragment at an import's feed, and a fragment attached to
    one of the group's images, each matched to its import by issuer and feed; other imports are reported."""
    from sandbox.aci.fragment_sources import plan_fragments
    from sandbox.aci.rego import rego_module
    from sandbox.shared.policy import parse_policy

    issuer = make_test_issuer()
    standalone_feed, attached_feed = f"{registry.host}/frags/side:1", "contoso/attached"
    rego = b'package side\n\nsvn := "2"\nframework_version := "0.2.3"\n\ncontainers := []\n'
    push_standalone(registry, "frags/side", "1", sign_fragment(issuer, rego, feed=standalone_feed))
    config = push_blob(registry, "shop/api", b'{"os":"linux"}') | {"mediaType": "application/vnd.oci.image.config.v1+json"}
    image = push_manifest(registry, "shop/api", "1", {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
                                                      "layers": []})
    artifact = attach(registry, "shop/api", image,
                      sign_fragment(issuer, rego.replace(b"package side", b"package other"), feed=attached_feed))
    push_manifest(registry, "shop/api", image["digest"].replace(":", "-"),
                  {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                   "manifests": [artifact]}, "application/vnd.oci.image.index.v1+json")
    imports = [{"issuer": issuer.did(), "feed": feed, "minimum_svn": "1", "includes": ["containers"]}
               for feed in (standalone_feed, attached_feed, f"{registry.host}/frags/missing:1")]
    doc = {"api_version": "0.10.0", "framework_version": "0.2.3", "containers": [],
           **{f: False for f in ("allow_properties_access", "allow_dump_stacks", "allow_runtime_logging",
                                 "allow_environment_variable_dropping", "allow_unencrypted_scratch",
                                 "allow_capability_dropping")}}
    policy = parse_policy(rego_module(doc, imports).encode())
    assert [f.envelope for f in fetch_fragments(standalone_feed)] and fetch_fragments(standalone_feed)[0].manifest_digest
    plan = plan_fragments(policy, [], [f"{registry.host}/shop/api:1"], base_dir=tmp_path)
    assert sorted((f.namespace, f.feed) for f in plan.load) == [("other", attached_feed), ("side", standalone_feed)]
    assert len(plan.notes) == 1 and "frags/missing:1" in plan.notes[0] and "was found" in plan.notes[0]
