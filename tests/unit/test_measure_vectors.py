"""`parma-sandbox measure` reproduces sev-snp-measure's published vectors.

The vectors are sev-snp-measure's own tests (../shared/vectors/snp/sev-snp-measure/test_guest.py), read
at run time: each `guest.calc_launch_digest(...)` call there becomes the equivalent command line, and the
digest our CLI prints must equal the one the test asserts. Calls that the vectors expect to fail must
fail with the same message.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from sandbox.cli.main import cli
from tests.conftest import vectors_dir

VECTORS = vectors_dir() / "snp" / "sev-snp-measure"
MODES = {"SEV": "sev", "SEV_ES": "seves", "SEV_SNP": "snp", "SEV_SNP_SVSM": "snp:svsm"}
# calc_launch_digest's positional parameters, in order (sevsnpmeasure/guest.py).
OVMF_HASH_OF = "ovmf-hash-of:"
PARAMS = ("mode", "vcpus", "vcpu_sig", "ovmf", "kernel", "initrd", "append", "guest_features",
          "snp_ovmf_hash_str", "vmm_type", "dump_vmsa", "svsm_file", "ovmf_vars_size")


@dataclass(frozen=True)
class Vector:
    name: str
    args: tuple[str, ...]
    expected: str | None          # digest hex, or None when an error is expected
    error: str | None
    files: tuple[Path, ...]


def _value(node: ast.expr, names: dict[str, str]) -> object:
    """Literal values, CPU_SIGS["X"], SevMode.X, VMMType.X, fixture paths and simple string names."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Subscript):            # vcpu_types.CPU_SIGS["EPYC-v4"]
        return ("cpu", node.slice.value)            # type: ignore[attr-defined]
    if isinstance(node, ast.Attribute):            # SevMode.SEV_SNP, vmm_types.VMMType.gce
        return ("enum", node.attr)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):   # fixtures_dir / "x.bin"
        return "tests/fixtures/" + str(_value(node.right, names))
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.JoinedStr | ast.Call):
        raise ValueError(ast.unparse(node))
    raise ValueError(ast.unparse(node))


def _fixture(value: object) -> Path:
    assert isinstance(value, str) and value.startswith("tests/"), value
    return VECTORS / value.removeprefix("tests/")


def _vector(fn: ast.FunctionDef) -> Vector | None:
    names: dict[str, str] = {}
    call = expected = error = None
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            names[node.targets[0].id] = node.value.value            # type: ignore[attr-defined]
        elif isinstance(node, ast.Assign) and "calc_snp_ovmf_hash" in ast.unparse(node.value):
            # ovmf_hash = guest.calc_snp_ovmf_hash(PATH).hex(): our own snp:ovmf-hash mode computes it
            path = node.value.func.value.args[0].value              # type: ignore[attr-defined]
            names[node.targets[0].id] = OVMF_HASH_OF + path         # type: ignore[attr-defined]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "calc_launch_digest":
                call = node
            elif node.func.attr == "assertEqual" and isinstance(node.args[1], ast.Constant):
                if isinstance(node.args[0], ast.Call) and ast.unparse(node.args[0]) == "ld.hex()":
                    expected = node.args[1].value
                elif ast.unparse(node.args[0]) == "str(c.exception)":
                    error = node.args[1].value
    if call is None or (expected is None and error is None):
        return None
    values = dict(zip(PARAMS, (_value(a, names) for a in call.args), strict=False))
    values.update({k.arg: _value(k.value, names) for k in call.keywords if k.arg})
    args = ["measure", "--mode", MODES[values["mode"][1]], "--ovmf", str(_fixture(values["ovmf"]))]
    files = [_fixture(values["ovmf"])]
    if values.get("vcpus") is not None and values["mode"][1] != "SEV":
        args += ["--vcpus", str(values["vcpus"])]
    sig = values.get("vcpu_sig")
    if isinstance(sig, tuple):
        args += ["--vcpu-type", sig[1]]
    elif error is not None and values["mode"][1] != "SEV" and not isinstance(values.get("vmm_type"), tuple):
        # The library call passes no CPU signature; the CLI (ours and sev-snp-measure's) insists on one for
        # QEMU guests. The expected error is about the OVMF, independent of the signature.
        args += ["--vcpu-type", "EPYC-v4"]
    for key, flag in (("kernel", "--kernel"), ("initrd", "--initrd"), ("append", "--append")):
        if values.get(key) is not None:
            args += [flag, str(values[key])]
    args += ["--guest-features", hex(values["guest_features"])]
    if values.get("snp_ovmf_hash_str"):
        args += ["--snp-ovmf-hash", values["snp_ovmf_hash_str"]]
    if isinstance(values.get("vmm_type"), tuple):
        args += ["--vmm-type", values["vmm_type"][1]]
    if values.get("svsm_file"):
        args += ["--svsm", str(_fixture(values["svsm_file"])), "--vars-size", str(values["ovmf_vars_size"])]
        files.append(_fixture(values["svsm_file"]))
    if values.get("dump_vmsa"):
        return None                                  # covered by test_dump_vmsa below
    return Vector(fn.name, tuple(args), expected, error, tuple(files))


