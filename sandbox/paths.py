"""Where parma-sandbox keeps its cache and its per-sandbox runtime state."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sandbox.shared.errors import InputError

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def cache_dir() -> Path:
    """~/.cache/parma-sandbox, or $PARMA_SANDBOX_CACHE, or $XDG_CACHE_HOME/parma-sandbox."""
    if env := os.environ.get("PARMA_SANDBOX_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "parma-sandbox"


def runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/parma-sandbox, falling back to /tmp/parma-sandbox-<uid> (mode 0700)."""
    if env := os.environ.get("PARMA_SANDBOX_RUNTIME"):
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return Path(xdg) / "parma-sandbox"
    return Path(f"/tmp/parma-sandbox-{os.getuid()}")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InputError(f"invalid sandbox name {name!r}",
                         hint="use 1-63 lowercase letters, digits and '-', starting and ending alphanumeric")
    return name


def sandbox_dir(name: str) -> Path:
    return runtime_dir() / check_name(name)
