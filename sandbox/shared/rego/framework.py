"""What ACI's framework decides that a policy module does not say (hcsshim pkg/securitypolicy).

Facts from hcsshim at 7c9ff7f4 (framework.rego `version` 0.5.0, api.rego `version` 0.12.0): each
enforcement point with the API version that introduced it and what happens when a policy module
has no rule for it (api.rego `enforcement_points`), and the defaults `check_container`,
`check_external_process` and `check_fragment` apply to data written for older framework versions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

FRAMEWORK_VERSION = (0, 5, 0)
API_VERSION = (0, 12, 0)

_SEMVER = re.compile(r"(0|[1-9][0-9]{0,17})\.(0|[1-9][0-9]{0,17})\.(0|[1-9][0-9]{0,17})")   # bounded numbers

Version = tuple[int, int, int]


def parse_semver(text: Any) -> Version | None:
    """MAJOR.MINOR.PATCH as a tuple, or None when `text` is not one (OPA's semver.is_valid, less pre-release)."""
    m = _SEMVER.fullmatch(text) if isinstance(text, str) else None
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def semver(text: str) -> Version:
    """parse_semver() of a version known to be valid (a constant, or one read_policy checked)."""
    version = parse_semver(text)
    if version is None:
        raise ValueError(f"{text!r} is not a MAJOR.MINOR.PATCH version")
    return version


def version_text(v: Version) -> str:
    return ".".join(map(str, v))


@dataclass(frozen=True)
class PointInfo:
    """api.rego's entry for one enforcement point."""

    introduced: Version
    default_allowed: bool | None   # result when the policy predates the point; None: use the framework's rule
    default_results: tuple[tuple[str, Any], ...] = ()


def _p(introduced: str, allowed: bool | None, **results: Any) -> PointInfo:
    return PointInfo(semver(introduced), allowed, tuple(results.items()))


# In api.rego's order.
ENFORCEMENT_POINTS: dict[str, PointInfo] = {
    "mount_device": _p("0.1.0", False),
    "rw_mount_device": _p("0.11.0", None),
    "mount_blockdev": _p("0.11.1", False),
    "mount_overlay": _p("0.1.0", False),
    "mount_cims": _p("0.11.0", False),
    "registry_changes": _p("0.10.0", False),
    "create_container": _p("0.1.0", False, env_list=None, allow_stdio_access=False),
    "unmount_device": _p("0.2.0", True),
    "rw_unmount_device": _p("0.11.0", None),
    "unmount_blockdev": _p("0.11.1", False),
    "unmount_overlay": _p("0.6.0", True),
    "exec_in_container": _p("0.2.0", True, env_list=None),
    "exec_external": _p("0.3.0", True, env_list=None, allow_stdio_access=False),
    "shutdown_container": _p("0.4.0", True),
    "signal_container_process": _p("0.5.0", True),
    "plan9_mount": _p("0.6.0", True),
    "plan9_unmount": _p("0.6.0", True),
    "get_properties": _p("0.7.0", True),
    "dump_stacks": _p("0.7.0", True),
    "runtime_logging": _p("0.8.0", True),
    "load_fragment": _p("0.9.0", False, add_module=False),
    "scratch_mount": _p("0.10.0", True),
    "scratch_unmount": _p("0.10.0", True),
    "log_provider": _p("0.11.0", True, providers_to_keep=None),
    "load_transparency_trust_list": _p("0.12.0", False),
    "host_network": _p("0.12.0", False),
}

# The rules of confcom's customer policy template (its order), all delegating to the framework. A module in
# confcom's layout has these plus every other point its api_version has; the policy model records only how
# a module departs from that layout (sandbox/shared/policy/model.py, `rules`).
CONFCOM_TEMPLATE_RULES = ("mount_device", "unmount_device", "mount_overlay", "unmount_overlay", "create_container",
                          "exec_in_container", "exec_external", "shutdown_container", "signal_container_process",
                          "plan9_mount", "plan9_unmount", "get_properties", "dump_stacks", "runtime_logging",
                          "load_fragment", "scratch_mount", "scratch_unmount")


def delegated_by_layout(point: str, api_version: Version) -> bool:
    """Whether confcom's layout delegates `point` to the framework for a policy of `api_version`."""
    return point in CONFCOM_TEMPLATE_RULES or api_version >= ENFORCEMENT_POINTS[point].introduced


def layout_rules(api_version: Version) -> tuple[str, ...]:
    """The rules confcom's layout writes, in its order: the template's, then the api_version's others."""
    return (*CONFCOM_TEMPLATE_RULES, *(ep for ep, info in ENFORCEMENT_POINTS.items()
                                       if ep not in CONFCOM_TEMPLATE_RULES and info.introduced <= api_version))


# Policy-level flags the framework reads (data.policy.<flag>; an undefined flag is false).
FLAGS = ("allow_properties_access", "allow_dump_stacks", "allow_runtime_logging",
         "allow_environment_variable_dropping", "allow_unencrypted_scratch", "allow_capability_dropping")
CAPABILITY_DROPPING_SINCE = (0, 2, 2)
# Flags of newer frameworks for features parma-sandbox does not have: only false can be imported.
FALSE_ONLY_FLAGS = ("allow_host_network", "allow_log_provider_dropping")

# Fields of a container object and the framework version that introduced each (check_container).
CONTAINER_BASE_FIELDS = ("command", "env_rules", "layers", "mounts", "allow_elevated", "working_dir",
                         "exec_processes", "signals", "allow_stdio_access")
CONTAINER_VERSIONED_FIELDS: dict[str, Version] = {
    "no_new_privileges": (0, 2, 0),
    "user": (0, 2, 1),
    "capabilities": (0, 2, 2),
    "seccomp_profile_sha256": (0, 2, 3),
}
# Below this framework version the init process also accepts SIGKILL and SIGTERM (check_signals).
SIGNALS_APPENDED_UNTIL = (0, 4, 1)
APPENDED_SIGNALS = (9, 15)
DEFAULT_UMASK = "0022"
ANY_USER: dict[str, object] = {"umask": DEFAULT_UMASK, "user_idname": {"pattern": "", "strategy": "any"},
                            "group_idnames": [{"pattern": "", "strategy": "any"}]}

EXTERNAL_PROCESS_FIELDS = ("command", "env_rules", "working_dir", "allow_stdio_access")
FRAGMENT_FIELDS = ("issuer", "feed", "minimum_svn", "includes")
FRAGMENT_INCLUDES = ("containers", "fragments", "external_processes", "namespace", "transparency_trust_lists",
                     "platform_rules")

# Fragment namespaces the guest refuses (securitypolicyenforcer_rego.go parseNamespace).
RESERVED_NAMESPACES = frozenset({"framework", "api", "policy", "metadata"})
NAMESPACE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

# Default mount sources of ACI's runtime (confcom internal_config.json "mount" and "default_mounts").
SANDBOX_PREFIX = "sandbox://"
