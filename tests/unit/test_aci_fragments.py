"""Policy fragments: CBOR/COSE envelopes, did:x509 issuers, signatures, and the load checks with reasons."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from sandbox.aci.fragment_crypto import (
    Issuer,
    SignatureError,
    certificate_facts,
    make_test_issuer,
    sign_fragment,
    verify_fragment,
)
from sandbox.shared import cbor, cose
from sandbox.shared.didx509 import DidError, check_did, parse_did
from sandbox.shared.rego.fragment import FragmentRefused, check_load, read_fragment_text, svn_ok
from tests.clirun import run_cli

pytestmark = pytest.mark.unit

FEED = "example.com/sidecar"
LAYER = "cd" * 32


def fragment_text(svn='"3"', name="contoso") -> bytes:
    c = {"allow_elevated": False, "allow_stdio_access": True, "capabilities": None, "command": ["/sidecar"],
         "env_rules": [], "exec_processes": [], "layers": [LAYER], "mounts": [], "name": "sidecar",
         "no_new_privileges": False, "seccomp_profile_sha256": "", "signals": [], "working_dir": "/",
         "user": {"group_idnames": [{"pattern": "", "strategy": "any"}], "umask": "0022",
                  "user_idname": {"pattern": "", "strategy": "any"}}}
    return (f'package {name}\n\nsvn := {svn}\nframework_version := "0.2.3"\n\n'
            f'containers := {json.dumps([c])}\n').encode()


@pytest.fixture(scope="module")
def issuer():
    return make_test_issuer()


def imports(did: str, minimum="2", feed=FEED) -> list[dict]:
    return [{"issuer": did, "feed": feed, "minimum_svn": minimum, "includes": ["containers"]}]


def test_cbor_round_trip_and_strictness() -> None:
    value = {1: -35, "iss": "did:x", 33: [b"\x01\x02", b""], 15: {"svn": 2**40}, "n": None, "t": True}
    assert cbor.decode(cbor.encode(value)) == value
    assert cbor.decode(cbor.encode(cbor.Tag(18, [b"", {}]))) == cbor.Tag(18, [b"", {}])
    for bad, match in [(b"\xa2\x01\x01\x01\x02", "duplicate map key"), (b"\xf9\x3c\x00", "floating-point"),
                       (b"\x9f\x01\xff", "indefinite"), (b"\x01\x02", "after the item"),
                       (b"\x9a\xff\xff\xff\xff", "cannot fit"), (b"\x62\xff\xfe", "not UTF-8")]:
        with pytest.raises(cbor.CborError, match=match):
            cbor.decode(bad)
    deep = b"\x81" * 40 + b"\x01"
    with pytest.raises(cbor.CborError, match="nested deeper"):
        cbor.decode(deep)


def test_signed_fragment_verifies_and_carries_issuer_feed_svn(issuer) -> None:
    env = sign_fragment(issuer, fragment_text(), feed=FEED, svn=3)
    parsed = cose.parse_sign1(env)
    assert parsed.content_type == cose.REGO_CONTENT_TYPE and len(parsed.chain) == 2
    v = verify_fragment(env)
    assert (v.issuer, v.feed, v.header_svn) == (issuer.did(), FEED, 3)
    f = read_fragment_text(v.payload.decode())
    accepted = check_load(imports(issuer.did()), issuer=v.issuer, feed=v.feed, header_svn=v.header_svn, fragment=f)
    assert accepted.contributions()["containers"][0]["layers"] == [LAYER]


def test_broken_signature_is_refused(issuer) -> None:
    env = bytearray(sign_fragment(issuer, fragment_text(), feed=FEED))
    env[-5] ^= 0x01
    with pytest.raises(SignatureError, match="signature does not verify"):
        verify_fragment(bytes(env))
    tampered = cose.parse_sign1(sign_fragment(issuer, fragment_text(), feed=FEED))
    forged = cose.assemble_sign1(tampered.protected_bytes, fragment_text(svn='"9"'), tampered.signature)
    with pytest.raises(SignatureError, match="signature does not verify"):
        verify_fragment(forged)


def test_issuer_that_does_not_match_the_chain_is_refused(issuer) -> None:
    other = make_test_issuer()
    env = sign_fragment(issuer, fragment_text(), feed=FEED, did=other.did())
    with pytest.raises(DidError, match="no CA certificate of the chain has the fingerprint"):
        verify_fragment(env)
    env = sign_fragment(issuer, fragment_text(), feed=FEED, did=issuer.did(eku="1.2.3.4"))
    with pytest.raises(DidError, match="lacks the EKU 1.2.3.4"):
        verify_fragment(env)


def test_chain_whose_links_do_not_verify_is_refused(issuer) -> None:
    other = make_test_issuer()
    mixed = Issuer(issuer.key, (issuer.chain[0], other.chain[1]))
    with pytest.raises(SignatureError, match="certificate 0 of the chain is not signed by certificate 1"):
        verify_fragment(sign_fragment(mixed, fragment_text(), feed=FEED, did=issuer.did()))


def test_each_refusal_has_its_own_reason(issuer) -> None:
    f3 = read_fragment_text(fragment_text().decode())
    did = issuer.did()
    cases = [
        (dict(imports=imports("did:x509:0:sha256:AAAA::eku:1.2.3"), issuer=did, feed=FEED, header_svn=None),
         "is not one the policy accepts fragments from"),
        (dict(imports=imports(did, feed="example.com/other"), issuer=did, feed=FEED, header_svn=None),
         "feed 'example.com/sidecar' is not one the policy accepts"),
        (dict(imports=imports(did, minimum="4"), issuer=did, feed=FEED, header_svn=None),
         "its SVN 3 is below the minimum_svn 4"),
        (dict(imports=imports(did, minimum="4"), issuer=did, feed=FEED, header_svn=3),
         "the envelope's SVN 3 is below the minimum_svn 4"),
        (dict(imports=imports(did), issuer=did, feed=FEED, header_svn=5),
         "the fragment's svn '3' differs from the envelope's SVN 5"),
    ]
    for kwargs, match in cases:
        with pytest.raises(FragmentRefused, match=match):
            check_load(kwargs.pop("imports"), fragment=f3, **kwargs)
    no_svn = read_fragment_text(fragment_text().decode().replace('svn := "3"\n', ""))
    with pytest.raises(FragmentRefused, match="neither the fragment nor its envelope declares an SVN"):
        check_load(imports(did), issuer=did, feed=FEED, header_svn=None, fragment=no_svn)
    assert check_load(imports(did), issuer=did, feed=FEED, header_svn=2, fragment=no_svn).import_["minimum_svn"] == "2"


def test_svn_comparison_is_the_frameworks() -> None:
    assert svn_ok("10", "9") and svn_ok(4, "4") and not svn_ok("3", 4)
    assert svn_ok("1.2.0", "1.10.0") is False and svn_ok("2.0.0", "1.0.0")     # deprecated semver path
    assert not svn_ok("x", "1")


def test_did_x509_parsing_and_subject_policies(issuer) -> None:
    d = parse_did("did:x509:0:sha256:I__iuL25oXEVFdTP_aBLx_eT1RPHbCQ_ECBQfYZpt9s::eku:1.3.6.1.4.1.311.76.59.1.3")
    assert d.policies == (("eku", ("1.3.6.1.4.1.311.76.59.1.3",)),)
    for bad, match in [("did:web:x", "not a did:x509"), ("did:x509:1:sha256:a::eku:1", "version"),
                       ("did:x509:0:md5:a::eku:1", "algorithm")]:
        with pytest.raises(DidError, match=match):
            parse_did(bad)
    facts = [certificate_facts(der) for der in issuer.chain]
    root_fp = issuer.did().split("::")[0]
    check_did(f"{root_fp}::subject:CN:parma-sandbox+test+fragment+issuer", facts)
    with pytest.raises(DidError, match="subject has no CN='someone'"):
        check_did(f"{root_fp}::subject:CN:someone", facts)
    with pytest.raises(DidError, match="single certificate"):
        check_did(issuer.did(), facts[:1])


def test_cli_sign_verify_show_and_refusal(tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["--format", "json", "policy", "fragment", "issuer", str(tmp_path / "iss")], capsys)
    assert code == 0, err
    did = json.loads(out)["issuer"]
    (tmp_path / "f.rego").write_bytes(fragment_text())
    code, out, err = run_cli(["policy", "fragment", "sign", str(tmp_path / "f.rego"), "--key",
                              str(tmp_path / "iss/key.pem"), "--chain", str(tmp_path / "iss/chain.pem"),
                              "--feed", FEED, "-o", str(tmp_path / "f.cose")], capsys)
    assert code == 0, err
    policy = ("package policy\napi_version := \"0.10.0\"\nframework_version := \"0.2.3\"\n"
              f"fragments := {json.dumps(imports(did, minimum='4'))}\ncontainers := []\n")
    (tmp_path / "p.rego").write_text(policy)
    code, out, err = run_cli(["policy", "fragment", "verify", str(tmp_path / "f.cose"), "--policy",
                              str(tmp_path / "p.rego")], capsys)
    assert code == 1 and "below the minimum_svn 4" in err and "Traceback" not in err
    (tmp_path / "p.rego").write_text(policy.replace('"minimum_svn": "4"', '"minimum_svn": "3"'))
    code, out, err = run_cli(["policy", "fragment", "verify", str(tmp_path / "f.cose"), "--policy",
                              str(tmp_path / "p.rego")], capsys)
    assert code == 0 and "accepted: import of" in out, err
    code, out, err = run_cli(["--format", "json", "policy", "fragment", "show", str(tmp_path / "f.cose")], capsys)
    assert code == 0 and json.loads(out)["containers"][0]["layers"] == [LAYER]
    (tmp_path / "bad.cose").write_bytes(b"\xd2\x84" + b"\x00" * 4)
    code, out, err = run_cli(["policy", "fragment", "show", str(tmp_path / "bad.cose")], capsys)
    assert code == 2 and "COSE" in err


def test_policy_explain_decodes_acis_decision_blob(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64
    decision = {"decision": "deny", "input": {"rule": "create_container", "containerID": "ab" * 32,
                                               "argList": ["/bin/sh"], "envList": ["A=<<redacted>>"],
                                               "workingDir": "/", "capabilities": "[unprivileged]"},
                "reason": {"errors": ["invalid command"], "error_objects": [{"command": ["/app"]}]}}
    blob = base64.b64encode(json.dumps(decision).encode()).decode()
    message = f"failed to create container: policyDecision< {blob} >policyDecision"
    code, out, err = run_cli(["policy", "explain", message], capsys)
    assert code == 0, err
    assert out.splitlines()[:3] == ["create_container: deny", "  because: invalid command",
                                    "    (the argv is not the command of any container the layers matched)"]
    assert "argv: [\"/bin/sh\"]" in out and "1 candidate object(s)" in out
    code, out, err = run_cli(["--format", "json", "policy", "explain", blob], capsys)
    doc = json.loads(out)
    assert doc["request"] == {"ep": "create_container", "input": {
        "container_id": "ab" * 32, "argv": ["/bin/sh"], "env": ["A=<<redacted>>"], "working_dir": "/",
        "capabilities": "[unprivileged]"}}
    code, out, err = run_cli(["policy", "explain", "not a blob"], capsys)
    assert code == 2 and "policyDecision" in err
    monkeypatch.setattr("sys.stdin", io.StringIO(message + "\n"))    # '-' reads the message from stdin
    code, out, err = run_cli(["policy", "explain", "-"], capsys)
    assert code == 0 and out.startswith("create_container: deny\n"), err


def test_policy_explain_with_the_policy_gives_the_local_engines_explanation(tmp_path: Path, capsys) -> None:
    import base64

    from sandbox.aci.rego import rego_module
    c = json.loads(fragment_text().decode().split("containers := ", 1)[1])[0] | {"command": ["/app"]}
    doc = {"api_version": "0.10.0", "framework_version": "0.2.3", "containers": [c],
           **{f: False for f in ("allow_properties_access", "allow_dump_stacks", "allow_runtime_logging",
                                 "allow_environment_variable_dropping", "allow_unencrypted_scratch",
                                 "allow_capability_dropping")}}
    (tmp_path / "policy.rego").write_text(rego_module(doc))

    def blob(inp: dict, errors: list[str]) -> str:
        return base64.b64encode(json.dumps({"decision": "deny", "input": inp, "reason": {"errors": errors}}).encode()
                                ).decode()

    create = blob({"rule": "create_container", "containerID": "ab" * 32, "argList": ["/bin/sh"], "envList": [],
                   "workingDir": "/", "sandboxDir": "/run/gcs/c/x/sandboxMounts", "isSandboxContainer": False,
                   "user": {"id": "0", "name": "root"}, "groups": [], "umask": "0022", "mounts": [],
                   "privileged": False, "noNewPrivileges": False, "seccompProfileSHA256": ""}, ["invalid command"])
    code, out, err = run_cli(["policy", "explain", create, "--policy", str(tmp_path / "policy.rego")], capsys)
    assert code == 0, err
    assert "here (the local engine):" in out and "argv ['/bin/sh'] does not match command ['/app']" in out
    device = blob({"rule": "mount_device", "target": "/run/mounts/scsi/m3", "deviceHash": "ee" * 32,
                   "mountPathRegex": "/run/mounts/scsi/m[0-9]+"}, ["deviceHash not found"])
    code, out, err = run_cli(["--format", "json", "policy", "explain", device, "--policy",
                              str(tmp_path / "policy.rego")], capsys)
    assert json.loads(out)["local"]["decisions"] == [
        f"mount_device denied for target '/run/parma/layers/m3': device hash {'ee' * 32!r} is not a layer of any "
        "container in the policy"]


def test_hostile_envelopes_give_errors_never_crashes(issuer) -> None:
    import random
    good = sign_fragment(issuer, fragment_text(), feed=FEED, svn=3)
    r = random.Random(9)
    for _ in range(400):
        data = bytearray(good)
        for _ in range(r.randint(1, 6)):
            data[r.randrange(len(data))] = r.randrange(256)
        if r.random() < 0.2:
            data = data[: r.randrange(len(data))]
        try:
            verify_fragment(bytes(data))
        except (cose.CoseError, SignatureError, DidError, cbor.CborError):
            pass


def test_the_agent_enforces_a_rego_policy_and_refuses_each_bad_fragment_with_its_own_reason(issuer) -> None:
    """The guest's own path: set_policy with the Rego text (its SHA-256 is HOST_DATA), then load_fragment
    with envelopes: accepted, from an issuer the policy does not name, with a lower SVN, with a broken
    signature. A refused fragment adds nothing."""
    import hashlib

    from sandbox.aci.rego import rego_module
    from sandbox.guest.hostdata import HostData
    from sandbox.guest.service import AgentService
    from sandbox.shared.messages import LoadFragmentRequest, SetPolicyRequest
    from sandbox.shared.policy.inputs import MountDeviceInput
    from sandbox.shared.protocol import ErrorCode, ProtocolError

    doc = {"api_version": "0.10.0", "framework_version": "0.2.3", "containers": [],
           "allow_properties_access": False, "allow_dump_stacks": False, "allow_runtime_logging": False,
           "allow_environment_variable_dropping": True, "allow_unencrypted_scratch": False,
           "allow_capability_dropping": True}
    rego = rego_module(doc, imports(issuer.did(), minimum="3")).encode()
    service = AgentService(host_data=lambda: HostData(hashlib.sha256(rego).digest(), "test"))
    assert service.handle(SetPolicyRequest(rego)).policy_hash == hashlib.sha256(rego).hexdigest()
    layer_mountable = MountDeviceInput("/run/parma/layers/f0", LAYER)
    assert not service.gate.allows(layer_mountable)

    def refused(envelope: bytes) -> str:
        with pytest.raises(ProtocolError) as e:
            service.handle(LoadFragmentRequest(envelope))
        assert e.value.code == ErrorCode.policy_denied and e.value.message.startswith("load_fragment denied")
        assert not service.gate.allows(layer_mountable), "a refused fragment must add nothing"
        return e.value.message

    broken = bytearray(sign_fragment(issuer, fragment_text(), feed=FEED, svn=3))
    broken[-5] ^= 0x01
    reasons = [
        refused(sign_fragment(make_test_issuer(), fragment_text(), feed=FEED, svn=3)),
        refused(sign_fragment(issuer, fragment_text(svn='"2"'), feed=FEED, svn=2)),
        refused(bytes(broken)),
        refused(sign_fragment(issuer, fragment_text(), feed="example.com/other", svn=3)),
    ]
    assert "is not one the policy accepts fragments from" in reasons[0]
    assert "the envelope's SVN 2 is below the minimum_svn 3" in reasons[1]
    assert "the envelope's signature does not verify" in reasons[2]
    assert "feed 'example.com/other' is not one the policy accepts" in reasons[3]
    assert len(set(reasons)) == 4
    loaded = service.handle(LoadFragmentRequest(sign_fragment(issuer, fragment_text(), feed=FEED, svn=3)))
    assert (loaded.namespace, loaded.issuer, loaded.header_svn) == ("contoso", issuer.did(), 3)
    assert service.gate.allows(layer_mountable)
