"""The group loader: a group file, or an ACI ARM template read as one (sandbox.group.arm).

It sits above both readers, so neither imports the other: spec.py validates group documents,
arm.py maps a template to a group document and validates that with spec.py.
"""

from __future__ import annotations

from pathlib import Path

from sandbox.group.arm import is_arm_template, load_template_group
from sandbox.group.jsonio import load_json_file
from sandbox.group.spec import GroupSpec, validate_group
from sandbox.shared.errors import InputError


def load_group(path: Path, *, template_group: str | None = None,
               volume_paths: dict[str, Path] | None = None) -> GroupSpec:
    """Read and validate a group file, or an ACI ARM template (docs/aci.md). Never touches the network.

    For a template, `template_group` picks one of several container groups and `volume_paths` gives
    the local directories of its azureFile/gitRepo volumes; a group file takes neither."""
    path = Path(path)
    raw = load_json_file(path)
    if is_arm_template(raw):
        return load_template_group(path, raw, group=template_group, volume_paths=volume_paths)
    if template_group is not None or volume_paths:
        raise InputError(f"{path}: --group and --volume apply to ARM templates, and this is a group file",
                         hint="a group file names its volumes itself (docs/group-spec.md)")
    return validate_group(raw, base_dir=path.resolve().parent, source=str(path))
