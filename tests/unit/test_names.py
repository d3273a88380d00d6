"""One name per concept: no two modules of the package define the same public class or type alias.

Where two things mean the same, one defines it and the other imports it; where they differ, their
names say how (ContainerSpec in the group file, the policy's Container, the guest's RuntimeContainer).
The exceptions say why they are exceptions.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SAME_NAME_ON_PURPOSE = {
    # containerd's own protobuf messages, named as in its .proto files and always used as M.<name> in the
    # shim; renaming them would hide which wire message they are.
    "Envelope": "containerd's events Envelope (sandbox/shim/messages.py) vs the agent's request frame",
    "ExecProcessRequest": "containerd's task ExecProcessRequest vs the agent's exec_process request",
    "Mount": "containerd's types Mount vs the policy's mount constraint",
    # The same concept, still defined twice: the guest's /etc files are not yet fed from the group spec.
    "DnsConfig": "the group's dnsConfig and the guest's resolv.conf input (one shared type once wired)",
}


def public_definitions(root: Path = ROOT) -> dict[str, list[str]]:
    """Public top-level classes and type aliases (capitalised assignments) -> the modules defining them."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted((root / "sandbox").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            names: list[str] = []
            if isinstance(node, ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name) and t.id[:1].isupper() and not t.id.isupper()]
            for name in names:
                if not name.startswith("_"):
                    found[name].append(module)
    return found


def test_no_two_modules_define_the_same_public_name() -> None:
    twice = {name: modules for name, modules in public_definitions().items() if len(modules) > 1}
    unexplained = {name: modules for name, modules in twice.items() if name not in SAME_NAME_ON_PURPOSE}
    assert unexplained == {}, "give each its own name, or define it once and import it"
    assert set(SAME_NAME_ON_PURPOSE) <= set(twice), "an exception that no longer applies: remove it"


def test_the_checker_sees_classes_and_aliases(tmp_path: Path) -> None:
    for name, text in (("a", "class Container:\n    pass\n"), ("b", "Container = dict\n_Private = 1\nLIMIT = 3\n")):
        path = tmp_path / "sandbox" / f"{name}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert dict(public_definitions(tmp_path)) == {"Container": ["sandbox.a", "sandbox.b"]}
