"""`parma-sandbox kbs ...` (the key broker) and `parma-sandbox secret ...` (its store)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from sandbox.cli.common import OutputFormat, emit, format_option, info, render_table, resolve_format
from sandbox.kbs.audit import AuditLog, Event
from sandbox.kbs.reference import DEFAULT_MANIFEST, manifest_measurements
from sandbox.kbs.server import DEFAULT_MAX_CONNECTIONS, make_server, parse_listen
from sandbox.kbs.store import KbsStore, ReleasePolicy, check_host_data, default_store, new_secret
from sandbox.shared.errors import CheckFailed, InputError
from sandbox.shared.kbs_protocol import MAX_SECRET_SIZE

DEFAULT_LISTEN = "127.0.0.1:8300"

store_option = click.option(
    "--store", "store_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
    help="Key broker store directory (default: $PARMA_SANDBOX_KBS_STORE, else ~/.local/share/parma-sandbox/kbs).")


def _store(store_dir: Path | None, *, create: bool = True) -> KbsStore:
    return KbsStore.open(store_dir or default_store(), create=create)


@click.group("kbs")
def kbs() -> None:
    """The key broker: releases secrets only to attested container groups."""


@kbs.command("serve")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT to listen on (port 0: any free one).")
@store_option
@click.option("--challenge-ttl", type=click.FloatRange(1, 3600), default=60.0, show_default=True,
              help="Seconds a challenge nonce stays valid.")
@click.option("--max-connections", type=click.IntRange(1, 4096), default=DEFAULT_MAX_CONNECTIONS, show_default=True,
              help="Requests handled at once; more get 503.")
@click.option("--fetch-certs", is_flag=True, help="Fetch VCEKs missing from the evidence from AMD's KDS.")
@format_option
def serve(listen: str, store_dir: Path | None, challenge_ttl: float, max_connections: int, fetch_certs: bool,
          fmt: str | None) -> None:
    """Serve the key broker over HTTP until interrupted (SIGINT/SIGTERM)."""
    address = parse_listen(listen)
    store = _store(store_dir)
    server = make_server(store, address, challenge_ttl=challenge_ttl, fetch_certs=fetch_certs,
                         max_connections=max_connections)
    if not ipaddress.ip_address(address[0]).is_loopback:
        info(f"warning: listening on {address[0]}, reachable from other machines; the protocol needs no "
             "confidentiality from the network, but anyone there can ask for challenges")
    service = server.service
    service.audit.append(Event.SERVE, url=server.url, broker_key=service.pin, store=str(store.root))
    doc = {"url": server.url, "public_key_sha256": service.pin, "store": str(store.root),
           "secrets": len(store.names())}
    if resolve_format(fmt) == OutputFormat.json:
        # One line, printed once the socket listens: a supervisor can read it and start using the broker.
        click.echo(json.dumps(doc, sort_keys=True))
    else:
        click.echo(f"kbs: listening on {doc['url']}\nkbs: broker key sha256 {doc['public_key_sha256']}\n"
                   f"kbs: store {doc['store']} ({doc['secrets']} secrets)")
    sys.stdout.flush()

    def stop(_signum: int, _frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
        info("kbs: stopped")


@kbs.command("key")
@store_option
@format_option
def key(store_dir: Path | None, fmt: str | None) -> None:
    """Print the broker's public key and its pin (what `policy gen --kbs-key` and `up --kbs-key` take)."""
    from cryptography.hazmat.primitives import serialization  # host-only, CLI-local

    store = _store(store_dir)
    pem = store.broker_key().public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    emit({"public_key_sha256": store.broker_pin(), "public_key_pem": pem}, fmt,
         lambda d: f"{d['public_key_sha256']}\n{d['public_key_pem'].rstrip()}")


@kbs.command("audit")
@store_option
@click.option("--verify", "check", is_flag=True,
              help="Check the hash chain and its head (nothing removed, inserted, edited or cut off); exit 1 if not.")
