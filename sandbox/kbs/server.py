"""`kbs serve`: the key broker's HTTP service (protocol: sandbox/shared/kbs_protocol.py, docs/kbs.md).

The host relays all traffic between the guest and the broker, so this service assumes every request
is hostile: bodies are bounded (MAX_REQUEST_BYTES) and need a Content-Length (no chunked encoding)
and a Content-Type of application/json (UTF-8: 415 otherwise), each read times out (READ_TIMEOUT) and a whole body must arrive within BODY_DEADLINE, at most
`max_connections` requests are handled at once (the rest get 503 at once, without a thread), and no
input can stop the server. Every release and every refusal is written to the audit log first.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from sandbox.attest.emulated_ca import EmulatedCa, load_emulated_ca
from sandbox.attest.kds import KdsClient
from sandbox.kbs.audit import AuditLog, Event
from sandbox.kbs.challenges import ChallengesFull, ChallengeStore, NonceStatus
from sandbox.kbs.release import evaluate, seal
from sandbox.kbs.store import KbsStore
from sandbox.log import log
from sandbox.shared.bounded_server import BoundedThreadingMixIn
from sandbox.shared.errors import InputError, SandboxError
from sandbox.shared.jsonstrict import decode_utf8, loads_strict
from sandbox.shared.kbs_protocol import (
    CHALLENGE_PATH,
    IDENTITY_FORMAT,
    IDENTITY_PATH,
    MAX_REQUEST_BYTES,
    RELEASE_PATH,
    KbsErrorCode,
    b64,
    check_secret_name,
)
from sandbox.shared.snp.evidence import ReportEvidence

READ_TIMEOUT = 10.0
BODY_DEADLINE = 15.0
DEFAULT_MAX_CONNECTIONS = 64


class KbsHttpError(Exception):
    def __init__(self, status: HTTPStatus, code: KbsErrorCode, message: str, **audit: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.audit = audit


@dataclass(frozen=True)
class Reply:
    status: HTTPStatus
    body: dict[str, Any]


class BrokerService:
    """The broker's logic, independent of HTTP: identity, challenges, release decisions, audit."""

    def __init__(self, store: KbsStore, *, challenge_ttl: float = 60.0, fetch_certs: bool = False,
                 emulated_ca: Callable[[], EmulatedCa | None] = load_emulated_ca,
                 challenges: ChallengeStore | None = None) -> None:
        self.store = store
        self.audit = AuditLog(store.audit_path)
        self.challenges = challenges if challenges is not None else ChallengeStore(challenge_ttl)
        self.fetch_certs = fetch_certs
        self._emulated_ca_loader = emulated_ca
        self._emulated_ca: EmulatedCa | None = None
        self._key = store.broker_key()
        self.public_der = store.broker_public_der()
        self.pin = store.broker_pin()
        self.kds = KdsClient()

    def emulated_ca(self) -> EmulatedCa | None:
        # The emulated CA may be created after the broker starts (by the first emulated `up`).
        if self._emulated_ca is None:
            self._emulated_ca = self._emulated_ca_loader()
        return self._emulated_ca

    def identity(self) -> dict[str, Any]:
        return {"format": IDENTITY_FORMAT, "public_key": b64(self.public_der), "public_key_sha256": self.pin}

    def challenge(self) -> dict[str, Any]:
        try:
            nonce = self.challenges.issue()
        except ChallengesFull as e:
            raise KbsHttpError(HTTPStatus.SERVICE_UNAVAILABLE, KbsErrorCode.busy,
                               f"too many outstanding challenges ({e}); retry later") from None
        return {"nonce": nonce.hex(), "expires_in": self.challenges.ttl}

    def release(self, body: Any, peer: str) -> dict[str, Any]:
        if not isinstance(body, dict) or set(body) != {"secret", "evidence"}:
            raise KbsHttpError(HTTPStatus.BAD_REQUEST, KbsErrorCode.bad_request,
                               "a release request is an object with exactly the keys 'secret' and 'evidence'")
        try:
            name = check_secret_name(body["secret"], where="secret")
        except InputError as e:
            raise KbsHttpError(HTTPStatus.BAD_REQUEST, KbsErrorCode.bad_request, str(e)) from None
        try:
            evidence = ReportEvidence.from_payload(body["evidence"], source="evidence")
        except InputError as e:
            raise KbsHttpError(HTTPStatus.BAD_REQUEST, KbsErrorCode.bad_request, f"invalid evidence: {e}",
                               secret=name) from None
        nonce_hex = evidence.nonce.hex()
        status, late = self.challenges.consume(evidence.nonce)
        if status != NonceStatus.OK:
            reason = {
                NonceStatus.UNKNOWN: "the evidence's nonce was not issued by this broker (wrong or forged nonce)",
                NonceStatus.USED: "the evidence's nonce was already used (replayed evidence)",
                NonceStatus.EXPIRED: f"the challenge expired {late:.1f} s before the evidence arrived "
                                     f"(challenges live {self.challenges.ttl:g} s)",
            }[status]
            raise KbsHttpError(HTTPStatus.FORBIDDEN, KbsErrorCode.refused, reason, secret=name, nonce=nonce_hex,
                               failed=[f"nonce.{status.value}"])
        record = self.store.get(name)
        if record is None:
            raise KbsHttpError(HTTPStatus.FORBIDDEN, KbsErrorCode.refused, f"no secret named {name!r}",
                               secret=name, nonce=nonce_hex, failed=["secret.exists"])
        decision = evaluate(record.policy, evidence, emulated_ca=self.emulated_ca(), kds=self.kds,
                            fetch_certs=self.fetch_certs)
        if not decision.released:
            raise KbsHttpError(HTTPStatus.FORBIDDEN, KbsErrorCode.refused, decision.reason, secret=name,
                               nonce=nonce_hex, failed=list(decision.failed), **decision.facts)
        sealed = seal(record.value, secret=name, nonce=evidence.nonce,
                      runtime_public_key=evidence.runtime_public_key, broker_key=self._key)
        self.audit.append(Event.RELEASE, secret=name, peer=peer, nonce=nonce_hex, reason=decision.reason,
                          secret_sha256=record.sha256, **decision.facts)
        return {"secret": name, "sealed": sealed.to_payload()}

    def handle(self, method: str, path: str, body: bytes | None, peer: str,
               content_types: Sequence[str] = ()) -> Reply:
        """Route one request (`content_types`: its Content-Type header lines); every error becomes a JSON reply
        and (except 404/405 noise) an audit record."""
        try:
            if path == IDENTITY_PATH and method == "GET":
                return Reply(HTTPStatus.OK, self.identity())
            if path == CHALLENGE_PATH and method == "POST":
                if _json_body(body, content_types) != {}:
                    raise KbsHttpError(HTTPStatus.BAD_REQUEST, KbsErrorCode.bad_request,
                                       "a challenge request is the empty JSON object {}")
                return Reply(HTTPStatus.OK, self.challenge())
            if path == RELEASE_PATH and method == "POST":
                return Reply(HTTPStatus.OK, self.release(_json_body(body, content_types), peer))
            if path in (IDENTITY_PATH, CHALLENGE_PATH, RELEASE_PATH):
                raise KbsHttpError(HTTPStatus.METHOD_NOT_ALLOWED, KbsErrorCode.method_not_allowed,
                                   f"{method} is not allowed on {path}")
            raise KbsHttpError(HTTPStatus.NOT_FOUND, KbsErrorCode.not_found, f"no endpoint {path[:200]!r}")
        except KbsHttpError as e:
            self.refuse(e, method, path, peer)
            return Reply(e.status, {"error": e.code.value, "message": e.message})
        except Exception as e:  # a damaged secret file, a bug: refuse on the record, never crash
            what = str(e) if isinstance(e, SandboxError) else f"internal error: {type(e).__name__}: {e}"
            if not isinstance(e, SandboxError):
                log.error("kbs: %s", what)
            err = KbsHttpError(HTTPStatus.INTERNAL_SERVER_ERROR, KbsErrorCode.internal, f"broker error: {what}")
            self.refuse(err, method, path, peer)
            return Reply(err.status, {"error": err.code.value, "message": err.message})

    def refuse(self, e: KbsHttpError, method: str, path: str, peer: str) -> None:
        try:
            self.audit.append(Event.REFUSE, peer=peer, endpoint=f"{method} {path[:200]}",
                              status=int(e.status), reason=e.message, **e.audit)
        except (OSError, SandboxError) as err:
            log.error("kbs: cannot write the audit log: %s", err)


