"""Modules the agent imports on first use, so that its start-up imports only what serving needs.

`blockdev = LazyModule("sandbox.guest.blockdev")` stands for the module: the first attribute read
imports it and every read after that goes to the module. Python's import lock makes a concurrent first
use wait for the one import, so no thread ever sees a half-imported module. Next to each use, an
`if TYPE_CHECKING:` import gives type checkers the real module. No import circle may hide behind one:
the lazy modules import nothing that imports their user.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any


class LazyModule:
    __slots__ = ("name", "_module")

    def __init__(self, name: str) -> None:
        self.name = name
        self._module: ModuleType | None = None

    def load(self) -> ModuleType:
        """Import the module now (once) and return it."""
        module = self._module
        if module is None:
            import importlib  # here, not at the top: the agent's boot path does not load importlib's package

            module = self._module = importlib.import_module(self.name)
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.load(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.name} ({'loaded' if self._module is not None else 'not loaded'})>"
