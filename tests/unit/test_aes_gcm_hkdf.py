"""Pure-Python AES-GCM and HKDF (the guest's key-release crypto) against FIPS 197, RFC 5869 and OpenSSL."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sandbox.shared.crypto.aes_gcm import AesGcm, AuthenticationError, encrypt_block, expand_key
from sandbox.shared.crypto.hkdf import hkdf
from sandbox.shared.errors import InputError

PLAINTEXT = bytes.fromhex("00112233445566778899aabbccddeeff")


@pytest.mark.parametrize(("key_size", "expected"), [
    # FIPS 197 Appendix C.1-C.3: key 000102..., plaintext 00112233...
    (16, "69c4e0d86a7b0430d8cdb78070b4c55a"),
    (24, "dda97ca4864cdfe06eaf70a0ec0d7191"),
    (32, "8ea2b7ca516745bfeafc49904b496089"),
])
def test_aes_fips197_example_vectors(key_size: int, expected: str) -> None:
    assert encrypt_block(expand_key(bytes(range(key_size))), PLAINTEXT).hex() == expected


@pytest.mark.parametrize("key_size", [16, 24, 32])
@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 64, 1000])
def test_gcm_matches_openssl_both_ways(key_size: int, length: int) -> None:
    key, iv, data, aad = os.urandom(key_size), os.urandom(12), os.urandom(length), os.urandom(length % 41)
    sealed = AESGCM(key).encrypt(iv, data, aad)
    assert AesGcm(key).encrypt(iv, data, aad) == sealed
    assert AesGcm(key).decrypt(iv, sealed, aad) == data
    assert AESGCM(key).decrypt(iv, AesGcm(key).encrypt(iv, data, aad), aad) == data


def test_gcm_refuses_any_change() -> None:
    key, iv, aad = os.urandom(32), os.urandom(12), b"header"
    sealed = AesGcm(key).encrypt(iv, b"the secret value", aad)
    gcm = AesGcm(key)
    for i in (0, len(sealed) // 2, len(sealed) - 1):  # ciphertext and tag bytes
        flipped = bytearray(sealed)
        flipped[i] ^= 1
        with pytest.raises(AuthenticationError):
            gcm.decrypt(iv, bytes(flipped), aad)
    with pytest.raises(AuthenticationError):
        gcm.decrypt(iv, sealed, b"Header")
    with pytest.raises(AuthenticationError):
        gcm.decrypt(os.urandom(12), sealed, aad)
    with pytest.raises(AuthenticationError):
        AesGcm(os.urandom(32)).decrypt(iv, sealed, aad)
    with pytest.raises(AuthenticationError):
        gcm.decrypt(iv, sealed[:15], aad)
    with pytest.raises(InputError):
        gcm.decrypt(b"short", sealed, aad)
    with pytest.raises(InputError):
        AesGcm(b"not a key")


def test_hkdf_rfc5869_case_1_and_openssl() -> None:
    # RFC 5869 A.1 (SHA-256).
    okm = hkdf(bytes([0x0B] * 22), salt=bytes(range(13)), info=bytes(range(0xF0, 0xFA)), length=42,
               hash_name="sha256")
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")
    ikm, salt, info = os.urandom(48), os.urandom(32), b"parma"
    for length in (1, 32, 48, 100):
        assert hkdf(ikm, salt=salt, info=info, length=length) == HKDF(hashes.SHA384(), length, salt,
                                                                        info).derive(ikm)
    with pytest.raises(InputError):
        hkdf(ikm, salt=salt, info=info, length=255 * 48 + 1)
