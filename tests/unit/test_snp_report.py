"""The shared SEV-SNP report model against the public vectors and hand-built edge cases."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from snpvectors import expected_sets, get_set, report_bytes, set_ids, snp_dir

from sandbox.shared.errors import InputError
from sandbox.shared.snp.binding import report_data_for
from sandbox.shared.snp.cert_table import CertKind, build_cert_table, entry, parse_cert_table
from sandbox.shared.snp.key_info import KeyInfo, SigningKey
from sandbox.shared.snp.policy import GuestPolicy
from sandbox.shared.snp.product import Cpuid, Product, TcbLayout, parse_product, product_from_cpuid
from sandbox.shared.snp.report import ReportFormatError, decode_report_file, parse_report
from sandbox.shared.snp.tcb import TcbVersion, parse_tcb_spec


@pytest.mark.parametrize("set_id", set_ids())
def test_vector_fields_match_and_bytes_round_trip(set_id: str) -> None:
    s = get_set(set_id)
    raw = report_bytes(s)
    report = parse_report(raw)
    assert report.to_bytes() == raw
    d = report.to_dict()
    assert {k: d[k] for k in s["fields"]} == s["fields"]
    assert hashlib.sha384(raw[:0x2A0]).hexdigest() == s["fields"]["sha384_signed_part"]


@pytest.mark.parametrize(("name", "version", "product", "mit"), [
    ("reportV3.bin", 3, Product.GENOA, None), ("reportV5.bin", 5, Product.MILAN, 0xB)])
def test_parse_only_reports(name: str, version: int, product: Product, mit: int | None) -> None:
    raw = (snp_dir() / "py-snp-utils" / name).read_bytes()
    report = parse_report(raw)
    assert (report.version, report.product, report.launch_mit_vector) == (version, product, mit)
    assert report.to_bytes() == raw


def test_hex_text_reports_are_accepted() -> None:
    raw = report_bytes(expected_sets()[0])
    assert decode_report_file(raw.hex().upper().encode() + b"\n") == raw


def test_truncated_unknown_version_and_reserved_bits_are_refused() -> None:
    raw = bytearray(report_bytes(expected_sets()[0]))
    with pytest.raises(ReportFormatError, match="truncated: 1000 bytes"):
        parse_report(bytes(raw[:1000]))
    with pytest.raises(ReportFormatError, match="unsupported ATTESTATION_REPORT version 4"):
        parse_report(b"\x04" + bytes(raw[1:]))
    for offset, message in ((0x04C, "0x04c..0x04f"), (0x19F, "0x188..0x19f"), (0x400, "0x330..0x49f"),
                            (0x00A, "bit 17"), (0x00C, "63:26"), (0x048, "SIGNING_KEY=2")):
        bad = bytearray(raw)
        bad[offset] ^= {0x00A: 0x02, 0x048: 0x08}.get(offset, 0x01)
        with pytest.raises(ReportFormatError, match=message.replace(".", r"\.")):
            parse_report(bytes(bad))


def test_v3_cpuid_decides_product_and_contradiction_is_an_input_error() -> None:
    raw = report_bytes(get_set("trustee/milan-v3-vlek"))
    assert parse_report(raw).product == Product.MILAN
    with pytest.raises(InputError, match="wrong product.*Milan CPU"):
        parse_report(raw, product=Product.GENOA)


def test_product_tables() -> None:
    assert product_from_cpuid(Cpuid(0x19, 0x01, 1)) == Product.MILAN
    assert product_from_cpuid(Cpuid(0x19, 0x11, 1)) == Product.GENOA
    assert product_from_cpuid(Cpuid(0x19, 0xA0, 2)) == Product.GENOA
    assert product_from_cpuid(Cpuid(0x1A, 0x02, 0)) == Product.TURIN
    assert product_from_cpuid(Cpuid(0x1A, 0x50, 0)) is None
    assert Cpuid(0x19, 0x01, 1).eax == 0x00A00F11 and Cpuid(0x19, 0x11, 1).eax == 0x00A10F11
    assert parse_product("milan-B0") == (Product.MILAN, "B0")
    with pytest.raises(Exception, match="unknown SEV-SNP product"):
        parse_product("Venice")


def test_tcb_layouts() -> None:
    # Milan: 03 00 00 00 00 00 08 73 (snp.md §1.5); Turin: tinfoilsh's 0x5200000004010101.
    milan = TcbVersion.from_u64(0x7308000000000003, TcbLayout.LEGACY)
    assert milan.spls() == {"bl": 3, "tee": 0, "snp": 8, "ucode": 115}
    turin = TcbVersion.from_u64(0x5200000004010101, TcbLayout.TURIN)
    assert turin.spls() == {"bl": 1, "tee": 1, "snp": 4, "ucode": 82, "fmc": 1}
    assert TcbVersion.from_parts(TcbLayout.TURIN, fmc=1, bl=1, tee=1, snp=4, ucode=82) == turin
    assert parse_tcb_spec("bl=3,tee=0,snp=8,ucode=115", TcbLayout.LEGACY) == milan
    assert parse_tcb_spec("7308000000000003", TcbLayout.LEGACY) == milan
    assert milan.meets(parse_tcb_spec("bl=3,snp=9", TcbLayout.LEGACY)) == ["snp 8 < 9"]
    with pytest.raises(Exception, match="FMC"):
        parse_tcb_spec("fmc=1", TcbLayout.LEGACY)


def test_turin_v2_heuristic_and_relayout() -> None:
    raw = bytearray(report_bytes(get_set("virtee-sev/milan-v2-vcek")))
    raw[0x1A8:0x1E0] = bytes(56)  # CHIP_ID bytes 8..63 zero: the v2 "Turin" heuristic
    report = parse_report(bytes(raw))
    assert report.product == Product.TURIN and report.tcb_layout == TcbLayout.TURIN
    again = report.with_product(Product.MILAN)
    assert again.reported_tcb.spls()["ucode"] == 115 and again.to_bytes() == bytes(raw)


def test_policy_and_key_info_bits() -> None:
    policy = GuestPolicy(0xB0000)
    assert policy.smt and policy.debug and not policy.migrate_ma and not policy.reserved_problems()
    assert GuestPolicy.build(smt=True) == GuestPolicy(0x30000)
    info = KeyInfo(0x4)
    assert info.signing_key == SigningKey.VLEK and not info.mask_chip_key
    assert KeyInfo.build(SigningKey.NONE, mask_chip_key=True).raw == 0x1E


def test_cert_table_round_trip_and_bounds() -> None:
    entries = [entry(CertKind.VCEK, b"vcek-der"), entry(CertKind.ASK, b"ask"), entry(CertKind.ARK, b"ark!")]
    table = build_cert_table(entries)
    assert table[:16] == uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes
    assert parse_cert_table(table) == entries
    assert [e.kind for e in parse_cert_table(table)] == [CertKind.VCEK, CertKind.ASK, CertKind.ARK]
    assert parse_cert_table(bytes(4096)) == []
    bad = bytearray(table)
    bad[16:20] = (10_000).to_bytes(4, "little")
    with pytest.raises(Exception, match="outside the table"):
        parse_cert_table(bytes(bad))


def test_binding_is_sha512_of_nonce_and_key() -> None:
    nonce, key = bytes(range(32)), b"\x30\x76" + bytes(118)
    assert report_data_for(nonce, key) == hashlib.sha512(nonce + key).digest()
    with pytest.raises(Exception, match="nonce must be"):
        report_data_for(b"short", key)
