"""The strict DER reader/writer the attestation code uses for AMD's certificate extensions."""

from __future__ import annotations

import pytest

from sandbox.attest import der


def test_der_is_strict() -> None:
    assert der.read_single(der.integer(128), der.INTEGER) == b"\x00\x80"
    with pytest.raises(der.DerError, match="non-minimal length"):
        der.read(b"\x04\x81\x01x")
    with pytest.raises(der.DerError, match="runs past"):
        der.read(b"\x04\x05ab")
    assert der.parse_oid(der.read_single(der.oid("1.3.6.1.4.1.3704.1.3.8"), der.OID)) == "1.3.6.1.4.1.3704.1.3.8"
