"""The zones are the architecture: guest and shared code import only the stdlib (guest: plus shared, and
the Debian packages in the UVM rootfs that an issue names, imported lazily, off the boot path)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "sandbox"
STDLIB = set(sys.stdlib_module_names)
# Debian packages of the UVM rootfs (images/uvm/packages.txt) the agent may use, inside functions only.
GUEST_LAZY_PACKAGES = ("cryptography",)


def imports_of(path: Path, *, top_level_only: bool = False) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in (_module_level(tree) if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the module's package
                pkg = path.relative_to(PKG.parent).with_suffix("").parts[:-node.level]
                found.append((node.lineno, ".".join([*pkg, node.module or ""]).rstrip(".")))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """Every node executed when the module is imported: not inside functions, nor `if TYPE_CHECKING:`."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            stack.extend(node.orelse)
            continue
        out.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return out


def violations(zone: str, allowed_prefixes: tuple[str, ...], lazy: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for path in sorted((PKG / zone).rglob("*.py")):
        eager = {lineno for lineno, _ in imports_of(path, top_level_only=True)}
        for lineno, name in imports_of(path):
            top = name.split(".")[0]
            if top in STDLIB or name == "__future__":
                continue
            if any(name == p or name.startswith(p + ".") for p in allowed_prefixes):
                continue
            if top in lazy and lineno not in eager:
                continue
            what = "imports at module level" if top in lazy else "imports"
            bad.append(f"{path.relative_to(PKG.parent)}:{lineno}: {what} {name}")
    return bad


@pytest.mark.parametrize(("zone", "allowed", "lazy"), [
    ("shared", ("sandbox.shared",), ()),
    ("guest", ("sandbox.shared", "sandbox.guest"), GUEST_LAZY_PACKAGES),
])
def test_zone_imports_only_stdlib_and_allowed(zone: str, allowed: tuple[str, ...], lazy: tuple[str, ...]) -> None:
    assert (PKG / zone).is_dir()
    assert violations(zone, allowed, lazy) == []


def test_lazy_guest_packages_are_in_the_uvm_rootfs() -> None:
    listed = (PKG.parent / "images" / "uvm" / "packages.txt").read_text()
    assert all(f"python3-{name}" in listed for name in GUEST_LAZY_PACKAGES)


def test_the_agent_boots_without_loading_cryptography() -> None:
    """What the agent imports at boot (sandbox.guest.agent and what it pulls in) leaves OpenSSL's bindings out,
    and the regex matcher and the Rego reader too (they load with the first policy), and the fragment
    verifier (with the first fragment)."""
    code = ("import sys; import sandbox.guest.agent, sandbox.guest.keyapi, sandbox.guest.snp_report; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cryptography', 'unicodedata') "
            "or m.startswith(('sandbox.shared.policy.re2', 'sandbox.guest.fragments', 'sandbox.shared.cose', "
            "'sandbox.shared.didx509')) or (m.startswith('sandbox.shared.rego.') "
            "and m != 'sandbox.shared.rego.framework')))")
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=PKG.parent, env={"PYTHONPATH": str(PKG.parent)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "sandbox" / "shared" / "x.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("import requests\nfrom sandbox.run import run\nimport json\n")
    names = [n for _, n in imports_of(bad)]
    assert names == ["requests", "sandbox.run", "json"]


def test_checker_tells_lazy_from_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zone = tmp_path / "sandbox" / "guest"
    zone.mkdir(parents=True)
    (zone / "ok.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cryptography\n"
                                "def f():\n    import cryptography\n")
    (zone / "bad.py").write_text("import cryptography\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path / "sandbox")
    assert violations("guest", ("sandbox.guest",), ("cryptography",)) == [
        "sandbox/guest/bad.py:1: imports at module level cryptography"]
