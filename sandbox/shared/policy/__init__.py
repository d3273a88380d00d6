"""The execution policy, shared by host and guest: the document model and the enforcement engine.

The names below are imported on first use (PEP 562): code that needs only a small module of this package,
such as `defaults` for the group validator, does not pay for loading the engine and the request shapes
(tens of milliseconds of start-up for `parma-sandbox validate`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandbox.shared.policy.engine import Decision, PolicyEngine
    from sandbox.shared.policy.inputs import EnforcementPoint, PolicyInputError
    from sandbox.shared.policy.model import (
        Policy,
        canonical_bytes,
        parse_policy,
        policy_hash,
        validate_policy,
    )

_HOMES = {
    "Decision": "engine", "PolicyEngine": "engine",
    "EnforcementPoint": "inputs", "PolicyInputError": "inputs",
    "Policy": "model", "canonical_bytes": "model", "parse_policy": "model", "policy_hash": "model",
    "validate_policy": "model",
}

__all__ = ["Decision", "EnforcementPoint", "Policy", "PolicyEngine", "PolicyInputError", "canonical_bytes",
           "parse_policy", "policy_hash", "validate_policy"]


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
