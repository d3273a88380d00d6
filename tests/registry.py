"""A real OCI registry for tests: Debian's docker-registry (distribution 2.8) on 127.0.0.1:<free port>, with a
temporary storage directory, optionally behind token authentication served by a small token server here.

Token auth (distribution's "token" auth): the registry answers 401 with `WWW-Authenticate: Bearer realm=..`;
the token server checks basic credentials and issues an RS256 JWT whose `x5c` header carries a self-signed
certificate that the registry trusts through `rootcertbundle`.
"""

from __future__ import annotations

import base64
import datetime
import json
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from sandbox.run import find_tool, run, spawn

USER, PASSWORD = "alice", "s3cret"
SERVICE, ISSUER = "parma-test-registry", "parma-test-issuer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    server: ThreadingHTTPServer
    requests: list[dict[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def issue(self, scope: str, subject: str) -> str:
        access = []
        if scope:
            kind, name, actions = scope.split(":", 2)
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(sig)}"


def start_token_server() -> TokenServer:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "parma test token signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    holder: dict[str, TokenServer] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server API
            ts = holder["ts"]
            query = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
            auth = self.headers.get("Authorization", "")
            user = ""
            if auth.startswith("Basic "):
                u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                user = u if (u, p) == (USER, PASSWORD) else "!bad"
            ts.requests.append({**query, "user": user})
            if user in ("", "!bad"):
                self.send_response(401)
                self.end_headers()
                return
            body = json.dumps({"token": ts.issue(query.get("scope", ""), user), "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["ts"] = TokenServer(key, cert, server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return holder["ts"]


@dataclass
class Registry:
    host: str
    proc: subprocess.Popen[bytes]
    root: Path
    token: TokenServer | None = None

    def push(self, source: str, name: str, *, all_platforms: bool = False, docker_format: bool = False) -> str:
        """skopeo copy SOURCE to this registry as NAME (e.g. "app:1"); returns the reference to pull."""
        argv = [find_tool("skopeo"), "copy", "--insecure-policy", "--quiet", "--dest-tls-verify=false"]
        if not docker_format:
            argv.append("--preserve-digests")       # keep uncompressed layers uncompressed
        if all_platforms:
            argv.append("--all")
        if docker_format:
            argv += ["--format", "v2s2"]
        if self.token is not None:
            argv.append(f"--dest-creds={USER}:{PASSWORD}")
        run([*argv, source, f"docker://{self.host}/{name}"], timeout=120)
        return f"{self.host}/{name}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.token is not None:
            self.token.server.shutdown()
            self.token.server.server_close()


def start_registry(root: Path, *, token_auth: bool) -> Registry:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    token = start_token_server() if token_auth else None
    auth = ""
    if token is not None:
        bundle = root / "token-root.pem"
        bundle.write_bytes(token.cert.public_bytes(serialization.Encoding.PEM))
        auth = (f"auth:\n  token:\n    realm: {token.url}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
                f"    rootcertbundle: {bundle}\n")
    config = root / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
                      f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}")
    log = open(root / "registry.log", "wb")  # owned by the process
    proc = spawn(["docker-registry", "serve", config], stdout=log, stderr=log)
    reg = Registry(f"127.0.0.1:{port}", proc, root, token)
    deadline = time.monotonic() + 15
    while True:
        try:
            if requests.get(f"http://{reg.host}/v2/", timeout=1).status_code in (200, 401):
                return reg
        except requests.exceptions.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            reg.stop()
            raise RuntimeError(f"docker-registry did not start: {(root / 'registry.log').read_text()[-2000:]}")
        time.sleep(0.05)


def serve(tmp_path_factory: pytest.TempPathFactory, *, token_auth: bool) -> Iterator[Registry]:
    """Body of a module-scoped fixture: a registry for the module's tests, stopped afterwards."""
    reg = start_registry(tmp_path_factory.mktemp("token-registry" if token_auth else "registry"),
                         token_auth=token_auth)
    yield reg
    reg.stop()
