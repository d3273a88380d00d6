"""The agent's crypto (sandbox/guest/keys.py) under Debian's own python3 and python3-cryptography: the
exact library version the UVM rootfs pins (images/uvm/packages.lock.json), run as the agent runs
(`python3 -S`, so dist-packages is not on sys.path until keys.py adds it). The host side (pyca/cryptography
from PyPI) signs and seals; the Debian side generates, verifies and opens."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sandbox.kbs.release import seal
from sandbox.shared.kbs_protocol import key_pin

REPO = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = Path("/usr/bin/python3")
LOCK = REPO / "images" / "uvm" / "packages.lock.json"

def _debian_cryptography_version() -> str:
    pinned = {p["name"]: p["version"] for p in json.loads(LOCK.read_text())["packages"]}
    return pinned["python3-cryptography"].split("-")[0]


@pytest.fixture(scope="module")
def debian_python() -> Path:
    if not DEBIAN_PYTHON.exists():
        pytest.skip("no Debian /usr/bin/python3")
    done = subprocess.run([DEBIAN_PYTHON, "-c", "import cryptography; print(cryptography.__version__)"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("Debian's python3-cryptography is not installed (scripts/install-host-packages.sh)")
    if done.stdout.strip() != _debian_cryptography_version():
        pytest.skip(f"Debian's python3-cryptography is {done.stdout.strip()}, the UVM pins "
                    f"{_debian_cryptography_version()}")
    return DEBIAN_PYTHON


def test_sign_exchange_and_open_with_debians_cryptography(debian_python: Path) -> None:
    broker = ec.generate_private_key(ec.SECP384R1())
    nonce = os.urandom(32)
    value = os.urandom(2000)
    # Step 1: the guest makes its runtime key and signs; step 2 (same process): it opens what the host sealed.
    script = r'''
import base64, json, sys
from sandbox.guest import keys
from sandbox.guest.keyapi import open_sealed
from sandbox.shared.kbs_protocol import Sealed
request = json.loads(sys.stdin.readline())
runtime = keys.RuntimeKey.generate()
verified = [keys.verify_p384(base64.b64decode(request["signer"]), data, base64.b64decode(request["signature"]))
            for data in (b"report bytes", b"other bytes")]
print(json.dumps({"runtime": base64.b64encode(runtime.public_der).decode()}), flush=True)
sealed = Sealed.from_payload(json.loads(sys.stdin.readline()))
value = open_sealed(sealed, secret="db-key", nonce=bytes.fromhex(request["nonce"]), runtime_key=runtime,
                    pins={request["pin"]})
import cryptography  # importable now: keys.py put dist-packages on sys.path
print(json.dumps({"version": cryptography.__version__, "verified": verified, "value": base64.b64encode(value).decode(),
                  "path_tail": sys.path[-1]}))
'''
    pin = key_pin(broker.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    proc = subprocess.Popen([debian_python, "-S", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/",
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.stdin is not None and proc.stdout is not None
    signer = ec.generate_private_key(ec.SECP384R1())
    signature = signer.sign(b"report bytes", ec.ECDSA(hashes.SHA384()))
    signer_der = signer.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    proc.stdin.write(json.dumps({"signer": base64.b64encode(signer_der).decode(), "nonce": nonce.hex(), "pin": pin,
                                 "signature": base64.b64encode(signature).decode()}) + "\n")
    proc.stdin.flush()
    runtime_der = base64.b64decode(json.loads(proc.stdout.readline())["runtime"])
    sealed = seal(value, secret="db-key", nonce=nonce, runtime_public_key=runtime_der, broker_key=broker)
    out, err = proc.communicate(json.dumps(sealed.to_payload()) + "\n", timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["version"] == _debian_cryptography_version()
    assert result["path_tail"] == "/usr/lib/python3/dist-packages"  # found the way the agent finds it
    assert base64.b64decode(result["value"]) == value
    assert result["verified"] == [True, False]
