"""The command lines in the docs match the CLI: every `parma-sandbox ...` line in a code block names a real command
and only options it has, and every command and option of the CLI appears in at least one such line (docs/cli.md
is the reference that lists them all). An option added without documentation, or a doc that keeps a removed
one, fails here."""

from __future__ import annotations

import re
from dataclasses import dataclass

import click

from sandbox.cli.main import cli
from tests.docblocks import REPO, blocks, documents

GLOBAL_OPTIONS = {"--debug", "-q", "--quiet", "--format", "--progress", "--version", "--help", "-h"}
GLOBAL_WITH_VALUE = {"--format", "--progress"}
OPTION = re.compile(r"(?<![\w/.=-])(?<!\w\[)(--?[A-Za-z][\w-]*)")
SHELL_END = re.compile(r"\s#|[|;)]|&&|\s&\s*$|\s[0-9]?>|\s<")
COMMENT = re.compile(r"\s#")


@dataclass(frozen=True)
class Mention:
    where: str
    command: tuple[str, ...]
    options: tuple[str, ...]


def subcommands(group: click.Group) -> dict[str, click.Command]:
    """A group's subcommands, through click's API: the CLI imports a command's module when it is asked for."""
    ctx = click.Context(group)
    return {name: cmd for name in group.list_commands(ctx) if (cmd := group.get_command(ctx, name)) is not None}


def leaf_commands() -> dict[tuple[str, ...], click.Command]:
    out: dict[tuple[str, ...], click.Command] = {}

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in subcommands(cmd).items():
                walk(sub, (*path, name))
        else:
            out[path] = cmd
    walk(cli, ())
    return out


def option_names(cmd: click.Command) -> set[str]:
    names = set()
    for p in cmd.params:
        if isinstance(p, click.Option):
            names.update(p.opts)
            names.update(p.secondary_opts)
    return names


def _lines(text: str) -> list[str]:
    """Code lines, with synopsis continuation lines (indented, after a command line) joined to theirs."""
    out: list[str] = []
    for raw in text.splitlines():
        line = raw.removeprefix("$ ")
        if out and line[:1].isspace() and line.strip().startswith(("[", "--", "-")):
            out[-1] += " " + line.strip()
        else:
            out.append(line)
    return out


def mentions() -> list[Mention]:
    found = []
    for doc in documents():
        for block in blocks(doc):
            for n, line in enumerate(_lines(block.text)):
                for m in re.finditer(r"(?:^|[\s(`])parma-sandbox\s+(.*)", line):
                    rest = m.group(1)
                    # In commands, a pipe or a `)` ends the command; in synopses `|` and `()` are alternatives.
                    ends = SHELL_END if block.runnable or block.attr("skip") else COMMENT
                    if (end := ends.search(" " + rest)) is not None:
                        rest = rest[:max(0, end.start() - 1)]
                    rest = rest.split(" -- ", 1)[0]   # exec: what follows is the container's command
                    words = rest.split()
                    i = 0
                    while i < len(words) and words[i] in GLOBAL_OPTIONS:
                        i += 2 if words[i] in GLOBAL_WITH_VALUE else 1
                    command: list[str] = []
                    group: click.Command = cli
                    while isinstance(group, click.Group) and i < len(words) and words[i] in subcommands(group):
                        group = subcommands(group)[words[i]]
                        command.append(words[i])
                        i += 1
                    if isinstance(group, click.Group) and i < len(words) and "|" in words[i]:
                        # An overview line: `parma-sandbox policy gen|show|hash ...` names several commands.
                        names = words[i].split("|")
                        if all(n in subcommands(group) for n in names):
                            found += [Mention(f"{block.where}+{n}", (*command, name), ()) for name in names]
                            continue
                    opts = tuple(o for o in OPTION.findall(" ".join(words[i:])) if not o.startswith("---"))
                    found.append(Mention(f"{block.where}+{n}", tuple(command), opts))
    return found


def test_every_documented_command_line_names_real_commands_and_options() -> None:
    commands = leaf_commands()
    problems = []
    for m in mentions():
        if not m.command:
            if not set(m.options) <= GLOBAL_OPTIONS:
                problems.append(f"{m.where}: no command named; options {m.options}")
            continue
        cmd = commands.get(m.command)
        if cmd is None:
            problems.append(f"{m.where}: 'parma-sandbox {' '.join(m.command)}' is a group, not a command")
            continue
        unknown = [o for o in m.options if o not in option_names(cmd) | GLOBAL_OPTIONS]
        if unknown:
            problems.append(f"{m.where}: 'parma-sandbox {' '.join(m.command)}' has no option {', '.join(unknown)}")
    assert not problems, "\n".join(problems)


def test_every_command_and_option_is_documented() -> None:
    documented: dict[tuple[str, ...], set[str]] = {}
    for m in mentions():
        documented.setdefault(m.command, set()).update(m.options)
    missing = []
    for path, cmd in sorted(leaf_commands().items()):
        if path not in documented:
            missing.append(f"parma-sandbox {' '.join(path)}: not shown in any doc's code block")
            continue
        for p in cmd.params:
            if isinstance(p, click.Option) and "--help" not in p.opts:
                if not (set(p.opts) | set(p.secondary_opts)) & documented[path]:
                    missing.append(f"parma-sandbox {' '.join(path)}: option {'/'.join(p.opts)} is not documented")
    assert not missing, "add them to docs/cli.md (or the doc of that command):\n" + "\n".join(missing)


def test_the_parser_sees_synopsis_lines() -> None:
    by_command = {m.command for m in mentions()}
    assert ("up",) in by_command and ("kbs", "serve") in by_command
    assert any(m.command == ("exec",) and "-l" not in m.options for m in mentions())
    assert REPO.joinpath("docs", "cli.md").is_file()
