"""The container-group spec: model, validation, JSON Schema."""

from sandbox.group.jsonio import ValidationError
from sandbox.group.spec import GroupSpec, TeeMode, load_group, validate_group

__all__ = ["GroupSpec", "TeeMode", "ValidationError", "load_group", "validate_group"]
