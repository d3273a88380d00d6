"""SEV-SNP ID block / ID auth: byte-exact layouts, known answers from sev-snp-measure, and the PSP's checks.

Known answers: tests/data/snp-id/kat.json, produced here by sev-snp-measure 0.0.13 (a public tool)
with throwaway test keys (tests/gen_snp_id_kat.py records how). sev-snp-measure signs with random
nonces, so its ID blocks, keys and digests are compared byte for byte and its signatures by
verification; ours are deterministic (RFC 6979) and must differ from its only in the signature slots.
The upstream vector (sev-snp-measure's tests/test_id_block.py, in the shared vectors) is checked too.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import pytest
from snpvectors import snp_dir

from sandbox.attest.id_keys import (
    check_launch,
    firmware_public_key,
    key_digest,
    load_private_key,
    make_id_material,
    parse_digest,
)
from sandbox.shared.errors import InputError
from sandbox.shared.snp import ecdsa_public_key, ecdsa_signature, id_auth, id_block
from sandbox.shared.snp.ecdsa_public_key import EcdsaPublicKey
from sandbox.shared.snp.ecdsa_signature import EcdsaSignature
from sandbox.shared.snp.id_auth import IdAuth
from sandbox.shared.snp.id_block import IdBlock

DATA = Path(__file__).parents[1] / "data" / "snp-id"
KAT = json.loads((DATA / "kat.json").read_text())
ID_KEY = load_private_key(DATA / "id_key.pem")
AUTHOR_KEY = load_private_key(DATA / "author_key.pem", "author key")
POLICY = 0x30000


def test_layout_sizes_and_offsets_follow_the_abi() -> None:
    assert id_block.SIZE == 0x60 and id_auth.SIZE == 0x1000
    assert ecdsa_signature.SIZE == 0x200 and ecdsa_public_key.SIZE == 0x404
    ld, fam, img = bytes(range(48)), b"F" * 16, b"I" * 16
    raw = IdBlock(ld, 0x30000, fam, img, guest_svn=7).to_bytes()
    assert raw[0x00:0x30] == ld and raw[0x30:0x40] == fam and raw[0x40:0x50] == img
    assert struct.unpack_from("<IIQ", raw, 0x50) == (1, 7, 0x30000)
    key = EcdsaPublicKey(x=0x0102, y=0x0304).to_bytes()
    assert key[:4] == b"\x02\0\0\0" and key[4:6] == b"\x02\x01" and key[0x4C:0x4E] == b"\x04\x03"
    assert not any(key[0x94:])
    sig = EcdsaSignature(r=1, s=2).to_bytes()
    assert sig[0] == 1 and sig[0x48] == 2 and not any(sig[0x90:])


def test_our_structures_parse_back_byte_exact() -> None:
    m = make_id_material(measurement=bytes(range(48)), policy=POLICY, id_key=ID_KEY, author_key=AUTHOR_KEY,
                         family_id=b"\x01" * 16, image_id=b"\x02" * 16, guest_svn=3)
    assert IdBlock.from_bytes(m.block.to_bytes()) == m.block
    raw = m.auth.to_bytes()
    assert IdAuth.from_bytes(raw).to_bytes() == raw
    assert struct.unpack_from("<II", raw, 0) == (1, 1)
    assert raw[0x240:0x644] == firmware_public_key(ID_KEY).to_bytes()
    assert raw[0x880:0xC84] == firmware_public_key(AUTHOR_KEY).to_bytes()
    # Deterministic: the same inputs give the same bytes.
    again = make_id_material(measurement=bytes(range(48)), policy=POLICY, id_key=ID_KEY, author_key=AUTHOR_KEY,
                             family_id=b"\x01" * 16, image_id=b"\x02" * 16, guest_svn=3)
    assert again.auth.to_bytes() == raw


def test_without_an_author_key_the_author_part_is_zero() -> None:
    m = make_id_material(measurement=bytes(48), policy=POLICY, id_key=ID_KEY)
    raw = m.auth.to_bytes()
    assert struct.unpack_from("<II", raw, 0) == (1, 0)
    assert not any(raw[0x644:])
    assert m.author_key_digest is None and not m.author_key_enabled


@pytest.mark.parametrize("case", KAT["cases"], ids=lambda c: c["label"])
def test_sev_snp_measure_known_answers(case: dict) -> None:
    """The ID block sev-snp-measure made equals ours; its ID auth parses, verifies and re-serialises exactly."""
    ld = bytes.fromhex(case["measurement"])
    theirs_block = base64.b64decode(case["id_block"])
    theirs_auth = base64.b64decode(case["id_auth"])
    ours = make_id_material(measurement=ld, policy=POLICY, id_key=ID_KEY, author_key=AUTHOR_KEY)
    assert ours.block.to_bytes() == theirs_block
    assert ours.id_key_digest == base64.b64decode(case["id_key_digest_b64"]) == key_digest(ID_KEY)
    assert ours.author_key_digest == base64.b64decode(case["author_key_digest_b64"]) == key_digest(AUTHOR_KEY)
    parsed = IdAuth.from_bytes(theirs_auth)
    assert parsed.to_bytes() == theirs_auth
    mine = ours.auth.to_bytes()
    spliced = bytearray(theirs_auth)
    for lo, hi in ((0x040, 0x240), (0x680, 0x880)):     # only the two signature slots may differ
        spliced[lo:hi] = mine[lo:hi]
    assert bytes(spliced) == mine
    # Their signatures verify under the PSP's checks, with and without AUTHOR_KEY_EN.
    for author in (True, False):
        checked = check_launch(theirs_block, base64.b64decode(case["id_auth"]), measurement=ld, policy=POLICY,
                               author_key_enabled=author)
        assert checked.id_key_digest == ours.id_key_digest
        assert (checked.author_key_digest is not None) == author


def test_upstream_vector_digests() -> None:
    keys = snp_dir() / "sev-snp-measure/keyfile"
    ld = base64.b64decode("B28FLQi9p6cAqipgjFyqawDrrSl7bWioWkWx5mmlWLZ+G5HShKMB/mPE+gdQRn7t")
    m = make_id_material(measurement=ld, policy=POLICY, id_key=load_private_key(keys / "id_key_test.pem"),
                         author_key=load_private_key(keys / "author_key_test.pem"))
    assert base64.b64encode(m.block.to_bytes()).decode() == (
        "B28FLQi9p6cAqipgjFyqawDrrSl7bWioWkWx5mmlWLZ+G5HShKMB/mPE+gdQRn7t"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABAAAAAAAAAAAAAwAAAAAA")
    assert base64.b64encode(m.id_key_digest).decode() == \
        "hwt+NcU/inLQ0yL3WrKvgmJ5Kq9leWIs5BMcPyHyied8sFYKXjuQs5MuZ07HCcsU"
    assert base64.b64encode(m.author_key_digest or b"").decode() == \
        "YxEcNLv8Ckk4+aAJvQdJgNgXIyPmFZnJ/TNtqGcySOHcqY0L6PdjdqEGuK/UwKBX"


def test_the_psp_checks_refuse_what_the_firmware_refuses() -> None:
    ld = bytes(range(48))
    m = make_id_material(measurement=ld, policy=POLICY, id_key=ID_KEY, author_key=AUTHOR_KEY)
    block, auth = m.block.to_bytes(), m.auth.to_bytes()
    check_launch(block, auth, measurement=ld, policy=POLICY, author_key_enabled=True)
    with pytest.raises(InputError, match="LD .* is not the launch digest"):
        check_launch(block, auth, measurement=bytes(48), policy=POLICY, author_key_enabled=True)
    with pytest.raises(InputError, match="POLICY 0x30000 is not the guest policy 0xb0000"):
        check_launch(block, auth, measurement=ld, policy=0xB0000, author_key_enabled=True)
    forged = bytearray(block)
    forged[0x30] ^= 1                                  # FAMILY_ID changed after signing
    with pytest.raises(InputError, match="ID_BLOCK_SIG does not verify"):
        check_launch(bytes(forged), auth, measurement=ld, policy=POLICY, author_key_enabled=True)
    other = make_id_material(measurement=ld, policy=POLICY, id_key=AUTHOR_KEY, author_key=ID_KEY).auth.to_bytes()
    swapped = auth[:0x680] + other[0x680:0x880] + auth[0x880:]     # ID_KEY_SIG by the wrong key
    with pytest.raises(InputError, match="ID_KEY_SIG does not verify"):
        check_launch(block, swapped, measurement=ld, policy=POLICY, author_key_enabled=True)
    no_author = make_id_material(measurement=ld, policy=POLICY, id_key=ID_KEY).auth.to_bytes()
    with pytest.raises(InputError, match="AUTH_KEY_ALGO 0"):
        check_launch(block, no_author, measurement=ld, policy=POLICY, author_key_enabled=True)


def test_bad_structures_are_input_errors() -> None:
    with pytest.raises(InputError, match="0x60 bytes|96 bytes"):
        IdBlock.from_bytes(bytes(95))
    bad_version = bytearray(IdBlock(bytes(48), POLICY).to_bytes())
    bad_version[0x50] = 2
    with pytest.raises(InputError, match="VERSION is 2"):
        IdBlock.from_bytes(bytes(bad_version))
    auth = bytearray(make_id_material(measurement=bytes(48), policy=POLICY, id_key=ID_KEY).auth.to_bytes())
    auth[0x10] = 1
    with pytest.raises(InputError, match="reserved bytes 0x8..0x3f"):
        IdAuth.from_bytes(bytes(auth))
    with pytest.raises(InputError, match="curve 3"):
        EcdsaPublicKey.from_bytes(struct.pack("<I", 3).ljust(0x404, b"\0"))


def test_digest_arguments(tmp_path: Path) -> None:
    digest = key_digest(ID_KEY)
    assert parse_digest(digest.hex(), "--id-key-digest") == digest
    assert parse_digest(base64.b64encode(digest).decode(), "--id-key-digest") == digest
    assert parse_digest(str(DATA / "id_key.pem"), "--id-key-digest") == digest
    from cryptography.hazmat.primitives import serialization
    pub = tmp_path / "id.pub"
    pub.write_bytes(ID_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    assert parse_digest(str(pub), "--id-key-digest") == digest
    with pytest.raises(InputError, match="SHA-384 digest"):
        parse_digest("abcd", "--id-key-digest")


def test_keys_that_the_firmware_cannot_use_are_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    p256 = tmp_path / "p256.pem"
    p256.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(InputError, match="EC P-384"):
        load_private_key(p256)
    with pytest.raises(InputError, match="cannot read"):
        load_private_key(tmp_path / "missing.pem")
