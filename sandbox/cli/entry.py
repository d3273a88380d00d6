"""The `parma-sandbox` program: a fast path for calls whose start-up competes with a native tool, click for
everything else (sandbox/cli/main.py).

`verity FILE ...` is timed against `veritysetup format` and `image convert LAYER -o OUT` against hcsshim's
tar2ext4, process start included (bench/bench_verity.py, bench/bench_tar2ext4.py): importing click and the
command table would cost them more than hashing a small file. So a `verity` or `image convert` call whose
arguments are plainly well-formed runs from sandbox/cli/verity_run.py or convert_run.py without click; any
other shape (help, a usage error, an option this module does not know) goes through click, which ends in the
same code with the same output, messages and exit codes.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False                   # as typing.TYPE_CHECKING, without importing typing (a few ms)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not _run_fast(args):
        from sandbox.cli.main import main as click_main

        click_main(args)


def _run_fast(args: list[str]) -> bool:
    """Run a `verity` or `image convert` call without click, exiting; False when click should handle `args`."""
    debug = quiet = False
    fmt = "table"
    i = 0
    while i < len(args) and args[i].startswith("-"):     # the global options click's group takes
        arg = args[i]
        i += 1
        if arg == "--debug":
            debug = True
        elif arg in ("-q", "--quiet"):
            quiet = True
        elif arg.startswith("--format="):
            fmt = arg.partition("=")[2]
        elif arg == "--format" and i < len(args):
            fmt = args[i]
            i += 1
        else:
            return False
    if args[i:i + 1] == ["verity"]:
        return _verity(args[i + 1:], fmt, debug)
    if args[i:i + 2] == ["image", "convert"]:
        return _convert(args[i + 2:], fmt, debug, quiet)
    return False


def _verity(args: list[str], fmt: str, debug: bool) -> bool:
    from sandbox.cli import verity_run

    call = verity_run.parse_args(args)
    if call is None or fmt not in verity_run.FORMATS:
        return False
    try:            # `verity` prints no notes or progress: nothing to set up for --quiet or --debug
        doc = verity_run.run(call.file, no_superblock=call.no_superblock, salt_hex=call.salt_hex,
                             hash_file=call.hash_file)
    except BaseException as e:
        _fail(e, debug)
    _print(doc, call.fmt or fmt, verity_run.kv_table)


def _convert(args: list[str], fmt: str, debug: bool, quiet: bool) -> bool:
    from sandbox.cli import convert_run
    from sandbox.cli.verity_run import FORMATS

    call = convert_run.parse_args(args)
    if call is None or fmt not in FORMATS:
        return False
    from sandbox.log import setup_logging
    from sandbox.progress import ProgressMode, Reporter, set_reporter

    setup_logging(debug=debug, quiet=quiet)         # as sandbox/cli/main.py's group does
    set_reporter(Reporter(ProgressMode.quiet if quiet else ProgressMode.auto))
    try:
        doc, table = convert_run.run(call.layer, call.output, no_verity=call.no_verity,
                                     no_whiteouts=call.no_whiteouts, compat=call.compat)
    except BaseException as e:
        _fail(e, debug)
    _print(doc, call.fmt or fmt, table)


def _fail(e: BaseException, debug: bool) -> NoReturn:
    """Report an error as sandbox/cli/main.py reports errors, and exit."""
    if isinstance(e, SystemExit):
        raise e
    from sandbox.cli.errors import report_error

    sys.exit(report_error(e, debug=debug))


def _print(doc: dict[str, Any], fmt: str, table: Callable[[dict[str, Any]], str]) -> NoReturn:
    """Print a result as sandbox.cli.common.emit does, and exit."""
    if fmt == "json":
        from sandbox.cli.render import json_text

        sys.stdout.write(json_text(doc) + "\n")
    elif text := table(doc):
        sys.stdout.write(text + "\n")
    sys.exit(0)