def _vectors() -> list[Vector]:
    src = VECTORS / "test_guest.py"
    if not src.is_file():
        return []
    tree = ast.parse(src.read_text())
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_"):
            if (v := _vector(fn)) is not None:
                found.append(v)
    return found


def _ovmf_hash_vectors() -> list[tuple[str, str]]:
    """`calc_snp_ovmf_hash("tests/fixtures/...").hex()` == literal, as `--mode snp:ovmf-hash`."""
    src = VECTORS / "test_guest.py"
    if not src.is_file():
        return []
    found = []
    for fn in ast.walk(ast.parse(src.read_text())):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                        and "calc_snp_ovmf_hash" in ast.unparse(node.value)):
                    path = node.value.func.value.args[0].value      # type: ignore[attr-defined]
                    for cmp in ast.walk(fn):
                        if (isinstance(cmp, ast.Call) and getattr(cmp.func, "attr", "") == "assertEqual"
                                and ast.unparse(cmp.args[0]) == node.targets[0].id):   # type: ignore[attr-defined]
                            found.append((path, cmp.args[1].value))  # type: ignore[attr-defined]
    return found


VECTOR_LIST = _vectors()
pytestmark = pytest.mark.skipif(not VECTOR_LIST, reason=f"sev-snp-measure vectors not found under {VECTORS}")


def test_the_vectors_were_found() -> None:
    assert len(VECTOR_LIST) >= 20
    assert sum(v.expected is not None for v in VECTOR_LIST) >= 17


@pytest.mark.parametrize("vector", VECTOR_LIST, ids=lambda v: v.name)
def test_measure_reproduces_the_vector(vector: Vector) -> None:
    missing = [f for f in vector.files if not f.exists()]
    if missing:
        pytest.skip(f"fixture not published with the vectors: {missing[0].name}")
    args = [_ovmf_hash(a.removeprefix(OVMF_HASH_OF)) if a.startswith(OVMF_HASH_OF) else a for a in vector.args]
    result = CliRunner().invoke(cli, args, standalone_mode=False)
    if vector.expected is not None:
        assert result.exception is None, result.output
        assert result.output.strip() == vector.expected
    else:
        assert result.exception is not None
        assert vector.error in str(result.exception)


def _ovmf_hash(path: str) -> str:
    result = CliRunner().invoke(cli, ["measure", "--mode", "snp:ovmf-hash", "--ovmf", str(_fixture(path))],
                                standalone_mode=False)
    assert result.exception is None, result.output
    return result.output.strip()


@pytest.mark.parametrize(("path", "expected"), _ovmf_hash_vectors())
def test_measure_reproduces_the_ovmf_hash(path: str, expected: str) -> None:
    assert _ovmf_hash(path) == expected


def test_dump_vmsa_writes_one_file_per_vcpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["measure", "--mode", "snp", "--vcpus", "4", "--vcpu-type", "EPYC-v4", "--ovmf",
            str(VECTORS / "fixtures/ovmf_AmdSev_suffix.bin"), "--dump-vmsa"]
    result = CliRunner().invoke(cli, args, standalone_mode=False)
    assert result.exception is None, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"vmsa{i}.bin" for i in range(4)]


def test_verbose_and_base64_output_match_sev_snp_measure() -> None:
    base = ["measure", "--mode", "snp", "--vcpus", "1", "--vcpu-type", "EPYC-v4", "--ovmf",
            str(VECTORS / "fixtures/ovmf_AmdSev_suffix.bin"), "--kernel", "/dev/null", "--initrd", "/dev/null",
            "--append", "console=ttyS0 loglevel=7", "--guest-features", "0x21"]
    out = CliRunner().invoke(cli, [*base, "-v"], standalone_mode=False).output.strip()
    assert out == ("Calculated SEV_SNP guest measurement: 803f691094946e42068aaa3a8f9e26a5c89f36f7b73ecfb2"
                   "8c653360fe4b3aba7e534442e7e1e17895dfe778d0228977")
    b64 = CliRunner().invoke(cli, [*base, "--output-format", "base64"], standalone_mode=False).output.strip()
    assert bytes.fromhex(out.rsplit(" ", 1)[1]) == __import__("base64").b64decode(b64)


def test_bad_combinations_are_input_errors() -> None:
    ovmf = str(VECTORS / "fixtures/ovmf_AmdSev_suffix.bin")
    for args, message in (
        (["--mode", "snp", "--ovmf", ovmf, "--vcpu-type", "EPYC-v4"], "missing --vcpus"),
        (["--mode", "snp", "--ovmf", ovmf, "--vcpus", "1"], "missing --vcpu-type"),
        (["--mode", "snp", "--ovmf", ovmf, "--vcpus", "1", "--vcpu-type", "EPYC-v4", "--append", "x"],
         "--kernel required"),
        (["--mode", "snp", "--ovmf", "/nonexistent", "--vcpus", "1", "--vcpu-type", "EPYC-v4"], "no such file"),
    ):
        result = CliRunner().invoke(cli, ["measure", *args], standalone_mode=False)
        assert result.exception is not None and message in str(result.exception), (args, result.exception)
