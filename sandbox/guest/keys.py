"""The agent's cryptography: P-384 keys, ECDSA, ECDH, HKDF and AES-GCM, all done by OpenSSL.

On an SEV-SNP host the hypervisor can watch the guest's timing and page faults, so nothing that
touches a secret key may be hand-written Python arithmetic. This module wraps Debian's
python3-cryptography (pyca/cryptography over OpenSSL; pinned in images/uvm/packages.lock.json), which
the host side uses too. `cryptography` is imported on first use, never at import time: the agent
imports this module at boot, and only signing or a key release pays for loading OpenSSL's bindings.

The guest has python3-cryptography 38 (bookworm); nothing here needs a newer API.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

from sandbox.shared.errors import CheckFailed

if TYPE_CHECKING:  # annotations only: the real imports are lazy
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey, EllipticCurvePublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# The agent runs `python3 -S` (no site.py: a faster boot), which leaves Debian's dist-packages off
# sys.path. It is appended, last, on first use: nothing there can shadow the stdlib or the agent.
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"


class CryptoError(CheckFailed):
    """A key, signature or ciphertext that OpenSSL refused: an AES-GCM tag that does not authenticate
    is a failed check."""


def make_cryptography_importable() -> None:
    """Let `import cryptography` find Debian's package in the UVM (the agent runs without site.py)."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if DEBIAN_DIST_PACKAGES not in sys.path:
            sys.path.append(DEBIAN_DIST_PACKAGES)


@functools.cache
def _modules() -> Any:
    """cryptography's modules, loaded once (bench/bench_attest.py measures the cost in the UVM)."""
    from types import SimpleNamespace

    make_cryptography_importable()

    from cryptography.exceptions import InvalidSignature, InvalidTag
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return SimpleNamespace(InvalidSignature=InvalidSignature, InvalidTag=InvalidTag, hashes=hashes,
                           serialization=serialization, ec=ec, AESGCM=AESGCM, HKDF=HKDF)


def load() -> None:
    """Import cryptography now rather than on first use (the agent does, on its preload thread)."""
    _modules()


def _spki(key: EllipticCurvePublicKey) -> bytes:
    m = _modules()
    return key.public_bytes(m.serialization.Encoding.DER, m.serialization.PublicFormat.SubjectPublicKeyInfo)


def load_p384_public(der: bytes) -> EllipticCurvePublicKey:
    """A P-384 public key from DER SubjectPublicKeyInfo (OpenSSL checks the point is on the curve)."""
    m = _modules()
    try:
        key = m.serialization.load_der_public_key(der)
    except (ValueError, TypeError) as e:
        raise CryptoError(f"not a DER public key: {e}") from None
    if not isinstance(key, m.ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise CryptoError("not an EC P-384 public key")
    public: EllipticCurvePublicKey = key    # m is untyped: the isinstance above is what makes this true
    return public


class RuntimeKey:
    """A P-384 key pair made in guest memory; the private half never leaves this object."""

    def __init__(self, private: EllipticCurvePrivateKey) -> None:
        self._private = private
        self.public_der = _spki(private.public_key())

    @classmethod
    def generate(cls) -> RuntimeKey:
        m = _modules()
        return cls(m.ec.generate_private_key(m.ec.SECP384R1()))

    def exchange(self, peer_public_der: bytes) -> bytes:
        """ECDH (SEC 1 §3.3.1): the 48-byte shared secret with the peer's public key."""
        m = _modules()
        return self._private.exchange(m.ec.ECDH(), load_p384_public(peer_public_der))


def verify_p384(public_der: bytes, data: bytes, signature_der: bytes) -> bool:
    """Whether `signature_der` (DER ECDSA-Sig-Value) is a valid ECDSA-SHA384 signature over `data`."""
    m = _modules()
    key = load_p384_public(public_der)
    try:
        key.verify(signature_der, data, m.ec.ECDSA(m.hashes.SHA384()))
    except (m.InvalidSignature, ValueError):
        return False
    return True


def hkdf_sha384(secret: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA384 (RFC 5869)."""
    m = _modules()
    kdf: HKDF = m.HKDF(algorithm=m.hashes.SHA384(), length=length, salt=salt, info=info)
    return kdf.derive(secret)


def aes_gcm_decrypt(key: bytes, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """AES-GCM (SP 800-38D) decryption of ciphertext || tag; CryptoError if it does not authenticate."""
    m = _modules()
    try:
        aead: AESGCM = m.AESGCM(key)
        return aead.decrypt(iv, ciphertext, aad)
    except (m.InvalidTag, ValueError) as e:
        raise CryptoError(f"authentication failed ({type(e).__name__})") from None
