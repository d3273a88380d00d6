"""`parma-sandbox verity FILE`: a dm-verity hash tree, as `veritysetup format` writes it.

Its own module, importing only the shared verity code: as a command it competes with `veritysetup`,
process start-up included (bench/bench_verity.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from sandbox.cli.common import emit, format_option, render_table
from sandbox.fsutil import atomic_output
from sandbox.shared.errors import InputError
from sandbox.shared.verity import ZERO_SALT, VerityInfo, format_verity

FILE = click.Path(path_type=Path, dir_okay=False)


def verity_doc(info: VerityInfo, hash_file: Path | None) -> dict[str, Any]:
    return {
        "root_hash": info.root_hash,
        "salt": info.salt.hex(),
        "data_blocks": info.data_blocks,
        "data_block_size": info.data_block_size,
        "hash_block_size": info.hash_block_size,
        "hash_offset": info.hash_offset,
        "hash_start_block": info.hash_start_block,
        "hash_blocks": info.hash_blocks,
        "superblock": info.superblock,
        "uuid": info.uuid.hex() if info.uuid else None,
        "hash_file": str(hash_file) if hash_file else None,
        "algorithm": info.algorithm,
        "hash_type": info.hash_type,
    }


def kv_table(doc: dict[str, Any]) -> str:
    return render_table(["field", "value"], [(k, "" if v is None else v) for k, v in doc.items()])


def parse_salt(text: str) -> bytes:
    if text == "-":
        return b""
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        raise InputError(f"--salt {text!r} is not hexadecimal",
                         hint="give the salt as hex digits, or '-' for an empty salt") from None
    return salt


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
    salt = parse_salt(salt_hex)
    if hash_file is not None:
        with atomic_output(hash_file) as tmp:
            info = format_verity(file, salt=salt, superblock=not no_superblock, hash_file=tmp)
    else:
        try:
            size = file.stat().st_size
        except OSError as e:
            raise InputError(f"cannot read {file}: {e.strerror}") from e
        try:
            info = format_verity(file, salt=salt, superblock=not no_superblock)
        except BaseException:
            os.truncate(file, size)             # leave FILE as it was
            raise
    emit(verity_doc(info, hash_file), fmt, kv_table)


commands = [verity]
