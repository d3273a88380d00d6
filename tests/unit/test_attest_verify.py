"""The verifier and the `attest` CLI against every public vector set and every negative vector."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from clirun import run_cli
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from snpvectors import cert_files, expected_sets, get_set, report_bytes, set_ids, snp_dir

from sandbox.attest.amd_certs import load_certificate_file, load_der_certificate, role_of, to_der
from sandbox.attest.roots import CertRole
from sandbox.attest.verify import Expectations, Verdict, verify_report
from sandbox.shared.errors import InputError
from sandbox.shared.snp.key_info import KeyInfo, SigningKey
from sandbox.shared.snp.report import parse_report

AT = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)  # inside every vector certificate's validity



def certs_of(set_id: str) -> list:
    vek, chain = cert_files(get_set(set_id))
    return load_certificate_file(vek) + load_certificate_file(chain)


def expect_for(s: dict, **kw: object) -> Expectations:
    f = s["fields"]
    base = dict(vmpl=f["vmpl"], at=AT, allow_debug=True, measurement=bytes.fromhex(f["measurement"]),
                host_data=bytes.fromhex(f["host_data"]), report_data=bytes.fromhex(f["report_data"]))
    return Expectations(**{**base, **kw})


def failed(raw: bytes, certs: list, expect: Expectations) -> set[str]:
    return {c.name for c in verify_report(raw, certs, expect).failed()}


# --- every genuine set verifies -----------------------------------------------------------------

@pytest.mark.parametrize("set_id", set_ids())
def test_every_vector_set_verifies(set_id: str) -> None:
    s = get_set(set_id)
    result = verify_report(report_bytes(s), certs_of(set_id), expect_for(s))
    assert result.verified, result.failed()
    assert result.product is not None and result.product.value == "Milan" and not result.emulated
    by_name = {c.name: c.status for c in result.checks}
    for name in ("ark.trusted", "ask.trusted", "ark.signature", "ask.signature", "vek.signature",
                 "report.signature", "vek.tcb", "report.measurement", "report.host_data", "report.report_data"):
        assert by_name[name] == Verdict.PASS, name
    assert by_name["vek.hwid"] == (Verdict.SKIP if s["verification"]["hwid_matches_chip_id"] is None else Verdict.PASS)


@pytest.mark.parametrize("set_id", set_ids())
def test_cli_verify_and_display_match_expected_values(set_id: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    s = get_set(set_id)
    vek, chain = cert_files(s)
    report = snp_dir() / s["files"]["report"]
    code, out, err = run_cli(["attest", "display", str(report), "--format", "json"], capsys)
    assert code == 0, err
    shown = json.loads(out)
    assert {k: shown[k] for k in s["fields"]} == s["fields"]
    args = ["attest", "verify", str(report), "--vcek", str(vek), "--chain", str(chain), "--at", "2025-06-01",
            "--vmpl", str(s["fields"]["vmpl"]), "--measurement", s["fields"]["measurement"],
            "--report-data", s["fields"]["report_data"], "--allow-debug", "--format", "json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert json.loads(out)["verified"] is True


def test_policy_file_is_hashed_into_host_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = get_set("ms-confidential-sidecar/milan-v2-vcek")
    policy = tmp_path / "policy.rego"
    policy.write_bytes(base64.b64decode((snp_dir() / "ms-confidential-sidecar/uvm_security_policy.base64").read_text()))
    assert hashlib.sha256(policy.read_bytes()).hexdigest() == s["fields"]["host_data"]
    vek, _ = cert_files(s)
    base = ["attest", "verify", str(snp_dir() / s["files"]["report"]), "--vcek", str(vek), "--at", "2025-06-01"]
    assert run_cli([*base, "--policy", str(policy)], capsys)[0] == 0
    policy.write_bytes(policy.read_bytes() + b" ")
    code, out, err = run_cli([*base, "--policy", str(policy)], capsys)
    assert code == 1 and "FAIL    report.host_data" in out and "verification failed: report.host_data" in err


# --- negative vectors fail with the right check named ----------------------------------------------

def flip(data: bytes, offset: int, *, xor: int | None = None, add: int | None = None) -> bytes:
    out = bytearray(data)
    out[offset] = out[offset] ^ xor if xor is not None else (out[offset] + add) & 0xFF  # type: ignore[operator]
    return bytes(out)


def test_virtee_tampered_report_fails_signature() -> None:
    s = get_set("virtee-sev/milan-v2-vcek")
    assert failed(flip(report_bytes(s), 0x15, xor=0x80), certs_of(s["id"]), expect_for(s)) == {"report.signature"}


def test_virtee_tampered_vcek_fails_chain() -> None:
    s = get_set("virtee-sev/milan-v2-vcek")
    vek, chain = cert_files(s)
    bad = load_der_certificate(flip(vek.read_bytes(), 40, xor=0xFF), source="tampered")
    assert "vek.signature" in failed(report_bytes(s), [bad, *load_certificate_file(chain)], expect_for(s))


def test_trustee_tampered_report_and_tcb() -> None:
    s = get_set("trustee/milan-v2-vcek")
    raw, certs = report_bytes(s), certs_of(s["id"])
    assert failed(flip(raw, 42, add=1), certs, expect_for(s)) == {"report.signature"}
    assert failed(flip(raw, 384, add=1), certs, expect_for(s)) == {"report.signature", "vek.tcb"}
    vek, chain = cert_files(s)
    bad_vek = load_der_certificate(flip(vek.read_bytes(), 42, add=1), source="tampered")
    assert "vek.signature" in failed(raw, [bad_vek, *load_certificate_file(chain)], expect_for(s))


@pytest.mark.parametrize(("name", "encoding"), [("test-vcek-invalid-legacy.der", "raw"),
                                                ("test-vcek-invalid-new.der", "der-octet-string")])
def test_fake_vceks_fail_chain_and_hwid_in_both_encodings(name: str, encoding: str) -> None:
    s = get_set("trustee/milan-v2-vcek")
    _, chain = cert_files(s)
    fake = load_certificate_file(snp_dir() / "trustee/test_data/snp" / name)
    result = verify_report(report_bytes(s), fake + load_certificate_file(chain), expect_for(s))
    assert {"vek.signature", "vek.hwid", "report.signature"} <= {c.name for c in result.failed()}
    hwid = next(c for c in result.checks if c.name == "vek.hwid")
    assert f"({encoding})" in hwid.detail and "000102030405" in hwid.detail


def test_milan_vcek_against_the_asvk_fails_chain() -> None:
    s = get_set("trustee/milan-v2-vcek")
    vek, chain = cert_files(s)
    no_ask = [c for c in load_certificate_file(chain) if role_of(c) != CertRole.ASK]
    assert {role_of(c) for c in no_ask} == {CertRole.ARK, CertRole.ASVK}
    assert {"ask.trusted", "vek.signature"} <= failed(report_bytes(s), load_certificate_file(vek) + no_ask,
                                                      expect_for(s))


def test_report_under_another_sets_vcek_fails() -> None:
    s = get_set("go-sev-guest/milan-v2-vcek")
    other = certs_of("virtee-sev/milan-v2-vcek")
    assert {"report.signature", "vek.hwid", "vek.tcb"} <= failed(report_bytes(s), other, expect_for(s))


def test_wrong_stepping_debug_vmpl_tcb_and_expiry_are_named() -> None:
    s = get_set("go-sev-guest/milan-v2-vcek")
    raw, certs = report_bytes(s), certs_of(s["id"])
    assert failed(raw, certs, expect_for(s, product="Milan-B1")) == {"vek.product"}
    assert failed(raw, certs, expect_for(s, product="Milan-B0")) == set()
    assert failed(raw, certs, expect_for(s, allow_debug=False)) == {"report.debug"}
    assert failed(raw, certs, expect_for(s, vmpl=1)) == {"report.vmpl"}
    assert failed(raw, certs, expect_for(s, min_tcb="bl=2,tee=0,snp=6,ucode=68")) == {"report.min_tcb"}
    assert failed(raw, certs, expect_for(s, min_tcb="bl=2,snp=5")) == set()
    assert failed(raw, certs, expect_for(s, at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))) == {"certs.validity"}
    assert failed(raw, certs, expect_for(s, measurement=b"\0" * 48)) == {"report.measurement"}
    assert failed(raw, certs, expect_for(s, forbid_smt=True)) == {"report.smt"}


def test_expired_vlek_needs_at(capsys: pytest.CaptureFixture[str]) -> None:
    s = get_set("trustee/milan-v3-vlek")
    vek, chain = cert_files(s)
    args = ["attest", "verify", str(snp_dir() / s["files"]["report"]), "--vcek", str(vek), "--chain", str(chain),
            "--vmpl", "1", "--at", "2026-01-01"]
    code, out, err = run_cli(args, capsys)
    assert code == 1 and "certs.validity" in err and "SEV-VLEK valid 2024-12-10..2025-12-10" in out


def test_chain_that_does_not_reach_a_pinned_root_is_refused() -> None:
    s = get_set("trustee/milan-v2-vcek")
    vek, _ = cert_files(s)
    # A look-alike ARK (same name, another key): pinning is by fingerprint, never by name.
    real_ark = next(c for c in certs_of(s["id"]) if role_of(c) == CertRole.ARK)
    key = rsa.generate_private_key(65537, 2048)
    fake = (x509.CertificateBuilder().subject_name(real_ark.subject).issuer_name(real_ark.subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(real_ark.not_valid_before_utc)
            .not_valid_after(real_ark.not_valid_after_utc)
            .sign(key, hashes.SHA384(), rsa_padding=padding.PSS(padding.MGF1(hashes.SHA384()), 48)))
    certs = [c for c in certs_of(s["id"]) if role_of(c) != CertRole.ARK] + [fake]
    assert to_der(fake) != to_der(real_ark)
    assert {"ark.trusted", "ask.trusted", "ask.signature"} <= failed(report_bytes(s), certs, expect_for(s))


# --- bad input: exit 2 with a clear message, never a traceback -------------------------------------

def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = get_set("virtee-sev/milan-v2-vcek")
    vek, chain = cert_files(s)
    raw = report_bytes(s)
    cases = {
        "garbage-certs.bin": (raw, ["--vcek", "GARBAGE"], "neither a PEM nor a DER certificate"),
        "bad-pem.bin": (raw, ["--vcek", "BADPEM"], "does not parse"),
        "wrong-product.bin": (raw, ["--vcek", str(vek), "--chain", str(chain), "--product", "Genoa"],
                              "wrong product"),
        "unknown-product.bin": (raw, ["--vcek", str(vek), "--product", "Venice"], "unknown SEV-SNP product"),
        "no-chain.bin": (raw, ["--vcek", str(vek)], "no ASK/ASVK certificate"),
        "no-vcek.bin": (raw, ["--chain", str(chain)], "no VCEK certificate"),
    }
    (tmp_path / "GARBAGE").write_bytes(b"\x00\x01 not a certificate")
    (tmp_path / "BADPEM").write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    for name, (content, extra, message) in cases.items():
        report = tmp_path / name
        report.write_bytes(content)
        extra = [str(tmp_path / a) if a in ("GARBAGE", "BADPEM") else a for a in extra]
        code, out, err = run_cli(["attest", "verify", str(report), "--at", "2025-06-01", *extra], capsys)
        assert code == 2, (name, err)
        assert message in err and "Traceback" not in err and out == "", (name, err)


def test_a_malformed_report_fails_verification_and_is_bad_input_to_display(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A report is evidence: `attest verify` of one that does not parse is a failed check (1); `attest
    display` only decodes the user's file, so there it is bad input (2)."""
    raw = report_bytes(get_set("virtee-sev/milan-v2-vcek"))
    for name, content, message in (("truncated.bin", raw[:700], "truncated: 700 bytes"),
                                   ("v9.bin", b"\x09" + raw[1:], "unsupported ATTESTATION_REPORT version 9")):
        report = tmp_path / name
        report.write_bytes(content)
        code, out, err = run_cli(["attest", "verify", str(report), "--at", "2025-06-01"], capsys)
        assert code == 1 and message in err and "Traceback" not in err and out == "", (name, err)
        code, out, err = run_cli(["attest", "display", str(report)], capsys)
        assert code == 2 and message in err and out == "", (name, err)


