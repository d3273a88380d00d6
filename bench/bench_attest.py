"""Attestation performance: pure-Python P-384 against cryptography (OpenSSL) in the same run, plus
emulated report signing and full report verification. Prints one JSON document.

The guest runs the pure-Python code (it has no `cryptography`), under TCG emulation on laptops and
CI, so `sign_ms` of ours is the number that matters for `attest report` latency.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sandbox.shared.crypto import p384
from sandbox.shared.crypto.p384 import PrivateKey, Signature


def per_call_ms(fn: Callable[[], object], *, min_seconds: float = 0.5, min_calls: int = 5) -> float:
    fn()  # warm up (builds the fixed-base table once)
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls * 1000


def p384_numbers() -> dict[str, dict[str, float]]:
    ours = PrivateKey.generate()
    theirs = ec.derive_private_key(ours.d, ec.SECP384R1())
    peer = PrivateKey.generate()
    msg = os.urandom(672)  # the signed part of a report
    sig = ours.sign(msg)
    der_sig = theirs.sign(msg, ec.ECDSA(hashes.SHA384()))
    peer_theirs = ec.derive_private_key(peer.d, ec.SECP384R1()).public_key()
    results = {
        "keygen": (lambda: PrivateKey.generate().public_key, lambda: ec.generate_private_key(ec.SECP384R1())),
        "sign": (lambda: ours.sign(msg), lambda: theirs.sign(msg, ec.ECDSA(hashes.SHA384()))),
        "verify": (lambda: ours.public_key.verify(msg, sig),
                   lambda: theirs.public_key().verify(der_sig, msg, ec.ECDSA(hashes.SHA384()))),
        "ecdh": (lambda: ours.exchange(peer.public_key), lambda: theirs.exchange(ec.ECDH(), peer_theirs)),
    }
    out = {}
    for name, (mine, ref) in results.items():
        a, b = per_call_ms(mine), per_call_ms(ref)
        out[name] = {"ours_ms": round(a, 3), "cryptography_ms": round(b, 4), "ratio": round(a / b, 1)}
    assert ours.public_key.verify(msg, Signature.from_der(der_sig))  # the two agree
    return out


def table_build_ms() -> float:
    p384._g_table.cache_clear()
    start = time.perf_counter()
    p384._g_table()
    return round((time.perf_counter() - start) * 1000, 1)


def attestation_numbers(tmp: Path) -> dict[str, float]:
    from sandbox.attest.emulated_ca import ensure_emulated_ca
    from sandbox.attest.evidence import certificates_from_table
    from sandbox.attest.psp import launch_material
    from sandbox.attest.verify import Expectations, verify_report
    from sandbox.shared.snp.emulated_psp import EmulatedPsp

    start = time.perf_counter()
    ca = ensure_emulated_ca(tmp)
    ca_ms = (time.perf_counter() - start) * 1000
    psp = EmulatedPsp(launch_material(host_data=hashlib.sha256(b"p").digest(), measurement=bytes(48), ca=ca))
    report = psp.report(bytes(64))
    certs = certificates_from_table(psp.cert_table())
    expect = Expectations(allow_emulated=True)
    assert verify_report(report, certs, expect, emulated_ca=ca).verified
    return {
        "emulated_ca_create_ms": round(ca_ms, 1),
        "emulated_report_ms": round(per_call_ms(lambda: psp.report(os.urandom(64))), 3),
        "verify_report_ms": round(per_call_ms(lambda: verify_report(report, certs, expect, emulated_ca=ca)), 3),
    }


# Runs as the UVM's init (python3 -S -c ...) under QEMU TCG and prints one BENCH line on the console.
GUEST_CODE = (
    "import time;from sandbox.shared.crypto import p384;t=time.perf_counter();p384._g_table();"
    "tb=(time.perf_counter()-t)*1000;k=p384.PrivateKey.generate();m=bytes(672);s=k.sign(m);"
    "f=lambda g,n:(lambda t0:([g() for _ in range(n)],(time.perf_counter()-t0)/n*1000)[1])(time.perf_counter());"
    "print('BENCH',round(tb,1),round(f(lambda:p384.PrivateKey.generate().public_key,5),1),"
    "round(f(lambda:k.sign(m),10),1),round(f(lambda:k.public_key.verify(m,s),5),1),"
    "round(f(lambda:k.exchange(k.public_key),5),1),flush=True)")


def in_guest_numbers() -> dict[str, object]:
    """The same P-384 operations inside the UVM under TCG (1 vCPU), where the agent really runs them."""
    try:
        from sandbox.uvm.build import ensure_uvm
    except ImportError:
        return {"skipped": "the UVM build (sandbox.uvm) is not in this tree"}
    from sandbox.run import run
    uvm = ensure_uvm(firmware=False)
    cmdline = f'{uvm.cmdline} PYTHONPATH=/usr/lib/parma-sandbox init=/usr/bin/python3 -- -S -c "{GUEST_CODE}"'
    start = time.perf_counter()
    out = run(["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
               "-machine", "q35,accel=tcg", "-smp", "1", "-m", "512M", "-kernel", str(uvm.kernel),
               "-append", cmdline, "-serial", "stdio",
               "-drive", f"if=none,id=disk0,file={uvm.rootfs},format=raw,readonly=on",
               "-device", "virtio-blk-pci,drive=disk0,serial=parma-root", "-device", "virtio-rng-pci"],
              stdout=subprocess.PIPE, timeout=600, check=False).stdout
    wall = time.perf_counter() - start
    line = next((x for x in out.decode(errors="replace").splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        return {"error": "no BENCH line on the guest console"}
    values = [float(v) for v in line.split()[1:]]
    return {"accel": "tcg", "vcpus": 1, "boot_and_run_s": round(wall, 1),
            **dict(zip(("table_build_ms", "keygen_ms", "sign_ms", "verify_ms", "ecdh_ms"), values, strict=True))}


def main() -> int:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        doc = {
            "python": sys.version.split()[0],
            "p384_fixed_base_table_build_ms": table_build_ms(),
            "p384": p384_numbers(),
            "attestation": attestation_numbers(Path(tmp)),
            "p384_in_uvm_tcg": in_guest_numbers(),
        }
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
