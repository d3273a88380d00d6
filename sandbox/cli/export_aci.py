"""`parma-sandbox export aci`: a group as an ARM template for Confidential ACI (docs/aci.md)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from sandbox.aci.export import aci_template
from sandbox.aci.rego import ccepolicy_base64
from sandbox.cli.common import OutputFormat, echo_json, format_option, info, resolve_format, write_document
from sandbox.cli.template_options import template_options, volume_paths
from sandbox.group import load_group
from sandbox.group.spec import LayerFormat
from sandbox.policy.sources import resolve_group_images

FILE = click.Path(path_type=Path, dir_okay=False)




@click.command("aci")
@click.argument("group_file", type=FILE)
@click.option("-o", "--output", type=FILE, help="Write the ARM template here (default: stdout).")
@click.option("--registry", metavar="REGISTRY/PREFIX",
              help="Where local images (oci:, docker-archive:) are pushed, unchanged: they are named "
                   "REGISTRY/PREFIX/<name>@<digest> in the template.")
@click.option("--policy-only", is_flag=True,
              help="Print only the base64 ccePolicy, and the HOST_DATA ACI will attest for it (stderr).")
@template_options
@format_option
def export_aci(group_file: Path, output: Path | None, registry: str | None, policy_only: bool,
               template_group: str | None,
               volumes: tuple[str, ...], fmt: str | None) -> None:
    """Write an ARM template that deploys GROUP_FILE on Confidential ACI, with the ccePolicy that
    describes ACI's runtime (docs/aci.md, 'Export to ACI'). Images are resolved and their layers
    hashed as ACI hashes them; every image is pinned by digest."""
    spec = load_group(group_file, template_group=template_group, volume_paths=volume_paths(volumes))
    spec = dataclasses.replace(spec, layer_format=LayerFormat.aci)
    result = aci_template(spec, resolve_group_images(spec), registry)   # init containers' images included
    if policy_only:
        policy = ccepolicy_base64(result.rego)
        if resolve_format(fmt) == OutputFormat.json:
            echo_json({"ccePolicy": policy, "host_data": result.host_data})
            return
        click.echo(policy)
        info(f"ACI HOST_DATA (sha256 of the Rego): {result.host_data}")
        return
    data = (json.dumps(result.template, indent=2) + "\n").encode()
    write_document(data, output, fmt, what="ARM template", digest_label="ACI HOST_DATA", digest=result.host_data)


command = export_aci