def test_v3_report_with_another_products_chain_is_wrong_product() -> None:
    s = get_set("trustee/milan-v3-vlek")
    vek, _ = cert_files(s)
    genoa = load_certificate_file(snp_dir() / "go-sev-guest/ask_ark_genoa_vlek.pem")
    with pytest.raises(InputError, match="wrong product: the report's CPUID says Milan"):
        verify_report(report_bytes(s), load_certificate_file(vek) + genoa, expect_for(s))


def test_expected_values_cover_all_sets() -> None:
    assert len(expected_sets()) >= 6


def test_turin_report_against_the_real_turin_vcek() -> None:
    """No public Turin report exists; build one in Turin's layout whose CHIP_ID and REPORTED_TCB
    match the real Turin VCEK: everything but the signature (we lack the key) must verify."""
    from dataclasses import replace

    from sandbox.shared.snp.product import Cpuid, Product, layout_of
    from sandbox.shared.snp.tcb import TcbVersion
    vcek = load_certificate_file(snp_dir() / "virtee-sev/vcek_turin.der")
    chain = load_certificate_file(snp_dir() / "virtee-sev/cert_chain_turin")
    base = parse_report(report_bytes(get_set("trustee/milan-v3-vlek")))
    tcb = TcbVersion.from_parts(layout_of(Product.TURIN), fmc=0, bl=0, tee=0, snp=0, ucode=9)
    turin = replace(base, cpuid=Cpuid(0x1A, 0x02, 0), chip_id=bytes.fromhex("1e550a8ee5cf9f4d") + bytes(56),
                    key_info=KeyInfo.build(SigningKey.VCEK), vmpl=0, product=None,
                    current_tcb=tcb, reported_tcb=tcb, committed_tcb=tcb, launch_tcb=tcb)
    raw = turin.to_bytes()
    assert parse_report(raw).product == Product.TURIN and parse_report(raw).reported_tcb.fmc == 0
    result = verify_report(raw, vcek + chain, Expectations(at=AT))
    assert [c.name for c in result.failed()] == ["report.signature"]
    checks = {c.name: c for c in result.checks}
    assert "8-byte hwID 1e550a8ee5cf9f4d == CHIP_ID" in checks["vek.hwid"].detail
    assert "fmc=0" in checks["vek.tcb"].detail and checks["ark.trusted"].detail.startswith("pinned AMD ARK-Turin")
    # One more ucode SPL and the certificate no longer matches; a CHIP_ID with more than 8 bytes neither.
    newer = TcbVersion.from_parts(layout_of(Product.TURIN), fmc=0, bl=0, tee=0, snp=0, ucode=10)
    assert "vek.tcb" in failed(replace(turin, reported_tcb=newer).to_bytes(), vcek + chain, Expectations(at=AT))
    wide = replace(turin, chip_id=turin.chip_id[:8] + b"\x01" + bytes(55)).to_bytes()
    assert "vek.hwid" in failed(wide, vcek + chain, Expectations(at=AT))