def content_type_problem(content_types: Sequence[str]) -> str | None:
    """Why a request body's Content-Type lines are not exactly one `application/json` (parameters allowed; a
    charset only if UTF-8, the one encoding JSON has and the body is read in), or None."""
    hint = "send the JSON body with Content-Type: application/json"
    if not content_types:
        return f"the request has no Content-Type: {hint}"
    if len(content_types) > 1:
        return f"the request has {len(content_types)} Content-Type headers: {hint} once"
    value = content_types[0]
    media, *params = value.split(";")
    if media.strip().lower() != "application/json":
        return f"Content-Type {value[:100]!r} is not accepted: {hint}"
    for param in params:
        name, _, arg = param.partition("=")
        if name.strip().lower() == "charset" and arg.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return (f"Content-Type {value[:100]!r}: the body is read as UTF-8, the only encoding of JSON; "
                    f"{hint} (charset utf-8, if any)")
    return None


def _json_body(body: bytes | None, content_types: Sequence[str]) -> Any:
    if body is None:
        raise KbsHttpError(HTTPStatus.LENGTH_REQUIRED, KbsErrorCode.bad_request, "a Content-Length is required")
    problem = content_type_problem(content_types)
    if problem is not None:
        raise KbsHttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, KbsErrorCode.bad_request, problem)
    try:
        return loads_strict(decode_utf8(body, "request body"), "request body")
    except InputError as e:
        raise KbsHttpError(HTTPStatus.BAD_REQUEST, KbsErrorCode.bad_request, str(e)) from None
    except RecursionError:
        raise KbsHttpError(HTTPStatus.BAD_REQUEST, KbsErrorCode.bad_request, "request body nests too deeply") from None


