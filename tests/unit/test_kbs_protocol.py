"""The sealed-secret format: the broker's seal (host, cryptography) opened by the agent's code (guest,
Debian's python3-cryptography; the same library), and every way a relaying host could alter or
forge a response refused."""

from __future__ import annotations

import dataclasses
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sandbox.guest.keyapi import open_sealed
from sandbox.guest.keys import RuntimeKey
from sandbox.kbs.release import seal
from sandbox.shared.errors import InputError
from sandbox.shared.kbs_protocol import (
    BrokerNotTrusted,
    Sealed,
    attestation_api_mount,
    check_secret_name,
    key_pin,
)
from sandbox.shared.policy import defaults

NONCE = bytes(range(32))


@pytest.fixture(scope="module")
def broker() -> ec.EllipticCurveRuntimeKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def runtime() -> RuntimeKey:
    return RuntimeKey.generate()


def _pin(key: ec.EllipticCurveRuntimeKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return key_pin(key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo))


def _seal(value: bytes, broker: ec.EllipticCurveRuntimeKey, runtime: RuntimeKey, *, name: str = "db-key",
          nonce: bytes = NONCE) -> Sealed:
    return seal(value, secret=name, nonce=nonce, runtime_public_key=runtime.public_der, broker_key=broker)


def test_round_trip_through_the_wire_format(broker: ec.EllipticCurveRuntimeKey, runtime: RuntimeKey) -> None:
    value = os.urandom(5000)
    sealed = Sealed.from_payload(_seal(value, broker, runtime).to_payload())
    assert open_sealed(sealed, secret="db-key", nonce=NONCE, runtime_key=runtime, pins={_pin(broker)}) == value


def test_a_broker_the_policy_does_not_pin_is_refused(broker: ec.EllipticCurveRuntimeKey,
                                                     runtime: RuntimeKey) -> None:
    impostor = ec.generate_private_key(ec.SECP384R1())  # the host's own broker
    sealed = _seal(b"attacker-chosen key", impostor, runtime)
    with pytest.raises(BrokerNotTrusted, match="does not pin"):
        open_sealed(sealed, secret="db-key", nonce=NONCE, runtime_key=runtime, pins={_pin(broker)})
    # ...even when it claims the real broker's public key but cannot sign with it.
    forged = dataclasses.replace(sealed, broker_public_key=_seal(b"x", broker, runtime).broker_public_key)
    with pytest.raises(BrokerNotTrusted, match="signature does not verify"):
        open_sealed(forged, secret="db-key", nonce=NONCE, runtime_key=runtime, pins={_pin(broker)})


@pytest.mark.parametrize("change", ["name", "nonce", "runtime_key", "ciphertext", "iv", "ephemeral", "signature"])
def test_any_change_by_the_relaying_host_is_refused(broker: ec.EllipticCurveRuntimeKey, runtime: RuntimeKey,
                                                    change: str) -> None:
    sealed = _seal(b"s3cret", broker, runtime)
    kwargs = {"secret": "db-key", "nonce": NONCE, "runtime_key": runtime, "pins": {_pin(broker)}}
    if change == "name":  # another secret of the same group swapped in
        kwargs["secret"] = "other-key"
    elif change == "nonce":  # an old response replayed for a new request
        kwargs["nonce"] = os.urandom(32)
    elif change == "runtime_key":
        kwargs["runtime_key"] = RuntimeKey.generate()
    elif change == "ciphertext":
        sealed = dataclasses.replace(sealed, ciphertext=bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:])
    elif change == "iv":
        sealed = dataclasses.replace(sealed, iv=os.urandom(12))
    elif change == "ephemeral":
        sealed = dataclasses.replace(sealed, ephemeral_public_key=RuntimeKey.generate().public_der)
    else:
        sealed = dataclasses.replace(sealed, signature=sealed.signature[:-1] + bytes([sealed.signature[-1] ^ 1]))
    with pytest.raises(BrokerNotTrusted):
        open_sealed(sealed, **kwargs)


def test_malformed_keys_in_a_response_are_refused(broker: ec.EllipticCurvePrivateKey, runtime: RuntimeKey) -> None:
    sealed = _seal(b"s3cret", broker, runtime)
    pins = {_pin(broker)}
    junk = dataclasses.replace(sealed, ephemeral_public_key=b"\x30\x03\x02\x01\x01")
    with pytest.raises(BrokerNotTrusted):  # the signature covers the ephemeral key: it fails first
        open_sealed(junk, secret="db-key", nonce=NONCE, runtime_key=runtime, pins=pins)
    off_curve = bytearray(runtime.public_der)
    off_curve[-1] ^= 1
    bad_broker = dataclasses.replace(sealed, broker_public_key=bytes(off_curve))
    with pytest.raises(BrokerNotTrusted, match="key is malformed"):
        open_sealed(bad_broker, secret="db-key", nonce=NONCE, runtime_key=runtime, pins={key_pin(bytes(off_curve))})


def test_malformed_payloads_are_input_errors(broker: ec.EllipticCurveRuntimeKey, runtime: RuntimeKey) -> None:
    good = _seal(b"x", broker, runtime).to_payload()
    for bad in (None, [], {}, {**good, "extra": ""}, {**good, "iv": "!!"}, {**good, "iv": "AAAA"}):
        with pytest.raises(InputError):
            Sealed.from_payload(bad)


def test_secret_names_and_the_api_mount() -> None:
    for ok in ("a", "db-key", "A.b_c-9", "x" * 128):
        assert check_secret_name(ok) == ok
    for bad in ("", "-x", ".hidden", "a/b", "../x", "x" * 129, "a b", None, 3):
        with pytest.raises(InputError):
            check_secret_name(bad)
    mount = attestation_api_mount()
    assert mount["source"] == mount["destination"] == "/run/parma/attest"
    assert "ro" in mount["options"]
    # The API directory must not collide with the directories the policy engine gives meaning to.
    assert not mount["source"].startswith((defaults.LAYERS_DIR, defaults.VOLUMES_DIR, defaults.DEFAULT_SANDBOX_DIR))
