"""Where `policy gen` gets its inputs: the same resolved images and `files` volume devices as `up`.

Both come from the launcher's pipeline (sandbox.launch.pipeline), so `policy gen` writes exactly the
policy that `up` would generate for the group.
"""

from __future__ import annotations

from sandbox.group.spec import GroupSpec
from sandbox.images.model import ResolvedImage


def resolve_group_images(spec: GroupSpec) -> dict[str, ResolvedImage]:
    """Every container's image, resolved and converted (cached by content), keyed by container name."""
    from sandbox.launch.pipeline import resolve_images
    return resolve_images(spec)


def files_volume_hashes(spec: GroupSpec) -> dict[str, str]:
    """dm-verity root hashes of the read-only devices of the group's `files` volumes (built if needed)."""
    from sandbox.launch.pipeline import package_volumes
    return {name: root_hash for name, (root_hash, _path) in package_volumes(spec).items()}
