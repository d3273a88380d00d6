"""The registry client's failure handling against a small scripted registry on 127.0.0.1: retries with
backoff, broken downloads, basic auth, wrong content, and where credentials may (not) be sent."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sandbox.images import registry as R
from sandbox.images.resolve import pull_image, resolve_image
from sandbox.images.store import BlobStore, DigestMismatch
from sandbox.shared.errors import NetworkError
from tests.imagefixtures import oci_image


class FakeRegistry:
    """Serves one OCI layout as repository 'app', tag 'latest'; `faults` script misbehaviour per path."""

    def __init__(self, layout: Path) -> None:
        self.layout = layout
        self.faults: dict[str, list[str]] = {}      # path suffix -> actions consumed one per request
        self.basic: tuple[str, str] | None = None
        self.hits: list[str] = []
        index = json.loads((layout / "index.json").read_text())
        self.tag_digest = index["manifests"][0]["digest"]
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server API
                outer.hits.append(self.path)
                if outer.basic:
                    want = "Basic " + base64.b64encode(":".join(outer.basic).encode()).decode()
                    if self.headers.get("Authorization") != want:
                        self.send_response(401)
                        self.send_header("WWW-Authenticate", 'Basic realm="fake"')
                        self.end_headers()
                        return
                for suffix, actions in outer.faults.items():
                    if self.path.endswith(suffix) and actions:
                        action = actions.pop(0)
                        if action.isdigit():
                            self.send_response(int(action))
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            return
                        if action == "cut":
                            body = outer.body(self.path)
                            self.send_response(200)
                            self.send_header("Content-Length", str(len(body)))
                            self.end_headers()
                            self.wfile.write(body[:len(body) // 2])
                            self.wfile.flush()
                            self.connection.close()
                            return
                        if action == "wrong":
                            body = b"x" * len(outer.body(self.path))
                            self.send_response(200)
                            self.send_header("Content-Length", str(len(body)))
                            self.end_headers()
                            self.wfile.write(body)
                            return
                body = outer.body(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                if "/manifests/" in self.path:
                    mt = json.loads(body).get("mediaType", "application/vnd.oci.image.manifest.v1+json")
                    self.send_header("Content-Type", mt)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def body(self, path: str) -> bytes | None:
        if path == "/v2/":
            return b"{}"
        ref = path.rsplit("/", 1)[-1]
        if "/manifests/" in path and ref == "latest":
            ref = self.tag_digest
        blob = self.layout / "blobs" / "sha256" / ref.removeprefix("sha256:")
        return blob.read_bytes() if ref.startswith("sha256:") and blob.is_file() else None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake(tmp_path: Path, isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRegistry]:
    monkeypatch.setattr(R, "BACKOFF", 0.01)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    oci_image(tmp_path / "img", compressions=("gzip", "gzip", "gzip"))
    reg = FakeRegistry(tmp_path / "img")
    yield reg
    reg.close()


def layer_digests(reg: FakeRegistry) -> list[str]:
    manifest = json.loads(reg.body(f"/v2/app/manifests/{reg.tag_digest}"))
    return [d["digest"] for d in manifest["layers"]]


def test_pull_and_retry_transient_errors(fake: FakeRegistry, tmp_path: Path) -> None:
    first = layer_digests(fake)[0]
    fake.faults = {"/manifests/latest": ["503", "429"], f"/blobs/{first}": ["500", "502"]}
    image = resolve_image(f"{fake.host}/app:latest", base_dir=tmp_path)
    assert image.layer_hashes == resolve_image("oci:img", base_dir=tmp_path).layer_hashes
    assert sum(p.endswith("/manifests/latest") for p in fake.hits) == 3


def test_persistent_errors_give_up(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.faults = {"/manifests/latest": ["503"] * 10}
    with pytest.raises(NetworkError, match="HTTP 503"):
        resolve_image(f"{fake.host}/app:latest", base_dir=tmp_path)
    assert sum(p.endswith("/manifests/latest") for p in fake.hits) == R.RETRIES + 1


def test_broken_download_is_retried_and_never_kept(fake: FakeRegistry, tmp_path: Path) -> None:
    second = layer_digests(fake)[1]
    fake.faults = {f"/blobs/{second}": ["cut"]}
    pulled = pull_image(f"{fake.host}/app:latest", base_dir=tmp_path)
    assert pulled.converted == 3
    fake.faults = {f"/blobs/{second}": ["cut", "cut", "cut"]}
    BlobStore().path(second).unlink()
    for p in (tmp_path / "cache" / "layers").rglob("*"):
        if p.is_file():
            p.unlink()
    with pytest.raises(NetworkError, match="broke off"):
        pull_image(f"{fake.host}/app:latest", base_dir=tmp_path)
    assert not BlobStore().has(second)
    assert not [p for p in BlobStore().blobs.iterdir() if p.name.startswith(".")]


def test_wrong_content_is_refused(fake: FakeRegistry, tmp_path: Path) -> None:
    third = layer_digests(fake)[2]
    fake.faults = {f"/blobs/{third}": ["wrong"]}
    with pytest.raises(DigestMismatch, match="hashes to"):
        resolve_image(f"{fake.host}/app:latest", base_dir=tmp_path)
    assert not BlobStore().has(third)


def test_pinned_digest_mismatch(fake: FakeRegistry, tmp_path: Path) -> None:
    """Asked for a manifest by digest, the registry sends other bytes: the digest check refuses them."""
    digest = fake.tag_digest
    fake.faults = {f"/manifests/{digest}": ["wrong"]}
    with pytest.raises(DigestMismatch, match="hashes to"):
        resolve_image(f"{fake.host}/app@{digest}", base_dir=tmp_path)


def test_basic_auth_from_docker_config(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.basic = ("bob", "pw")
    with pytest.raises(NetworkError, match="requires a login"):
        resolve_image(f"{fake.host}/app:latest", base_dir=tmp_path)
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_text(json.dumps(
        {"auths": {f"http://{fake.host}": {"username": "bob", "password": "pw"}}}))
    assert resolve_image(f"{fake.host}/app:latest", base_dir=tmp_path).layers


def test_credentials_lookup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tmp_path / "config.json"
    hub = base64.b64encode(b"u:p:with:colons").decode()
    cfg.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": hub},
                                         "ghcr.io": {"auth": base64.b64encode(b"g:h").decode()}},
                               "credHelpers": {"quay.io": "secretservice"}}))
    assert R.load_credentials("docker.io", cfg) == R.Credentials("u", "p:with:colons")
    assert R.load_credentials("ghcr.io", cfg) == R.Credentials("g", "h")
    assert R.load_credentials("quay.io", cfg) is None
    assert any("credential helper" in r.getMessage() for r in caplog.records)
    assert R.load_credentials("x.io", tmp_path / "missing.json") is None


def test_insecure_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    assert R.insecure_allowed("localhost:5000") and R.insecure_allowed("127.0.0.1") and R.insecure_allowed("[::1]:5000")
    assert not R.insecure_allowed("registry.example.com")
    monkeypatch.setenv(R.INSECURE_ENV, "registry.example.com:5000, other.lan")
    assert R.insecure_allowed("registry.example.com:5000") and R.insecure_allowed("other.lan:443")
    assert not R.insecure_allowed("registry.example.com:6000")


def test_no_credentials_to_a_plain_http_token_service() -> None:
    client = R.RegistryClient("example.com", "example.com", credentials=R.Credentials("u", "p"))
    with pytest.raises(NetworkError, match="over http"):
        client._authenticate('Bearer realm="http://auth.example.com/token",service="x"', "repository:a:pull")
    assert R.parse_challenge('Bearer realm="https://a/t",service="s",scope="repository:x:pull"') == (
        "bearer", {"realm": "https://a/t", "service": "s", "scope": "repository:x:pull"})
