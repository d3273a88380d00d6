"""`parma-sandbox validate group.json`: check a group spec without touching the network.

Besides the spec itself, local images (`oci:` layouts and `docker-archive:` tarballs) must exist and hold
the named tag, so that a typo is found here rather than by `up`. Registry images are not contacted.
"""

from __future__ import annotations

from pathlib import Path

import click

from sandbox.cli.common import emit, format_option
from sandbox.cli.template_options import template_options, volume_paths
from sandbox.group import GroupSpec, ValidationError, load_group
from sandbox.group.spec import check_device_count
from sandbox.images.local import check_local_image
from sandbox.shared.errors import SandboxError
from sandbox.shared.policy.model import parse_policy, policy_hash


def group_summary(spec: GroupSpec) -> dict[str, object]:
    return {
        "name": spec.name,
        "tee": spec.tee.value,
        "resources": {"vcpus": spec.resources.vcpus, "memoryMiB": spec.resources.memory_mib},
        "containers": [{"name": c.name, "image": c.image} for c in spec.containers],
        "initContainers": [{"name": c.name, "image": c.image} for c in spec.init_containers],
        "restartPolicy": spec.restart_policy.value,
        "ports": [{"port": p.port, "hostPort": p.host_port, "protocol": p.protocol, "hostAddress": p.host_address}
                  for p in spec.ports],
        "volumes": [{"name": v.name, "kind": v.kind.value} for v in spec.volumes],
    }


def count_layer_disks(spec: GroupSpec) -> tuple[int, list[str]]:
    """Distinct layers of the group's local images (read offline), and the images not counted: registry
    images, whose layers `up` and `policy gen` count once they are pulled, and unreadable local ones."""
    from sandbox.images.resolve import local_layer_ids  # image code, off the CLI's start-up path

    layers: set[str] = set()
    uncounted = []
    for c in spec.init_containers + spec.containers:
        try:
            ids = local_layer_ids(c.image, base_dir=spec.base_dir)
        except SandboxError:     # a local image that is missing or unreadable: `up` will say why
            ids = None
        if ids is None:
            uncounted.append(c.image)
        else:
            layers.update(ids)
    return len(layers), uncounted


@click.command("validate")
@click.argument("group_file", type=click.Path(path_type=Path, dir_okay=False))
@template_options
@format_option
def validate(group_file: Path, template_group: str | None, volumes: tuple[str, ...], fmt: str | None) -> None:
    """Validate GROUP_FILE (exit 0 when valid, 2 with every problem listed otherwise)."""
    spec = load_group(group_file, template_group=template_group, volume_paths=volume_paths(volumes))
    problems = [f"{where}[{i}].image: {why}"
                for where, containers in (("initContainers", spec.init_containers), ("containers", spec.containers))
                for i, c in enumerate(containers)
                if (why := check_local_image(c.image, base_dir=spec.base_dir))]
    if problems:
        raise ValidationError(str(group_file), problems,
                              hint="local image paths are relative to the group file; "
                                   "'parma-sandbox image layers REF' reads one on its own")
    layers, uncounted = count_layer_disks(spec)
    check_device_count(spec, layers, source=str(group_file))
    summary = {"valid": True, "file": str(group_file), **group_summary(spec), "layerDisks": layers,
               "layersNotCounted": uncounted}
    # A template's ccePolicy is what `up` runs under: read it now, as the agent will (docs/aci.md).
    from sandbox.aci.ccepolicy import template_ccepolicy_of_file  # ARM and Rego reading, when asked for

    rego = template_ccepolicy_of_file(group_file, template_group)
    if rego is not None:
        policy = parse_policy(rego, f"{group_file} (ccePolicy)")
        summary["ccePolicy"] = {"host_data": policy_hash(rego), "containers": len(policy.containers),
                                "fragment_imports": [f.feed for f in policy.fragments]}

    def table(s: dict) -> str:
        names = ", ".join(c["name"] for c in s["containers"])
        line = f"{group_file}: valid: group {s['name']!r} with {len(s['containers'])} container(s): {names}"
        if "ccePolicy" in s:
            line += f"; its ccePolicy (HOST_DATA {s['ccePolicy']['host_data']}) runs with it"
        return line

    emit(summary, fmt, table)


commands = [validate]
