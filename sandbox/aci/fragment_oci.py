"""Policy fragments in a registry, as confcom puts them there: attached to images, or standalone.

`az confcom acifragmentgen --upload-fragment` runs `oras attach --artifact-type
application/x-ms-ccepolicy-frag IMAGE FRAGMENT.cose:application/cose-x509+rego`: an artifact manifest
whose `subject` is the image's manifest, with one layer, the COSE_Sign1 envelope. It is found through
the registry's referrers API (OCI distribution 1.1, `GET /v2/<name>/referrers/<digest>`) or, on
registries without it, the referrers tag `sha256-<hex>` (the spec's fallback, which oras writes).
A standalone fragment is pushed to its feed (`oras push FEED --artifact-type
application/x-ms-ccepolicy-frag FRAGMENT.cose:application/cose-x509+rego`, confcom's `fragment push`):
the manifest at the feed's reference is itself the artifact. Everything is read through the project's
registry client and checked against its digest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sandbox.images.reference import Transport, parse_reference
from sandbox.images.registry import RegistryClient
from sandbox.shared.cose import FRAGMENT_ARTIFACT_TYPE, FRAGMENT_MEDIA_TYPE
from sandbox.shared.errors import InputError, NetworkError, NotFoundError

INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
MAX_FRAGMENT = 4 << 20


@dataclass(frozen=True)
class AttachedFragment:
    manifest_digest: str        # the artifact manifest that carries it
    envelope: bytes


def _json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError:
        raise NetworkError(f"{what} is not JSON") from None
    if not isinstance(doc, dict):
        raise NetworkError(f"{what} is not a JSON object")
    return doc


def _referrers(client: RegistryClient, repository: str, digest: str) -> list[dict[str, Any]]:
    scope = f"repository:{repository}:pull"
    resp = client.request("GET", f"/v2/{repository}/referrers/{digest}?artifactType={FRAGMENT_ARTIFACT_TYPE}",
                          scope, headers={"Accept": INDEX_MEDIA_TYPE})
    if resp.status_code == 200:
        index = _json(resp.content, f"referrers of {repository}@{digest}")
    else:
        resp.close()
        try:   # the referrers tag schema: sha256-<hex>
            raw, _ = client.get_manifest(repository, digest.replace(":", "-"))
        except NotFoundError:
            return []
        index = _json(raw, f"referrers tag of {repository}@{digest}")
    manifests = index.get("manifests")
    return [m for m in manifests if isinstance(m, dict)] if isinstance(manifests, list) else []


def _blob(client: RegistryClient, repository: str, digest: str, limit: int) -> bytes:
    data = bytearray()
    for chunk in client.blob_chunks(repository, digest):
        data += chunk
        if len(data) > limit:
            raise NetworkError(f"blob {digest} of {repository} is larger than {limit} bytes")
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise NetworkError(f"blob {digest} of {repository} does not match its digest")
    return bytes(data)


def _envelopes(client: RegistryClient, repository: str, manifest: dict[str, Any]) -> list[bytes]:
    return [_blob(client, repository, layer["digest"], MAX_FRAGMENT) for layer in manifest.get("layers") or ()
            if isinstance(layer, dict) and layer.get("mediaType") == FRAGMENT_MEDIA_TYPE
            and isinstance(layer.get("digest"), str)]


def _is_fragment_artifact(manifest: dict[str, Any]) -> bool:
    return (manifest.get("artifactType") or (manifest.get("config") or {}).get("mediaType")) == FRAGMENT_ARTIFACT_TYPE


def fetch_fragments(image: str) -> list[AttachedFragment]:
    """The fragment envelopes at a registry reference: the artifact itself when the reference is a
    standalone fragment (confcom's `fragment push`), else every fragment attached to the image there;
    [] when there are none."""
    ref = parse_reference(image)
    if ref.transport != Transport.registry:
        raise InputError(f"{image}: fragments are attached to images in a registry",
                         hint="for a local envelope, pass the .cose file itself")
    client = RegistryClient(ref.domain, ref.api_host)
    raw, _ = client.get_manifest(ref.path, ref.reference)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    if ref.digest and ref.digest != digest:
        raise NetworkError(f"{image}: the registry's manifest does not match the digest asked for")
    top = _json(raw, f"manifest of {image}")
    if _is_fragment_artifact(top):
        return [AttachedFragment(digest, envelope) for envelope in _envelopes(client, ref.path, top)]
    out = []
    for desc in _referrers(client, ref.path, digest):
        if desc.get("artifactType") not in (None, FRAGMENT_ARTIFACT_TYPE) or not isinstance(desc.get("digest"), str):
            continue
        mraw, _ = client.get_manifest(ref.path, desc["digest"])
        if "sha256:" + hashlib.sha256(mraw).hexdigest() != desc["digest"]:
            raise NetworkError(f"referrer {desc['digest']} of {image} does not match its digest")
        manifest = _json(mraw, f"referrer {desc['digest']}")
        if not _is_fragment_artifact(manifest) or (manifest.get("subject") or {}).get("digest") != digest:
            continue
        out += [AttachedFragment(desc["digest"], envelope) for envelope in _envelopes(client, ref.path, manifest)]
    return out
