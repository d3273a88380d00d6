"""Typed errors become `error:`/`hint:` lines and exit codes in one place; tracebacks only with --debug."""

from __future__ import annotations

import click
import pytest

from sandbox.cli import main as main_mod
from sandbox.cli.errors import exit_code_for
from sandbox.shared import errors as E


@pytest.fixture
def boom_command(monkeypatch: pytest.MonkeyPatch):
    """Attach a throw-away command that raises whatever the test puts in `holder`."""
    holder: dict[str, BaseException] = {}

    @click.command("boom")
    def boom() -> None:
        raise holder["error"]

    main_mod.cli.add_command(boom)
    yield holder
    main_mod.cli.commands.pop("boom", None)


def run_main(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main_mod.main(args)
    return exc.value.code


@pytest.mark.parametrize(("error", "code"), [
    (E.InputError("bad file"), 2),
    (E.CheckFailed("measurement mismatch"), 1),
    (E.PolicyDenied("denied"), 1),
    (E.ToolMissing("no tool"), 1),
    (E.NetworkError("down"), 1),
])
def test_exit_codes(error: E.SandboxError, code: int) -> None:
    assert exit_code_for(error) == code


def test_error_and_hint_without_traceback(boom_command, capsys: pytest.CaptureFixture[str]) -> None:
    boom_command["error"] = E.ToolError("veritysetup failed (exit code 1)", hint="line one\ncommand: veritysetup x")
    assert run_main(["boom"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: veritysetup failed (exit code 1)", "hint: line one",
                                "      command: veritysetup x"]


def test_debug_shows_traceback(boom_command, capsys: pytest.CaptureFixture[str]) -> None:
    boom_command["error"] = E.InputError("bad")
    assert run_main(["--debug", "boom"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_unexpected_exception_is_reported_as_bug(boom_command, capsys: pytest.CaptureFixture[str]) -> None:
    boom_command["error"] = ZeroDivisionError("division by zero")
    assert run_main(["boom"]) == 1
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError" in err and "--debug" in err and "Traceback" not in err


def test_keyboard_interrupt_is_130(boom_command, capsys: pytest.CaptureFixture[str]) -> None:
    boom_command["error"] = KeyboardInterrupt()
    assert run_main(["boom"]) == 130


def test_usage_error_is_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["validate"]) == 2
    assert run_main(["no-such-command"]) == 2
    assert run_main(["--format", "yaml", "check"]) == 2


def test_missing_file_is_input_error(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["validate", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_up_says_what_is_missing(tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """`up` validates first: an invalid group never reaches later steps."""
    bad = tmp_path / "g.json"
    bad.write_text('{"name": "g"}')
    assert run_main(["up", str(bad)]) == 2
    assert "containers: required field is missing" in capsys.readouterr().err


# --- every failure the user can meet is a typed error with the documented exit code ---------------------


def _check_failures() -> list[type[E.SandboxError]]:
    from sandbox.aci.fragment_crypto import SignatureError
    from sandbox.guest.keys import CryptoError  # the guest's AES-GCM authentication, via OpenSSL
    from sandbox.images.store import DigestMismatch
    from sandbox.layers.convert import DiffIdMismatch
    from sandbox.shared.kbs_protocol import BrokerNotTrusted
    from sandbox.shared.snp.report import ReportFormatError
    return [DigestMismatch, DiffIdMismatch, SignatureError, CryptoError, ReportFormatError, BrokerNotTrusted]


@pytest.mark.parametrize("cls", _check_failures(), ids=lambda c: c.__name__)
def test_a_failed_check_exits_1(cls: type[E.SandboxError], boom_command, capsys: pytest.CaptureFixture[str]) -> None:
    """Digests, DiffIds, signatures, AES-GCM tags and attestation reports are checks: 1, not 2 (usage)."""
    assert issubclass(cls, E.CheckFailed)
    boom_command["error"] = cls("the check failed")
    assert run_main(["boom"]) == 1
    assert capsys.readouterr().err.startswith("error: the check failed")


def test_a_refused_fragment_is_a_denial() -> None:
    from sandbox.shared.rego.fragment import FragmentRefused
    assert issubclass(FragmentRefused, E.PolicyDenied) and exit_code_for(FragmentRefused("no")) == 1


def test_a_vm_config_that_cannot_launch_is_bad_input(boom_command, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    from sandbox.vmm.config import Accel, Disk, Tee, VmConfig, VmConfigError
    with pytest.raises(VmConfigError, match="serials must be unique") as e:
        VmConfig(name="x", tee=Tee.emulated, accel=Accel.tcg, vcpus=1, memory_mib=256, kernel=Path("/k"),
                 cmdline="", disks=(Disk(Path("/a"), "L0"), Disk(Path("/b"), "L0")), agent_sockets=(),
                 console_log=Path("/c"), qmp_socket=Path("/q"))
    boom_command["error"] = e.value
    assert run_main(["boom"]) == 2
    assert "internal error" not in capsys.readouterr().err


def test_guest_errors_are_in_the_hierarchy() -> None:
    from sandbox.guest.blockdev import BlockError
    from sandbox.guest.hostdata import HostDataUnavailable
    from sandbox.guest.mkext4 import Ext4FormatError
    from sandbox.guest.runtime import CrunError
    from sandbox.guest.scratch import ScratchError
    from sandbox.guest.terminal import TerminalError
    from sandbox.guest.users import UserError
    from sandbox.shared.protocol import ErrorCode, ProtocolError
    for cls in (BlockError, Ext4FormatError, CrunError, ScratchError, TerminalError, UserError):
        assert issubclass(cls, E.GuestOperationFailed), cls
    assert issubclass(HostDataUnavailable, E.AttestationError)
    error = ProtocolError(ErrorCode.not_found, "no container c")
    assert isinstance(error, E.GuestError) and error.message == str(error) == "no container c"


# Exceptions that are not SandboxErrors, and why none of them reaches the user.
OUTSIDE_THE_HIERARCHY = {
    "sandbox.cli.errors.Interrupted": "a KeyboardInterrupt for SIGTERM/SIGHUP; the CLI exits 128 + the signal",
    "sandbox.guest.devmapper.DeviceMapperError": "an OSError carrying the ioctl's errno; the agent answers `failed`",
    "sandbox.guest.keyapi.ApiError": "an HTTP answer to a container on the attestation API",
    "sandbox.kbs.challenges.ChallengesFull": "becomes HTTP 503 from the key broker",
    "sandbox.kbs.server.KbsHttpError": "an HTTP answer of the key broker",
    "sandbox.layers.decompress._Stopped": "control flow: ends the layer read-ahead thread when its reader goes away",
    "sandbox.policy.trace.SimulatedActionFailure": "control flow inside `policy check`",
    "sandbox.shared.codec.FieldError": "a ValueError every decoder boundary turns into a typed error",
    "sandbox.shared.policy.engine._Deny": "control flow inside the policy engine",
    "sandbox.shared.policy.regex.RegexError": "a ValueError the policy model reports as a problem",
    "sandbox.shared.policy.re2machine.ProgramTooLarge": "becomes a RegexError",
    "sandbox.shared.policy.re2syntax.SyntaxProblem": "becomes a RegexError",
    "sandbox.shared.rego.syntax._NoFast": "control flow inside the Rego reader",
    "sandbox.shim.main.UsageError": "the shim's own command line (containerd reads its stderr)",
    "sandbox.shim.stdio.StdioError": "the shim's stdio plumbing; reported to containerd",
    "sandbox.shim.ttrpc.RpcError": "a ttrpc status answer to containerd",
    "sandbox.shim.ttrpc.FramingError": "a ttrpc framing failure; the shim drops the connection",
}


def test_every_exception_class_is_a_sandbox_error_or_says_why_not() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    found = {}
    for path in sorted((root / "sandbox").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.bases:
                found[f"{module}.{node.name}"] = node
    import importlib
    outside = []
    for qualname in found:
        module, _, name = qualname.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(cls, E.SandboxError):
            outside.append(qualname)
    assert sorted(outside) == sorted(OUTSIDE_THE_HIERARCHY)