class _Handler(BaseHTTPRequestHandler):
    server: BrokerHttpServer
    server_version = "parma-sandbox-kbs/1"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        # Every read of the request line, headers and body (what StreamRequestHandler.setup does with
        # its class-wide `timeout`; this one is the server's).
        self.connection.settimeout(self.server.read_timeout)
        self._head_late = False

    def handle_one_request(self) -> None:
        """The request line and headers must arrive within the body's deadline too: a client that trickles
        them a byte at a time, each read inside the read timeout, would otherwise hold a slot forever."""
        timer = threading.Timer(self.server.body_deadline, self._head_too_slow)
        timer.daemon = True
        self._head_timer = timer
        timer.start()
        try:
            super().handle_one_request()
        finally:
            timer.cancel()

    def _head_too_slow(self) -> None:
        self._head_late = True
        self.close_connection = True
        self.server.service.refuse(KbsHttpError(HTTPStatus.REQUEST_TIMEOUT, KbsErrorCode.bad_request,
                                                f"the request line and headers did not arrive within "
                                                f"{self.server.body_deadline:g} s"), "?", "", self._peer())
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _peer(self) -> str:
        host, port = self.client_address[:2]
        return f"{host}:{port}"

    def _serve(self, method: str) -> None:
        self._head_timer.cancel()       # the body has its own deadline
        if self._head_late:             # cut off: what was parsed is not the whole request
            return
        service = self.server.service
        peer = self._peer()
        body: bytes | None = None
        if self.headers.get("Transfer-Encoding") is not None:
            # Only Content-Length bodies are read: a chunked body has no size to check before reading it.
            self._error(HTTPStatus.LENGTH_REQUIRED, KbsErrorCode.bad_request,
                        "Transfer-Encoding is not accepted; send the body with a Content-Length", method)
            return
        lengths = self.headers.get_all("Content-Length") or []
        length_text = lengths[0].strip() if lengths else None
        if length_text is not None:
            # Exactly one, in ASCII digits: int() would also take "+5", "0_5" and other scripts' digits, and
            # two lengths are how a request is smuggled past whatever relays it.
            if len(lengths) > 1 or not (length_text.isascii() and length_text.isdigit()):
                self._error(HTTPStatus.BAD_REQUEST, KbsErrorCode.bad_request, "invalid Content-Length", method)
                return
            length = int(length_text)
            if length > MAX_REQUEST_BYTES:
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, KbsErrorCode.too_large,
                            f"request body of {length} bytes exceeds the {MAX_REQUEST_BYTES}-byte limit", method)
                return
            body, problem = self._read_body(length)
            if problem is not None:
                self._error(HTTPStatus.REQUEST_TIMEOUT, KbsErrorCode.bad_request, problem, method)
                return
        elif method == "POST":
            self._error(HTTPStatus.LENGTH_REQUIRED, KbsErrorCode.bad_request, "a Content-Length is required", method)
            return
        reply = service.handle(method, self.path.split("?", 1)[0], body, peer,
                               self.headers.get_all("Content-Type") or [])
        self._send(reply.status, reply.body)

    def _read_body(self, length: int) -> tuple[bytes, str | None]:
        """The body, or why it did not arrive: a trickling or stalled client holds a slot only so long."""
        read_timeout, deadline_s = self.server.read_timeout, self.server.body_deadline
        deadline = time.monotonic() + deadline_s
        chunks = []
        got = 0
        while got < length:
            left = deadline - time.monotonic()
            if left <= 0:
                return b"", (f"the request body did not arrive within {deadline_s:g} s "
                             f"({got} of {length} bytes came)")
            self.connection.settimeout(min(left, read_timeout))
            try:
                chunk = self.rfile.read1(min(length - got, 65536))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    continue  # reported above, as the whole-body limit
                return b"", (f"no request body data for {read_timeout:g} s "
                             f"({got} of {length} bytes came)")
            if not chunk:
                return b"", f"the connection closed after {got} of {length} body bytes"
            chunks.append(chunk)
            got += len(chunk)
        self.connection.settimeout(read_timeout)
        return b"".join(chunks), None

    def _error(self, status: HTTPStatus, code: KbsErrorCode, message: str, method: str) -> None:
        err = KbsHttpError(status, code, message)
        self.server.service.refuse(err, method, self.path.split("?", 1)[0], self._peer())
        self.close_connection = True
        self._send(status, {"error": code.value, "message": message})

    def _send(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # http.server's naming
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (unparsable request line, headers too long...): audited like ours."""
        status = HTTPStatus(code)
        path = getattr(self, "path", "") or ""
        self.server.service.refuse(KbsHttpError(status, KbsErrorCode.bad_request, message or status.phrase),
                                   getattr(self, "command", None) or "?", path.split("?", 1)[0], self._peer())
        super().send_error(code, message, explain)

    def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
        log.debug("kbs: %s %s", self._peer(), format % args)


class BrokerHttpServer(BoundedThreadingMixIn, HTTPServer):
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], service: BrokerService, *,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, read_timeout: float = READ_TIMEOUT,
                 body_deadline: float = BODY_DEADLINE) -> None:
        self.service = service
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.body_deadline = body_deadline
        self.busy_refusals = 0
        super().__init__(address, _Handler)

    def on_busy(self, client_address: Any) -> None:
        self.busy_refusals += 1
        host, port = client_address[:2]
        self.service.refuse(KbsHttpError(HTTPStatus.SERVICE_UNAVAILABLE, KbsErrorCode.busy,
                                         "too many concurrent requests"), "?", "", f"{host}:{port}")

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that resets or times out mid-request is not the broker's problem; a bug is logged.
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError | TimeoutError):
            log.debug("kbs: connection from %s ended: %s", client_address, exc)
        else:
            log.error("kbs: internal error serving %s: %s: %s", client_address, type(exc).__name__, exc)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        assert isinstance(host, str)        # an IPv4 server (parse_listen); typeshed's type allows AF_UNIX bytes
        return f"http://{host}:{port}"


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InputError(f"--listen: {text!r} is not HOST:PORT", hint="e.g. 127.0.0.1:8300 (port 0 picks a free one)")
    try:
        socket.inet_aton(host)
    except OSError:
        raise InputError(f"--listen: {host!r} is not an IPv4 address", hint="e.g. 127.0.0.1") from None
    return host, int(port_text)


def make_server(store: KbsStore, listen: tuple[str, int], *, challenge_ttl: float = 60.0,
                fetch_certs: bool = False, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                read_timeout: float = READ_TIMEOUT, body_deadline: float = BODY_DEADLINE,
                service: BrokerService | None = None) -> BrokerHttpServer:
    """The broker's HTTP server, bound to `listen` (not yet serving: call serve_forever)."""
    service = service or BrokerService(store, challenge_ttl=challenge_ttl, fetch_certs=fetch_certs)
    try:
        return BrokerHttpServer(listen, service, max_connections=max_connections, read_timeout=read_timeout,
                                body_deadline=body_deadline)
    except OSError as e:
        raise InputError(f"cannot listen on {listen[0]}:{listen[1]}: {e.strerror}",
                         hint="choose another port with --listen") from None
