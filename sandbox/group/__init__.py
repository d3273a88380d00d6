"""The container group: its spec (model, validation, JSON Schema), ACI ARM templates read as one, and
the loader that picks between them."""

from sandbox.group.jsonio import ValidationError
from sandbox.group.load import load_group
from sandbox.group.spec import GroupSpec, TeeMode, validate_group

__all__ = ["GroupSpec", "TeeMode", "ValidationError", "load_group", "validate_group"]