@click.option("--tail", type=click.IntRange(0), default=0, help="Only the last N records (0: all).")
@format_option
def audit(store_dir: Path | None, check: bool, tail: int, fmt: str | None) -> None:
    """Show the audit log (every release and refusal, with the reason)."""
    log = AuditLog(_store(store_dir, create=False).audit_path)
    if check:
        result = log.verify()
        head = result.head
        emit({"records": result.records, "intact": result.intact, "problems": list(result.problems),
              "head": None if head is None else {"records": head.records, "size": head.size, "last": head.last}},
             fmt, lambda d: f"{d['records']} records, chain {'intact' if d['intact'] else 'BROKEN'}"
                            + "".join(f"\n  {p}" for p in d["problems"]))
        if not result.intact:
            raise CheckFailed(f"the audit log is not intact ({len(result.problems)} problem"
                              f"{'s' if len(result.problems) != 1 else ''})")
        return
    records = list(log.records())
    if tail:
        records = records[-tail:]
    if resolve_format(fmt).value == "json":
        emit(records, fmt, str)
        return
    rows = [(r.get("time", ""), r.get("event", ""), r.get("secret", ""), r.get("peer", ""),
             str(r.get("reason", r.get("url", "")))[:120]) for r in records]
    emit(records, fmt, lambda _d: render_table(["time", "event", "secret", "peer", "reason"], rows))


@click.group("secret")
def secret() -> None:
    """Secrets held by the key broker, each with its release policy."""


def _read_value(path: Path) -> bytes:
    try:
        data = sys.stdin.buffer.read(MAX_SECRET_SIZE + 1) if str(path) == "-" else path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read secret file {path}: {e.strerror}") from None
    return data


def _policy_hashes(policy_files: tuple[Path, ...], hashes: tuple[str, ...]) -> list[str]:
    out = list(hashes)
    from sandbox.aci.ccepolicy import policy_file_bytes  # ARM and Rego reading, when asked for

    for p in policy_files:
        # ACI's Rego as ACI hashes it (also from its base64 or an ARM template's ccePolicy), JSON as it is
        out.append(hashlib.sha256(policy_file_bytes(p)).hexdigest())
    return out


