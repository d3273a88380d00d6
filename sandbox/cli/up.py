"""Lifecycle commands: up, ps, logs, exec, inspect, down."""

from __future__ import annotations

import ipaddress
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sandbox.cli.common import DeferredChoice, emit, format_option, info, render_table
from sandbox.cli.errors import Interrupted, PassThroughCommand
from sandbox.cli.template_options import template_options, volume_paths
from sandbox.log import QUIET, setup_logging
from sandbox.shared.errors import (
    ExecCannotInvoke,
    ExecDenied,
    ExecNotFound,
    ExecSetupError,
    InputError,
    SandboxError,
)
from sandbox.state import list_sandboxes

if TYPE_CHECKING:
    from sandbox.group import GroupSpec
    from sandbox.launch.pipeline import UpOptions

# The group loader, the launcher, the key broker client and the lifecycle operations are imported by the
# commands that use them: `ps` must not pay for `up` (start-up time, sandbox/cli/main.py).


@click.command("up")
@click.argument("group_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-d", "--detach", is_flag=True, help="Start the group and return; do not stream logs.")
@click.option("--name", help="Sandbox name (default: the group's name).")
@click.option("--policy", "policy_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Use this policy instead of generating one: a JSON policy, or ACI's Rego (text, base64, or an "
                   "ARM template's ccePolicy). An ARM template with a ccePolicy brings its own (docs/aci.md).")
@click.option("--fragment", "fragments", multiple=True, metavar="FILE|REFERENCE",
              help="Load this signed policy fragment (a .cose file, or a registry reference to a standalone or "
                   "image-attached fragment) after the policy. Repeatable.")
@click.option("--drop-fragments", is_flag=True,
              help="Load no fragment the policy imports unless named with --fragment (nothing is fetched).")
@click.option("--tee", type=DeferredChoice("sandbox.group", "TeeMode"), default=None,
              help="TEE mode (default: the group's 'tee', else auto).")
@click.option("--backend", type=DeferredChoice("sandbox.vmm.config", "Backend"), default="qemu",
              show_default=True, help="Run QEMU directly, or as a transient libvirt domain.")
@click.option("--kbs", "kbs_url", help="Key broker URL for the attestation API (pinned in the generated policy; "
                                        "docs/kbs.md), e.g. http://127.0.0.1:8300.")
@click.option("--kbs-key", "kbs_keys", multiple=True,
              help="Pin this broker key (SHA-256, as 'kbs key' prints) instead of asking --kbs. Repeatable.")
@click.option("--id-key", type=click.Path(path_type=Path, dir_okay=False),
              help="Sign an SEV-SNP ID block with this EC P-384 key: the PSP then refuses any other measurement.")
@click.option("--author-key", type=click.Path(path_type=Path, dir_okay=False),
              help="Also sign the ID key with this author key (author-key-enabled).")
@click.option("--id-block", "id_block", type=click.Path(path_type=Path, dir_okay=False),
              help="Use an ID block signed elsewhere ('parma-sandbox measure ... --id-key KEY --id-out FILE').")
@click.option("--expect-measurement", help="Reference MEASUREMENT (96 hex digits) the post-launch report must "
                                           "carry (default: the predicted one).")
@click.option("--dns-server", "dns_server", metavar="ADDRESS:PORT",
              help="Have the containers resolve names with this DNS server on the host (e.g. a local dnsmasq), "
                   "over TCP relayed by QEMU's user networking, instead of the group's dnsConfig servers.")
@click.option("--record-trace", "record_trace", type=click.Path(path_type=Path, dir_okay=False),
              help="Write every request the launch sends, as the agent checked it, to this file (also when the "
                   "launch fails): replay it with 'policy check' (docs/policy-trace.md).")
@click.option("--debug", "debug_files", is_flag=True,
              help="Keep the launch's debug files (argv, domain XML, console, report) and show tracebacks; "
                   "see docs/snp-lab.md.")
