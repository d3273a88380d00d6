"""`parma-sandbox up group.json`: the main job. Steps land with their issues; missing ones say so."""

from __future__ import annotations

from pathlib import Path

import click

from sandbox.cli.common import info
from sandbox.group import TeeMode, load_group
from sandbox.hostcheck import check_host
from sandbox.progress import step
from sandbox.shared.errors import NotImplementedStep


@click.command("up")
@click.argument("group_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-d", "--detach", is_flag=True, help="Start the group and return; do not stream logs.")
@click.option("--name", help="Sandbox name (default: the group's name).")
@click.option("--policy", "policy_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Use this policy file instead of generating one.")
@click.option("--tee", type=click.Choice([t.value for t in TeeMode]), default=None,
              help="TEE mode (default: the group's 'tee', else auto).")
def up(group_file: Path, detach: bool, name: str | None, policy_file: Path | None, tee: str | None) -> None:
    """Pull, convert, generate the policy, launch the UVM and start GROUP_FILE's containers."""
    spec = load_group(group_file)
    mode = TeeMode(tee) if tee else spec.tee
    with step("Probing host"):
        report = check_host()
    if mode == TeeMode.auto:
        info(f"tee: auto -> {report.tee.value} ({'; '.join(report.reasons) or 'SEV-SNP available'})")
    info(f"group {spec.name!r}: {len(spec.containers)} container(s) validated")
    raise NotImplementedStep("step 'pull and convert images' is not implemented yet",
                             hint="image pulling and layer conversion land with the layers issue (#3); "
                                  "'parma-sandbox validate' and 'parma-sandbox check' work today")


commands = [up]
