"""Entry point of the `parma-sandbox` command."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import click

from sandbox import __version__
from sandbox.cli.common import CliContext, OutputFormat
from sandbox.cli.errors import EXIT_USAGE, PassThroughCommand, report_error, report_interrupt
from sandbox.log import DEBUG, setup_logging
from sandbox.progress import ProgressMode, Reporter, set_reporter

# Each module defines a `commands` list of click commands/groups to attach to the top level.
COMMAND_MODULES = (
    "sandbox.cli.check",
    "sandbox.cli.validate",
    "sandbox.cli.up",
    "sandbox.cli.policy",
    "sandbox.cli.attest",
    "sandbox.cli.image",
    "sandbox.cli.aci",
    "sandbox.cli.kbs",
    "sandbox.cli.build",
    "sandbox.cli.measure",
    "sandbox.cli.export",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="parma-sandbox")
@click.option("--debug", is_flag=True, help="Log every external command and show tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only print results and errors.")
@click.option("--format", "fmt", type=click.Choice([f.value for f in OutputFormat]), default="table",
              show_default=True, help="Output format for commands that print a document or a list.")
@click.option("--progress", type=click.Choice([m.value for m in ProgressMode]), default="auto",
              show_default=True, help="Progress display on stderr (auto: tty on a terminal, plain otherwise).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, fmt: str, progress: str) -> None:
    """Run container groups in a confidential UVM, with every host request checked by an attested policy."""
    setup_logging(debug=debug, quiet=quiet)
    mode = ProgressMode.quiet if quiet and progress == "auto" else ProgressMode(progress)
    set_reporter(Reporter(mode))
    ctx.obj = CliContext(debug=debug, quiet=quiet, format=OutputFormat(fmt))


for _module in COMMAND_MODULES:
    for _command in importlib.import_module(_module).commands:
        cli.add_command(_command)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = cli.main(args=args, prog_name="parma-sandbox", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort as e:
        sys.exit(report_interrupt(e.__cause__))   # click wraps the KeyboardInterrupt (or Interrupted)
    except click.ClickException as e:
        e.show()
        command = e.ctx.command if isinstance(e, click.UsageError) and e.ctx is not None else None
        if isinstance(command, PassThroughCommand):
            sys.exit(command.usage_exit_code)
        sys.exit(e.exit_code if e.exit_code is not None else EXIT_USAGE)
    except BaseException as e:  # noqa: BLE001 - the single place where errors meet the user
        if isinstance(e, SystemExit):
            raise
        sys.exit(report_error(e, debug=DEBUG.get() or "--debug" in args))
    sys.exit(rv if isinstance(rv, int) else 0)
