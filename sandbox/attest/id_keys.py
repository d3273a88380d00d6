"""SEV-SNP ID blocks signed with a guest owner's ID key (and optional author key), and their checks.

With an ID block the PSP itself enforces the measurement: SNP_LAUNCH_FINISH verifies ID_BLOCK_SIG
with the ID key (and, with AUTHOR_KEY_EN, ID_KEY_SIG with the author key), and refuses the launch
unless the block's LD equals the launch digest and its POLICY equals the guest policy. Reports then
carry ID_KEY_DIGEST / AUTHOR_KEY_DIGEST (SHA-384 of the keys in the firmware's public key format),
FAMILY_ID, IMAGE_ID and GUEST_SVN. `check_launch` performs those same checks for the emulated PSP.

Signatures are deterministic (RFC 6979), so the same key and inputs give byte-identical structures.
Layouts: sandbox/shared/snp/{id_block,id_auth,ecdsa_signature,ecdsa_public_key}.py.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from sandbox.shared.errors import InputError
from sandbox.shared.snp.ecdsa_public_key import EcdsaPublicKey
from sandbox.shared.snp.ecdsa_signature import EcdsaSignature
from sandbox.shared.snp.id_auth import ALGO_ECDSA_P384_SHA384, IdAuth
from sandbox.shared.snp.id_block import IdBlock

DIGEST_SIZE = 48
KEY_HINT = "create one with: openssl ecparam -name secp384r1 -genkey -noout -out id_key.pem"


def load_private_key(path: Path, what: str = "ID key") -> ec.EllipticCurvePrivateKey:
    """An EC P-384 private key from a PEM or DER file (unencrypted)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the {what} {path}: {e.strerror}") from e
    try:
        loader = serialization.load_pem_private_key if b"-----BEGIN" in data else serialization.load_der_private_key
        key = loader(data, password=None)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: not an unencrypted private key ({e})", hint=KEY_HINT) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise InputError(f"{path}: the {what} must be an EC P-384 key (the only kind the SNP firmware accepts)",
                         hint=KEY_HINT)
    return key


def firmware_public_key(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> EcdsaPublicKey:
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    numbers = pub.public_numbers()
    return EcdsaPublicKey(numbers.x, numbers.y)


def key_digest(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    """What a report's ID_KEY_DIGEST / AUTHOR_KEY_DIGEST holds for this key."""
    return firmware_public_key(key).digest()


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> EcdsaSignature:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA384(), deterministic_signing=True)))
    return EcdsaSignature(r, s)


def _verify(key: EcdsaPublicKey, signature: EcdsaSignature, data: bytes) -> bool:
    try:
        pub = ec.EllipticCurvePublicNumbers(key.x, key.y, ec.SECP384R1()).public_key()
        pub.verify(encode_dss_signature(signature.r, signature.s), data, ec.ECDSA(hashes.SHA384()))
        return True
    except (InvalidSignature, ValueError):
        return False


@dataclass(frozen=True)
class IdMaterial:
    """An ID block, its ID auth structure, and the report digests they produce."""

    block: IdBlock
    auth: IdAuth

    @property
    def author_key_enabled(self) -> bool:
        return self.auth.has_author_key

    @property
    def id_key_digest(self) -> bytes:
        return self.auth.id_key.digest()

    @property
    def author_key_digest(self) -> bytes | None:
        return self.auth.author_key.digest() if self.auth.author_key else None

    def to_json(self) -> dict[str, object]:
        return {
            "id_block": base64.b64encode(self.block.to_bytes()).decode(),
            "id_auth": base64.b64encode(self.auth.to_bytes()).decode(),
            "author_key_enabled": self.author_key_enabled,
            "measurement": self.block.launch_digest.hex(), "policy": hex(self.block.policy),
            "family_id": self.block.family_id.hex(), "image_id": self.block.image_id.hex(),
            "guest_svn": self.block.guest_svn,
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex() if self.author_key_digest else None,
        }


