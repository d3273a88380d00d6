"""did:x509 issuer identifiers (DIF did:x509 method, as hcsshim's didx509go resolves them), stdlib only.

`did:x509:0:<alg>:<base64url fingerprint>::<policy>[::<policy>...]` names a signer by a CA certificate
of its chain (the fingerprint of any certificate after the leaf) and what the leaf must carry: `eku:<oid>`,
`subject:<key>:<value>[:<key>:<value>...]` (values percent-encoded), `san:<type>:<value>` or
`fulcio-issuer:<host>`. Certificates are described by CertificateFacts, which the side that has an
X.509 library extracts (sandbox/guest/fragments.py); every mismatch raises DidError with the reason.
"""

from __future__ import annotations

import base64
import hashlib
import urllib.parse
from dataclasses import dataclass, field

from sandbox.shared.errors import InputError

HASHES = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
SUBJECT_KEYS = ("C", "O", "OU", "L", "S", "STREET", "POSTALCODE", "SERIALNUMBER", "CN")
SAN_TYPES = ("dns", "email", "ipaddress", "uri")
FULCIO_ISSUER_OID = "1.3.6.1.4.1.57264.1.1"
# Extended key usages Go's crypto/x509 knows by name; didx509go's eku policy requires at least one
# other ("unknown") EKU on the leaf before it looks at any.
GO_KNOWN_EKUS = frozenset({
    "2.5.29.37.0", "1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2", "1.3.6.1.5.5.7.3.3", "1.3.6.1.5.5.7.3.4",
    "1.3.6.1.5.5.7.3.5", "1.3.6.1.5.5.7.3.6", "1.3.6.1.5.5.7.3.7", "1.3.6.1.5.5.7.3.8", "1.3.6.1.5.5.7.3.9",
    "1.3.6.1.4.1.311.10.3.3", "2.16.840.1.113730.4.1", "1.3.6.1.4.1.311.2.1.22", "1.3.6.1.4.1.311.61.1.1"})


class DidError(InputError):
    """A did:x509 that is malformed or does not match a certificate chain."""


@dataclass(frozen=True)
class CertificateFacts:
    """What did:x509 policies read from one certificate."""

    der: bytes
    subject: tuple[tuple[str, str], ...] = ()        # (key in SUBJECT_KEYS, value)
    san: tuple[tuple[str, str], ...] = ()            # (type in SAN_TYPES, value)
    eku: tuple[str, ...] = ()                        # dotted OIDs
    extensions: dict[str, bytes] = field(default_factory=dict)   # OID -> extnValue contents


@dataclass(frozen=True)
class DidX509:
    text: str
    hash_name: str
    fingerprint: str                                  # base64url, no padding
    policies: tuple[tuple[str, tuple[str, ...]], ...]


def parse_did(text: str) -> DidX509:
    top = text.split("::")
    if len(top) < 2:
        raise DidError(f"{text!r} is not a did:x509 (no '::policy' part)")
    pre = top[0].split(":")
    if len(pre) != 5 or pre[0] != "did" or pre[1] != "x509":
        raise DidError(f"{text!r} is not a did:x509 of the form did:x509:0:<alg>:<fingerprint>::<policy>")
    if pre[2] != "0":
        raise DidError(f"did:x509 version {pre[2]!r} is not supported (only 0)")
    if pre[3] not in HASHES:
        raise DidError(f"did:x509 fingerprint algorithm {pre[3]!r} is not one of {', '.join(HASHES)}")
    policies = []
    for policy in top[1:]:
        name, *args = policy.split(":")
        if not args:
            raise DidError(f"did:x509 policy {policy!r} has no arguments")
        policies.append((name, tuple(args)))
    return DidX509(text, pre[3], pre[4], tuple(policies))


def fingerprint(der: bytes, hash_name: str = "sha256") -> str:
    return base64.urlsafe_b64encode(HASHES[hash_name](der).digest()).rstrip(b"=").decode("ascii")


def did_for(chain: list[CertificateFacts], eku: str, *, ca_index: int = -1) -> str:
    """The did:x509 naming `chain` by its CA certificate at `ca_index` (default: the root) and an EKU."""
    return f"did:x509:0:sha256:{fingerprint(chain[ca_index].der)}::eku:{eku}"


def _unescape(value: str) -> str:
    return urllib.parse.unquote_plus(value)


def check_did(did: DidX509 | str, chain: list[CertificateFacts]) -> None:
    """Raise DidError unless `chain` (leaf first) satisfies the did:x509; the message says what failed."""
    did = parse_did(did) if isinstance(did, str) else did
    if len(chain) < 2:
        raise DidError("the certificate chain has a single certificate; did:x509 names a CA of the chain")
    if did.fingerprint not in {fingerprint(c.der, did.hash_name) for c in chain[1:]}:
        raise DidError(f"no CA certificate of the chain has the fingerprint {did.fingerprint} that {did.text} names")
    leaf = chain[0]
    for name, args in did.policies:
        if name == "eku":
            if len(args) != 1:
                raise DidError("did:x509 eku policy takes exactly one OID")
            if not any(e not in GO_KNOWN_EKUS for e in leaf.eku):
                raise DidError("the signing certificate has no EKU extension with a non-standard usage")
            if args[0] not in leaf.eku:
                raise DidError(f"the signing certificate lacks the EKU {args[0]} that the issuer names")
        elif name == "subject":
            if len(args) % 2:
                raise DidError("did:x509 subject policy needs key:value pairs")
            for key, value in zip(args[::2], args[1::2], strict=True):
                if key not in SUBJECT_KEYS:
                    raise DidError(f"did:x509 subject key {key!r} is not supported")
                if (key, _unescape(value)) not in leaf.subject:
                    raise DidError(f"the signing certificate's subject has no {key}={_unescape(value)!r}")
        elif name == "san":
            if len(args) != 2 or args[0] not in SAN_TYPES:
                raise DidError(f"did:x509 san policy needs one of {', '.join(SAN_TYPES)} and a value")
            if (args[0], _unescape(args[1])) not in leaf.san:
                raise DidError(f"the signing certificate has no {args[0]} SAN {_unescape(args[1])!r}")
        elif name == "fulcio-issuer":
            expected = "https://" + _unescape(args[0])
            if leaf.extensions.get(FULCIO_ISSUER_OID) != expected.encode():
                raise DidError(f"the signing certificate's Fulcio issuer is not {expected}")
        else:
            raise DidError(f"did:x509 policy {name!r} is not supported")