@template_options
@format_option
def up(group_file: Path, detach: bool, name: str | None, policy_file: Path | None, fragments: tuple[str, ...],
       drop_fragments: bool, tee: str | None, backend: str, kbs_url: str | None, kbs_keys: tuple[str, ...], id_key: Path | None, author_key: Path | None,
       id_block: Path | None, expect_measurement: str | None, dns_server: str | None, record_trace: Path | None,
       debug_files: bool,
       template_group: str | None, volumes: tuple[str, ...], fmt: str | None) -> int:
    """Pull, convert, generate the policy, launch the UVM and start GROUP_FILE's containers.

    The init containers run first, in order, each to completion; then the containers start, and are
    restarted as the group's restartPolicy says (Always by default, as ACI). Attached (the default), it
    streams the containers' output until the group can no longer run, then takes the sandbox down and
    exits with the first failed container's exit code (0 when none failed); Ctrl-C also takes it down.
    With -d it prints the sandbox and returns, and a supervisor process keeps restarting the containers
    until 'down'.
    """
    from sandbox.aci.ccepolicy import template_ccepolicy_of_file
    from sandbox.group import TeeMode, load_group
    from sandbox.kbs.client import check_url
    from sandbox.launch.measured import IdentityOptions
    from sandbox.launch.pipeline import UpOptions
    from sandbox.vmm.config import Backend

    if debug_files:
        setup_logging(debug=True, quiet=QUIET.get())
    identity = IdentityOptions(id_key=id_key, author_key=author_key, id_block=id_block,
                               expect_measurement=_measurement(expect_measurement))
    spec = load_group(group_file, template_group=template_group, volume_paths=volume_paths(volumes))
    if policy_file is None and template_ccepolicy_of_file(group_file, template_group) is not None:
        # An ACI template with a ccePolicy runs under that policy, byte for byte: the HOST_DATA ACI attests.
        policy_file = group_file
    opts = UpOptions(name=name, policy_file=policy_file, policy_group=template_group, fragments=fragments,
                     fetch_fragments=not drop_fragments, tee=TeeMode(tee) if tee else None,
                     backend=Backend(backend), detach=detach,
                     kbs_url=check_url(kbs_url) if kbs_url else None, kbs_keys=kbs_keys, identity=identity,
                     dns_server=_host_port(dns_server) if dns_server else None, record_trace=record_trace)
    # SIGTERM/SIGHUP (a supervisor, a closed terminal) take the same clean path as Ctrl-C: a VM being
    # launched is stopped and its state removed; an attached sandbox is taken down. Then `up` exits
    # 128 + the signal (143, 129), where Ctrl-C exits 130.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _up(spec, opts, fmt)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _up(spec: GroupSpec, opts: UpOptions, fmt: str | None) -> int:
    from sandbox.launch import lifecycle, supervisor_process
    from sandbox.launch.pipeline import up as launch_up
    from sandbox.state import StateStore

    launched = launch_up(spec, opts)
    rec = launched.record
    summary: dict[str, Any] = {
        "name": launched.name, "status": rec.status.value, "tee": rec.tee, "accel": rec.accel,
        "backend": rec.backend, "policy_hash": rec.policy_hash,
        "containers": [c.name for c in rec.containers if not c.init],
        "init_containers": [c.name for c in rec.containers if c.init],
        "ports": [f"{p.host_address}:{p.host_port}->{p.port}" for p in rec.ports],
        "fragments": [f["namespace"] for f in (rec.startup or {}).get("fragments", [])],
        "timings": launched.timings.marks}
    outcome = launched.outcome
    if opts.detach:
        if outcome is not None and outcome.done:
            summary["exit_code"] = outcome.exit_code
            emit(summary, fmt, lambda s: f"{s['name']}: its group is over (exit code {s['exit_code']}); "
                                         f"'parma-sandbox logs {s['name']}' shows the output, "
                                         f"'parma-sandbox down {s['name']}' removes it")
            return int(outcome.exit_code or 0)
        supervisor_process.spawn(launched.name, StateStore())
        emit(summary, fmt, lambda s: f"{s['name']}: running ({s['tee']}, {s['accel']}); containers: "
                                     f"{', '.join(s['containers'])}"
                                     + (f"; ports: {', '.join(s['ports'])}" if s["ports"] else ""))
        return 0
    info(f"{launched.name}: running; streaming output (Ctrl-C stops the sandbox)")
    return lifecycle.run_attached(launched, echo=info)


def _host_port(value: str) -> tuple[str, int]:
    """--dns-server ADDRESS:PORT (an IPv6 address in brackets)."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = 0
    if not sep or not 0 < number < 65536:
        raise InputError(f"--dns-server: {value!r} is not ADDRESS:PORT", hint="e.g. --dns-server 127.0.0.1:5353")
    return host, number


def _measurement(value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value.strip().removeprefix("0x"))
    except ValueError:
        raw = b""
    if len(raw) != 48:
        raise InputError(f"--expect-measurement: expected 96 hex digits (a SHA-384 launch digest), got {value!r}")
    return raw


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def _age(created: float) -> str:
    secs = max(0, int(time.time() - created))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


@click.command("ps")
@format_option
def ps(fmt: str | None) -> None:
    """List sandboxes (including failed or stale ones that 'down' should clean)."""
    rows = list_sandboxes()

    def table(items: list[dict[str, Any]]) -> str:
        return render_table(("name", "status", "tee", "backend", "containers", "ports", "age"),
                            [(r["name"], r["status"], f"{r['tee']}/{r['accel']}", r["backend"],
                              ",".join(_container_cell(r, c) for c in r["containers"]), ",".join(r["ports"]),
                              _age(r["created"]))
                             for r in items])

    emit(rows, fmt, table)


def _container_cell(row: dict[str, Any], name: str) -> str:
    """A container in `ps`: its name, with its restarts and its exit code once it will not run again."""
    notes = []
    if row.get("restarts", {}).get(name):
        notes.append(f"{row['restarts'][name]} restarts")
    if name in row.get("exited", {}):
        notes.append(f"exited {row['exited'][name]}")
    if name in row.get("not_ready", ()):
        notes.append("not ready")
    return f"{name} ({', '.join(notes)})" if notes else name


@click.command("logs")
@click.argument("name")
@click.argument("container", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the containers exit.")
def logs(name: str, container: str | None, follow: bool) -> None:
    """Print the output of NAME's containers (or of CONTAINER): stdout to stdout, stderr to stderr."""
    from sandbox.launch import lifecycle

    lifecycle.logs(name, container, follow=follow)


