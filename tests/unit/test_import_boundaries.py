"""The zones are the architecture: guest and shared code import only the stdlib (guest: plus shared)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "sandbox"
STDLIB = set(sys.stdlib_module_names)


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the module's package
                pkg = path.relative_to(PKG.parent).with_suffix("").parts[:-node.level]
                found.append((node.lineno, ".".join([*pkg, node.module or ""]).rstrip(".")))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def violations(zone: str, allowed_prefixes: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((PKG / zone).rglob("*.py")):
        for lineno, name in imports_of(path):
            top = name.split(".")[0]
            if top in STDLIB or name == "__future__":
                continue
            if any(name == p or name.startswith(p + ".") for p in allowed_prefixes):
                continue
            bad.append(f"{path.relative_to(PKG.parent)}:{lineno}: imports {name}")
    return bad


@pytest.mark.parametrize(("zone", "allowed"), [
    ("shared", ("sandbox.shared",)),
    ("guest", ("sandbox.shared", "sandbox.guest")),
])
def test_zone_imports_only_stdlib_and_allowed(zone: str, allowed: tuple[str, ...]) -> None:
    assert (PKG / zone).is_dir()
    assert violations(zone, allowed) == []


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "sandbox" / "shared" / "x.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("import requests\nfrom sandbox.run import run\nimport json\n")
    names = [n for _, n in imports_of(bad)]
    assert names == ["requests", "sandbox.run", "json"]
