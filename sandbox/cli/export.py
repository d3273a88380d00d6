"""`parma-sandbox export ...`: hand a group to engines elsewhere (docs/aci.md)."""

from __future__ import annotations

import click


@click.group("export")
def export() -> None:
    """Write what another engine needs to run a group as it runs here (ACI: an ARM template)."""


commands = [export]
