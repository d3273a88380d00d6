"""The in-guest attestation API (sandbox/guest/keyapi.py) served on a unix socket on the host, with an emulated
guest behind it and a real broker on 127.0.0.1: what a container sees, including every failure."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kbsenv import (
    LOOPBACK_BROKER,
    MEASUREMENT,
    POLICY,
    POLICY_HASH,
    api_call,
    emulated_guest,
    running_broker,
    shared_ca,
)

from sandbox.attest.evidence import certificates_from_table
from sandbox.attest.verify import Expectations, verify_report
from sandbox.guest import keyapi, snp_report
from sandbox.kbs.server import BrokerHttpServer
from sandbox.kbs.store import KbsStore, ReleasePolicy, new_secret

SECRET = bytes(range(256)) * 3


@pytest.fixture
def store(tmp_path: Path) -> KbsStore:
    store = KbsStore.open(tmp_path / "kbs")
    store.put(new_secret("app-key", SECRET, ReleasePolicy((POLICY_HASH,), (MEASUREMENT.hex(),), allow_emulated=True)))
    return store


@pytest.fixture
def broker(store: KbsStore) -> Iterator[BrokerHttpServer]:
    with running_broker(store) as server:
        yield server


class Api:
    def __init__(self, tmp_path: Path, guest: snp_report.GuestPaths, pins: set[str], url: str | None,
                 connection: keyapi.ConnectionFactory = LOOPBACK_BROKER) -> None:
        self.pins = set(pins)
        self.url = url
        self.logs: list[str] = []
        config = keyapi.KeyApiConfig(pins=lambda: frozenset(self.pins), broker_url=lambda: self.url, paths=guest,
                                     log=self.logs.append, broker_connection=connection)
        self.sock = tmp_path / "attest" / "api.sock"
        self.server = keyapi.start(config, str(self.sock))

    def call(self, method: str, path: str, body: object = None, **kw: object) -> tuple[int, bytes]:
        return api_call(self.sock, method, path, body, **kw)  # type: ignore[arg-type]

    def json(self, method: str, path: str, body: object = None, **kw: object) -> tuple[int, dict]:
        status, raw = self.call(method, path, body, **kw)
        return status, json.loads(raw)


@pytest.fixture
def api(tmp_path: Path, store: KbsStore, broker: BrokerHttpServer) -> Iterator[Api]:
    api = Api(tmp_path, emulated_guest(tmp_path / "guest"), {store.broker_pin()}, broker.url)
    yield api
    api.server.shutdown()
    api.server.server_close()


def test_status(api: Api) -> None:
    assert api.json("GET", "/status") == (200, {"message": "STATUS OK", "attestation": "emulated", "key_brokers": 1,
                                                "broker_configured": True})
    assert (api.sock.stat().st_mode & 0o777) == 0o666  # any container user may connect; the mount is the gate


def test_attest_raw_binds_the_callers_runtime_data(api: Api) -> None:
    runtime_data = b'{"keys": ["my public key"]}'
    status, doc = api.json("POST", "/attest/raw", {"runtime_data": base64.b64encode(runtime_data).decode()})
    assert status == 200 and doc["backend"] == "emulated"
    report = bytes.fromhex(doc["report"])
    certs = certificates_from_table(base64.b64decode(doc["cert_table"]))
    expected = hashlib.sha256(runtime_data).digest() + bytes(32)  # the sidecar's REPORT_DATA
    result = verify_report(report, certs, Expectations(report_data=expected, host_data=hashlib.sha256(POLICY).digest(),
                                                        allow_emulated=True), emulated_ca=shared_ca())
    assert result.verified, result.failed()


def test_key_release_as_json_and_raw(api: Api) -> None:
    status, doc = api.json("POST", "/key/release", {"name": "app-key"})
    assert status == 200 and base64.b64decode(doc["secret"]) == SECRET and doc["name"] == "app-key"
    status, raw = api.call("POST", "/key/release", {"name": "app-key"}, headers={"Accept": "application/octet-stream"})
    assert status == 200 and raw == SECRET
    assert api.logs[-1].endswith(": released") and "app-key" not in " ".join(api.logs)  # names stay off the console


def test_a_refusal_reaches_the_container_with_the_brokers_reason(tmp_path: Path, store: KbsStore,
                                                                 broker: BrokerHttpServer) -> None:
    other = Api(tmp_path / "other", emulated_guest(tmp_path / "g2", policy=POLICY + b"\n"), {store.broker_pin()},
                broker.url)
    try:
        status, doc = other.json("POST", "/key/release", {"name": "app-key"})
    finally:
        other.server.shutdown()
        other.server.server_close()
    assert status == 403
    assert doc["error"].startswith("the key broker refused: release.host_data: HOST_DATA")


def test_an_unpinned_broker_is_not_trusted(api: Api) -> None:
    api.pins = {"00" * 32}  # the policy pins some other broker: this one could be the host's
    status, doc = api.json("POST", "/key/release", {"name": "app-key"})
    assert status == 502 and "does not pin" in doc["error"]
    api.pins = set()
    status, doc = api.json("POST", "/key/release", {"name": "app-key"})
    assert status == 503 and "pins no key broker" in doc["error"]


def test_missing_or_unreachable_broker(api: Api) -> None:
    api.url = None
    status, doc = api.json("POST", "/key/release", {"name": "app-key"})
    assert status == 503 and "no key broker address" in doc["error"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once closed
    api.url = f"http://127.0.0.1:{port}"
    status, doc = api.json("POST", "/key/release", {"name": "app-key"})
    assert status == 502 and "unreachable" in doc["error"]
    api.url = "ftp://example"
    assert api.json("POST", "/key/release", {"name": "app-key"})[0] == 503


def test_bad_requests_get_errors_and_the_api_keeps_serving(api: Api) -> None:
    cases = [
        (("POST", "/key/release"), {"raw_body": b"not json"}, 400),
        (("POST", "/key/release"), {"body": {"name": "../../etc/passwd"}}, 400),
        (("POST", "/key/release"), {"body": {"name": "a", "kid": "b"}}, 400),
        (("POST", "/attest/raw"), {"body": {"runtime_data": "!!"}}, 400),
        (("GET", "/key/release"), {}, 405),
        (("GET", "/secrets"), {}, 404),
    ]
    for (method, path), kw, status in cases:
        got, raw = api.call(method, path, **kw)  # type: ignore[arg-type]
        assert got == status and json.loads(raw)["error"], (path, kw, got, raw)
    for request, status_line in ((b"POST /attest/raw HTTP/1.0\r\nContent-Length: 70000\r\n\r\n", b" 413 "),
                                 (b"POST /attest/raw HTTP/1.0\r\n\r\n", b" 411 "),
                                 (b"\x00\xff garbage \r\n\r\n", b" 400 ")):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(api.sock))
            s.sendall(request)
            assert status_line in s.recv(1024).split(b"\r\n")[0]
    assert api.json("GET", "/status")[0] == 200


@pytest.fixture(scope="module")
def example_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/secret's static C client, built as its image recipe builds it."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (needed to build the example client)")
    out = tmp_path_factory.mktemp("client") / "parma-secret"
    source = Path(__file__).resolve().parents[2] / "examples" / "secret" / "parma-secret.c"
    subprocess.run(["gcc", "-static", "-Os", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(source)], check=True)
    return out


def test_the_example_client_prints_the_secret_or_the_reason(api: Api, example_client: Path, store: KbsStore) -> None:
    env = {"PARMA_ATTEST_SOCKET": str(api.sock)}
    done = subprocess.run([example_client, "app-key"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0 and done.stdout == SECRET, done.stderr
    store.remove("app-key")
    done = subprocess.run([example_client, "app-key"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 1 and done.stdout == b""
    assert done.stderr == b"parma-secret: app-key: HTTP 403: the key broker refused: no secret named 'app-key'\n"
    done = subprocess.run([example_client, "../x"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 2
    done = subprocess.run([example_client, "app-key"], env={"PARMA_ATTEST_SOCKET": "/nonexistent/api.sock"},
                          capture_output=True, timeout=60)
    assert done.returncode == 1 and b"attestationApi: true" in done.stderr


def test_a_broker_location_inside_the_guest_is_refused(tmp_path: Path, store: KbsStore) -> None:
    """The host picks the broker URL (fw_cfg): the agent refuses any that points back into the guest, before
    it connects. Here with the agent's own connection class, against a listener nobody may reach."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        api = Api(tmp_path, emulated_guest(tmp_path / "guest"), {store.broker_pin()}, None,
                  connection=keyapi.CheckedConnection)
        try:
            for url, why in ((f"http://127.0.0.1:{port}", "127.0.0.1 is a loopback address"),
                             (f"http://localhost:{port}", "is a loopback address"),
                             (f"http://[::ffff:127.0.0.1]:{port}", "is a loopback address"),
                             (f"http://0.0.0.0:{port}", "0.0.0.0 is the unspecified address"),
                             ("http://169.254.169.254", "169.254.169.254 is a link-local address"),
                             ("http://224.0.0.251:5353", "is a multicast address")):
                api.url = url
                status, doc = api.json("POST", "/key/release", {"name": "app-key"})
                assert status == 502 and "refused" in doc["error"] and why in doc["error"], (url, doc)
                assert "may not point into the guest" in doc["error"]
            with pytest.raises(BlockingIOError):
                listener.accept()  # not one connection was attempted
            assert api.json("GET", "/status")[0] == 200
        finally:
            api.server.shutdown()
            api.server.server_close()


