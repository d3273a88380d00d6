"""SHA-2 digests of small inputs without loading OpenSSL (stdlib only; host and guest).

Importing `hashlib` loads OpenSSL's libcrypto through `_hashlib`: about 100 ms under TCG, on the path of
every `up` in the guest (the launch self-check's REPORT_DATA, the policy's hash, a layer's root hash). For
the few kilobytes these hash, CPython's own SHA-2 modules are as good, and Debian's python3 has them built
in. Bulk hashing (verity trees on the host) keeps hashlib and OpenSSL. Digests are the same either way;
an interpreter without those modules falls back to hashlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable
    from hashlib import _Hash

ALGORITHMS = ("sha224", "sha256", "sha384", "sha512")


def _builtin_constructors() -> dict[str, Callable[..., _Hash]]:
    """{algorithm: constructor} from CPython's own modules: _sha2 (3.12+), else _sha256 and _sha512."""
    for names in (("_sha2",), ("_sha256", "_sha512")):
        found: dict[str, Any] = {}
        try:
            for name in names:
                module = __import__(name)
                found.update({a: getattr(module, a) for a in ALGORITHMS if hasattr(module, a)})
        except ImportError:
            continue
        if len(found) == len(ALGORITHMS):
            return found
    import hashlib

    return {a: getattr(hashlib, a) for a in ALGORITHMS}


_CONSTRUCTORS = _builtin_constructors()


def new(algorithm: str, data: bytes = b"") -> _Hash:
    """A hash object for `algorithm` (a SHA-2 name, or anything hashlib.new takes), fed `data`."""
    constructor = _CONSTRUCTORS.get(algorithm.lower())
    if constructor is None:
        import hashlib

        return hashlib.new(algorithm, data)
    return constructor(data)


def sha256(data: bytes = b"") -> _Hash:
    return _CONSTRUCTORS["sha256"](data)


def sha384(data: bytes = b"") -> _Hash:
    return _CONSTRUCTORS["sha384"](data)


def sha512(data: bytes = b"") -> _Hash:
    return _CONSTRUCTORS["sha512"](data)