@secret.command("put")
@click.argument("name")
@click.option("--file", "file", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The secret's value ('-' reads stdin); at most 64 KiB.")
@click.option("--policy", "policy_files", type=click.Path(path_type=Path, dir_okay=False), multiple=True,
              help="Release only to groups running this execution policy (its SHA-256 is HOST_DATA; an ARM template: "
                   "its ccePolicy's). Repeatable.")
@click.option("--policy-hash", "policy_hashes", multiple=True,
              help="Release only to this HOST_DATA (64 hex digits, as 'policy hash' prints). Repeatable.")
@click.option("--measurement", "measurements", multiple=True,
              help="Release only to a UVM with this launch MEASUREMENT (96 hex digits). Repeatable. "
                   "Default: every measurement in the UVM manifest.")
@click.option("--uvm-manifest", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The UVM manifest whose measurements bind the secret (default: build/uvm/manifest.json of "
                   "this checkout, which 'parma-sandbox build uvm' writes).")
@click.option("--any-uvm", is_flag=True,
              help="Release to ANY UVM whose HOST_DATA matches, whatever kernel and rootfs it runs. Rarely right: "
                   "a host can boot its own UVM with your policy's HOST_DATA.")
@click.option("--min-tcb", help="Minimum REPORTED_TCB: bl=N,tee=N,snp=N,ucode=N[,fmc=N] or 16 hex digits. "
                                "Required unless --allow-emulated.")
@click.option("--allow-emulated", is_flag=True,
              help="Accept evidence from this installation's emulated PSP (laptops, CI). Never for real secrets.")
@click.option("--replace", is_flag=True, help="Overwrite an existing secret of that name.")
@store_option
@format_option
def put(name: str, file: Path, policy_files: tuple[Path, ...], policy_hashes: tuple[str, ...],
        measurements: tuple[str, ...], uvm_manifest: Path | None, any_uvm: bool, min_tcb: str | None,
        allow_emulated: bool, replace: bool, store_dir: Path | None, fmt: str | None) -> None:
    """Store secret NAME with its release policy (written 0600, atomically).

    The secret goes only to evidence for the given execution policy (HOST_DATA) from a UVM whose launch
    measurement is one of its reference values (the UVM manifest's, by default), with at least --min-tcb,
    never a debug guest, at VMPL 0."""
    if not policy_files and not policy_hashes:
        raise InputError("a secret needs a release policy: pass --policy FILE or --policy-hash HEX",
                         hint="'parma-sandbox policy gen group.json -o policy.json' writes the policy")
    host_data = check_host_data(_policy_hashes(policy_files, policy_hashes))
    if any_uvm and (measurements or uvm_manifest):
        raise InputError("--any-uvm contradicts --measurement and --uvm-manifest",
                         hint="bind the secret to measurements, or (rarely) to any UVM, not both")
    source = "--measurement"
    if not measurements and not any_uvm:
        manifest = uvm_manifest or DEFAULT_MANIFEST
        try:
            measurements = manifest_measurements(manifest)
        except InputError as e:
            raise InputError(f"secret {name!r} must be bound to the UVM it may go to, and {e.message}",
                             hint=f"{e.hint}; HOST_DATA alone would let a host's own UVM have it (say --any-uvm "
                                  "if that is really meant)") from None
        source = str(manifest)
    if min_tcb is None and not allow_emulated:
        raise InputError(f"secret {name!r} needs --min-tcb: SEV-SNP evidence is trusted only from firmware at "
                         "least that recent",
                         hint="e.g. --min-tcb bl=7,tee=0,snp=14,ucode=72 ('parma-sandbox attest display' shows a "
                              "report's REPORTED_TCB); --min-tcb 0 accepts any")
    policy = ReleasePolicy(host_data, tuple(measurements), min_tcb, allow_emulated, any_uvm)
    record = new_secret(name, _read_value(file), policy)
    store = _store(store_dir)
    store.put(record, replace=replace)
    AuditLog(store.audit_path).append(Event.PUT, secret=name, secret_sha256=record.sha256, replace=replace,
                                      release_policy=policy.to_dict())
    uvm = ("ANY UVM with that HOST_DATA" if any_uvm
           else f"{len(policy.measurement)} UVM measurement{'s' if len(policy.measurement) != 1 else ''} "
                f"(from {source})")
    emit(_summary(record), fmt, lambda d: f"stored {d['name']} ({d['size']} bytes, sha256 {d['sha256']}); "
                                          f"released to {uvm}")
    if any_uvm:
        info("warning: --any-uvm: a host that boots its own kernel and rootfs with this HOST_DATA gets this secret")
    if allow_emulated:
        info("note: this secret will also be released to EMULATED evidence (no AMD hardware vouches for it)")
        if min_tcb is None:
            info("note: without --min-tcb it is released to emulated evidence only, never to SEV-SNP hardware")


def _summary(record: Any) -> dict[str, Any]:
    return {"name": record.name, "size": len(record.value), "sha256": record.sha256, "created": record.created,
            "release_policy": record.policy.to_dict()}


@secret.command("list")
@store_option
@format_option
def list_secrets(store_dir: Path | None, fmt: str | None) -> None:
    """List stored secrets and their release policies (never the values)."""
    records = [_summary(r) for r in _store(store_dir).list()]

    def uvm(policy: dict[str, Any]) -> str:
        if policy["any_uvm"]:
            return "ANY (--any-uvm)"
        return str(len(policy["measurement"])) if policy["measurement"] else "NONE: re-store (HOST_DATA only)"

    def table(items: list[dict[str, Any]]) -> str:
        rows = [(d["name"], d["size"], ", ".join(h[:16] for h in d["release_policy"]["host_data"]),
                 uvm(d["release_policy"]), d["release_policy"]["min_tcb"] or "-",
                 "yes" if d["release_policy"]["allow_emulated"] else "no", d["created"]) for d in items]
        return render_table(["name", "bytes", "host_data", "uvm measurements", "min tcb", "emulated", "created"],
                            rows)

    emit(records, fmt, table)


@secret.command("rm")
@click.argument("name")
@store_option
def rm(name: str, store_dir: Path | None) -> None:
    """Remove secret NAME."""
    store = _store(store_dir, create=False)
    store.remove(name)
    AuditLog(store.audit_path).append(Event.REMOVE, secret=name)
    info(f"removed {name}")


commands = [kbs, secret]