def make_id_material(*, measurement: bytes, policy: int, id_key: ec.EllipticCurvePrivateKey,
                     author_key: ec.EllipticCurvePrivateKey | None = None, family_id: bytes = bytes(16),
                     image_id: bytes = bytes(16), guest_svn: int = 0) -> IdMaterial:
    """Sign an ID block for `measurement` under `policy` (the launch's own policy)."""
    block = IdBlock(measurement, policy, family_id, image_id, guest_svn)
    id_pub = firmware_public_key(id_key)
    auth = IdAuth(id_block_sig=sign(id_key, block.to_bytes()), id_key=id_pub,
                  id_key_sig=sign(author_key, id_pub.to_bytes()) if author_key else None,
                  author_key=firmware_public_key(author_key) if author_key else None)
    return IdMaterial(block, auth)


def check_launch(block_bytes: bytes, auth_bytes: bytes, *, measurement: bytes, policy: int,
                 author_key_enabled: bool) -> IdMaterial:
    """The SNP_LAUNCH_FINISH checks of an ID block (for the emulated PSP). Raises InputError on any failure."""
    block = IdBlock.from_bytes(block_bytes)
    auth = IdAuth.from_bytes(auth_bytes, author_key_enabled=author_key_enabled)
    problems = []
    if auth.id_key_algo != ALGO_ECDSA_P384_SHA384:
        problems.append(f"ID_KEY_ALGO {auth.id_key_algo} is not ECDSA P-384/SHA-384")
    if not _verify(auth.id_key, auth.id_block_sig, block.to_bytes()):
        problems.append("ID_BLOCK_SIG does not verify under the ID key")
    if author_key_enabled:
        if auth.author_key is None or auth.id_key_sig is None:
            problems.append("AUTHOR_KEY_EN is set but the ID auth structure has no author key")
        elif not _verify(auth.author_key, auth.id_key_sig, auth.id_key.to_bytes()):
            problems.append("ID_KEY_SIG does not verify under the author key")
    if block.launch_digest != measurement:
        problems.append(f"the ID block's LD {block.launch_digest.hex()} is not the launch digest {measurement.hex()}")
    if block.policy != policy:
        problems.append(f"the ID block's POLICY {block.policy:#x} is not the guest policy {policy:#x}")
    if problems:
        raise InputError("the ID block does not authorize this launch: " + "; ".join(problems))
    if not author_key_enabled and auth.author_key is not None:
        auth = IdAuth(auth.id_block_sig, auth.id_key, id_key_algo=auth.id_key_algo)  # ignored, as the PSP does
    return IdMaterial(block, auth)


def parse_digest(value: str, option: str) -> bytes:
    """A key digest given as 96 hex digits, as base64 (what sev-snp-measure prints), or as a key file."""
    text = value.strip()
    candidate = Path(text)
    if len(text) not in (64, 96) and candidate.is_file():
        return _digest_of_key_file(candidate, option)
    try:
        raw = bytes.fromhex(text.removeprefix("0x")) if len(text.removeprefix("0x")) == 2 * DIGEST_SIZE \
            else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != DIGEST_SIZE:
        raise InputError(f"{option}: expected a SHA-384 digest (96 hex digits or base64) or a key file, got {value!r}")
    return raw


def _digest_of_key_file(path: Path, option: str) -> bytes:
    data = path.read_bytes()
    try:
        if b"PRIVATE KEY" in data:
            return key_digest(load_private_key(path, option.lstrip("-")))
        pub = serialization.load_pem_public_key(data) if b"-----BEGIN" in data \
            else serialization.load_der_public_key(data)
    except ValueError as e:
        raise InputError(f"{option}: {path} is not a key ({e})") from e
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP384R1):
        raise InputError(f"{option}: {path} is not an EC P-384 key")
    return key_digest(pub)
