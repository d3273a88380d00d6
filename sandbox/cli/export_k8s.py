"""`parma-sandbox export k8s GROUP`: the group as a Pod (or Deployment) for the `parma` RuntimeClass."""

from __future__ import annotations

import hashlib
from pathlib import Path

import click
import yaml

from sandbox.cli.common import info, write_document
from sandbox.group import load_group
from sandbox.k8s.manifest import Kind, check_policy_images, exec_notes, manifests, with_registry_images
from sandbox.policy.gen import generate_policy
from sandbox.policy.sources import files_volume_hashes, resolve_group_images
from sandbox.policy.summary import read_policy

FILE = click.Path(path_type=Path, dir_okay=False)


@click.command("k8s")
@click.argument("group_file", type=FILE)
@click.option("--kind", type=click.Choice([k.value for k in Kind]), default=Kind.pod.value, show_default=True,
              help="Write a Pod, or a Deployment whose pod template carries the policy.")
@click.option("--policy", "policy_file", type=FILE,
              help="Use this policy file instead of generating one from the group's images.")
@click.option("--registry", metavar="REGISTRY/PREFIX",
              help="Where local images (oci:, docker-archive:) are pushed, unchanged: they are named "
                   "REGISTRY/PREFIX/<name>@<digest> in the manifest and the policy, and every other image is "
                   "pinned by its digest.")
@click.option("--namespace", help="metadata.namespace of the objects written.")
@click.option("--replicas", type=click.IntRange(min=0), default=1, show_default=True,
              help="Deployment replicas (each replica is its own UVM with the same policy and HOST_DATA).")
@click.option("-o", "--output", type=FILE, help="Write the manifest here (default: stdout).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default=None,
              help="Shape of the result line with -o (default: the global --format).")
def command(group_file: Path, kind: str, policy_file: Path | None, registry: str | None, namespace: str | None,
            replicas: int, output: Path | None, fmt: str | None) -> None:
    """Write GROUP_FILE as a Kubernetes manifest with runtimeClassName: parma and the policy annotation.

    The policy is generated from the group's images (pulled and converted here, as `policy gen` does)
    unless --policy is given; its SHA-256 is the HOST_DATA every pod of this manifest attests.
    """
    spec = load_group(group_file)
    # refuse what a pod cannot run before pulling anything (local images get their registry names below)
    manifests(spec, b"", kind=Kind(kind), local_images_named=registry is not None)
    images = None
    if registry is not None:
        images = resolve_group_images(spec)
        spec = with_registry_images(spec, images, registry)
    if policy_file is not None:
        policy, parsed = read_policy(policy_file)
        check_policy_images(spec, parsed)
    else:
        images = images if images is not None else resolve_group_images(spec)
        policy = generate_policy(spec, images, volume_hashes=files_volume_hashes(spec))
    docs = manifests(spec, policy, kind=Kind(kind), namespace=namespace, replicas=replicas)
    text = yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, allow_unicode=True)
    notes = exec_notes(spec)
    if notes:
        info("kubectl exec may run only: " + "; ".join(notes))
    write_document(text.encode(), output, fmt, what=f"{kind} manifest",
                   digest_label="policy sha256 (HOST_DATA)", digest=hashlib.sha256(policy).hexdigest())
