"""Entry point of the `parma-sandbox` command.

Start-up is part of the interface: `--version`, `--help`, `ps`, `validate` and `policy check` answer in
well under 0.15 s (bench/bench_cli.py). So the top-level group is lazy: it knows each command's name,
the module that defines it and its one-line help, and imports that module only when the command runs
(or its own help is asked for). tests/unit/test_cli_startup.py checks that the table matches the
commands the modules define and that importing this module pulls in none of the heavy packages.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import click

from sandbox import __version__
from sandbox.cli.common import CliContext, OutputFormat
from sandbox.cli.errors import EXIT_USAGE, PassThroughCommand, report_error, report_interrupt
from sandbox.log import DEBUG, setup_logging
from sandbox.progress import ProgressMode, Reporter, set_reporter


@dataclass(frozen=True)
class LazyCommand:
    """Where a top-level command lives, and what `--help` says about it without importing it."""

    modules: tuple[str, ...]    # imported in order; later ones may attach subcommands to the group
    help: str                   # the first sentence of the command's docstring


# Each module also lists its top-level commands in `commands`; the test keeps this table in step with them.
COMMANDS: dict[str, LazyCommand] = {
    "attest": LazyCommand(("sandbox.cli.attest",),
                          "SEV-SNP attestation: display, fetch certificates, verify, get a report from a sandbox."),
    "build": LazyCommand(("sandbox.cli.build",), "Build the UVM or one of its parts (default: uvm)."),
    "check": LazyCommand(("sandbox.cli.check",),
                         "Probe the host: QEMU, KVM, SEV-SNP, firmware, libvirt, vsock and tools."),
    "down": LazyCommand(("sandbox.cli.up",),
                        "Stop sandbox NAME (or --all): containers first, then the VM, gracefully and then forced."),
    "export": LazyCommand(("sandbox.cli.export",),
                          "Write a group as a deployment for another engine (Confidential ACI, Kubernetes with the "
                          "parma runtime)."),
    "exec": LazyCommand(("sandbox.cli.up",),
                        "Run COMMAND in CONTAINER of sandbox NAME, if the policy allows it: exec [-it] NAME "
                        "CONTAINER -- CMD..."),
    "image": LazyCommand(("sandbox.cli.image",),
                         "Container images as dm-verity block devices: pull, list layers, convert."),
    "inspect": LazyCommand(("sandbox.cli.up",),
                           "Show a sandbox: policy hash, expected measurement, TEE mode, devices, containers."),
    "kbs": LazyCommand(("sandbox.cli.kbs",), "The key broker: releases secrets only to attested container groups."),
    "logs": LazyCommand(("sandbox.cli.up",),
                        "Print the output of NAME's containers (or of CONTAINER): stdout to stdout, stderr to "
                        "stderr."),
    "measure": LazyCommand(("sandbox.cli.measure",),
                           "Calculate an AMD SEV / SEV-ES / SEV-SNP guest launch measurement (sev-snp-measure "
                           "compatible)."),
    "policy": LazyCommand(("sandbox.cli.policy",),
                          "Execution policies: generate, inspect, compare, and replay requests against them."),
    "ps": LazyCommand(("sandbox.cli.up",), "List sandboxes (including failed or stale ones that 'down' should clean)."),
    "secret": LazyCommand(("sandbox.cli.kbs",), "Secrets held by the key broker, each with its release policy."),
    "up": LazyCommand(("sandbox.cli.up",),
                      "Pull, convert, generate the policy, launch the UVM and start GROUP_FILE's containers."),
    "validate": LazyCommand(("sandbox.cli.validate",),
                            "Validate GROUP_FILE (exit 0 when valid, 2 with every problem listed otherwise)."),
    "verity": LazyCommand(("sandbox.cli.verity",),
                          "Format a dm-verity hash tree for FILE (as `veritysetup format` would) and print its "
                          "parameters."),
}


def load_command(name: str) -> click.Command:
    """Import the modules behind a top-level command and return it."""
    entry = COMMANDS[name]
    found: click.Command | None = None
    for module in entry.modules:
        for command in importlib.import_module(module).commands:
            if command.name == name:
                found = command
    if found is None:
        raise LookupError(f"{entry.modules[0]} defines no command {name!r}")
    return found


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use (see the module docstring).

    Commands attached with add_command (tests do) are served as usual.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            self.add_command(load_command(cmd_name))
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # As click.Group.format_commands, with the table's help for the commands not imported yet.
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            command = self.commands.get(name) or click.Command(name, help=COMMANDS[name].help)
            if not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    except BaseException as e:  # the single place where errors meet the user
        if isinstance(e, SystemExit):
            raise
        sys.exit(report_error(e, debug=DEBUG.get() or "--debug" in args))
    sys.exit(rv if isinstance(rv, int) else 0)
