"""The one place where typed errors become messages and exit codes."""

from __future__ import annotations

import signal
import sys

import click

from sandbox.shared import errors as E

# The contract, verb by verb, is the table in docs/cli.md ("Exit codes"); tests/unit/test_exit_codes.py
# runs every row of it.
EXIT_OK = 0
EXIT_FAILURE = 1            # a check failed, a request was denied, a tool or service failed
EXIT_USAGE = 2              # a usage or input error (including a named thing that does not exist)
# `exec` passes the command's own code through, so its own outcomes use codes a command rarely does:
EXIT_EXEC_DENIED = 77       # the execution policy does not permit the command (sysexits' EX_NOPERM)
EXIT_EXEC_SETUP = 125       # docker/podman: an error of parma-sandbox or the sandbox, not of the command
EXIT_EXEC_CANNOT_RUN = 126  # docker: the command exists but cannot be invoked (not executable)
EXIT_EXEC_NOT_FOUND = 127   # docker: the command does not exist in the container
EXIT_SIGNAL_BASE = 128      # stopped by signal N: 128 + N, as a shell reports it
EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + signal.SIGINT   # 130, Ctrl-C

# First match wins; subclasses before their bases.
EXIT_CODES: tuple[tuple[type[E.SandboxError], int], ...] = (
    (E.ExecSetupError, EXIT_EXEC_SETUP),
    (E.ExecDenied, EXIT_EXEC_DENIED),
    (E.ExecCannotInvoke, EXIT_EXEC_CANNOT_RUN),
    (E.ExecNotFound, EXIT_EXEC_NOT_FOUND),
    (E.InputError, EXIT_USAGE),
    (E.CheckFailed, EXIT_FAILURE),
    (E.PolicyDenied, EXIT_FAILURE),
    (E.SandboxError, EXIT_FAILURE),
)


class Interrupted(KeyboardInterrupt):
    """A signal that stops a command the way Ctrl-C does (SIGTERM, SIGHUP): cleanup runs, then the
    command exits with 128 + the signal's number (143 for SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def interrupted_exit_code(error: BaseException | None) -> int:
    """130 for Ctrl-C; 128 + N for an Interrupted by signal N."""
    return EXIT_SIGNAL_BASE + error.signum if isinstance(error, Interrupted) else EXIT_INTERRUPTED


def report_interrupt(error: BaseException | None) -> int:
    if isinstance(error, Interrupted):
        click.echo(f"error: stopped by {signal.Signals(error.signum).name}", err=True)
    else:
        click.echo("error: interrupted", err=True)
    return interrupted_exit_code(error)


class PassThroughCommand(click.Command):
    """A command that exits with a program's own code (`exec`): its own errors, usage errors too, exit
    125 as docker's and podman's do, so that they never pass for the program's."""

    usage_exit_code = EXIT_EXEC_SETUP


def exit_code_for(error: E.SandboxError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return EXIT_FAILURE


def report_error(error: BaseException, *, debug: bool) -> int:
    """Print an error to stderr the way users see it and return the exit code."""
    if debug:
        import traceback  # only with --debug: not worth its import time on every start

        traceback.print_exception(error, file=sys.stderr)
    if isinstance(error, E.SandboxError):
        click.echo(f"error: {error.message}", err=True)
        if isinstance(error, E.InvalidDocument):
            for problem in error.problems:
                click.echo(f"  {error.source}: {problem}", err=True)
        if error.hint:
            lines = error.hint.splitlines()
            click.echo(f"hint: {lines[0]}", err=True)
            for line in lines[1:]:
                click.echo(f"      {line}", err=True)
        return exit_code_for(error)
    if isinstance(error, KeyboardInterrupt):
        return report_interrupt(error)
    click.echo(f"error: internal error: {type(error).__name__}: {error}", err=True)
    if not debug:
        click.echo("hint: this is a bug in parma-sandbox; re-run with --debug for a traceback and report it",
                   err=True)
    return EXIT_FAILURE
