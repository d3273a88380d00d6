"""The enforcement points: where the agent asks the policy engine (ACI's Rego rule names, snake_case); and
the kinds of volume the create_volume point decides on. Light on purpose: the agent imports it at boot."""

from __future__ import annotations

from enum import StrEnum


class EnforcementPoint(StrEnum):
    mount_device = "mount_device"
    unmount_device = "unmount_device"
    mount_overlay = "mount_overlay"
    unmount_overlay = "unmount_overlay"
    scratch_mount = "scratch_mount"
    scratch_unmount = "scratch_unmount"
    create_volume = "create_volume"          # parma-sandbox extension (volumes in the policy)
    create_container = "create_container"
    exec_in_container = "exec_in_container"
    exec_external = "exec_external"
    shutdown_container = "shutdown_container"
    signal_container_process = "signal_container_process"
    get_properties = "get_properties"
    dump_stacks = "dump_stacks"
    runtime_logging = "runtime_logging"
    load_fragment = "load_fragment"


class VolumeKind(StrEnum):
    """What a group volume is: the group spec's volume kinds, as the policy pins them."""

    empty_dir = "emptyDir"   # a writable directory in guest memory, created empty by the guest (create_volume)
    tmpfs = "tmpfs"          # likewise, private and of a given size
    files = "files"          # a directory shipped with the group: a read-only device pinned by root hash
    secret = "secret"        # small files the host delivers, read-only (create_volume); content not pinned
