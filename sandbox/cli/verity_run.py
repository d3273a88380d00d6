"""What `parma-sandbox verity` does, without click, and the calls the fast entry point runs by itself.

As a command it competes with `veritysetup format`, process start-up included (bench/bench_verity.py), and
importing click with the command table costs more than hashing a small file. So sandbox/cli/entry.py runs
the calls whose arguments `parse_args` understands completely straight from here; every other shape (help,
a usage error, a path click refuses) goes to the click command in sandbox/cli/verity.py, which ends in the
same `run`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sandbox.cli.render import render_table
from sandbox.shared.errors import InputError
from sandbox.shared.verity import ZERO_SALT, VerityInfo, format_verity

FORMATS = ("table", "json")         # sandbox.cli.common.OutputFormat, whose module imports click


def verity_doc(info: VerityInfo, hash_file: Path | None) -> dict[str, object]:
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


def kv_table(doc: dict[str, object]) -> str:
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


def run(file: Path, *, no_superblock: bool, salt_hex: str, hash_file: Path | None) -> dict[str, object]:
    """Format the tree and return the result document. Without `hash_file` the tree is appended to `file`,
    which is left as it was if that fails."""
    salt = parse_salt(salt_hex)
    if hash_file is not None:
        from sandbox.fsutil import atomic_output  # only this form writes a new file

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
    return verity_doc(info, hash_file)


@dataclass(frozen=True)
class VerityCall:
    """The arguments of one `verity` call."""

    file: Path
    no_superblock: bool = False
    salt_hex: str = ZERO_SALT.hex()
    hash_file: Path | None = None
    fmt: str | None = None              # the command's own --format, if given


def path_click_accepts(text: str) -> bool:
    """What click.Path(dir_okay=False) lets through: not a directory and, if it exists, readable."""
    return bool(text) and not os.path.isdir(text) and (not os.path.lexists(text) or os.access(text, os.R_OK))


def plain_args(args: list[str], flags: Mapping[str, str],
               valued: Mapping[str, str]) -> tuple[str, dict[str, str]] | None:
    """`args` read as click reads one positional argument, the flags `flags` and the options `valued` that
    take a value (a long one's value also after '='), in any order, a repeated option's last value winning;
    both map an option's spellings to its field. (The positional, {field: value, '' for a flag given});
    None for anything else: --help, '--', '-', an unknown option, a second positional or none, a missing
    value. Shared by this module's and sandbox/cli/convert_run.py's `parse_args`."""
    given: dict[str, str] = {}
    positional: str | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in flags:
            given[flags[arg]] = ""
            continue
        if not arg.startswith("-"):
            if positional is not None:
                return None
            positional = arg
            continue
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        field = valued.get(name)
        if field is None:
            return None
        if not eq:
            if i == len(args):
                return None
            value = args[i]
            i += 1
        given[field] = value
    return None if positional is None else (positional, given)


def parse_args(args: list[str]) -> VerityCall | None:
    """The call `args` (what follows `verity`) make when they are plainly well-formed, else None.

    Accepted: FILE once, and --no-superblock, --salt V, --hash-file F and --format table|json (the value
    also after '='), in any order, a repeated option's last value winning, as click parses them. Anything
    else, --help included, is None: the click command answers it.
    """
    parsed = plain_args(args, {"--no-superblock": "no_superblock"},
                        {"--salt": "salt_hex", "--hash-file": "hash_file", "--format": "fmt"})
    if parsed is None:
        return None
    file, given = parsed
    hash_file, fmt = given.get("hash_file"), given.get("fmt")
    if (not path_click_accepts(file) or (hash_file is not None and not path_click_accepts(hash_file))
            or (fmt is not None and fmt not in FORMATS)):
        return None
    return VerityCall(file=Path(file), no_superblock="no_superblock" in given,
                      salt_hex=given.get("salt_hex", ZERO_SALT.hex()),
                      hash_file=Path(hash_file) if hash_file is not None else None, fmt=fmt)
