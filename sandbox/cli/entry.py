"""The `parma-sandbox` program: a fast path for calls whose start-up competes with a native tool, click for
everything else (sandbox/cli/main.py).

`verity FILE ...` is timed against `veritysetup format`, process start included (bench/bench_verity.py):
importing click and the command table would cost it more than hashing a small file. So a `verity` call
whose arguments are plainly well-formed runs from sandbox/cli/verity_run.py without click; any other shape
(help, a usage error, an option this module does not know) goes through click, which ends in the same code
with the same output, messages and exit codes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not _run_fast(args):
        from sandbox.cli.main import main as click_main

        click_main(args)


def _run_fast(args: list[str]) -> bool:
    """Run a `verity` call without click, exiting; False when click should handle `args`."""
    debug = False
    fmt = "table"
    i = 0
    while i < len(args) and args[i].startswith("-"):     # the global options click's group takes
        arg = args[i]
        i += 1
        if arg == "--debug":
            debug = True
        elif arg in ("-q", "--quiet"):
            pass                                         # `verity` prints no notes or progress to hush
        elif arg.startswith("--format="):
            fmt = arg.partition("=")[2]
        elif arg == "--format" and i < len(args):
            fmt = args[i]
            i += 1
        else:
            return False
    if i == len(args) or args[i] != "verity":
        return False
    from sandbox.cli import verity_run

    call = verity_run.parse_args(args[i + 1:])
    if call is None or fmt not in verity_run.FORMATS:
        return False
    try:
        doc = verity_run.run(call.file, no_superblock=call.no_superblock, salt_hex=call.salt_hex,
                             hash_file=call.hash_file)
    except BaseException as e:  # reported as sandbox/cli/main.py reports errors
        if isinstance(e, SystemExit):
            raise
        from sandbox.cli.errors import report_error

        sys.exit(report_error(e, debug=debug))
    if (call.fmt or fmt) == "json":
        from sandbox.cli.render import json_text

        sys.stdout.write(json_text(doc) + "\n")
    else:
        sys.stdout.write(verity_run.kv_table(doc) + "\n")
    sys.exit(0)