@click.command("exec", cls=PassThroughCommand,
               context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Stream our stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="Run the command on a terminal in the guest (ours in raw mode).")
@click.argument("name")
@click.argument("container")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(interactive: bool, tty: bool, name: str, container: str, command: tuple[str, ...]) -> int:
    """Run COMMAND in CONTAINER of sandbox NAME, if the policy allows it: exec [-it] NAME CONTAINER -- CMD...

    As docker exec: -i streams stdin to the command, -t gives it a terminal (keys, Ctrl-C and Ctrl-D go
    to it as typed; window size changes follow); either needs the policy to allow the container's stdio.
    Exits with the command's exit code (128 + N when signal N ended it); 77 when the policy denies the
    command, 125 when it cannot be run at all (no such sandbox or container, a usage error such as -t
    without a terminal), 126 when it is not executable, 127 when it does not exist
    (docs/cli.md, "Exit codes"). Without -i the process gets no stdin; its output is shown only if the
    policy allows stdio access.
    """
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ExecSetupError("no command given",
                             hint="usage: parma-sandbox exec [-it] NAME CONTAINER -- CMD [ARG...]")
    from sandbox.launch import lifecycle

    try:
        if interactive or tty:
            from sandbox.launch.interactive import exec_interactive  # termios & co.: only -i/-t needs them

            return exec_interactive(name, container, command, tty=tty, stdin=interactive)
        return lifecycle.exec_in(name, container, command)
    except (ExecSetupError, ExecDenied, ExecCannotInvoke, ExecNotFound):
        raise
    except SandboxError as e:   # parma-sandbox's own failure, never one of the command's codes
        raise ExecSetupError(e.message, hint=e.hint) from e


@click.command("inspect")
@click.argument("name")
@click.option("--trace", "trace", is_flag=True,
              help="Print the launch's requests as the agent checked them: a 'policy check' trace "
                   "(docs/policy-trace.md).")
@format_option
def inspect(name: str, trace: bool, fmt: str | None) -> None:
    """Show a sandbox: policy hash, expected measurement, TEE mode, devices, containers."""
    from sandbox.launch import lifecycle

    if trace:
        click.echo(lifecycle.launch_trace(name), nl=False)
        return
    data = lifecycle.inspect(name)

    def table(d: dict[str, Any]) -> str:
        lines = [f"name:         {d['name']}", f"status:       {d['status']}",
                 f"tee:          {d['tee']} ({d['accel']}, backend {d['backend']})",
                 f"policy hash:  {d['policy_hash']}",
                 f"measurement:  {d['expected_measurement'] or '(unknown)'}",
                 f"state:        {d['state_dir']}", "devices:"]
        lines += [f"  {x['serial']:<4} {x['target']:<28} {x['root_hash']}  {x['path']}" for x in d["devices"]]
        lines.append("containers:")
        for c in d["containers"]:
            status = c.get("status", "?")
            notes = [f"{c['restarts']} restarts"] if c.get("restarts") else []
            if c.get("exit_code") is not None:
                notes.append(f"last exit {c['exit_code']}")
            if c.get("ready") is not None and status == "running":
                notes.append("ready" if c["ready"] else "not ready")
            kind = "init " if c.get("init") else ""
            lines.append(f"  {kind}{c['name']:<12} {status}{' (' + ', '.join(notes) + ')' if notes else ''}  "
                         f"{c['image']}  argv={c['argv']}")
            if c.get("error"):
                lines.append(f"    {c['error']}")
            if c.get("probe_error"):
                lines.append(f"    {c['probe_error']}")
        if d.get("restart_policy"):
            lines.append(f"restart policy: {d['restart_policy']}")
        if d["ports"]:
            lines.append("ports:")
            lines += [f"  {p['host_address']}:{p['host_port']} -> {p['port']}/{p['protocol']}" for p in d["ports"]]
        if d.get("agent_error"):
            lines.append(f"agent: {d['agent_error']}")
        return "\n".join(lines)

    emit(data, fmt, table)


@click.command("down")
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help="Take down every sandbox.")
@click.option("-t", "--timeout", default=10.0, show_default=True, help="Seconds to wait for containers to stop.")
@format_option
def down(name: str | None, all_: bool, timeout: float, fmt: str | None) -> None:
    """Stop sandbox NAME (or --all): containers first, then the VM, gracefully and then forced."""
    if bool(name) == all_:
        raise InputError("give a sandbox NAME or --all", hint="'parma-sandbox ps' lists them")
    from sandbox.launch import lifecycle

    results = list(lifecycle.down_all()) if all_ else [lifecycle.down(name or "", timeout=timeout)]
    emit(results, fmt, lambda rs: "\n".join(f"{r['name']}: removed" + ("" if r["graceful"] else " (forced)")
                                            for r in rs))


commands = [up, ps, logs, exec_, inspect, down]
