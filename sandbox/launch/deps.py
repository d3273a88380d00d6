"""The pipeline steps other parts of parma-sandbox provide, imported when used.

Where a step is not available in this build, `up` stops at it and names it (NotImplementedStep)
instead of failing with an import error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sandbox.shared.errors import NotImplementedStep


def _load(module: str, name: str, step: str, owner: str) -> Callable[..., Any]:
    try:
        mod = __import__(module, fromlist=[name])
        return getattr(mod, name)
    except (ImportError, AttributeError) as e:
        raise NotImplementedStep(f"step '{step}' is not available in this build ({module}.{name}: {e})",
                                 hint=f"it comes with the {owner} work") from None


def resolve_image() -> Callable[..., Any]:
    return _load("sandbox.images.resolve", "resolve_image", "pull and convert images", "layers (#3)")


def ensure_uvm() -> Callable[..., Any]:
    return _load("sandbox.uvm.build", "ensure_uvm", "build the UVM", "uvm (#4)")
