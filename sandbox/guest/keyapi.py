"""The in-guest attestation and key-release API for containers, and the agent's key broker client.

Modelled on Azure's confidential-sidecar-containers `skr` API (HTTP + JSON), served by the agent on
the unix socket ATTEST_API_SOCKET. The launcher bind-mounts its directory only into containers whose
policy entry lists that mount (group.json `attestationApi: true`), so the execution policy decides
which containers may attest or ask for keys; every other container has no path to the socket.

  GET  /status        -> {"message": "STATUS OK", "attestation": backend, "key_brokers": n,
                          "broker_configured": bool}
  POST /attest/raw    {"runtime_data": b64} -> {"report": hex, "cert_table": b64, "backend": ...}
                      REPORT_DATA = SHA-256(runtime_data) || 32 zero bytes, as the sidecar does. The
                      zero half keeps these reports apart from the agent's own key-binding reports,
                      whose REPORT_DATA is a full SHA-512 (a container cannot impersonate the agent).
  POST /key/release   {"name": NAME} -> {"name": NAME, "secret": b64}
                      (or the raw bytes with `Accept: application/octet-stream`)
  errors              -> {"error": "..."}: 400 bad request, 403 the broker refused (its reason),
                         502 broker unreachable, not trusted or its location refused, 503 not configured

For /key/release the agent runs the broker protocol itself (sandbox/shared/kbs_protocol.py) with its
own runtime key: challenge, evidence with REPORT_DATA = SHA-512(nonce || runtime key), then the
sealed secret, which it opens only if the broker's key is pinned by the policy (`key_brokers`). The
broker's address comes from the host (fw_cfg FW_CFG_KBS_URL) and is not trusted: a wrong address
can only make the release fail, and one that points into the guest is refused (broker_address.py).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import os
import socket
import socketserver
import struct
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from sandbox.guest import keys, snp_report
from sandbox.guest.broker_address import BrokerAddressRefused, CheckedConnection
from sandbox.guest.keys import CryptoError, RuntimeKey
from sandbox.shared import sha2
from sandbox.shared.bounded_server import BoundedThreadingMixIn
from sandbox.shared.errors import InputError, KeyReleaseRefused, NetworkError, SandboxError
from sandbox.shared.jsonstrict import JsonObject, loads_bounded
from sandbox.shared.kbs_protocol import (
    ATTEST_API_SOCKET,
    CHALLENGE_PATH,
    FW_CFG_KBS_URL,
    KEY_SIZE,
    MAX_RESPONSE_BYTES,
    RELEASE_PATH,
    BrokerNotTrusted,
    Sealed,
    check_secret_name,
    header,
    key_info,
    key_pin,
    signed_bytes,
)
from sandbox.shared.snp.binding import MAX_NONCE, MIN_NONCE

MAX_BODY = 64 * 1024
READ_TIMEOUT = 10.0
BROKER_TIMEOUT = 60.0   # the broker may fetch a VCEK from AMD's KDS; a TCG guest is slow too
MAX_CONNECTIONS = 8
FW_CFG_DIR = Path("/sys/firmware/qemu_fw_cfg/by_name")


class NotConfigured(SandboxError):
    """The API cannot do this here: no key broker pinned or located, no attestation interface."""


def read_broker_url(fw_cfg_dir: Path = FW_CFG_DIR) -> str | None:
    try:
        raw = (fw_cfg_dir / FW_CFG_KBS_URL / "raw").read_bytes()
    except OSError:
        return None
    text = raw.rstrip(b"\0").decode("utf-8", "replace").strip()
    return text or None


# --- the agent's key broker client -----------------------------------------------------------------

ConnectionFactory = Callable[..., http.client.HTTPConnection]  # (host, port, timeout=) -> connection


def _post_json(url: str, path: str, body: Mapping[str, object], timeout: float,
               connection: ConnectionFactory) -> tuple[int, Any]:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 80
    except ValueError:
        parts, port = None, 0
    if parts is None or parts.scheme != "http" or not parts.hostname:
        raise NotConfigured(f"key broker URL {url[:200]!r} is not http://HOST[:PORT]",
                            hint="the exchange is authenticated end to end; plain HTTP is all it needs")
    conn = connection(parts.hostname, port, timeout=timeout)
    try:
        data = json.dumps(body).encode()
        conn.request("POST", parts.path.rstrip("/") + path, body=data,
                     headers={"Content-Type": "application/json", "Content-Length": str(len(data))})
        response = conn.getresponse()
        raw = response.read(MAX_RESPONSE_BYTES + 1)
        status = response.status
    except (OSError, http.client.HTTPException) as e:
        raise NetworkError(f"key broker {url} unreachable: {e}") from None
    finally:
        conn.close()
    if len(raw) > MAX_RESPONSE_BYTES:
        raise NetworkError(f"key broker {url}: response larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        return status, loads_bounded(raw, f"key broker {url}: HTTP {status} body")
    except InputError as e:
        raise NetworkError(e.message) from None


def _broker_error(status: int, doc: Any, url: str) -> SandboxError:
    message = doc.get("message") if isinstance(doc, dict) else None
    message = str(message)[:1000] if message else f"HTTP {status}"
    if status == HTTPStatus.FORBIDDEN:
        return KeyReleaseRefused(f"the key broker refused: {message}")
    return NetworkError(f"key broker {url}: HTTP {status}: {message}")


EvidenceFn = Callable[[bytes], Any]  # nonce -> ReportEvidence


def open_sealed(sealed: Sealed, *, secret: str, nonce: bytes, runtime_key: RuntimeKey,
                pins: frozenset[str] | set[str]) -> bytes:
    """Authenticate the broker and the exchange, then decrypt (the format: kbs_protocol.py). The
    header is rebuilt from what this guest asked for, never taken from the response."""
    pin = key_pin(sealed.broker_public_key)
    if pin not in pins:
        raise BrokerNotTrusted(f"the response comes from key broker {pin[:16]}..., which the execution policy "
                               "does not pin (key_brokers)",
                               hint="a host can run its own broker; only the policy's brokers are trusted")
    aad = header(secret=secret, nonce=nonce, runtime_public_key=runtime_key.public_der,
                 ephemeral_public_key=sealed.ephemeral_public_key, broker_public_key=sealed.broker_public_key)
    try:
        signed = keys.verify_p384(sealed.broker_public_key, signed_bytes(aad, sealed.iv, sealed.ciphertext),
                                  sealed.signature)
    except CryptoError as e:
        raise BrokerNotTrusted(f"the broker's key is malformed: {e}") from None
    if not signed:
        raise BrokerNotTrusted("the broker's signature does not verify for this request "
                               "(wrong secret, nonce or runtime key, or altered in transit)")
    try:
        shared_secret = runtime_key.exchange(sealed.ephemeral_public_key)
    except CryptoError as e:
        raise BrokerNotTrusted(f"the broker's ephemeral key is malformed: {e}") from None
    key = keys.hkdf_sha384(shared_secret, salt=nonce, info=key_info(aad), length=KEY_SIZE)
    try:
        return keys.aes_gcm_decrypt(key, sealed.iv, sealed.ciphertext, aad)
    except CryptoError as e:
        raise BrokerNotTrusted(f"the sealed secret does not decrypt: {e}") from None


def release_secret(url: str, name: str, *, evidence_for: EvidenceFn, runtime_key: RuntimeKey,
                   pins: frozenset[str], timeout: float = BROKER_TIMEOUT,
                   connection: ConnectionFactory = CheckedConnection) -> bytes:
    """Run the broker protocol for secret `name` and return its value, authenticated by a pinned key.

    `connection` refuses broker locations inside the guest (broker_address.py); tests on the host
    pass http.client.HTTPConnection to reach a broker on 127.0.0.1."""
    check_secret_name(name)
    if not pins:
        raise NotConfigured("the execution policy pins no key broker (key_brokers), so no secret can be trusted",
                            hint="generate the policy with 'policy gen --kbs URL' or 'up --kbs URL'")
    status, doc = _post_json(url, CHALLENGE_PATH, {}, timeout, connection)
    if status != HTTPStatus.OK:
        raise _broker_error(status, doc, url)
    try:
        nonce = bytes.fromhex(doc["nonce"])
    except (TypeError, KeyError, ValueError):
        raise NetworkError(f"key broker {url}: the challenge has no valid nonce") from None
    if not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise NetworkError(f"key broker {url}: a {len(nonce)}-byte nonce (expected {MIN_NONCE}..{MAX_NONCE})")
    evidence = evidence_for(nonce)
    status, doc = _post_json(url, RELEASE_PATH, {"secret": name, "evidence": evidence.to_payload()}, timeout,
                             connection)
    if status != HTTPStatus.OK:
        raise _broker_error(status, doc, url)
    if not isinstance(doc, dict) or doc.get("secret") != name:
        raise NetworkError(f"key broker {url}: the response is not for secret {name!r}")
    try:
        sealed = Sealed.from_payload(doc.get("sealed"))
    except InputError as e:
        raise NetworkError(f"key broker {url}: malformed sealed secret: {e}") from None
    return open_sealed(sealed, secret=name, nonce=nonce, runtime_key=runtime_key, pins=pins)


# --- the API server -------------------------------------------------------------------------------

@dataclass
class KeyApiConfig:
    """What the API needs from the agent. Callables, because the policy arrives after the API starts."""

    pins: Callable[[], frozenset[str]]                       # key_brokers of the installed policy
    broker_url: Callable[[], str | None] = read_broker_url
    paths: snp_report.GuestPaths = field(default_factory=lambda: snp_report.DEFAULT_PATHS)
    runtime_key: Callable[[], RuntimeKey] = snp_report.runtime_key
    log: Callable[[str], None] = lambda message: None
    broker_connection: ConnectionFactory = CheckedConnection  # refuses locations inside the guest

    def evidence_for(self, nonce: bytes) -> Any:
        return snp_report.evidence_for(nonce, key=self.runtime_key(), paths=self.paths)


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _status_for(error: SandboxError) -> HTTPStatus:
    if isinstance(error, KeyReleaseRefused):
        return HTTPStatus.FORBIDDEN
    if isinstance(error, NotConfigured):
        return HTTPStatus.SERVICE_UNAVAILABLE
    if isinstance(error, BrokerNotTrusted | BrokerAddressRefused | NetworkError):
        return HTTPStatus.BAD_GATEWAY
    if isinstance(error, InputError):
        return HTTPStatus.BAD_REQUEST
    return HTTPStatus.SERVICE_UNAVAILABLE  # AttestationError and the like: the guest cannot attest


def peer_container(sock: socket.socket) -> str:
    """The container (crun cgroup /parma/<id>) of the process at the other end, for the agent's log."""
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            path = line.split(":", 2)[-1]
            if path.startswith("/parma/"):
                return path.split("/")[2]
        return f"pid {pid}"
    except (OSError, struct.error, IndexError):
        return "unknown"


