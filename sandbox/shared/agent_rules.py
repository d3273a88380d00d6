"""The agent's own rules for host requests, which hold whatever the policy says (docs/policy-trace.md).

The policy engine decides what the policy allows; the agent also keeps guest-side invariants that no
policy can lift: mounts go to its fixed directories, a container's root filesystem is its own overlay
at its own path, env entries are NAME=VALUE. The agent checks them before it asks the policy (a refusal
is `invalid_request`, not `policy_denied`), and `policy check` reports them for the requests of a
trace, so a trace that only the engine would accept does not pass for a run that could happen. Each
function returns why the agent refuses, or None.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sandbox.shared.codec import shown
from sandbox.shared.protocol import LAYER_TARGET_RE, LAYERS_DIR, VOLUME_TARGET_RE, VOLUMES_DIR, container_dir


def is_layer_target(target: str) -> bool:
    return re.fullmatch(LAYER_TARGET_RE, target) is not None


def is_volume_target(target: str) -> bool:
    return re.fullmatch(VOLUME_TARGET_RE, target) is not None


def rootfs_target(container_id: str) -> str:
    """Where a container's overlay (its root filesystem) is mounted."""
    return container_dir(container_id) + "/rootfs"


def device_target_problem(target: str) -> str | None:
    """mount_device: layers go to LAYERS_DIR/<name>, files volumes to VOLUMES_DIR/<volume>."""
    if is_layer_target(target) or is_volume_target(target):
        return None
    return f"mount target {shown(target)} must be {LAYERS_DIR}/<name> or {VOLUMES_DIR}/<volume>"


def overlay_problem(container_id: str, layer_paths: Sequence[str], target: str) -> str | None:
    """mount_overlay, what the request alone shows: the container's own rootfs path, and layers."""
    expected = rootfs_target(container_id)
    if target != expected:
        return f"the rootfs of {container_id} must be mounted at {expected}"
    if not layer_paths:
        return "layer_paths is empty"
    return None


def env_problem(env: Sequence[str]) -> str | None:
    """create_container and exec_process: every env entry is NAME=VALUE with a non-empty NAME."""
    for entry in env:
        name, sep, _ = entry.partition("=")
        if not sep or not name:
            return f"env entry {shown(entry)} is not NAME=VALUE with a name"
    return None
