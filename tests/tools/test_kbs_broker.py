"""The key broker over real HTTP on 127.0.0.1, driven like a hostile host would: every refusal named in the
response and in the audit log, and the broker still serving after 200 concurrent bad requests."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from kbsenv import (
    LOOPBACK_BROKER,
    MEASUREMENT,
    POLICY,
    POLICY_HASH,
    emulated_guest,
    http_call,
    running_broker,
)

from sandbox.guest import keyapi, snp_report
from sandbox.guest.keys import RuntimeKey
from sandbox.kbs.audit import AuditLog
from sandbox.kbs.challenges import ChallengeStore
from sandbox.kbs.store import KbsStore, ReleasePolicy, new_secret
from sandbox.shared.errors import KeyReleaseRefused
from sandbox.shared.kbs_protocol import CHALLENGE_PATH, IDENTITY_PATH, RELEASE_PATH
from sandbox.shared.snp.policy import GuestPolicy

SECRET = b"correct horse battery staple"


@pytest.fixture
def store(tmp_path: Path) -> KbsStore:
    store = KbsStore.open(tmp_path / "kbs")
    store.put(new_secret("emu-ok", SECRET, ReleasePolicy((POLICY_HASH,), (MEASUREMENT.hex(),), allow_emulated=True)))
    store.put(new_secret("hw-only", SECRET, ReleasePolicy((POLICY_HASH,), (MEASUREMENT.hex(),), min_tcb="0")))
    return store


@pytest.fixture
def guest(tmp_path: Path) -> snp_report.GuestPaths:
    return emulated_guest(tmp_path / "guest")


@pytest.fixture(scope="module")
def runtime() -> RuntimeKey:
    return RuntimeKey.generate()


def _challenge(url: str) -> bytes:
    status, doc = http_call(url, "POST", CHALLENGE_PATH, {})
    assert status == 200 and doc["expires_in"] > 0
    return bytes.fromhex(doc["nonce"])


def _evidence(nonce: bytes, guest: snp_report.GuestPaths, runtime: RuntimeKey) -> Any:
    return snp_report.evidence_for(nonce, key=runtime, paths=guest)


def _release(url: str, name: str, evidence: Any) -> tuple[int, Any]:
    payload = evidence if isinstance(evidence, dict) else evidence.to_payload()
    return http_call(url, "POST", RELEASE_PATH, {"secret": name, "evidence": payload})


def _last_audit(store: KbsStore) -> dict[str, Any]:
    return list(AuditLog(store.audit_path).records())[-1]


def _refused(store: KbsStore, status: int, doc: Any, *, reason: str, check: str | None = None) -> None:
    assert status == 403 and doc["error"] == "refused", doc
    assert reason in doc["message"], doc["message"]
    record = _last_audit(store)
    assert record["event"] == "refuse" and reason in record["reason"]
    if check is not None:
        assert check in record["failed"], record


def test_identity_and_a_release_opened_by_the_guest(store: KbsStore, guest: snp_report.GuestPaths,
                                                    runtime: RuntimeKey) -> None:
    with running_broker(store) as server:
        status, doc = http_call(server.url, "GET", IDENTITY_PATH)
        assert status == 200 and doc["public_key_sha256"] == store.broker_pin()
        value = keyapi.release_secret(server.url, "emu-ok", runtime_key=runtime, pins=frozenset({store.broker_pin()}),
                                      evidence_for=lambda n: _evidence(n, guest, runtime), connection=LOOPBACK_BROKER)
    assert value == SECRET
    record = _last_audit(store)
    assert record["event"] == "release" and record["secret"] == "emu-ok"
    assert record["host_data"] == POLICY_HASH and record["measurement"] == MEASUREMENT.hex() and record["emulated"]
    assert AuditLog(store.audit_path).verify().intact


def test_emulated_evidence_is_refused_unless_the_secret_allows_it(store: KbsStore, guest: snp_report.GuestPaths,
                                                                 runtime: RuntimeKey) -> None:
    with running_broker(store) as server:
        with pytest.raises(KeyReleaseRefused, match="emulated evidence .* is not accepted"):
            keyapi.release_secret(server.url, "hw-only", runtime_key=runtime, pins=frozenset({store.broker_pin()}),
                                  evidence_for=lambda n: _evidence(n, guest, runtime), connection=LOOPBACK_BROKER)
    assert "ark.trusted" in _last_audit(store)["failed"]


def test_a_policy_changed_by_one_byte_is_refused(store: KbsStore, tmp_path: Path, runtime: RuntimeKey) -> None:
    other = emulated_guest(tmp_path / "other", policy=POLICY + b" ")
    with running_broker(store) as server:
        status, doc = _release(server.url, "emu-ok", _evidence(_challenge(server.url), other, runtime))
    _refused(store, status, doc, reason="is not an execution policy hash this secret is released to",
             check="release.host_data")
    assert _last_audit(store)["host_data"] == hashlib.sha256(POLICY + b" ").hexdigest()


def test_replayed_evidence_is_refused(store: KbsStore, guest: snp_report.GuestPaths, runtime: RuntimeKey) -> None:
    with running_broker(store) as server:
        evidence = _evidence(_challenge(server.url), guest, runtime)
        assert _release(server.url, "emu-ok", evidence)[0] == 200
        status, doc = _release(server.url, "emu-ok", evidence)
    _refused(store, status, doc, reason="already used (replayed evidence)", check="nonce.used")


def test_a_nonce_the_broker_never_issued_is_refused(store: KbsStore, guest: snp_report.GuestPaths,
                                                    runtime: RuntimeKey) -> None:
    with running_broker(store) as server:
        _challenge(server.url)
        status, doc = _release(server.url, "emu-ok", _evidence(os.urandom(32), guest, runtime))
    _refused(store, status, doc, reason="not issued by this broker", check="nonce.unknown")


def test_evidence_bound_to_another_nonce_is_refused(store: KbsStore, guest: snp_report.GuestPaths,
                                                    runtime: RuntimeKey) -> None:
    """A genuine report for an old nonce, presented under a fresh one: the REPORT_DATA binding fails."""
    with running_broker(store) as server:
        fresh = _challenge(server.url)
        old = dataclasses.replace(_evidence(os.urandom(32), guest, runtime), nonce=fresh)
        status, doc = _release(server.url, "emu-ok", old)
    _refused(store, status, doc, reason="report.report_data", check="report.report_data")


def test_a_tampered_report_is_refused(store: KbsStore, guest: snp_report.GuestPaths, runtime: RuntimeKey) -> None:
    with running_broker(store) as server:
        evidence = _evidence(_challenge(server.url), guest, runtime)
        report = bytearray(evidence.report)
        report[0x90] ^= 0x01  # first byte of MEASUREMENT
        status, doc = _release(server.url, "emu-ok", dataclasses.replace(evidence, report=bytes(report)))
    _refused(store, status, doc, reason="report.signature", check="report.signature")


def test_an_expired_challenge_is_refused(store: KbsStore, guest: snp_report.GuestPaths, runtime: RuntimeKey) -> None:
    now = [0.0]
    with running_broker(store, challenges=ChallengeStore(5, clock=lambda: now[0])) as server:
        evidence = _evidence(_challenge(server.url), guest, runtime)
        now[0] += 7.5
        status, doc = _release(server.url, "emu-ok", evidence)
    _refused(store, status, doc, reason="challenge expired 2.5 s before the evidence arrived", check="nonce.expired")


def test_debug_guests_measurement_and_tcb_are_checked(store: KbsStore, tmp_path: Path, guest: snp_report.GuestPaths,
                                                      runtime: RuntimeKey) -> None:
    debug = emulated_guest(tmp_path / "debug", guest_policy=GuestPolicy.build(smt=True, debug=True).raw)
    store.put(new_secret("pinned", SECRET, ReleasePolicy((POLICY_HASH,), ("00" * 48,), allow_emulated=True)))
    store.put(new_secret("new-tcb", SECRET, ReleasePolicy((POLICY_HASH,), (MEASUREMENT.hex(),),
                                                          "bl=9,tee=0,snp=24,ucode=72", allow_emulated=True)))
    with running_broker(store) as server:
        status, doc = _release(server.url, "emu-ok", _evidence(_challenge(server.url), debug, runtime))
        _refused(store, status, doc, reason="report.debug", check="report.debug")
        status, doc = _release(server.url, "pinned", _evidence(_challenge(server.url), guest, runtime))
        _refused(store, status, doc, reason="not an allowed launch measurement", check="release.measurement")
        status, doc = _release(server.url, "new-tcb", _evidence(_challenge(server.url), guest, runtime))
        _refused(store, status, doc, reason="report.min_tcb", check="report.min_tcb")
        status, doc = _release(server.url, "absent", _evidence(_challenge(server.url), guest, runtime))
        _refused(store, status, doc, reason="no secret named 'absent'", check="secret.exists")


def test_malformed_requests_get_clear_errors(store: KbsStore, guest: snp_report.GuestPaths,
                                             runtime: RuntimeKey) -> None:
    with running_broker(store) as server:
        url = server.url
        good = _evidence(_challenge(url), guest, runtime).to_payload()
        cases = [
            (("POST", RELEASE_PATH), {"raw_body": b"{not json"}, 400, "not valid JSON"),
            (("POST", RELEASE_PATH), {"body": {"secret": "emu-ok"}}, 400, "exactly the keys"),
            (("POST", RELEASE_PATH), {"body": {"secret": "../etc", "evidence": good}}, 400, "not a valid secret name"),
            (("POST", RELEASE_PATH), {"body": {"secret": "emu-ok", "evidence": {**good, "report": "AAAA"}}}, 400,
             "not 1184"),
            (("POST", RELEASE_PATH), {"body": {"secret": "emu-ok", "evidence": {**good, "runtime_public_key":
                                                                                base64.b64encode(b"junk").decode()}}},
             400, "runtime_public_key is not a P-384 SubjectPublicKeyInfo"),
            (("POST", RELEASE_PATH), {"raw_body": b"[" * 100000}, 413, "exceeds"),
            (("POST", RELEASE_PATH), {"raw_body": b"[" * 5000}, 400, "nested too deeply"),
            (("POST", RELEASE_PATH), {"body": {"secret": "emu-ok", "evidence": good},
                                      "headers": {"Content-Type": "text/plain"}}, 415, "application/json"),
            (("GET", RELEASE_PATH), {}, 405, "not allowed"),
            (("GET", "/kbs/v1/secrets"), {}, 404, "no endpoint"),
        ]
        for (method, path), kwargs, status, text in cases:
            got, doc = http_call(url, method, path, **kwargs)
            assert got == status and text in doc["message"], (path, kwargs.keys(), got, doc)
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5) as s:
            s.sendall(f"POST {RELEASE_PATH} HTTP/1.0\r\n\r\n".encode())
            assert b" 411 " in s.recv(4096).split(b"\r\n")[0]
    assert AuditLog(store.audit_path).verify().intact


def _bad_request(port: int, kind: int) -> bytes:
    """One hostile request; returns the status line (b'' if the broker just closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        if kind == 0:
            s.sendall(b"\x00\x01garbage\xff" * 50 + b"\r\n\r\n")
        elif kind == 1:
            s.sendall(b"POST /kbs/v1/release HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n")
        elif kind == 2:
            s.sendall(b"POST /kbs/v1/release HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"secret\": ")  # then hang up
            return b""
        elif kind == 3:
            body = json.dumps({"secret": "emu-ok", "evidence": {"report": "", "cert_table": "", "nonce": "00",
                                                               "runtime_public_key": "", "backend": "x"}}).encode()
            s.sendall(b"POST /kbs/v1/release HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                      % len(body) + body)
        else:
            s.sendall(b"GET /" + b"A" * 70000 + b" HTTP/1.1\r\n\r\n")
        try:
            return s.recv(4096).split(b"\r\n")[0]
        except OSError:
            return b""


def test_the_broker_survives_200_concurrent_bad_requests(store: KbsStore, guest: snp_report.GuestPaths,
                                                         runtime: RuntimeKey) -> None:
    with running_broker(store, max_connections=32) as server:
        port = server.server_address[1]
        with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
            results = list(pool.map(lambda i: _bad_request(port, i % 5), range(200)))
        answered = [r for r in results if r]
        assert len(answered) >= 150, results
        assert all(b" 4" in r or b" 503 " in r for r in answered), {r for r in answered}
        # Still serving, correctly:
        value = keyapi.release_secret(server.url, "emu-ok", runtime_key=runtime, pins=frozenset({store.broker_pin()}),
                                      evidence_for=lambda n: _evidence(n, guest, runtime), connection=LOOPBACK_BROKER)
        assert value == SECRET
    log = AuditLog(store.audit_path)
    assert log.verify().intact
    # Every one of the 200 was refused on the record, with a reason (busy ones included).
    refusals = [r for r in log.records() if r["event"] == "refuse"]
    assert len(refusals) == 200 and all(r["reason"] for r in refusals)


def test_a_damaged_secret_file_is_a_refusal_on_the_record(store: KbsStore, guest: snp_report.GuestPaths,
                                                           runtime: RuntimeKey) -> None:
    (store.secrets_dir / "emu-ok.json").write_text("{")
    with running_broker(store) as server:
        status, doc = _release(server.url, "emu-ok", _evidence(_challenge(server.url), guest, runtime))
        assert status == 500 and doc["error"] == "internal" and "emu-ok.json" in doc["message"]
        assert http_call(server.url, "GET", IDENTITY_PATH)[0] == 200
    assert _last_audit(store)["status"] == 500


def test_same_host_data_on_another_uvm_is_refused(store: KbsStore, tmp_path: Path, runtime: RuntimeKey) -> None:
    """The host boots its own kernel and rootfs with the policy's HOST_DATA: the measurement differs, so the
    secret stays with the broker. A secret stored by an older version with HOST_DATA alone releases nothing
    (and says how to re-store it); --any-uvm is the owner's explicit choice."""
    own_uvm = emulated_guest(tmp_path / "own-uvm", measurement=bytes(range(48)))
    legacy = json.loads(new_secret("legacy", SECRET, ReleasePolicy((POLICY_HASH,), (MEASUREMENT.hex(),),
                                                                   allow_emulated=True)).to_bytes())
    legacy["format"] = "parma-sandbox/kbs-secret/v1"
    legacy["release_policy"] = {"host_data": [POLICY_HASH], "measurement": [], "min_tcb": None,
                                "allow_emulated": True, "allow_debug": False}
    (store.secrets_dir / "legacy.json").write_text(json.dumps(legacy))
    store.put(new_secret("anywhere", SECRET, ReleasePolicy((POLICY_HASH,), allow_emulated=True, any_uvm=True)))
    with running_broker(store) as server:
        status, doc = _release(server.url, "emu-ok", _evidence(_challenge(server.url), own_uvm, runtime))
        _refused(store, status, doc, reason=f"MEASUREMENT {bytes(range(48)).hex()} is not an allowed launch "
                                            "measurement", check="release.measurement")
        status, doc = _release(server.url, "legacy", _evidence(_challenge(server.url), own_uvm, runtime))
        _refused(store, status, doc, reason="bound to HOST_DATA alone", check="release.measurement")
        assert "secret put NAME --replace" in doc["message"]
        status, doc = _release(server.url, "anywhere", _evidence(_challenge(server.url), own_uvm, runtime))
        assert status == 200 and _last_audit(store)["event"] == "release"
