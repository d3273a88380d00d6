"""The key-release wire format, shared by the key broker (host) and the guest agent (docs/kbs.md).

HTTP with JSON bodies under /kbs/v1:

  GET  /kbs/v1/identity   -> {"format", "public_key": b64 SPKI DER (P-384), "public_key_sha256": hex}
  POST /kbs/v1/challenge  {} -> {"nonce": hex (32 bytes), "expires_in": seconds}
  POST /kbs/v1/release    {"secret": NAME, "evidence": <ReportEvidence payload>}
                          -> {"secret": NAME, "sealed": <Sealed payload>}
  errors                  -> {"error": <ErrorCode>, "message": "..."} with a 4xx/5xx status

The evidence is the agent's `get_report` result (sandbox/shared/snp/evidence.py): REPORT_DATA =
SHA-512(nonce || runtime public key DER). The broker answers with the secret sealed to that runtime
key and signed by the broker's own long-term P-384 key:

  header  = canonical JSON {"v": 1, "secret", "nonce": hex, "runtime_public_key": b64,
                            "ephemeral_public_key": b64, "broker_public_key": b64}
  Z       = ECDH(ephemeral private key, runtime public key)                  (SEC 1 §3.3.1, 48 bytes)
  key     = HKDF-SHA384(Z, salt = nonce, info = KEY_INFO || SHA-384(header), 32 bytes)   (RFC 5869)
  sealed  = AES-256-GCM(key, iv (12 random bytes), secret, aad = header)     (SP 800-38D)
  signature = ECDSA-P384-SHA384(broker key, canonical JSON header + {"iv", "ciphertext"})

The guest rebuilds the header from its own nonce, runtime key and requested name, accepts the broker
key only if its SHA-256 is pinned by the execution policy (`key_brokers`), checks the signature,
then decrypts (sandbox/guest/keyapi.py `open_sealed`). Both sides do the cryptography with OpenSSL
(pyca/cryptography; Debian's python3-cryptography in the guest); this module is only the format. Everything the host relays is thereby authenticated end to end: the host can drop or
delay messages, never read or alter a secret, nor substitute its own broker.

The in-guest attestation API for containers lives under ATTEST_API_DIR (a unix socket), which the
launcher bind-mounts into exactly the containers whose policy entry lists `attestation_api_mount()`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sandbox.shared import sha2
from sandbox.shared.errors import CheckFailed, InputError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sandbox.shared.jsonstrict import JsonObject

VERSION = 1
API_PREFIX = "/kbs/v1"
IDENTITY_PATH = f"{API_PREFIX}/identity"
CHALLENGE_PATH = f"{API_PREFIX}/challenge"
RELEASE_PATH = f"{API_PREFIX}/release"
IDENTITY_FORMAT = "parma-sandbox/kbs/v1"

NONCE_SIZE = 32                      # what the broker issues; evidence takes 16..1024 (snp/binding.py)
MAX_SECRET_SIZE = 64 * 1024          # a key, not bulk data (keep bulk data encrypted under it elsewhere)
MAX_REQUEST_BYTES = 64 * 1024        # evidence (report + certificate table) is about 8 KiB in JSON
MAX_RESPONSE_BYTES = 4 * MAX_SECRET_SIZE
SECRET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PIN = re.compile(r"[0-9a-f]{64}")
KEY_INFO = b"parma-sandbox/kbs/v1 aes-256-gcm key\x00"
KEY_SIZE = 32
IV_SIZE = 12

# Guest side: the attestation API socket, where the launcher binds it into containers, and the fw_cfg
# entry through which the host tells the agent where the broker is (an unauthenticated hint).
ATTEST_API_DIR = "/run/parma/attest"
ATTEST_API_SOCKET = f"{ATTEST_API_DIR}/api.sock"
ATTEST_API_MOUNT_OPTIONS = ("rbind", "rprivate", "nosuid", "nodev", "ro")
FW_CFG_KBS_URL = "opt/parma/kbs_url"


def attestation_api_mount() -> JsonObject:
    """The bind mount (policy constraint and create_container mount alike) that gives a container the
    attestation API. Connecting to a unix socket needs no write access, so it is read-only."""
    return {"destination": ATTEST_API_DIR, "source": ATTEST_API_DIR, "type": "bind",
            "options": list(ATTEST_API_MOUNT_OPTIONS)}


class KbsErrorCode(StrEnum):
    bad_request = "bad_request"          # malformed JSON, missing/unknown fields, bad encodings
    not_found = "not_found"              # no such endpoint
    method_not_allowed = "method_not_allowed"
    too_large = "too_large"              # request body over MAX_REQUEST_BYTES
    refused = "refused"                  # the evidence does not satisfy the secret's release policy
    busy = "busy"                        # too many connections or outstanding challenges
    internal = "internal"


def check_secret_name(name: Any, *, where: str = "secret name") -> str:
    if not isinstance(name, str) or not SECRET_NAME.fullmatch(name):
        raise InputError(f"{where}: {str(name)[:80]!r} is not a valid secret name",
                         hint="use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit")
    return name


def key_pin(public_key_der: bytes) -> str:
    """How policies and users name a broker: SHA-256 (hex) of its DER SubjectPublicKeyInfo."""
    return sha2.sha256(public_key_der).hexdigest()


def canonical(doc: Mapping[str, object]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise InputError(f"{what}: expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{what}: not valid base64 ({e})") from None


def header(*, secret: str, nonce: bytes, runtime_public_key: bytes, ephemeral_public_key: bytes,
           broker_public_key: bytes) -> bytes:
    """The AAD of the sealed secret: everything that binds it to this exchange."""
    return canonical({"v": VERSION, "secret": secret, "nonce": nonce.hex(),
                      "runtime_public_key": b64(runtime_public_key),
                      "ephemeral_public_key": b64(ephemeral_public_key),
                      "broker_public_key": b64(broker_public_key)})


def signed_bytes(aad: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    doc = json.loads(aad)
    doc.update({"iv": b64(iv), "ciphertext": b64(ciphertext)})
    return canonical(doc)


def key_info(aad: bytes) -> bytes:
    """HKDF's `info` for the sealing key: the label and SHA-384 of the header (salt: the nonce)."""
    return KEY_INFO + sha2.sha384(aad).digest()


