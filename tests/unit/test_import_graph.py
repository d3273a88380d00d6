"""No import circles among sandbox modules, and no arrow from a lower layer up to a higher one.

Every import counts, wherever it is written: at module level, inside a function (a lazy import for
start-up speed is fine, a circle hidden behind one is not), or under `if TYPE_CHECKING`. Importing
`a.b.c` also runs the `__init__` of `a` and `a.b`, so that is an arrow to those packages too (except
from a module inside them, which Python has already started by then).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "sandbox"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the `sandbox` package under root."""
    out = {}
    for path in sorted((root / "sandbox").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Dotted names an import statement may load (a `from X import y` may load X.y or just X)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the sandbox modules it imports (directly, or as the packages that hold them)."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in _imported(module, path, node):
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    target = ".".join(parts[:i])
                    if target not in modules or target == module:
                        continue
                    if module.startswith(target + "."):
                        continue  # the module's own package: already being imported
                    graph[module].add(target)
    return graph


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


# Circles whose removal is under way on another branch; each entry must still exist (delete it when the
# fix lands). The layer writer <-> ACI layer rules circle goes once the ACI rules come in through the
# converter's options (issue 14, item 2).
BEING_REMOVED: list[list[str]] = []


def test_no_import_cycles() -> None:
    found = [c for c in cycles(import_graph()) if c not in BEING_REMOVED]
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_circles_being_removed_still_exist() -> None:
    gone = [c for c in BEING_REMOVED if c not in cycles(import_graph())]
    assert gone == [], f"these circles are gone: delete them from BEING_REMOVED: {gone}"


# Layers, lowest first. A module may import from its own layer and from any lower one, never from a
# higher one. A prefix names a package (and everything in it) or a module; the longest prefix wins.
LAYERS: tuple[tuple[str, ...], ...] = (
    # stdlib-only code shared with the guest; the guest agent itself (test_import_boundaries: zones)
    ("sandbox.shared",),
    ("sandbox.guest",),
    # host utilities every host module may use
    ("sandbox.log", "sandbox.paths", "sandbox.fsutil", "sandbox.run", "sandbox.progress", "sandbox.state"),
    # the user's group: documents in, GroupSpec out
    ("sandbox.group",),
    # machinery: images, layers and their ACI twins, the UVM, VMMs, attestation, the key broker
    ("sandbox.hostcheck", "sandbox.vmm", "sandbox.attest", "sandbox.kbs", "sandbox.images", "sandbox.layers",
     "sandbox.aci.ext4compat", "sandbox.uvm"),
    # policies: generation, summaries, traces, and the ACI/Kubernetes formats built on them
    ("sandbox.policy", "sandbox.aci", "sandbox.k8s"),
    # running a group: the launcher, and containerd's shim built on it
    ("sandbox.launch",),
    ("sandbox.shim",),
    # the command line, and the entry points that call it
    ("sandbox.cli",),
    ("sandbox.__main__",),
)


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank)
    return None if best is None else best[1]


def upward_arrows(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Each import of a module in a higher layer. A package whose __init__ imports nothing carries no
    arrow: importing one of its modules runs no code of a higher layer."""
    bad = []
    for module, targets in sorted(graph.items()):
        mine = layer_of(module)
        for target in sorted(targets):
            if not graph.get(target) and any(m.startswith(target + ".") for m in graph):
                continue
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{module} ({LAYERS[mine][0]}...) imports {target} ({LAYERS[theirs][0]}...)")
    return bad


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in import_graph() if m != "sandbox" and layer_of(m) is None]
    assert unplaced == [], "place these modules in LAYERS: " + ", ".join(unplaced)


def test_no_upward_arrows() -> None:
    bad = upward_arrows(import_graph())
    assert bad == [], "imports from a higher layer:\n" + "\n".join(bad)


# --- the checkers themselves ---------------------------------------------------------------------------


def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_circle_behind_a_function_level_import_is_found(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "sandbox/__init__.py": "",
        "sandbox/a/__init__.py": "",
        "sandbox/a/x.py": "from sandbox.b.y import f\n",
        "sandbox/b/__init__.py": "",
        "sandbox/b/y.py": "def f():\n    from sandbox.a import x  # hidden\n    return x\n",
        "sandbox/b/z.py": "from . import y\n",
    })
    graph = import_graph(tmp_path)
    assert graph["sandbox.b.z"] == {"sandbox.b.y"}
    assert cycles(graph) == [["sandbox.a.x", "sandbox.b.y"]]


def test_a_circle_through_a_package_init_is_found(tmp_path: Path) -> None:
    # c/__init__ re-exports c.load, which imports d.m, which imports c.spec: loading d.m first runs
    # c/__init__, which needs d.m before it exists.
    write_package(tmp_path, {
        "sandbox/__init__.py": "",
        "sandbox/c/__init__.py": "from sandbox.c.load import load\n",
        "sandbox/c/load.py": "from sandbox.d.m import read\n",
        "sandbox/c/spec.py": "",
        "sandbox/d/__init__.py": "",
        "sandbox/d/m.py": "from sandbox.c.spec import Spec\n",
    })
    assert cycles(import_graph(tmp_path)) == [["sandbox.c", "sandbox.c.load", "sandbox.d.m"]]


@pytest.mark.parametrize(("module", "target", "upward"), [
    ("sandbox.policy.sources", "sandbox.launch.pipeline", True),
    ("sandbox.group.spec", "sandbox.aci.rego", True),
    ("sandbox.layers.convert", "sandbox.aci.ext4compat", False),
    ("sandbox.launch.pipeline", "sandbox.policy.gen", False),
    ("sandbox.shim.sandbox", "sandbox.cli.up", True),
    ("sandbox.state", "sandbox.vmm.backend", True),
])
def test_upward_arrow_checker(module: str, target: str, upward: bool) -> None:
    assert bool(upward_arrows({module: {target}, target: set()})) is upward


def test_an_empty_package_init_carries_no_arrow() -> None:
    graph = {"sandbox.images.resolve": {"sandbox.aci", "sandbox.aci.ext4compat"}, "sandbox.aci": set(),
             "sandbox.aci.ext4compat": set(), "sandbox.aci.rego": set()}
    assert upward_arrows(graph) == []
    graph["sandbox.aci"] = {"sandbox.aci.rego"}
    assert upward_arrows(graph) == ["sandbox.images.resolve (sandbox.hostcheck...) imports sandbox.aci "
                                    "(sandbox.policy...)"]
