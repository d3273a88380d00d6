"""Run a long build step (kernel make, edk2 build) with its output in a log file and progress on stderr."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from sandbox.progress import step
from sandbox.run import PathLike, find_tool, spawn
from sandbox.shared.errors import ToolError, ToolMissing


def run_logged(argv: Sequence[PathLike], log_path: Path, *, what: str, env: Mapping[str, str],
               cwd: PathLike | None = None, total: int | None = None, unit_prefix: bytes | None = None) -> None:
    """Run `argv` to completion, appending its output to `log_path`.

    Progress counts the log lines starting with `unit_prefix` (e.g. b"  CC ") against `total`, an
    estimate used only for the bar. A failure raises ToolError with the log's tail.
    """
    with step(what, total=total) as task, open(log_path, "ab") as log_file:
        proc = spawn(argv, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        seen = 0
        while proc.poll() is None:
            time.sleep(1)
            if unit_prefix is not None:
                with open(log_path, "rb") as f:
                    done = sum(1 for line in f if line.startswith(unit_prefix))
                task.advance(done - seen)
                seen = done
        if proc.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise ToolError(f"{what} failed (exit code {proc.returncode})",
                            hint=f"{tail}\nfull log: {log_path}", returncode=proc.returncode)


def require_build_tools(tools: Sequence[str], headers: Mapping[str, str], *, what: str) -> None:
    """Fail fast, with an install hint, when a tool or a header (path -> Debian package) is missing."""
    for tool in tools:
        find_tool(tool)
    for header, package in headers.items():
        if not Path(header).exists():
            raise ToolMissing(f"{what} needs {header}",
                              hint=f"install the Debian package {package} (or run 'make setup')")
