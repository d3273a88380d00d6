"""sandbox/shared/sha2.py: SHA-2 without OpenSSL, digests identical to hashlib's."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.shared import sha2

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("algorithm", sha2.ALGORITHMS)
def test_digests_equal_hashlibs(algorithm: str) -> None:
    for size in (0, 1, 55, 56, 63, 64, 111, 112, 127, 128, 4096, 100_003):
        data = os.urandom(size)
        expected = hashlib.new(algorithm, data).digest()
        assert sha2.new(algorithm, data).digest() == expected
        assert sha2.new(algorithm.upper(), data).digest() == expected
        h = sha2.new(algorithm)
        h.update(data[:size // 2])
        h.copy().update(b"not this")
        h.update(data[size // 2:])
        assert h.digest() == expected and h.digest_size == hashlib.new(algorithm).digest_size


def test_named_constructors() -> None:
    for name in ("sha256", "sha384", "sha512"):
        assert getattr(sha2, name)(b"abc").hexdigest() == hashlib.new(name, b"abc").hexdigest()


def test_other_algorithms_go_to_hashlib() -> None:
    assert sha2.new("sha1", b"abc").digest() == hashlib.sha1(b"abc").digest()
    with pytest.raises(ValueError):
        sha2.new("no-such-hash")


def test_the_up_path_in_the_guest_does_not_load_openssl() -> None:
    """What the agent loads for `up` (the preload list: report, policy engine, mounts, containers), its
    policy hash and a layer's root hash, without OpenSSL's _hashlib (about 100 ms under TCG)."""
    code = """
import importlib, io, sys
from sandbox.guest import agent
for name in agent.PRELOAD:
    importlib.import_module(name)
from sandbox.shared import sha2, verity
from sandbox.shared.snp import binding
sha2.sha256(b"policy").digest()
binding.report_data_for(bytes(32), b"")
print(sorted(m for m in ("_hashlib", "hashlib", "hmac") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.strip() == "[]"
