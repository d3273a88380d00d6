"""`parma-sandbox image ...`: pull, layers, convert."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sandbox.aci.ext4compat import COMPAT_MODES
from sandbox.cli import convert_run
from sandbox.cli.common import OutputFormat, echo_json, emit, format_option, render_table, resolve_format
from sandbox.images import DEFAULT_PLATFORM

if TYPE_CHECKING:
    from sandbox.images.resolve import PullResult

# The registry client (requests) is imported by the commands that pull: `image convert` works offline and
# should start as fast as the converter it competes with (bench/bench_tar2ext4.py).

FILE = click.Path(path_type=Path, dir_okay=False)


@click.group("image")
def image() -> None:
    """Container images as dm-verity block devices: pull, list layers, convert."""


def _compat_option(f):  # click decorator
    return click.option("--compat", type=click.Choice(COMPAT_MODES), default=None,
                        help="aci: layer images byte-identical to ACI's (hcsshim tar2ext4), so root hashes "
                             "equal those in ACI policies; see docs/aci.md.")(f)


def _platform_option(f):  # click decorator
    return click.option("--platform", default=DEFAULT_PLATFORM, show_default=True,
                        help="Platform to pick from a multi-platform image (os/arch[/variant]).")(f)


def image_doc(result: PullResult) -> dict[str, Any]:
    img = result.image
    return {
        "reference": img.reference,
        "digest": img.digest,
        "platform": result.platform,
        "converted": result.converted,
        "config": {"entrypoint": list(img.config.entrypoint), "cmd": list(img.config.cmd),
                   "env": list(img.config.env), "working_dir": img.config.working_dir, "user": img.config.user},
        "layers": [{"diff_id": layer.diff_id, "media_type": layer.media_type, "size": layer.size,
                    "root_hash": layer.root_hash, "device_path": str(layer.device_path)} for layer in img.layers],
    }


@image.command("pull")
@click.argument("ref")
@_platform_option
@_compat_option
@format_option
def pull(ref: str, platform: str, compat: str | None, fmt: str | None) -> None:
    """Pull REF (registry image, oci:DIR[:TAG] or docker-archive:FILE) and convert its layers."""
    from sandbox.images.resolve import pull_image

    doc = image_doc(pull_image(ref, base_dir=Path.cwd(), platform=platform, compat=compat))

    def table(d: dict[str, Any]) -> str:
        cached = len(d["layers"]) - d["converted"]
        return (f"{d['reference']}: {d['digest']} ({d['platform']}), {len(d['layers'])} layer(s): "
                f"{d['converted']} converted, {cached} cached")

    emit(doc, fmt, table)


@image.command("layers")
@click.argument("ref")
@_platform_option
@_compat_option
@format_option
def layers(ref: str, platform: str, compat: str | None, fmt: str | None) -> None:
    """List REF's layers: diff_id, media type, size, dm-verity root hash and device image (pulls if needed)."""
    from sandbox.images.resolve import pull_image

    doc = image_doc(pull_image(ref, base_dir=Path.cwd(), platform=platform, compat=compat))
    if resolve_format(fmt) == OutputFormat.json:
        echo_json(doc["layers"])
        return
    click.echo(render_table(["diff_id", "media type", "size", "root hash", "device"],
                            [(d["diff_id"], d["media_type"], d["size"], d["root_hash"], d["device_path"])
                             for d in doc["layers"]]))


@image.command("convert")
@click.argument("layer", type=FILE)
@click.option("-o", "--output", type=FILE, required=True, help="Write the device image here.")
@click.option("--no-verity", is_flag=True, help="Write the plain ext4 image, without the dm-verity tree.")
@click.option("--no-whiteouts", is_flag=True, help="Keep '.wh.*' names as plain files (for a root filesystem).")
@_compat_option
@format_option
def convert(layer: Path, output: Path, no_verity: bool, no_whiteouts: bool, compat: str | None,
            fmt: str | None) -> None:
    """Convert LAYER (a tar, tar.gz or tar.zst) into ext4 + dm-verity and print the root hash."""
    doc, table = convert_run.run(layer, output, no_verity=no_verity, no_whiteouts=no_whiteouts, compat=compat)
    emit(doc, fmt, table)


commands = [image]
