"""`parma-sandbox export ...`: hand a group to the engines that run it elsewhere.

The `export` group collects one subcommand per target; each target's command lives in its own module,
listed in SUBCOMMAND_MODULES (each defines `command`), so targets are added without touching the others.
"""

from __future__ import annotations

import importlib

import click

SUBCOMMAND_MODULES = (
    "sandbox.cli.export_aci",
    "sandbox.cli.export_k8s",
)


@click.group("export")
def export() -> None:
    """Write a group as a deployment for another engine (Confidential ACI, Kubernetes with the parma runtime)."""


for _module in SUBCOMMAND_MODULES:
    export.add_command(importlib.import_module(_module).command)

commands = [export]