class _HostileBroker(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_POST(self) -> None:  # http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize(("body", "reason"), [
    (b"[" * 200_000, "nested deeper than 32 levels"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, "nested deeper than 32 levels"),
    (b'{"nonce": 1e400}', "out of range"),
    (b'{"nonce": ' + b"9" * 5000 + b"}", "digit"),
    (b'{"nonce": "00", "nonce": "11"}', "duplicate key"),
    (b'{"nonce": NaN}', "NaN is not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b'{"nonce": "' + b"ab" * 200_000 + b'"}', "response larger than"),
    (b'{"nonce": ["x"]}', "no valid nonce"),
])
def test_a_hostile_brokers_answers_are_refusals(tmp_path: Path, store: KbsStore, body: bytes, reason: str) -> None:
    handler = type("Handler", (_HostileBroker,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = Api(tmp_path, emulated_guest(tmp_path / "guest"), {store.broker_pin()},
              f"http://127.0.0.1:{server.server_address[1]}")
    try:
        status, doc = api.json("POST", "/key/release", {"name": "app-key"})
        assert status == 502 and reason in doc["error"], doc
        assert api.json("GET", "/status")[0] == 200
    finally:
        api.server.shutdown()
        api.server.server_close()
        server.shutdown()
        server.server_close()
