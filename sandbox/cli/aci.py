"""`parma-sandbox policy export|import`: the ccePolicy Rego format of Azure Container Instances.

These are subcommands of the `policy` group (sandbox/cli/policy.py), attached here so that the
ACI interoperability code stays in its own module.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import click

from sandbox.aci.ccepolicy import policy_file_bytes
from sandbox.aci.decision import parse_decision, render_replay, replay
from sandbox.aci.decision import render as render_decision
from sandbox.aci.fragment_crypto import (
    SignatureError,
    VerifiedFragment,
    load_issuer,
    make_test_issuer,
    save_issuer,
    sign_fragment,
    verify_fragment,
)
from sandbox.aci.fragment_oci import fetch_fragments
from sandbox.aci.rego import ccepolicy_base64, export_rego, import_rego, read_rego
from sandbox.cli.common import (
    emit,
    format_option,
    write_document,
)
from sandbox.cli.policy import policy as policy_group
from sandbox.fsutil import atomic_write
from sandbox.group.jsonio import read_input_file
from sandbox.policy.summary import read_policy
from sandbox.shared.cose import FRAGMENT_ARTIFACT_TYPE
from sandbox.shared.didx509 import DidError
from sandbox.shared.errors import CheckFailed, InputError
from sandbox.shared.jsonstrict import decode_utf8
from sandbox.shared.policy import policy_hash
from sandbox.shared.policy.model import is_rego
from sandbox.shared.rego.fragment import FragmentRefused, RegoFragment, check_load, read_fragment_text

FILE = click.Path(path_type=Path, dir_okay=False)


@click.command("export")
@click.argument("policy_file", type=FILE)
@click.option("--format", "target", type=click.Choice(["aci-rego"]), default="aci-rego", show_default=True,
              help="Format to write: ACI's Rego policy module (the ccePolicy). With -o, the global "
                   "--format shapes the result line.")
@click.option("--base64", "as_base64", is_flag=True,
              help="Write base64, the value of confidentialComputeProperties.ccePolicy in an ARM template.")
@click.option("-o", "--output", type=FILE, help="Write here (default: stdout, exact bytes).")
def export(policy_file: Path, target: str, as_base64: bool, output: Path | None) -> None:
    """Write POLICY_FILE as ACI's Rego policy module (what `az confcom acipolicygen` produces).

    ACI sets HOST_DATA to SHA-256 of the Rego text, so the exported policy has its own hash: it is
    printed on stderr (or in the result with -o)."""
    _, parsed = read_policy(policy_file)
    rego = export_rego(parsed)
    data = (ccepolicy_base64(rego) if as_base64 else rego).encode("ascii" if as_base64 else "utf-8")
    digest = hashlib.sha256(rego.encode("utf-8")).hexdigest()
    write_document(data, output, None, what="ACI policy", digest_label="ACI HOST_DATA (sha256 of the Rego)",
                   digest=digest)


@click.command("import")
@click.argument("rego_file", type=FILE)
@click.option("--drop-fragments", is_flag=True,
              help="Leave out the policy's fragment imports (a policy without them allows less: only what "
                   "fragments would add).")
@click.option("--group", help="A file with several policy modules (confcom's multi-group output): the module's "
                             "0-based index; an ARM template with several container groups: the group's name.")
@click.option("-o", "--output", type=FILE, help="Write the policy here (default: stdout, exact bytes).")
@format_option
def import_(rego_file: Path, drop_fragments: bool, group: str | None, output: Path | None, fmt: str | None) -> None:
    """Read an ACI Rego policy as a parma-sandbox policy: Rego text, its base64, or the ccePolicy of an
    ARM template (confcom-generated policies included).

    Only the data assignments and framework delegations are read; docs/aci.md lists the accepted
    subset, and anything else is refused with the line where it starts."""
    text, index = _policy_text(rego_file, group)
    parsed = import_rego(text, source=str(rego_file), drop_fragments=drop_fragments, module_index=index)
    data = parsed.canonical_bytes()
    write_document(data, output, fmt, what="policy", digest_label="policy sha256 (HOST_DATA)",
                   digest=policy_hash(data))


policy_group.add_command(export)
policy_group.add_command(import_)

# Subcommands of `policy` only; nothing at the top level.
commands: list[click.Command] = []


# -- policy explain ----------------------------------------------------------------------------------------


@click.command("explain")
@click.argument("blob")
@click.option("--policy", "policy_file", type=FILE,
              help="Also decide the request with the local engine under this policy (the deployment's ccePolicy: "
                   "Rego, base64 or the ARM template), and show its explanation.")
@format_option
def explain(blob: str, policy_file: Path | None, fmt: str | None) -> None:
    """Decode ACI's policyDecision BLOB (the base64 in a denial, or the whole message; '-' reads stdin).

    Shows the enforcement point, the reasons ACI's framework gave and the request's input in the
    field names `policy check` uses, so the request can be replayed against a policy here; with
    --policy, what the local engine says about it (where one request can be replayed alone)."""
    text = sys.stdin.read() if blob == "-" else blob
    decision = parse_decision(text)
    result = decision.to_json() | {"request": decision.request()}
    replayed = replay(decision, policy_file_bytes(policy_file)) if policy_file is not None else None
    if replayed is not None:
        result["local"] = {"decisions": list(replayed.decisions), "notes": list(replayed.notes)}
    emit(result, fmt, lambda _: render_decision(decision) + ("\n" + render_replay(replayed) if replayed else ""))


# -- policy fragment ... -----------------------------------------------------------------------------------


@click.group("fragment")
def fragment() -> None:
    """Policy fragments: signed Rego modules that add containers to a policy (docs/aci.md, 'Fragments')."""


@fragment.command("issuer")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@format_option
def fragment_issuer(directory: Path, fmt: str | None) -> None:
    """Create a local test issuer in DIRECTORY: key.pem (signing key) and chain.pem (leaf, root).

    Prints its did:x509, the issuer a policy names to accept fragments it signs. For tests and local
    development only: nothing outside this machine trusts it."""
    if (directory / "key.pem").exists():
        raise InputError(f"{directory}/key.pem exists already", hint="choose an empty directory")
    issuer = make_test_issuer()
    save_issuer(issuer, directory)
    emit({"directory": str(directory), "issuer": issuer.did()}, fmt, lambda r: r["issuer"])


@fragment.command("sign")
@click.argument("rego_file", type=FILE)
@click.option("--key", "key_file", type=FILE, required=True, help="The signing key (PEM, EC).")
@click.option("--chain", "chain_file", type=FILE, required=True, help="Its certificate chain (PEM, leaf first).")
@click.option("--feed", required=True, help="The feed (e.g. the image repository the fragment belongs to).")
@click.option("--svn", type=click.IntRange(min=0), help="Put this SVN in the envelope's header too.")
@click.option("--issuer", "did", help="The did:x509 to claim (default: root fingerprint + the test EKU).")
@click.option("--alg", default="ES384", type=click.Choice(["ES256", "ES384", "ES512"]), show_default=True)
@click.option("-o", "--output", type=FILE, required=True, help="Write the COSE_Sign1 envelope here.")
@format_option
def fragment_sign(rego_file: Path, key_file: Path, chain_file: Path, feed: str, svn: int | None, did: str | None,
                  alg: str, output: Path, fmt: str | None) -> None:
    """Sign REGO_FILE (a fragment module: 'package <name>', svn, framework_version, containers...)."""
    payload = read_input_file(rego_file, "a fragment Rego module")
    read_fragment_text(decode_utf8(payload, str(rego_file)), str(rego_file))   # refuse what could never load
    envelope = sign_fragment(load_issuer(key_file, chain_file), payload, feed=feed, did=did, svn=svn, algorithm=alg)
    write_document(envelope, output, fmt, what="fragment", digest_label="sha256",
                   digest=hashlib.sha256(envelope).hexdigest())


def _verified(path: Path) -> tuple[VerifiedFragment, RegoFragment]:
    data = read_input_file(path, "a COSE_Sign1 fragment envelope")
    try:
        verified = verify_fragment(data)
    except (SignatureError, DidError) as e:
        raise CheckFailed(f"{path}: {e}") from None
    text = decode_utf8(verified.payload, f"{path} (payload)")
    return verified, read_fragment_text(text, f"{path} (payload)")


def _fragment_summary(path: Path, v: VerifiedFragment, f: RegoFragment) -> dict:
    return {"file": str(path), "issuer": v.issuer, "feed": v.feed, "header_svn": v.header_svn,
            "content_type": v.content_type, "namespace": f.namespace, "svn": f.svn,
            "framework_version": f.framework_version,
            "chain": [dict(c.subject) for c in v.chain],
            "containers": [{"name": c.get("name"), "id": c.get("id"), "command": c["command"], "layers": c["layers"]}
                           for c in f.containers],
            "fragments": list(f.fragments), "external_processes": len(f.external_processes),
            "warnings": list(f.warnings)}


def _render_fragment(r: dict) -> str:
    lines = [f"fragment {r['namespace']} (svn {r['svn']!s}, framework {r['framework_version']})",
             f"  issuer: {r['issuer']}", f"  feed:   {r['feed']}"]
    if r["header_svn"] is not None:
        lines.append(f"  header svn: {r['header_svn']}")
    lines.append("  signed by: " + " <- ".join(c.get("CN", "?") for c in r["chain"]))
    for c in r["containers"]:
        lines.append(f"  container {c['name'] or c['id'] or '?'}: {len(c['layers'])} layer(s), "
                     f"command {json.dumps(c['command'])}")
    for imp in r["fragments"]:
        lines.append(f"  imports fragments from {imp['issuer']} ({imp['feed']}, minimum svn {imp['minimum_svn']})")
    lines += [f"  warning: {w}" for w in r["warnings"]]
    if "accepted_by" in r:
        lines.append(f"  accepted: {r['accepted_by']}")
    return "\n".join(lines)


@fragment.command("show")
@click.argument("envelope", type=FILE)
@format_option
def fragment_show(envelope: Path, fmt: str | None) -> None:
    """Verify ENVELOPE's signature and issuer, then show what the fragment holds."""
    v, f = _verified(envelope)
    emit(_fragment_summary(envelope, v, f), fmt, _render_fragment)


