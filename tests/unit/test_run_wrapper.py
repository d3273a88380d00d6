"""The external-tool wrapper: argv only, debug logging of a copy-pasteable command, typed failures."""

from __future__ import annotations

import logging
import sys

import pytest

from sandbox.log import setup_logging
from sandbox.run import command_line, find_tool, run
from sandbox.shared.errors import ToolError, ToolMissing


def test_success_captures_output() -> None:
    proc = run([sys.executable, "-c", "print('hi')"])
    assert proc.stdout == b"hi\n"


def test_missing_tool_has_install_hint() -> None:
    with pytest.raises(ToolMissing) as exc:
        find_tool("veritysetup-does-not-exist")
    assert "was not found" in exc.value.message
    with pytest.raises(ToolMissing):
        run(["definitely-not-a-tool-xyz"])


def test_known_tool_hint_names_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # /usr/sbin and /sbin are still searched; skopeo is in /usr/bin
    with pytest.raises(ToolMissing) as exc:
        find_tool("skopeo")
    assert "Debian package skopeo" in exc.value.hint


def test_failure_carries_stderr_tail_and_command() -> None:
    with pytest.raises(ToolError) as exc:
        run([sys.executable, "-c", "import sys; sys.stderr.write('bad thing\\n'); sys.exit(3)"])
    err = exc.value
    assert err.returncode == 3
    assert "exit code 3" in err.message
    assert "bad thing" in err.hint and "command: " in err.hint


def test_no_shell_interpretation(tmp_path) -> None:
    marker = tmp_path / "pwned"
    proc = run(["echo", f"; touch {marker}"])
    assert not marker.exists()
    assert proc.stdout.strip() == f"; touch {marker}".encode()


def test_ok_codes_and_check_false() -> None:
    assert run(["false"], check=False).returncode == 1
    assert run(["false"], ok_codes=(0, 1)).returncode == 1


def test_timeout_is_tool_error() -> None:
    with pytest.raises(ToolError, match="did not finish"):
        run(["sleep", "5"], timeout=0.2)


def test_debug_logs_copy_pasteable_command(caplog: pytest.LogCaptureFixture) -> None:
    setup_logging(debug=True)
    logger = logging.getLogger("parma-sandbox")
    logger.propagate = True
    try:
        with caplog.at_level(logging.DEBUG, logger="parma-sandbox"):
            run(["echo", "a b", "c"])
        assert any("+ " in r.getMessage() and "'a b' c" in r.getMessage() for r in caplog.records)
    finally:
        setup_logging()


def test_command_line_quotes() -> None:
    assert command_line(["x", "a b", "$HOME"]) == "x 'a b' '$HOME'"
