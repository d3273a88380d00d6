"""The enforcement points: where the agent asks the policy engine (ACI's Rego rule names, snake_case)."""

from __future__ import annotations

from enum import StrEnum


class EnforcementPoint(StrEnum):
    mount_device = "mount_device"
    unmount_device = "unmount_device"
    mount_overlay = "mount_overlay"
    unmount_overlay = "unmount_overlay"
    scratch_mount = "scratch_mount"
    scratch_unmount = "scratch_unmount"
    create_container = "create_container"
    exec_in_container = "exec_in_container"
    exec_external = "exec_external"
    shutdown_container = "shutdown_container"
    signal_container_process = "signal_container_process"
    get_properties = "get_properties"
    dump_stacks = "dump_stacks"
    runtime_logging = "runtime_logging"
    load_fragment = "load_fragment"
