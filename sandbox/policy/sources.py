"""Where `policy gen` gets its inputs: resolved images and the root hashes of `files` volume devices.

Both come from the layers work (image resolution and conversion). Until those functions exist in
this build, the steps stop with a NotImplementedStep that names what is missing.
"""

from __future__ import annotations

from sandbox.group.spec import GroupSpec, VolumeKind
from sandbox.images.model import ResolvedImage
from sandbox.progress import step
from sandbox.shared.errors import NotImplementedStep


def resolve_group_images(spec: GroupSpec) -> dict[str, ResolvedImage]:
    """Resolve every container's image (pull or read, convert layers, cached by content)."""
    try:
        from sandbox.images.resolve import resolve_image
    except ImportError:
        raise NotImplementedStep(
            "policy gen needs image resolution (sandbox.images.resolve.resolve_image), which is not in this "
            "build yet", hint="from Python, call sandbox.policy.gen.generate_policy with resolved images") from None
    images: dict[str, ResolvedImage] = {}
    by_reference: dict[str, ResolvedImage] = {}
    for c in spec.containers:
        if c.image not in by_reference:
            with step(f"Resolve image {c.image}"):
                by_reference[c.image] = resolve_image(c.image, base_dir=spec.base_dir)
        images[c.name] = by_reference[c.image]
    return images


def files_volume_hashes(spec: GroupSpec) -> dict[str, str]:
    """dm-verity root hashes of the read-only devices of the group's `files` volumes."""
    volumes = [v for v in spec.volumes if v.kind == VolumeKind.files]
    if not volumes:
        return {}
    try:
        from sandbox.layers.volumes import build_files_volume
    except ImportError:
        raise NotImplementedStep(
            f"files volume {volumes[0].name!r} needs its read-only device (directory -> ext4 + dm-verity), "
            "and this build cannot make it yet (sandbox.layers.volumes.build_files_volume)",
            hint="from Python, pass volume_hashes to sandbox.policy.gen.generate_policy") from None
    hashes = {}
    for v in volumes:
        with step(f"Build files volume {v.name}"):
            hashes[v.name] = build_files_volume(v.source).root_hash
    return hashes
