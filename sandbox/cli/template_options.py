"""Options that pick what to run from an ACI ARM template: --group and --volume (docs/aci.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sandbox.shared.errors import InputError


def template_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--volume", "volumes", multiple=True, metavar="NAME=PATH",
                     help="ARM templates: the local directory for the azureFile or gitRepo volume NAME "
                          "(mounted read-only). Repeatable.")(f)
    return click.option("--group", "template_group", metavar="NAME",
                        help="ARM templates with several container groups: the one to use (its name, or its "
                             "0-based index).")(f)


def volume_paths(volumes: tuple[str, ...]) -> dict[str, Path]:
    """NAME=PATH arguments as a mapping; a malformed or repeated NAME is an input error."""
    out: dict[str, Path] = {}
    for item in volumes:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--volume {item!r}: expected NAME=PATH", hint="e.g. --volume share=./data")
        if name in out:
            raise InputError(f"--volume {name}: given twice")
        out[name] = Path(path).expanduser()
    return out