@dataclass(frozen=True)
class Sealed:
    """A secret sealed to a runtime key: the `sealed` object of a release response."""

    ephemeral_public_key: bytes  # DER SPKI
    broker_public_key: bytes     # DER SPKI
    iv: bytes
    ciphertext: bytes            # AES-GCM ciphertext || tag
    signature: bytes             # DER ECDSA-Sig-Value

    KEYS = ("ephemeral_public_key", "broker_public_key", "iv", "ciphertext", "signature")

    def to_payload(self) -> dict[str, str]:
        return {k: b64(getattr(self, k)) for k in self.KEYS}

    @classmethod
    def from_payload(cls, payload: Any) -> Sealed:
        if not isinstance(payload, dict) or set(payload) != set(cls.KEYS):
            raise InputError(f"sealed secret: expected exactly the keys {', '.join(cls.KEYS)}")
        values = {k: unb64(payload[k], f"sealed.{k}") for k in cls.KEYS}
        if len(values["iv"]) != IV_SIZE:
            raise InputError(f"sealed.iv must be {IV_SIZE} bytes")
        if len(values["ciphertext"]) > MAX_SECRET_SIZE + 16:
            raise InputError(f"sealed.ciphertext is larger than a secret may be ({MAX_SECRET_SIZE} bytes)")
        return cls(**values)


class BrokerNotTrusted(CheckFailed):
    """The response was not signed by a key broker that the execution policy pins, or does not
    open (a failed check)."""
