"""The boot-modules bundle (sandbox/guest/boot_modules.py): the code of the agent's start-up imports in one file."""

from __future__ import annotations

import ast
import importlib.util
import json
import marshal
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.guest import agent, boot_modules

REPO = Path(__file__).resolve().parents[2]


def _compile(src: Path, mode: py_compile.PycInvalidationMode = py_compile.PycInvalidationMode.UNCHECKED_HASH) -> Path:
    cfile = Path(importlib.util.cache_from_source(str(src)))
    py_compile.compile(str(src), cfile=str(cfile), doraise=True, invalidation_mode=mode)
    return cfile


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """tmp/pkgx: a package, a module in the bundle that fails on line 4, and a submodule outside it."""
    root = tmp_path / "root"
    pkg = root / "pkgx"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 'package'\n")
    (pkg / "inside.py").write_text("from pkgx import outside\n\n\ndef fail():\n    raise RuntimeError('line 5')\n")
    (pkg / "outside.py").write_text("VALUE = 'outside'\n")
    return root


def _bundle_of(root: Path, names: list[str], out: Path) -> Path:
    modules = []
    for name in names:
        rel = name.replace(".", "/")
        is_package = (root / rel / "__init__.py").is_file()
        source = root / rel / "__init__.py" if is_package else root / f"{rel}.py"
        modules.append((name, is_package, str(source), importlib.util.cache_from_source(str(source)),
                        str(_compile(source))))
    out.write_bytes(boot_modules.pack(modules))
    return out


PROBE = """
import json, sys, traceback
from sandbox.guest import boot_modules
finder = boot_modules.install(sys.argv[2])
sys.path.insert(0, sys.argv[1])
import pkgx.inside
try:
    pkgx.inside.fail()
except RuntimeError as e:
    line = traceback.format_exception(e)[-2].strip()
print(json.dumps({
    "finder": finder is not None,
    "loaders": {n: type(sys.modules[n].__spec__.loader).__name__ for n in ("pkgx", "pkgx.inside", "pkgx.outside")},
    "files": [sys.modules[n].__file__ for n in ("pkgx", "pkgx.inside")],
    "cached": sys.modules["pkgx.inside"].__cached__,
    "path": list(sys.modules["pkgx"].__path__),
    "values": [sys.modules["pkgx"].VALUE, sys.modules["pkgx.outside"].VALUE],
    "loaded": finder.loaded if finder else None,
    "left": sorted(finder.entries) if finder else None,
    "traceback_line": line,
}))
"""


def _probe(root: Path, bundle: Path | str) -> dict:
    return json.loads(subprocess.run([sys.executable, "-S", "-c", PROBE, str(root), str(bundle)], cwd=REPO,
                                     check=True, capture_output=True, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)}).stdout)


def test_modules_in_the_bundle_load_from_it_and_keep_their_files(package: Path, tmp_path: Path) -> None:
    bundle = _bundle_of(package, ["pkgx", "pkgx.inside"], tmp_path / boot_modules.BUNDLE_NAME)
    got = _probe(package, bundle)
    assert got["finder"]
    assert got["loaders"] == {"pkgx": "BundleFinder", "pkgx.inside": "BundleFinder",
                              "pkgx.outside": "SourceFileLoader"}      # found through the package's __path__
    assert got["files"] == [str(package / "pkgx/__init__.py"), str(package / "pkgx/inside.py")]
    assert got["cached"] == importlib.util.cache_from_source(str(package / "pkgx/inside.py"))
    assert got["path"] == [str(package / "pkgx")]
    assert got["values"] == ["package", "outside"]
    assert got["loaded"] == ["pkgx", "pkgx.inside"] and got["left"] == []   # each entry dropped once run
    assert got["traceback_line"].endswith("inside.py\", line 5, in fail\n    raise RuntimeError('line 5')")


