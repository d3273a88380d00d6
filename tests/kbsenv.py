"""Helpers for the key broker tests: one emulated CA per test run, an emulated guest, a broker on
127.0.0.1 and an HTTP client for the in-guest API's unix socket."""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import http.client
import json
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sandbox.attest.emulated_ca import EmulatedCa, ensure_emulated_ca
from sandbox.attest.psp import launch_material
from sandbox.guest import snp_report
from sandbox.kbs.challenges import ChallengeStore
from sandbox.kbs.server import BrokerHttpServer, BrokerService, make_server
from sandbox.kbs.store import KbsStore
from tests.psp_serve import psp_socket_for

POLICY = b'{"api_version":"0.12.0","containers":[],"framework_version":"0.5.0"}'
POLICY_HASH = hashlib.sha256(POLICY).hexdigest()
MEASUREMENT = bytes.fromhex("6d287813eb5222d770f75005c664e34c204f385ce832cc2ce7d0d6f354454362"
                            "f390ef83a92046c042e706363b4b08fa")


@functools.cache
def shared_ca() -> EmulatedCa:
    """This test run's emulated CA (two RSA-4096 keys take seconds: make them once)."""
    base = Path(tempfile.mkdtemp(prefix="parma-kbs-ca-"))
    atexit.register(shutil.rmtree, base, True)
    return ensure_emulated_ca(base)


def emulated_guest(directory: Path, *, policy: bytes = POLICY, measurement: bytes = MEASUREMENT,
                   ca: EmulatedCa | None = None, guest_policy: int | None = None) -> snp_report.GuestPaths:
    """A guest launched in emulation mode: its reports come from the emulated PSP serving this material."""
    directory.mkdir(parents=True, exist_ok=True)
    fw_cfg = directory / "psp.json"
    kwargs = {"policy": guest_policy} if guest_policy is not None else {}
    material = launch_material(host_data=hashlib.sha256(policy).digest(), measurement=measurement,
                               ca=ca or shared_ca(), **kwargs)
    fw_cfg.write_bytes(material.to_bytes())
    return snp_report.GuestPaths(configfs_tsm=directory / "no-tsm", sev_guest=directory / "no-sev-guest",
                                 sev_sysfs=directory / "no-sev", msr=directory / "no-msr",
                                 psp_port=psp_socket_for(fw_cfg))


@contextlib.contextmanager
def running_broker(store: KbsStore, *, ttl: float = 60.0, challenges: ChallengeStore | None = None,
                   max_connections: int = 64,
                   emulated_ca: Callable[[], EmulatedCa | None] | None = None,
                   **limits: float) -> Iterator[BrokerHttpServer]:
    """A broker on 127.0.0.1; it trusts this test run's emulated CA unless told which one (a real UVM's
    emulated PSP uses the installation's: pass `load_emulated_ca`). `limits`: make_server's read_timeout and
    body_deadline."""
    service = BrokerService(store, challenge_ttl=ttl, emulated_ca=emulated_ca or shared_ca, challenges=challenges)
    server = make_server(store, ("127.0.0.1", 0), service=service, max_connections=max_connections, **limits)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# The agent refuses broker locations inside the guest, loopback included (sandbox/guest/broker_address.py).
# Tests that run the agent's client on the host reach their 127.0.0.1 broker with a plain connection.
LOOPBACK_BROKER = http.client.HTTPConnection


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def api_call(sock: Path, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
             raw_body: bytes | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
    """One request to the in-guest API over its unix socket: (status, body)."""
    conn = _UnixConnection(sock, timeout)
    try:
        data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_call(url: str, method: str, path: str, body: Any = None, *, raw_body: bytes | None = None,
              headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    """One request to the broker: (status, parsed JSON body). A body goes as `application/json`, as the
    broker requires, unless `headers` names a Content-Type of its own."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
        sent = dict(headers or {})
        if data is not None and not any(k.lower() == "content-type" for k in sent):
            sent["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        text = response.read()
        return response.status, json.loads(text) if text else None
    finally:
        conn.close()
