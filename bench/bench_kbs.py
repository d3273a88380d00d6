"""Key release costs: the guest's pure-Python crypto against OpenSSL, and a whole release on loopback.

Measures (median of N runs, milliseconds):
- AES-256-GCM open of a 64 KiB secret (the largest allowed): pure Python vs `cryptography` (ratio);
- opening a sealed 1 KiB secret in the guest (pin check, ECDSA P-384 verify, ECDH, HKDF, AES-GCM) in pure
  Python vs the same steps with `cryptography` (ratio);
- a whole release as the agent does it, against `kbs serve` logic on 127.0.0.1: challenge, emulated evidence
  (report signed by the emulated PSP in pure Python), verification, sealing, opening;
- 200 concurrent bad requests against the broker: wall time, and that it still releases afterwards.
Host numbers; a TCG guest runs the pure-Python parts roughly an order of magnitude slower.

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

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from kbsenv import POLICY_HASH, emulated_guest, running_broker  # noqa: E402

from sandbox.guest import keyapi, snp_report  # noqa: E402
from sandbox.kbs.release import seal  # noqa: E402
from sandbox.kbs.store import KbsStore, ReleasePolicy, new_secret  # noqa: E402
from sandbox.shared.crypto.aes_gcm import AesGcm  # noqa: E402
from sandbox.shared.crypto.p384 import PrivateKey  # noqa: E402
from sandbox.shared.kbs_protocol import derive_key, header, key_pin, open_sealed, signed_bytes  # noqa: E402


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
    return AESGCM(derive_key(z, nonce, aad)).decrypt(sealed.iv, sealed.ciphertext, aad)


def bad_request(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /kbs/v1/release HTTP/1.0\r\nContent-Length: 12\r\n\r\n{\"secret\":1}")
        return s.recv(64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=20)
    n = parser.parse_args().iterations
    out: dict[str, Any] = {"iterations": n, "loadavg": os.getloadavg()}

    key, iv, data = os.urandom(32), os.urandom(12), os.urandom(64 * 1024)
    sealed64 = AESGCM(key).encrypt(iv, data, b"aad")
    ours = median_ms(lambda: AesGcm(key).decrypt(iv, sealed64, b"aad"), n)
    ref = median_ms(lambda: AESGCM(key).decrypt(iv, sealed64, b"aad"), n)
    out["aes_gcm_open_64k_ms"] = {"pure_python": ours, "openssl": ref, "ratio": round(ours / ref, 1)}

    broker_key = ec.generate_private_key(ec.SECP384R1())
    runtime = PrivateKey.generate()
    runtime_ref = ec.derive_private_key(runtime.d, ec.SECP384R1())
    nonce = os.urandom(32)
    sealed = seal(os.urandom(1024), secret="s", nonce=nonce, runtime_public_key=runtime.public_key.to_der(),
                  broker_key=broker_key)
    pins = {key_pin(sealed.broker_public_key)}
    ours = median_ms(lambda: open_sealed(sealed, secret="s", nonce=nonce, runtime_key=runtime, pins=pins), n)
    ref = median_ms(lambda: open_with_openssl(sealed, "s", nonce, runtime_ref), n)
    out["open_sealed_1k_ms"] = {"pure_python": ours, "openssl": ref, "ratio": round(ours / ref, 1)}

    with tempfile.TemporaryDirectory() as tmp:
        store = KbsStore.open(Path(tmp) / "kbs")
        store.put(new_secret("s", os.urandom(1024), ReleasePolicy((POLICY_HASH,), allow_emulated=True)))
        guest = emulated_guest(Path(tmp) / "guest")
        pin = frozenset({store.broker_pin()})
        with running_broker(store) as server:
            def release() -> bytes:
                return keyapi.release_secret(server.url, "s", runtime_key=runtime, pins=pin,
                                             evidence_for=lambda nc: snp_report.evidence_for(nc, key=runtime,
                                                                                            paths=guest))
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
