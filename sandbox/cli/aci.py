"""`parma-sandbox policy export|import`: the ccePolicy Rego format of Azure Container Instances.

These are subcommands of the `policy` group (sandbox/cli/policy.py), attached here so that the
ACI interoperability code stays in its own module.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from sandbox.cli.common import format_option, write_document
from sandbox.cli.policy import policy as policy_group
from sandbox.policy.summary import read_policy
from sandbox.shared.errors import InputError
from sandbox.shared.policy import policy_hash

# The Rego and ARM code is imported by the commands that use it: this module loads with every `policy`
# subcommand (sandbox/cli/main.py).

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
    from sandbox.aci.rego import ccepolicy_base64, export_rego

    _, parsed = read_policy(policy_file)
    rego = export_rego(parsed)
    data = (ccepolicy_base64(rego) if as_base64 else rego).encode("ascii" if as_base64 else "utf-8")
    digest = hashlib.sha256(rego.encode("utf-8")).hexdigest()
    write_document(data, output, None, what="ACI policy", digest_label="ACI HOST_DATA (sha256 of the Rego)",
                   digest=digest)


def _template_ccepolicy(path: Path, raw: bytes) -> bytes:
    """The ccePolicy of an ARM template, or the file's bytes when it is not a template."""
    from sandbox.aci.arm import ccepolicy_of_template, is_arm_template
    from sandbox.shared.jsonstrict import decode_utf8, loads_strict

    if not raw.lstrip().startswith(b"{"):
        return raw
    doc = loads_strict(decode_utf8(raw, str(path)), str(path))
    if not is_arm_template(doc):
        raise InputError(f"{path}: a JSON file that is not an ARM template",
                         hint="import reads a Rego policy (text or base64) or an ARM template with a ccePolicy")
    policy = ccepolicy_of_template(path, doc)
    if policy is None:
        raise InputError(f"{path}: the container group's confidentialComputeProperties.ccePolicy is empty",
                         hint="an empty ccePolicy means ACI's allow-all policy, which parma-sandbox does not run")
    return policy.encode("utf-8")


@click.command("import")
@click.argument("rego_file", type=FILE)
@click.option("--drop-fragments", is_flag=True,
              help="Import a policy that lists fragments without them (fragments are not supported; "
                   "dropping them only removes what they would allow).")
@click.option("-o", "--output", type=FILE, help="Write the policy here (default: stdout, exact bytes).")
@format_option
def import_(rego_file: Path, drop_fragments: bool, output: Path | None, fmt: str | None) -> None:
    """Read an ACI Rego policy as a parma-sandbox policy: Rego text, its base64, or the ccePolicy of an
    ARM template (confcom-generated policies included).

    Only the data assignments and framework delegations are read; docs/aci.md lists the accepted
    subset, and anything else is refused with the line where it starts."""
    from sandbox.aci.rego import decode_policy_text, import_rego
    from sandbox.fsutil import read_input_file

    raw = read_input_file(rego_file, "a Rego policy (text or base64) or an ARM template")
    text = decode_policy_text(_template_ccepolicy(rego_file, raw), str(rego_file))
    parsed = import_rego(text, source=str(rego_file), drop_fragments=drop_fragments)
    data = parsed.canonical_bytes()
    write_document(data, output, fmt, what="policy", digest_label="policy sha256 (HOST_DATA)",
                   digest=policy_hash(data))


policy_group.add_command(export)
policy_group.add_command(import_)

# Subcommands of `policy` only; nothing at the top level.
commands: list[click.Command] = []
