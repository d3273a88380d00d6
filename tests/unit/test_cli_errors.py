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
