"""Logging for the host side: everything goes to stderr; stdout is reserved for results."""

from __future__ import annotations

import contextvars
import logging
import sys

DEBUG = contextvars.ContextVar("parma_sandbox_debug", default=False)
QUIET = contextvars.ContextVar("parma_sandbox_quiet", default=False)

log = logging.getLogger("parma-sandbox")


class _Formatter(logging.Formatter):
    PREFIX = {logging.DEBUG: "debug: ", logging.WARNING: "warning: ", logging.ERROR: "error: "}

    def format(self, record: logging.LogRecord) -> str:
        return self.PREFIX.get(record.levelno, "") + record.getMessage()


def setup_logging(*, debug: bool = False, quiet: bool = False) -> None:
    DEBUG.set(debug)
    QUIET.set(quiet)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.propagate = False
    if debug:
        log.setLevel(logging.DEBUG)
    elif quiet:
        log.setLevel(logging.WARNING)
    else:
        log.setLevel(logging.INFO)
