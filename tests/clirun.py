"""Run the parma-sandbox CLI in-process and capture (exit code, stdout, stderr)."""

from __future__ import annotations

import pytest

from sandbox.cli import main as main_mod


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main_mod.main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err
