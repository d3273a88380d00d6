"""What `parma-sandbox image convert` does, without click, and the calls the fast entry point runs by itself.

As a command it competes with hcsshim's tar2ext4, process start-up included (bench/bench_tar2ext4.py), and
importing click with the command table costs more than a tenth of converting a small layer. So
sandbox/cli/entry.py runs the calls whose arguments `parse_args` understands completely straight from here;
every other shape (help, a usage error, a path click refuses) goes to the click command in
sandbox/cli/image.py, which ends in the same `run`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.aci.ext4compat import COMPAT_MODES, layer_mode
from sandbox.cli.verity_run import FORMATS, kv_table, path_click_accepts, verity_doc
from sandbox.layers.convert import convert_layer, convert_tar_to_ext4
from sandbox.layers.tar2ext4 import Ext4Options
from sandbox.shared.errors import InputError


def run(layer: Path, output: Path, *, no_verity: bool, no_whiteouts: bool,
        compat: str | None) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    """Convert LAYER into OUTPUT; the result document and its table rendering."""
    if compat and no_whiteouts:
        raise InputError("--compat aci converts whiteouts, as ACI does: drop --no-whiteouts")
    options = layer_mode(compat)[0] if compat else Ext4Options(whiteouts=not no_whiteouts)
    if no_verity:
        ext4 = convert_tar_to_ext4(layer, output, options=options)
        doc: dict[str, Any] = {"output": str(output), "diff_id": ext4.diff_id, "ext4_size": ext4.ext4_size,
                               "entries": ext4.entries, "compression": ext4.compression.value}
        return doc, kv_table
    res = convert_layer(layer, output, options=options)
    doc = {"root_hash": res.root_hash, "output": str(output), "diff_id": res.diff_id, "ext4_size": res.ext4_size,
           "image_size": res.image_size, "entries": res.entries, "compression": res.compression.value,
           "verity": verity_doc(res.verity, None)}
    return doc, _root_hash_line


def _root_hash_line(doc: dict[str, Any]) -> str:
    return str(doc["root_hash"])


@dataclass(frozen=True)
class ConvertCall:
    """The arguments of one `image convert` call."""

    layer: Path
    output: Path
    no_verity: bool = False
    no_whiteouts: bool = False
    compat: str | None = None
    fmt: str | None = None              # the command's own --format, if given


_VALUED = {"-o": "output", "--output": "output", "--compat": "compat", "--format": "fmt"}


def parse_args(args: list[str]) -> ConvertCall | None:
    """The call `args` (what follows `image convert`) make when they are plainly well-formed, else None.

    Accepted: LAYER once, -o/--output F, --no-verity, --no-whiteouts, --compat aci and --format table|json
    (a long option's value also after '='), in any order, a repeated option's last value winning, as click
    parses them. Anything else, --help included, is None: the click command answers it.
    """
    fields: dict[str, Any] = {}
    layer: str | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("--no-verity", "--no-whiteouts"):
            fields[arg[2:].replace("-", "_")] = True
            continue
        if not arg.startswith("-"):
            if layer is not None:
                return None
            layer = arg
            continue
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        field = _VALUED.get(name)
        if field is None:
            return None
        if not eq:
            if i == len(args):
                return None
            value = args[i]
            i += 1
        if field == "output":
            if not path_click_accepts(value):
                return None
            fields["output"] = Path(value)
        elif (field == "compat" and value not in COMPAT_MODES) or (field == "fmt" and value not in FORMATS):
            return None
        else:
            fields[field] = value
    if layer is None or "output" not in fields or not path_click_accepts(layer):
        return None
    return ConvertCall(layer=Path(layer), **fields)