def test_without_a_usable_bundle_the_agent_imports_the_usual_way(package: Path, tmp_path: Path) -> None:
    bundle = _bundle_of(package, ["pkgx", "pkgx.inside"], tmp_path / "good")
    data = bundle.read_bytes()
    other = data.replace(sys.implementation.cache_tag.encode(), b"cpython-399", 1)
    cases = {"missing": tmp_path / "absent", "other": tmp_path / "other", "truncated": tmp_path / "truncated",
             "garbage": tmp_path / "garbage"}
    cases["other"].write_bytes(other)
    cases["truncated"].write_bytes(data[:len(data) // 2])
    cases["garbage"].write_bytes(data[:len(boot_modules._header())] + marshal.dumps({"pkgx": (1, 2)}))
    for what, path in cases.items():
        got = _probe(package, path)
        assert not got["finder"], what
        assert set(got["loaders"].values()) == {"SourceFileLoader"}, what
        assert got["values"] == ["package", "outside"], what


def test_loads_rejects_what_is_not_a_bundle() -> None:
    header = boot_modules._header()
    good = boot_modules.dumps({"m": (False, "/m.py", "/__pycache__/m.pyc", marshal.dumps(compile("", "m", "exec")))})
    assert list(boot_modules.loads(good)) == ["m"]
    for bad in (b"", b"not a bundle", header, header + b"\xff", header + marshal.dumps([1]),
                header + marshal.dumps({"m": (False, "/m.py", "/m.pyc", "code as text")}),
                header + marshal.dumps({1: (False, "/m.py", "/m.pyc", b"")})):
        with pytest.raises(ValueError):
            boot_modules.loads(bad)


def test_pack_takes_only_unchecked_hash_pyc_files_of_this_interpreter(package: Path) -> None:
    source = package / "pkgx/outside.py"
    for mode in (py_compile.PycInvalidationMode.TIMESTAMP, py_compile.PycInvalidationMode.CHECKED_HASH):
        pyc = _compile(source, mode)
        with pytest.raises(ValueError, match="unchecked-hash"):
            boot_modules.pack([("pkgx.outside", False, str(source), str(pyc), str(pyc))])
    pyc = _compile(source)
    pyc.write_bytes(b"\0\0\0\0" + pyc.read_bytes()[4:])
    with pytest.raises(ValueError, match="this interpreter"):
        boot_modules.pack([("pkgx.outside", False, str(source), str(pyc), str(pyc))])


def test_the_bundle_is_deterministic(package: Path, tmp_path: Path) -> None:
    a = _bundle_of(package, ["pkgx.inside", "pkgx"], tmp_path / "a").read_bytes()
    b = _bundle_of(package, ["pkgx", "pkgx.inside"], tmp_path / "b").read_bytes()
    assert a == b


def test_serving_names_what_main_imports_before_ready() -> None:
    """The image build bundles agent.SERVING's imports: they must be those of main()."""
    tree = ast.parse(Path(agent.__file__).read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    imported = [n.module for n in ast.walk(main) if isinstance(n, ast.ImportFrom)]
    modules = [m for m in imported if m != "sandbox.guest"]
    packages = [f"sandbox.guest.{a.name}" for n in ast.walk(main) if isinstance(n, ast.ImportFrom)
                and n.module == "sandbox.guest" for a in n.names]
    assert sorted(modules + packages) == sorted(agent.SERVING)


def test_the_build_lists_the_agents_start_up_imports(tmp_path: Path) -> None:
    """The build's list of start-up imports (here with this interpreter and the boot cache the build
    makes): the agent's own modules and the stdlib ones it needs, none of what waits for later."""
    from sandbox.uvm.overlay import BOOT_IMPORTS_SCRIPT
    from tests.unit.test_agent_startup import NOT_AT_READY, _agent_cache

    cache = _agent_cache(tmp_path)
    out = subprocess.run([sys.executable, "-S", "-c", BOOT_IMPORTS_SCRIPT, str(cache)], cwd=REPO,
                         check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    listed = {name: (origin, is_package) for name, origin, is_package in json.loads(out.stdout)}
    assert set(agent.SERVING) | {"sandbox.guest.agent", "sandbox.shared.messages", "json", "threading"} <= set(listed)
    assert not set(listed) & set(NOT_AT_READY)
    assert not {"inspect", "ast", "dis"} & set(listed)     # the boot cache keeps them away, as in the agent
    assert listed["sandbox.shared"] == (str(REPO / "sandbox/shared/__init__.py"), True)
