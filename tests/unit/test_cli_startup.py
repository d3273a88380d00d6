"""The CLI starts fast because it imports only what the command needs (timings: bench/bench_cli.py).

Each check runs a fresh interpreter, so what an earlier test imported cannot hide an import.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import sandbox.cli
from sandbox.cli.main import COMMANDS, cli, load_command
from sandbox.shared.policy import canonical_bytes

REPO = Path(__file__).resolve().parents[2]
HEAVY_AT_IMPORT = ("sandbox.launch", "sandbox.attest", "sandbox.kbs", "sandbox.layers")
# The quick verbs load none of the launcher, attestation, key broker, layer converter, registry client (HTTP),
# X.509, UVM build or VMM code (validate reads local images' manifests, and the converter's version).
HEAVY_FOR_QUICK_VERBS = ("sandbox.launch", "sandbox.attest", "sandbox.kbs", "sandbox.layers.convert",
                         "sandbox.layers.tar2ext4", "sandbox.images.registry", "sandbox.uvm", "sandbox.vmm",
                         "requests", "urllib3", "cryptography")


def modules_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """The modules a fresh interpreter holds when `code` has run (including a CLI run that exits)."""
    prologue = ("import atexit, json, sys\n"
                "atexit.register(lambda: sys.__stderr__.write('\\nMODULES ' + json.dumps(sorted(sys.modules))))\n")
    proc = subprocess.run([sys.executable, "-c", prologue + code], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=60)
    line = proc.stderr.rpartition("\nMODULES ")[2]
    assert line.startswith("["), proc.stderr
    return set(json.loads(line))


def offending(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_importing_the_cli_imports_no_heavy_package() -> None:
    modules = modules_after("import sandbox.cli.main")
    assert "sandbox.cli.main" in modules
    assert offending(modules, HEAVY_AT_IMPORT) == []


@pytest.fixture
def policy_and_trace(tmp_path: Path) -> tuple[Path, Path]:
    any_id = {"pattern": "", "strategy": "any"}
    doc = {"api_version": "0.12.0", "framework_version": "0.5.0", "external_processes": [], "containers": [{
        "name": "web", "layers": ["1a" * 32], "command": ["/bin/sh"], "env_rules": [], "working_dir": "/",
        "mounts": [], "exec_processes": [], "signals": [], "capabilities": None,
        "user": {"user_idname": any_id, "group_idnames": [any_id], "umask": "0022"},
        "seccomp_profile_sha256": "", "allow_elevated": False, "allow_stdio_access": True,
        "no_new_privileges": False}]}
    policy = tmp_path / "policy.json"
    policy.write_bytes(canonical_bytes(doc))
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"ep": "mount_device", "input": {"target": "/run/parma/layers/0",
                                                                 "device_hash": "1a" * 32}}) + "\n")
    return policy, trace


@pytest.mark.parametrize("verb", ["--version", "--help", "ps", "validate", "policy check"])
def test_quick_verbs_import_only_what_they_need(verb: str, policy_and_trace: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    policy, trace = policy_and_trace
    args = {"validate": ["validate", str(REPO / "examples" / "hello" / "group.json")],
            "policy check": ["policy", "check", str(policy), str(trace)]}.get(verb, [verb])
    env = {"PATH": "/usr/bin:/bin", "PARMA_SANDBOX_RUNTIME": str(tmp_path / "run")}
    modules = modules_after(f"from sandbox.cli.main import main\nmain({args!r})", env)
    assert offending(modules, HEAVY_FOR_QUICK_VERBS) == []


def test_the_table_lists_every_command_where_it_is_defined() -> None:
    defined: dict[str, set[str]] = {}
    for info in pkgutil.iter_modules(sandbox.cli.__path__, "sandbox.cli."):
        module = importlib.import_module(info.name)
        for command in getattr(module, "commands", []):
            defined.setdefault(command.name, set()).add(info.name)
    assert set(defined) == set(COMMANDS)
    for name, modules in defined.items():
        assert modules <= set(COMMANDS[name].modules), name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_table_help_is_the_commands_own(name: str) -> None:
    command = load_command(name)
    assert command.name == name
    assert command.get_short_help_str(10_000) == COMMANDS[name].help


def test_help_lists_every_command_with_its_short_help() -> None:
    out = CliRunner().invoke(cli, ["--help"], terminal_width=100).output
    section = out.split("Commands:\n", 1)[1]
    rows = {line.split()[0]: line.split(None, 1)[1] for line in section.splitlines() if line.strip()}
    assert list(rows) == sorted(COMMANDS)
    limit = 100 - 6 - max(len(name) for name in COMMANDS)
    for name in COMMANDS:
        assert rows[name] == load_command(name).get_short_help_str(limit)


def test_policy_subcommands_from_both_modules_are_there() -> None:
    group = load_command("policy")
    assert isinstance(group, click.Group)
    with click.Context(group) as ctx:
        assert {"gen", "show", "hash", "diff", "check", "export", "import"} <= set(group.list_commands(ctx))
        assert group.get_command(ctx, "import") is not None
