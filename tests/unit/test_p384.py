"""Pure-Python P-384 against `cryptography` (OpenSSL) in both directions, plus RFC 6979 A.2.6."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from sandbox.shared.crypto import der, p384
from sandbox.shared.crypto.p384 import PrivateKey, PublicKey, Signature
from sandbox.shared.errors import InputError

RFC6979_KEY = int("6B9D3DAD2E1B8C1C05B19875B6659F4DE23C3B667BF297BA9AA47740787137D8"
                  "96D5724E4C70A825F872C9EA60D2EDF5", 16)


def theirs(d: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(d, ec.SECP384R1())


def test_rfc6979_p384_sha384_sample() -> None:
    # RFC 6979 A.2.6, curve P-384, SHA-384, message "sample".
    sig = PrivateKey(RFC6979_KEY).sign(b"sample")
    assert sig.r == int("94EDBB92A5ECB8AAD4736E56C691916B3F88140666CE9FA73D64C4EA95AD133C"
                        "81A648152E44ACF96E36DD1E80FABE46", 16)
    assert sig.s == int("99EF4AEB15F178CEA1FE40DB2603138F130E740A19624526203B6351D0A3A94F"
                        "A329C145786E679E7B82C71A38628AC8", 16)


@pytest.mark.parametrize("seed", range(4))
def test_public_key_and_encodings_match_openssl(seed: int) -> None:
    key = PrivateKey.generate()
    ref = theirs(key.d).public_key()
    assert (key.public_key.x, key.public_key.y) == (ref.public_numbers().x, ref.public_numbers().y)
    spki = ref.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key.to_der() == spki
    assert PublicKey.from_der(spki) == key.public_key
    for fmt in (serialization.PublicFormat.UncompressedPoint, serialization.PublicFormat.CompressedPoint):
        point = ref.public_bytes(serialization.Encoding.X962, fmt)
        assert key.public_key.to_sec1(compressed=fmt == serialization.PublicFormat.CompressedPoint) == point
        assert PublicKey.from_sec1(point) == key.public_key


def test_our_signatures_verify_with_openssl_and_back() -> None:
    key = PrivateKey.generate()
    ref = theirs(key.d)
    for msg in (b"", b"hello", bytes(range(256)) * 5):
        ours = key.sign(msg)
        ref.public_key().verify(encode_dss_signature(ours.r, ours.s), msg, ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(ref.sign(msg, ec.ECDSA(hashes.SHA384())))
        assert key.public_key.verify(msg, Signature(r, s))
        assert not key.public_key.verify(msg + b"x", Signature(r, s))
        assert not key.public_key.verify(msg, Signature(r, (s + 1) % p384.N))


def test_signature_der_round_trip_matches_openssl() -> None:
    ref_der = theirs(RFC6979_KEY).sign(b"x", ec.ECDSA(hashes.SHA384()))
    sig = Signature.from_der(ref_der)
    assert (sig.r, sig.s) == decode_dss_signature(ref_der)
    assert sig.to_der() == ref_der


def test_hedged_signatures_differ_and_verify() -> None:
    key = PrivateKey(RFC6979_KEY)
    a = key.sign(b"m", extra_entropy=b"\x01" * 32)
    b = key.sign(b"m", extra_entropy=b"\x02" * 32)
    assert a != b and key.public_key.verify(b"m", a) and key.public_key.verify(b"m", b)


def test_ecdh_matches_openssl() -> None:
    mine, peer = PrivateKey.generate(), ec.generate_private_key(ec.SECP384R1())
    peer_pub = PublicKey.from_der(peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert mine.exchange(peer_pub) == peer.exchange(ec.ECDH(), theirs(mine.d).public_key())


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(InputError, match="not on the curve"):
        PublicKey(p384.GX, p384.GY + 1)
    with pytest.raises(InputError, match="SEC 1"):
        PublicKey.from_sec1(b"\x04" + bytes(10))
    with pytest.raises(InputError, match="out of range"):
        PrivateKey(p384.N)
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(der.DerError, match="P-384"):
        PublicKey.from_der(p256)
    with pytest.raises(der.DerError, match="trailing"):
        PublicKey.from_der(PrivateKey(7).public_key.to_der() + b"\0")
    assert not PrivateKey(7).public_key.verify(b"m", Signature(0, 1))


def test_der_is_strict() -> None:
    assert der.read_single(der.integer(128), der.INTEGER) == b"\x00\x80"
    with pytest.raises(der.DerError, match="non-minimal length"):
        der.read(b"\x04\x81\x01x")
    with pytest.raises(der.DerError, match="runs past"):
        der.read(b"\x04\x05ab")
    assert der.parse_oid(der.read_single(der.oid("1.3.6.1.4.1.3704.1.3.8"), der.OID)) == "1.3.6.1.4.1.3704.1.3.8"
