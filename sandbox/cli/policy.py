"""`parma-sandbox policy ...`: generate, show, hash, diff and check execution policies."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sandbox.cli.common import (
    ExtensibleGroup,
    OutputFormat,
    emit,
    format_option,
    info,
    resolve_format,
    write_document,
)
from sandbox.cli.template_options import template_options, volume_paths
from sandbox.policy.summary import BANNER, debug_features, read_policy, render, summarize
from sandbox.shared.policy import PolicyEngine, parse_policy, policy_hash

# Generating a policy needs the image resolver and the key broker client; each command imports what it
# uses beyond reading policies, so that `policy check` starts at once (sandbox/cli/main.py).

EXIT_DENIED = 1
EXIT_DIFFERENT = 1   # as diff(1) and `git diff --exit-code`: 0 identical, 1 different, 2 trouble

FILE = click.Path(path_type=Path, dir_okay=False)


# sandbox/cli/aci.py attaches export, import, explain and fragment (ACI's Rego format) when imported.
@click.group("policy", cls=ExtensibleGroup, extensions=("sandbox.cli.aci",))
def policy() -> None:
    """Execution policies: generate, inspect, compare, and replay requests against them."""


@policy.command("gen")
@click.argument("group_file", type=FILE)
@click.option("-o", "--output", type=FILE, help="Write the policy here (default: stdout, exact bytes).")
@click.option("--debug-mode/--no-debug-mode", default=None,
              help="Add a shell exec process, an allow-all env rule, logging and properties access "
                   "(default: the group's policy.debugMode). Changes the hash.")
@click.option("--kbs", "kbs_url", help="Pin the key broker serving at this URL (key_brokers; docs/kbs.md).")
@click.option("--kbs-key", "kbs_keys", multiple=True,
              help="Pin this key broker (its public key's SHA-256, as 'kbs key' prints). Repeatable.")
@template_options
@format_option
def gen(group_file: Path, output: Path | None, debug_mode: bool | None, kbs_url: str | None,
        kbs_keys: tuple[str, ...], template_group: str | None, volumes: tuple[str, ...], fmt: str | None) -> None:
    """Generate the policy of GROUP_FILE from its images, volumes and options."""
    from sandbox.group import load_group
    from sandbox.kbs.client import broker_pins
    from sandbox.policy.gen import generate_policy
    from sandbox.policy.sources import files_volume_hashes, resolve_group_images

    spec = load_group(group_file, template_group=template_group, volume_paths=volume_paths(volumes))
    pins = broker_pins(kbs_url, kbs_keys)
    images = resolve_group_images(spec)
    raw = generate_policy(spec, images, debug_mode=debug_mode, volume_hashes=files_volume_hashes(spec),
                          key_brokers=pins)
    digest = policy_hash(raw)
    if debug_features(parse_policy(raw)):
        info(f"warning: {BANNER}")
    write_document(raw, output, fmt, what="policy", digest_label="policy sha256 (HOST_DATA)", digest=digest)


@policy.command("show")
@click.argument("policy_file", type=FILE)
@format_option
def show(policy_file: Path, fmt: str | None) -> None:
    """Summarise POLICY_FILE; debug-mode policies are flagged loudly."""
    raw, parsed = read_policy(policy_file)
    summary = summarize(raw, parsed)
    if summary["debug_mode"]:
        info(f"warning: {policy_file}: {BANNER}")
    emit(summary, fmt, render)


@policy.command("hash")
@click.argument("policy_file", type=FILE)
@format_option
def hash_(policy_file: Path, fmt: str | None) -> None:
    """Print SHA-256 of the exact bytes of POLICY_FILE (its HOST_DATA); the file must be a valid policy."""
    raw, _ = read_policy(policy_file)
    emit({"file": str(policy_file), "sha256": policy_hash(raw)}, fmt, lambda r: r["sha256"])


@policy.command("diff")
@click.argument("a", type=FILE)
@click.argument("b", type=FILE)
@format_option
@click.pass_context
def diff(ctx: click.Context, a: Path, b: Path, fmt: str | None) -> None:
    """Compare two policies by container and field; exit 0 when identical, 1 when they differ (as
    `git diff --exit-code` does), 2 when a file cannot be read as a policy."""
    from sandbox.policy.diff import diff_policies

    raw_a, pa = read_policy(a)
    raw_b, pb = read_policy(b)
    changes = diff_policies(pa, pb)
    result = {"identical": raw_a == raw_b, "sha256": {"a": policy_hash(raw_a), "b": policy_hash(raw_b)},
              "changes": [{"where": c.where, "field": c.field, "detail": c.detail} for c in changes]}

    def table(r: dict) -> str:
        if r["identical"]:
            return "identical"
        lines = [str(c) for c in changes]
        if not changes:
            lines.append("no semantic difference, but the bytes differ: the hashes (HOST_DATA) differ")
        lines.append(f"sha256: {r['sha256']['a']} -> {r['sha256']['b']}")
        return "\n".join(lines)

    emit(result, fmt, table)
    if not result["identical"]:
        ctx.exit(EXIT_DIFFERENT)


@policy.command("check")
@click.argument("policy_file", type=FILE)
@click.argument("trace_file", type=FILE)
@format_option
@click.pass_context
def check(ctx: click.Context, policy_file: Path, trace_file: Path, fmt: str | None) -> None:
    """Replay TRACE_FILE (JSON lines of {"ep", "input"}) against POLICY_FILE, one decision per line.

    Exit 0 when every request is allowed, 1 when any is denied, 2 for bad input."""
    from sandbox.policy.trace import read_trace, replay

    raw, _ = read_policy(policy_file)
    engine = PolicyEngine.from_bytes(raw, source=str(policy_file))
    requests = read_trace(trace_file)
    as_json = resolve_format(fmt) == OutputFormat.json
    denied = 0
    for outcome in replay(engine, requests):
        d = outcome.decision
        denied += not d.allowed
        if as_json:
            click.echo(json.dumps(outcome.to_json(), sort_keys=True))
            continue
        verdict = "allowed" if d.allowed else "DENIED"
        if d.allowed:
            detail = "rolled back: the action failed" if outcome.rolled_back else "; ".join(d.changes) or "-"
        else:
            detail = d.reason
        click.echo(f"{outcome.request.line:>4}  {d.ep:<24} {verdict:<7}  {detail}")
    info(f"{len(requests)} request(s), {denied} denied")
    if denied:
        ctx.exit(EXIT_DENIED)


commands = [policy]
