"""The entry point's fast path for `verity`: the same results, messages and exit codes as the click command,
without importing click; every shape it does not fully understand goes to click."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.cli.verity_run import parse_args

REPO = Path(__file__).resolve().parents[2]
FAST = "sandbox.cli.entry"
CLICK = "sandbox.cli.main"
# Runs `main()` of a module as the console script does, and says on stderr at exit whether click was loaded.
PROGRAM = ("import atexit, sys\n"
           "atexit.register(lambda: sys.__stderr__.write('\\nCLICK ' + str('click' in sys.modules)))\n"
           "from {module} import main\n"
           "main()\n")


def run(module: str, args: list[str], cwd: Path) -> tuple[int, str, str, bool]:
    """(exit code, stdout, stderr, whether click was imported) of the program run with `args`."""
    proc = subprocess.run([sys.executable, "-c", PROGRAM.format(module=module), *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    err, _, loaded = proc.stderr.rpartition("\nCLICK ")
    return proc.returncode, proc.stdout, err, loaded.strip() == "True"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "data").write_bytes(bytes(range(256)) * 16 * 9)        # 9 blocks
    (tmp_path / "odd").write_bytes(b"x" * 5000)
    (tmp_path / "dir").mkdir()
    return tmp_path


FAST_SHAPES = [
    ["verity", "--hash-file", "tree", "data"],
    ["verity", "data", "--no-superblock", "--hash-file=tree", "--salt", "-"],
    ["--format", "json", "verity", "--salt=abcd", "--hash-file", "tree", "data"],
    ["--format=json", "-q", "--debug", "verity", "--hash-file", "tree", "data", "--format", "table"],
    ["verity", "--format", "json", "--salt", "00", "--salt", "0102", "--hash-file", "tree", "data"],
    ["verity", "--salt", "zz", "--hash-file", "tree", "data"],           # bad input: exit 2, no tree written
    ["verity", "--hash-file", "tree", "missing"],
    ["verity", "odd"],                                                  # not whole blocks, appended
    ["verity", "--no-superblock", "data"],                              # appended to the data
]
CLICK_SHAPES = [
    ["verity", "--help"],
    ["verity"],
    ["verity", "data", "data"],
    ["verity", "dir"],
    ["verity", "--hash-file", "dir", "data"],
    ["verity", "--bogus", "data"],
    ["verity", "--format", "xml", "data"],
    ["--format", "yaml", "verity", "data"],
    ["verity", "--hash-file"],
    ["--progress", "plain", "verity", "data"],
    ["verity", "--", "data"],
    ["verity", "-", "--hash-file", "tree"],
]


def outcome(module: str, args: list[str], work: Path) -> tuple[int, str, str, bool, bytes | None, bytes]:
    for name in ("tree", "data.copy"):
        (work / name).unlink(missing_ok=True)
    data = (work / "data").read_bytes()
    code, out, err, loaded_click = run(module, args, work)
    tree = (work / "tree").read_bytes() if (work / "tree").exists() else None
    after = (work / "data").read_bytes()
    (work / "data").write_bytes(data)
    return code, out, err, loaded_click, tree, after


@pytest.mark.parametrize("args", FAST_SHAPES, ids=[" ".join(a) for a in FAST_SHAPES])
def test_fast_path_answers_as_click_does_without_click(work: Path, args: list[str]) -> None:
    fast = outcome(FAST, args, work)
    slow = outcome(CLICK, args, work)
    assert fast[3] is (fast[0] != 0), "click is imported to report an error, only then"
    assert slow[3] is True
    assert fast[:3] == slow[:3]
    assert fast[4:] == slow[4:]


@pytest.mark.parametrize("args", CLICK_SHAPES, ids=[" ".join(a) for a in CLICK_SHAPES])
def test_other_shapes_go_to_click(work: Path, args: list[str]) -> None:
    fast = outcome(FAST, args, work)
    assert fast[3] is True
    assert fast[:3] == outcome(CLICK, args, work)[:3]


def test_json_result_is_the_tree_written(work: Path) -> None:
    code, out, _, _ = run(FAST, ["verity", "--format", "json", "--no-superblock", "--hash-file", "tree", "data"],
                          work)
    assert code == 0
    doc = json.loads(out)
    assert doc["data_blocks"] == 9 and doc["hash_file"] == "tree" and doc["superblock"] is False
    assert (work / "tree").stat().st_size == 4096


def test_parse_args_understands_only_plain_shapes(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(work)
    call = parse_args(["data", "--salt", "-", "--hash-file=tree", "--no-superblock", "--format=json"])
    assert call is not None
    assert (call.file, call.salt_hex, call.hash_file, call.no_superblock, call.fmt) == \
        (Path("data"), "-", Path("tree"), True, "json")
    for args in CLICK_SHAPES:
        if args[0] == "verity":
            assert parse_args(args[1:]) is None, args
