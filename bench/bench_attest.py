"""Attestation and key-release crypto costs: on the host, and inside the UVM under TCG where the agent runs.

The agent signs (emulated PSP reports) and unwraps sealed secrets with OpenSSL through Debian's
python3-cryptography (sandbox/guest/keys.py), imported on first use. Measured, in milliseconds:
- host: emulated CA creation, emulated report signing, full report verification;
- in the UVM (QEMU TCG, 1 vCPU, the real rootfs, `python3 -S` as the agent runs): the first import of
  cryptography (what the first key release pays, off the boot path), P-384 key generation, ECDSA sign
  of a report's 672 signed bytes, verify, ECDH, and opening a sealed 1 KiB secret (pin, ECDSA verify,
  ECDH, HKDF, AES-GCM) with the agent's own `open_sealed`.
The reference (the pure-Python P-384 and AES-GCM these replaced) is gone from the tree; its numbers
from the last run that had it, under the same conditions, are in docs/security.md.

Prints one JSON document. Usage: python bench/bench_attest.py [--no-guest]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.attest.psp_service import vcek_signer


def per_call_ms(fn: Callable[[], object], *, min_seconds: float = 0.5, min_calls: int = 5) -> float:
    fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls * 1000


def host_numbers(tmp: Path) -> dict[str, float]:
    from sandbox.attest.emulated_ca import ensure_emulated_ca
    from sandbox.attest.evidence import certificates_from_table
    from sandbox.attest.psp import launch_material
    from sandbox.attest.verify import Expectations, verify_report
    from sandbox.shared.snp.emulated_psp import EmulatedPsp

    start = time.perf_counter()
    ca = ensure_emulated_ca(tmp)
    ca_ms = (time.perf_counter() - start) * 1000
    material = launch_material(host_data=hashlib.sha256(b"p").digest(), measurement=bytes(48), ca=ca)
    psp = EmulatedPsp(material, vcek_signer(material.vcek_private_key))
    report = psp.report(bytes(64))
    certs = certificates_from_table(psp.cert_table())
    expect = Expectations(allow_emulated=True)
    assert verify_report(report, certs, expect, emulated_ca=ca).verified
    return {
        "emulated_ca_create_ms": round(ca_ms, 1),
        "emulated_report_ms": round(per_call_ms(lambda: psp.report(os.urandom(64))), 3),
        "verify_report_ms": round(per_call_ms(lambda: verify_report(report, certs, expect, emulated_ca=ca)), 3),
    }


# Runs as the UVM's init, read from a second disk; prints one BENCH line, then BENCH-END.
GUEST_SCRIPT = r'''
import json, os, time
t = time.perf_counter()
from sandbox.guest import keys
keys._modules()
import_ms = (time.perf_counter() - t) * 1000
from sandbox.guest.keyapi import open_sealed
from sandbox.shared.kbs_protocol import KEY_SIZE, Sealed, header, key_info, key_pin, signed_bytes
m = keys._modules()

def per(fn, n):
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return round((time.perf_counter() - t0) / n * 1000, 2)

def spki(k):
    return k.public_bytes(m.serialization.Encoding.DER, m.serialization.PublicFormat.SubjectPublicKeyInfo)

runtime = keys.RuntimeKey.generate()
signer = m.ec.generate_private_key(m.ec.SECP384R1())     # a stand-in for the VCEK (the PSP signs on the host)
report = os.urandom(672)
sig = signer.sign(report, m.ec.ECDSA(m.hashes.SHA384()))
signer_der = spki(signer.public_key())
broker = m.ec.generate_private_key(m.ec.SECP384R1())
ephemeral = m.ec.generate_private_key(m.ec.SECP384R1())
broker_der, ephemeral_der = spki(broker.public_key()), spki(ephemeral.public_key())
nonce = os.urandom(32)
aad = header(secret="s", nonce=nonce, runtime_public_key=runtime.public_der, ephemeral_public_key=ephemeral_der,
             broker_public_key=broker_der)
z = ephemeral.exchange(m.ec.ECDH(), keys.load_p384_public(runtime.public_der))
key = m.HKDF(algorithm=m.hashes.SHA384(), length=KEY_SIZE, salt=nonce, info=key_info(aad)).derive(z)
iv = os.urandom(12)
ct = m.AESGCM(key).encrypt(iv, os.urandom(1024), aad)
sealed = Sealed(ephemeral_der, broker_der, iv, ct, broker.sign(signed_bytes(aad, iv, ct), m.ec.ECDSA(m.hashes.SHA384())))
pins = {key_pin(broker_der)}
assert len(open_sealed(sealed, secret="s", nonce=nonce, runtime_key=runtime, pins=pins)) == 1024
print("BENCH " + json.dumps({
    "first_import_ms": round(import_ms, 1),
    "keygen_ms": per(keys.RuntimeKey.generate, 10),
    "verify_ms": per(lambda: keys.verify_p384(signer_der, report, sig), 20),
    "ecdh_ms": per(lambda: runtime.exchange(ephemeral_der), 20),
    "open_sealed_1k_ms": per(lambda: open_sealed(sealed, secret="s", nonce=nonce, runtime_key=runtime, pins=pins), 10),
}), flush=True)
print("BENCH-END", flush=True)
'''


def in_guest_numbers() -> dict[str, object]:
    from sandbox.uvm.boot import BootSpec, boot
    from sandbox.uvm.build import ensure_uvm

    uvm = ensure_uvm(firmware=False)
    with tempfile.TemporaryDirectory() as tmp:
        disk = Path(tmp) / "script.img"
        data = GUEST_SCRIPT.encode()
        disk.write_bytes(data + bytes(-len(data) % 4096))
        init = "/usr/bin/python3 -- -S -c \"exec(open('/dev/vdb','rb').read().rstrip(bytes(1)))\""
        cmdline = uvm.cmdline.replace(f"init={uvm.cmdline.rsplit('init=', 1)[1]}",
                                      f"PYTHONPATH=/usr/lib/parma-sandbox init={init}")
        spec = BootSpec(uvm.kernel, uvm.rootfs, cmdline, memory_mib=512, accel="tcg",
                        extra_args=("-drive", f"if=none,id=script,file={disk},format=raw,readonly=on",
                                    "-device", "virtio-blk-pci,drive=script"))
        result = boot(spec, marker="BENCH-END", timeout=600)
    line = next((x for x in result.console.splitlines() if x.startswith("BENCH {")), None)
    if line is None:
        return {"error": f"no BENCH line on the guest console ({result.outcome})", "console_tail": result.tail(15)}
    return {"accel": "tcg", "vcpus": 1, "boot_and_run_s": round(result.elapsed, 1), **json.loads(line[6:])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-guest", action="store_true", help="skip the in-UVM measurement (needs the UVM)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        doc: dict[str, object] = {"python": sys.version.split()[0], "loadavg_1m": round(os.getloadavg()[0], 2),
                                  "host": host_numbers(Path(tmp))}
    if not args.no_guest:
        doc["in_uvm_tcg"] = in_guest_numbers()
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
