"""`parma-sandbox verity FILE`: a dm-verity hash tree, as `veritysetup format` writes it.

The click command; the work and the output are in sandbox/cli/verity_run.py, which the entry point also
runs without click (sandbox/cli/entry.py).
"""

from __future__ import annotations

from pathlib import Path

import click

from sandbox.cli.common import emit, format_option
from sandbox.cli.verity_run import kv_table, run
from sandbox.shared.verity import ZERO_SALT

FILE = click.Path(path_type=Path, dir_okay=False)


@click.command("verity")
@click.argument("file", type=FILE)
@click.option("--no-superblock", is_flag=True, help="Do not write a verity superblock (pass the parameters at open).")
@click.option("--salt", "salt_hex", default=ZERO_SALT.hex(), show_default="32 zero bytes",
              help="Salt as hex, or '-' for none.")
@click.option("--hash-file", type=FILE, help="Write the tree to this file instead of appending it to FILE.")
@format_option
def verity(file: Path, no_superblock: bool, salt_hex: str, hash_file: Path | None, fmt: str | None) -> None:
    """Format a dm-verity hash tree for FILE (as `veritysetup format` would) and print its parameters.

    Without --hash-file the tree is appended to FILE (which must be a whole number of 4096-byte blocks).
    """
    emit(run(file, no_superblock=no_superblock, salt_hex=salt_hex, hash_file=hash_file), fmt, kv_table)


commands = [verity]