@fragment.command("verify")
@click.argument("envelope", type=FILE)
@click.option("--policy", "policy_file", type=FILE,
              help="Also check that this Rego policy (text, base64 or an ARM template) accepts the fragment.")
@click.option("--group", "group", help="For a multi-group policy file, the module's 0-based index; for an ARM "
                                       "template with several container groups, the group's name.")
@format_option
def fragment_verify(envelope: Path, policy_file: Path | None, group: str | None, fmt: str | None) -> None:
    """Check ENVELOPE as ACI's guest does: certificate chain, signature, did:x509 issuer; with --policy,
    the issuer, feed and SVN against the policy's fragment imports. Exit 1 with the reason when refused."""
    v, f = _verified(envelope)
    result = _fragment_summary(envelope, v, f)
    if policy_file is not None:
        text, index = _policy_text(policy_file, group)
        rego = read_rego(text, source=str(policy_file), module_index=index)
        try:
            accepted = check_load(rego.fragments, issuer=v.issuer, feed=v.feed, header_svn=v.header_svn, fragment=f)
        except FragmentRefused as e:
            raise CheckFailed(f"{envelope}: {e}") from None
        result["accepted_by"] = (f"import of {accepted.issuer} / {accepted.feed} (minimum svn "
                                 f"{accepted.import_['minimum_svn']}, includes {', '.join(accepted.import_['includes'])})")
    emit(result, fmt, _render_fragment)


