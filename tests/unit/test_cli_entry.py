"""The entry point's fast paths for `verity` and `image convert`: the same results, messages and exit codes as
the click commands, without importing click; every shape they do not fully understand goes to click."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.cli.convert_run import parse_args as convert_parse_args
from sandbox.cli.verity_run import parse_args
from tests.layertars import edge_case_layer

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


# `image convert`: the same shapes test, with a layer tar; progress lines carry a duration, which varies.
CONVERT_FAST = [
    ["image", "convert", "layer.tar", "-o", "out.img"],
    ["--format", "json", "image", "convert", "--compat", "aci", "layer.tar", "--output=out.img"],
    ["image", "convert", "--no-verity", "layer.tar", "-o", "out.img", "--format", "json"],
    ["-q", "image", "convert", "--no-whiteouts", "--no-verity", "--output", "out.img", "layer.tar"],
    ["--debug", "image", "convert", "--compat=aci", "layer.tar", "-o", "sub/out.img", "--format=table"],
    ["image", "convert", "--compat", "aci", "--no-whiteouts", "layer.tar", "-o", "out.img"],   # exit 2
    ["image", "convert", "missing.tar", "-o", "out.img"],
    ["image", "convert", "odd", "-o", "out.img"],                                             # not a tar
]
CONVERT_CLICK = [
    ["image", "convert", "--help"],
    ["image", "convert", "layer.tar"],
    ["image", "convert", "--compat", "xyz", "layer.tar", "-o", "out.img"],
    ["image", "convert", "dir", "-o", "out.img"],
    ["image", "convert", "layer.tar", "-o", "dir"],
    ["image", "convert", "layer.tar", "-oout.img"],
    ["image", "convert", "layer.tar", "layer.tar", "-o", "out.img"],
    ["image", "convert", "--format", "xml", "layer.tar", "-o", "out.img"],
    ["image", "convert", "layer.tar", "-o"],
    ["--progress", "plain", "image", "convert", "layer.tar", "-o", "out.img"],
    ["image", "layers", "--help"],
]


def convert_outcome(module: str, args: list[str], work: Path) -> tuple[int, str, str, bool, bytes | None]:
    for name in ("out.img", "sub/out.img"):
        (work / name).unlink(missing_ok=True)
    code, out, err, loaded_click = run(module, args, work)
    err = re.sub(r"\(\d+(\.\d+)?s\)", "(N s)", err)
    images = [p.read_bytes() for p in (work / "out.img", work / "sub" / "out.img") if p.exists()]
    return code, out, err, loaded_click, images[0] if images else None


@pytest.fixture
def layer_work(work: Path) -> Path:
    (work / "layer.tar").write_bytes(edge_case_layer().tar_bytes())
    return work


@pytest.mark.parametrize("args", CONVERT_FAST, ids=[" ".join(a) for a in CONVERT_FAST])
def test_convert_fast_path_answers_as_click_does_without_click(layer_work: Path, args: list[str]) -> None:
    fast = convert_outcome(FAST, args, layer_work)
    slow = convert_outcome(CLICK, args, layer_work)
    assert fast[3] is (fast[0] != 0), "click is imported to report an error, only then"
    assert slow[3] is True
    assert fast[:3] == slow[:3]
    assert fast[4] == slow[4]
    assert (fast[4] is None) is (fast[0] != 0)


@pytest.mark.parametrize("args", CONVERT_CLICK, ids=[" ".join(a) for a in CONVERT_CLICK])
def test_convert_other_shapes_go_to_click(layer_work: Path, args: list[str]) -> None:
    fast = convert_outcome(FAST, args, layer_work)
    assert fast[3] is True
    assert fast[:3] == convert_outcome(CLICK, args, layer_work)[:3]


def test_convert_parse_args_understands_only_plain_shapes(layer_work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(layer_work)
    call = convert_parse_args(["--no-verity", "layer.tar", "--compat=aci", "-o", "x", "--output", "y",
                               "--format", "json"])
    assert call is not None
    assert (call.layer, call.output, call.no_verity, call.no_whiteouts, call.compat, call.fmt) == \
        (Path("layer.tar"), Path("y"), True, False, "aci", "json")
    for args in CONVERT_CLICK:
        if args[:2] == ["image", "convert"]:
            assert convert_parse_args(args[2:]) is None, args
