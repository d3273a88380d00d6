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
from sandbox.cli.verity_run import FORMATS, kv_table, path_click_accepts, plain_args, verity_doc
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


def parse_args(args: list[str]) -> ConvertCall | None:
    """The call `args` (what follows `image convert`) make when they are plainly well-formed, else None.

    Accepted: LAYER once, -o/--output F, --no-verity, --no-whiteouts, --compat aci and --format table|json
    (a long option's value also after '='), in any order, a repeated option's last value winning, as click
    parses them. Anything else, --help included, is None: the click command answers it.
    """
    parsed = plain_args(args, {"--no-verity": "no_verity", "--no-whiteouts": "no_whiteouts"},
                        {"-o": "output", "--output": "output", "--compat": "compat", "--format": "fmt"})
    if parsed is None:
        return None
    layer, given = parsed
    output, compat, fmt = given.get("output"), given.get("compat"), given.get("fmt")
    if (output is None or not path_click_accepts(output) or not path_click_accepts(layer)
            or (compat is not None and compat not in COMPAT_MODES)
            or (fmt is not None and fmt not in FORMATS)):
        return None
    return ConvertCall(layer=Path(layer), output=Path(output), no_verity="no_verity" in given,
                       no_whiteouts="no_whiteouts" in given, compat=compat, fmt=fmt)
