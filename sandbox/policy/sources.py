"""What a group's policy is computed from: its resolved images and its `files` volume devices.

`up` (sandbox.launch.pipeline), `policy gen`, the exports and the containerd shim all take them from
here, so `policy gen` writes exactly the policy that `up` would generate for the group, and the launch
plan attaches exactly the devices the policy pins.
"""

from __future__ import annotations

from pathlib import Path

from sandbox.group.spec import GroupSpec, LayerFormat
from sandbox.images.model import ResolvedImage
from sandbox.progress import step


def resolve_group_images(spec: GroupSpec) -> dict[str, ResolvedImage]:
    """Every container's image, resolved and converted (cached by content), keyed by container name."""
    from sandbox.images.resolve import resolve_image  # heavy (requests); only commands that resolve need it

    by_ref: dict[str, ResolvedImage] = {}
    out = {}
    with step("Resolve and convert images", total=len(spec.containers)) as task:
        for c in spec.containers:
            if c.image not in by_ref:
                # layerFormat aci: layer hashes as ACI computes them (docs/aci.md)
                compat = {"compat": spec.layer_format.value} if spec.layer_format != LayerFormat.default else {}
                by_ref[c.image] = resolve_image(c.image, base_dir=spec.base_dir, **compat)
            out[c.name] = by_ref[c.image]
            task.advance()
    return out


def package_files_volumes(spec: GroupSpec) -> dict[str, tuple[str, Path]]:
    """(dm-verity root hash, image path) of the read-only device of each `files` volume, built if needed."""
    from sandbox.layers.volumes import build_files_volume  # the layer converter; only when there are volumes

    files = [v for v in spec.volumes if v.source is not None]
    out = {}
    if files:
        with step("Package files volumes", total=len(files)) as task:
            for v in files:
                assert v.source is not None
                volume = build_files_volume(v.source)
                out[v.name] = (volume.root_hash, volume.image)
                task.advance()
    return out


def files_volume_hashes(spec: GroupSpec) -> dict[str, str]:
    """dm-verity root hashes of the read-only devices of the group's `files` volumes (built if needed)."""
    return {name: root_hash for name, (root_hash, _path) in package_files_volumes(spec).items()}