class _Handler(BaseHTTPRequestHandler):
    server: KeyApiServer
    timeout = READ_TIMEOUT
    server_version = "parma-attestation-api/1"
    sys_version = ""

    def address_string(self) -> str:  # unix sockets have no address; BaseHTTPRequestHandler indexes it
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
        pass

    def _body(self) -> JsonObject:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required") from None
        if not 0 <= length <= MAX_BODY:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body must be at most {MAX_BODY} bytes")
        raw = self.rfile.read(length)
        try:
            doc = loads_bounded(raw, "the body") if raw.strip() else {}
        except InputError as e:
            raise ApiError(HTTPStatus.BAD_REQUEST, e.message) from None
        if not isinstance(doc, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return doc

    def _reply(self, status: HTTPStatus, doc: Mapping[str, object] | None = None,
               raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(doc).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        routes = {("GET", "/status"): self._status, ("POST", "/attest/raw"): self._attest_raw,
                  ("POST", "/key/release"): self._key_release}
        handler = routes.get((method, path))
        try:
            if handler is None:
                known = {p for _, p in routes}
                raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED if path in known else HTTPStatus.NOT_FOUND,
                               f"{method} {path[:200]} is not an endpoint of this API "
                               "(GET /status, POST /attest/raw, POST /key/release)")
            handler()
        except ApiError as e:
            self.close_connection = True
            self._reply(e.status, {"error": e.message})
        except SandboxError as e:
            self.close_connection = True
            self._reply(_status_for(e), {"error": e.message + (f" (hint: {e.hint})" if e.hint else "")})
        except Exception as e:  # a bug must not take the API (or the agent) down
            self.close_connection = True
            self.server.config.log(f"attestation API: internal error: {type(e).__name__}: {e}")
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(e).__name__}"})

    def do_GET(self) -> None:  # http.server's naming
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    # -- endpoints ------------------------------------------------------------------------------

    def _status(self) -> None:
        config = self.server.config
        try:
            backend = snp_report.select_backend(config.paths).value
        except SandboxError as e:
            backend = f"unavailable: {e.message}"
        self._reply(HTTPStatus.OK, {"message": "STATUS OK", "attestation": backend,
                                    "key_brokers": len(config.pins()), "broker_configured": bool(config.broker_url())})

    def _attest_raw(self) -> None:
        doc = self._body()
        if set(doc) != {"runtime_data"} or not isinstance(doc["runtime_data"], str):
            raise ApiError(HTTPStatus.BAD_REQUEST, "expected {\"runtime_data\": \"<base64>\"}")
        try:
            runtime_data = base64.b64decode(doc["runtime_data"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(HTTPStatus.BAD_REQUEST, "runtime_data is not valid base64") from None
        report_data = sha2.sha256(runtime_data).digest() + bytes(32)
        result = snp_report.get_extended_report(report_data, paths=self.server.config.paths)
        self._reply(HTTPStatus.OK, {"report": result.report.hex(),
                                    "cert_table": base64.b64encode(result.cert_table).decode(),
                                    "backend": result.backend.value})

    def _key_release(self) -> None:
        config = self.server.config
        doc = self._body()
        if set(doc) != {"name"}:
            raise ApiError(HTTPStatus.BAD_REQUEST, "expected {\"name\": \"<secret name>\"}")
        name = check_secret_name(doc["name"], where="name")
        url = config.broker_url()
        if not url:
            raise NotConfigured("no key broker address: the sandbox was started without one",
                                hint="start it with 'parma-sandbox up --kbs URL'")
        who = peer_container(self.connection)
        try:
            value = release_secret(url, name, evidence_for=config.evidence_for, runtime_key=config.runtime_key(),
                                   pins=config.pins(), connection=config.broker_connection)
        except SandboxError as e:
            config.log(f"key release for container {who}: failed ({type(e).__name__})")
            raise
        config.log(f"key release for container {who}: released")
        if "application/octet-stream" in self.headers.get("Accept", ""):
            self._reply(HTTPStatus.OK, raw=value)
        else:
            self._reply(HTTPStatus.OK, {"name": name, "secret": base64.b64encode(value).decode()})


class KeyApiServer(BoundedThreadingMixIn, socketserver.UnixStreamServer):
    max_connections = MAX_CONNECTIONS

    def __init__(self, path: str | Path, config: KeyApiConfig) -> None:
        self.config = config
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o755)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        super().__init__(str(self.path), _Handler)
        os.chmod(self.path, 0o666)  # containers may run as any user; the mount is the gate

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up or times out; errors in handlers are answered in _route


def policy_pins(policy: Any) -> frozenset[str]:
    """The key broker pins of an installed policy model (none when absent)."""
    brokers = getattr(policy, "key_brokers", None) or ()
    return frozenset(b.public_key_sha256 for b in brokers)


def start(config: KeyApiConfig, path: str = ATTEST_API_SOCKET) -> KeyApiServer:
    """Serve the API on `path` in a daemon thread (the agent calls this once at boot)."""
    server = KeyApiServer(path, config)
    threading.Thread(target=server.serve_forever, name="attestation-api", daemon=True).start()
    return server
