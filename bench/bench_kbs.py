"""Key release costs: the agent's crypto path against bare OpenSSL calls, and a whole release on loopback.

Measures (median of N runs, milliseconds):
- AES-256-GCM open of a 64 KiB secret (the largest allowed): the agent's wrapper (sandbox/guest/keys.py)
  vs `cryptography` called directly (ratio: the wrapper's overhead);
- opening a sealed 1 KiB secret as the agent does (pin check, ECDSA P-384 verify, ECDH, HKDF, AES-GCM)
  vs the same steps with `cryptography` called directly (ratio);
- a whole release as the agent does it, against `kbs serve` logic on 127.0.0.1: challenge, emulated evidence
  (report signed by the emulated PSP), verification, sealing, opening;
- 200 concurrent bad requests against the broker: wall time, and that it still releases afterwards.
Host numbers; bench/bench_attest.py measures the agent's crypto inside the UVM under TCG.

Usage: python bench/bench_kbs.py [--iterations N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from kbsenv import LOOPBACK_BROKER, MEASUREMENT, POLICY_HASH, emulated_guest, running_broker

from sandbox.guest import keyapi, snp_report
from sandbox.guest.keyapi import open_sealed
from sandbox.guest.keys import RuntimeKey, aes_gcm_decrypt
from sandbox.kbs.release import seal
from sandbox.kbs.store import KbsStore, ReleasePolicy, new_secret
from sandbox.shared.kbs_protocol import KEY_SIZE, header, key_info, key_pin, signed_bytes


def median_ms(fn: Any, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(samples), 3)


def open_with_openssl(sealed: Any, name: str, nonce: bytes, runtime: ec.EllipticCurvePrivateKey) -> bytes:
    runtime_der = runtime.public_key().public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    aad = header(secret=name, nonce=nonce, runtime_public_key=runtime_der,
                 ephemeral_public_key=sealed.ephemeral_public_key, broker_public_key=sealed.broker_public_key)
    broker = serialization.load_der_public_key(sealed.broker_public_key)
    broker.verify(sealed.signature, signed_bytes(aad, sealed.iv, sealed.ciphertext), ec.ECDSA(hashes.SHA384()))
    z = runtime.exchange(ec.ECDH(), serialization.load_der_public_key(sealed.ephemeral_public_key))
    key = HKDF(algorithm=hashes.SHA384(), length=KEY_SIZE, salt=nonce, info=key_info(aad)).derive(z)
    return AESGCM(key).decrypt(sealed.iv, sealed.ciphertext, aad)


def bad_request(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /kbs/v1/release HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n"
                  b"{\"secret\":1}")
        return s.recv(64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=20)
    n = parser.parse_args().iterations
    out: dict[str, Any] = {"iterations": n, "loadavg": os.getloadavg()}

    key, iv, data = os.urandom(32), os.urandom(12), os.urandom(64 * 1024)
    sealed64 = AESGCM(key).encrypt(iv, data, b"aad")
    ours = median_ms(lambda: aes_gcm_decrypt(key, iv, sealed64, b"aad"), n)
    ref = median_ms(lambda: AESGCM(key).decrypt(iv, sealed64, b"aad"), n)
    out["aes_gcm_open_64k_ms"] = {"agent": ours, "openssl": ref, "ratio": round(ours / ref, 1)}

    broker_key = ec.generate_private_key(ec.SECP384R1())
    runtime_ref = ec.generate_private_key(ec.SECP384R1())
    runtime = RuntimeKey(runtime_ref)
    nonce = os.urandom(32)
    sealed = seal(os.urandom(1024), secret="s", nonce=nonce, runtime_public_key=runtime.public_der,
                  broker_key=broker_key)
    pins = {key_pin(sealed.broker_public_key)}
    ours = median_ms(lambda: open_sealed(sealed, secret="s", nonce=nonce, runtime_key=runtime, pins=pins), n)
    ref = median_ms(lambda: open_with_openssl(sealed, "s", nonce, runtime_ref), n)
    out["open_sealed_1k_ms"] = {"agent": ours, "openssl": ref, "ratio": round(ours / ref, 1)}

    with tempfile.TemporaryDirectory() as tmp:
        store = KbsStore.open(Path(tmp) / "kbs")
        store.put(new_secret("s", os.urandom(1024), ReleasePolicy((POLICY_HASH,), (MEASUREMENT.hex(),),
                                                                             allow_emulated=True)))
        guest = emulated_guest(Path(tmp) / "guest")
        pin = frozenset({store.broker_pin()})
        with running_broker(store) as server:
            def release() -> bytes:
                return keyapi.release_secret(server.url, "s", runtime_key=runtime, pins=pin,
                                             evidence_for=lambda nc: snp_report.evidence_for(nc, key=runtime,
                                                                                            paths=guest),
                                             connection=LOOPBACK_BROKER)
            release()
            out["release_round_trip_ms"] = median_ms(release, n)
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
                replies = list(pool.map(lambda _: bad_request(server.server_address[1]), range(200)))
            out["bad_requests_200"] = {"wall_ms": round((time.perf_counter() - t0) * 1000, 1),
                                       "answered": sum(1 for r in replies if r.startswith(b"HTTP/")),
                                       "release_after_ok": len(release()) == 1024}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
