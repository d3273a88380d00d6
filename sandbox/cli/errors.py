"""The one place where typed errors become messages and exit codes."""

from __future__ import annotations

import sys

import click

from sandbox.shared import errors as E

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_EXEC_SETUP = 125     # docker: the error is with the sandbox/container, not the command
EXIT_EXEC_CANNOT_RUN = 126  # docker: the command cannot be invoked (here also: the policy denies it)
EXIT_EXEC_NOT_FOUND = 127
EXIT_INTERRUPTED = 130

# First match wins; subclasses before their bases.
EXIT_CODES: tuple[tuple[type[E.SandboxError], int], ...] = (
    (E.ExecSetupError, EXIT_EXEC_SETUP),
    (E.ExecDenied, EXIT_EXEC_CANNOT_RUN),
    (E.ExecCannotInvoke, EXIT_EXEC_CANNOT_RUN),
    (E.ExecNotFound, EXIT_EXEC_NOT_FOUND),
    (E.InputError, EXIT_USAGE),
    (E.CheckFailed, EXIT_FAILURE),
    (E.PolicyDenied, EXIT_FAILURE),
    (E.SandboxError, EXIT_FAILURE),
)


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
        click.echo("error: interrupted", err=True)
        return EXIT_INTERRUPTED
    click.echo(f"error: internal error: {type(error).__name__}: {error}", err=True)
    if not debug:
        click.echo("hint: this is a bug in parma-sandbox; re-run with --debug for a traceback and report it",
                   err=True)
    return EXIT_FAILURE