def _policy_text(path: Path, group: str | None) -> tuple[str, int | None]:
    """The Rego text of a policy file (text, base64, or an ARM template's ccePolicy) and, for a file of
    several modules, the module --group picks."""
    is_template = read_input_file(path, "a Rego policy").lstrip().startswith(b"{")
    data = policy_file_bytes(path, group if is_template else None)
    if not is_rego(data):
        raise InputError(f"{path}: a JSON policy, not ACI's Rego",
                         hint="import reads a Rego policy (text or base64) or an ARM template with a ccePolicy")
    text = data.decode("utf-8")
    if is_template or group is None:
        return text, None
    if not (group.isascii() and group.isdigit()):
        raise InputError(f"--group {group!r}: for a policy file, give the module's 0-based index")
    return text, int(group)


@fragment.command("fetch")
@click.argument("image")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Write each envelope here as <n>.cose.")
@format_option
def fragment_fetch(image: str, output_dir: Path, fmt: str | None) -> None:
    """Fetch the fragments attached to IMAGE in its registry (as 'az confcom' attaches them), verify each
    (chain, signature, issuer) and write them to OUTPUT_DIR."""
    found = fetch_fragments(image)
    if not found:
        raise CheckFailed(f"{image}: no policy fragment is attached to this image",
                          hint=f"confcom attaches them as OCI referrers of artifact type {FRAGMENT_ARTIFACT_TYPE}")
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, attached in enumerate(found):
        path = output_dir / f"{i}.cose"
        atomic_write(path, attached.envelope)
        v, f = _verified(path)
        results.append(_fragment_summary(path, v, f) | {"manifest": attached.manifest_digest})
    emit(results, fmt, lambda rs: "\n".join(f"{r['file']}: {r['namespace']} from {r['issuer']} ({r['feed']})"
                                             for r in rs))


policy_group.add_command(explain)
policy_group.add_command(fragment)
