"""Shared CLI plumbing: the context object, --format handling, and result output on stdout."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import click

from sandbox.cli.render import json_text
from sandbox.cli.render import render_table as render_table  # commands import it from here


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


@dataclass
class CliContext:
    debug: bool = False
    quiet: bool = False
    format: OutputFormat = OutputFormat.table


class DeferredChoice(click.Choice):
    """A choice among the values of an enum whose module is imported only when the option is parsed or
    its help is shown: a command's options are built whenever its module loads, and the enum's module
    may be too heavy for the start of the other commands there (`ps` beside `up`; sandbox/cli/main.py)."""

    def __init__(self, module: str, enum: str) -> None:
        self._source = (module, enum)
        self._choices: tuple[str, ...] | None = None
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        if self._choices is None:
            module, enum = self._source
            self._choices = tuple(member.value for member in getattr(importlib.import_module(module), enum))
        return self._choices

    @choices.setter
    def choices(self, values: Sequence[str]) -> None:
        self._choices = tuple(values)


class ExtensibleGroup(click.Group):
    """A click group some of whose subcommands live in other modules (`extensions`), which attach them when
    imported. They are imported only when a subcommand the group does not define itself is asked for, or
    the list of subcommands is shown: `policy check` does not load the ACI interoperability code."""

    def __init__(self, *args: Any, extensions: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extensions = tuple(extensions)
        self._extended = False

    def _extend(self) -> None:
        if not self._extended:
            self._extended = True
            for module in self.extensions:
                importlib.import_module(module)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and not self._extended:
            self._extend()
            command = super().get_command(ctx, cmd_name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._extend()
        return super().list_commands(ctx)


def cli_context() -> CliContext:
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return CliContext()
    obj = ctx.find_object(CliContext)
    return obj if obj is not None else CliContext()


def format_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """Per-command --format; when omitted the global --format applies."""
    return click.option("--format", "fmt", type=click.Choice([f.value for f in OutputFormat]), default=None,
                        help="Output format (default: the global --format, else table).")(f)


def resolve_format(fmt: str | None) -> OutputFormat:
    return OutputFormat(fmt) if fmt else cli_context().format


def echo_json(data: Any) -> None:
    click.echo(json_text(data))


def emit(data: Any, fmt: str | None, table: Callable[[Any], str]) -> None:
    """Print a result document: JSON, or the human rendering produced by `table`."""
    if resolve_format(fmt) == OutputFormat.json:
        echo_json(data)
    else:
        text = table(data)
        if text:
            click.echo(text)


def write_document(data: bytes, output: Path | None, fmt: str | None, *, what: str, digest_label: str,
                   digest: str) -> None:
    """A generated document: exact bytes on stdout with its digest noted on stderr, or written atomically to
    `output` with a result line (or JSON) saying where and with which digest."""
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        info(f"{digest_label}: {digest}")
        return
    from sandbox.fsutil import atomic_write  # imported on use: most commands write no document

    atomic_write(output, data)
    emit({"file": str(output), "sha256": digest}, fmt, lambda r: f"wrote {what} {r['file']} ({digest_label} {digest})")


def info(message: str) -> None:
    """A human note on stderr (suppressed by -q)."""
    if not cli_context().quiet:
        click.echo(message, err=True)
