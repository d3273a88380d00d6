"""`up`: pull -> convert -> policy -> UVM -> launch -> set policy -> mount -> create -> start.

The sandbox's state directory is created (under its lock) before QEMU starts and records every
process as soon as it exists, so a crashed or killed `up` leaves nothing that `ps` cannot show or
`down` cannot clean. A failure after the launch stops the VM and removes the state again.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sandbox.attest import psp_service
from sandbox.fsutil import atomic_write
from sandbox.group import GroupSpec, TeeMode
from sandbox.hostcheck import Accel, CheckReport, Tee, check_host
from sandbox.images.model import ResolvedImage
from sandbox.images.reference import Transport, parse_reference
from sandbox.kbs.client import broker_pins, guest_url
from sandbox.launch import measured, selfcheck
from sandbox.launch.agent_client import AgentClient, wait_for_agent
from sandbox.launch.diagnostics import keep_diagnostics, keep_early_diagnostics
from sandbox.launch.plan import LaunchPlan, build_plan
from sandbox.launch.scratch_disk import SCRATCH_DISK_SERIAL, create_scratch_disk, scratch_vm_disk
from sandbox.launch.supervisor import GroupOutcome, SupervisedGroup, Supervisor, write_plan
from sandbox.launch.trace_record import TraceRecorder
from sandbox.log import log
from sandbox.policy.gen import generate_policy
from sandbox.policy.sources import package_files_volumes, resolve_group_images
from sandbox.progress import step
from sandbox.shared.errors import CheckFailed, InputError, PolicyDenied, SandboxError, StateError
from sandbox.shared.kbs_protocol import FW_CFG_KBS_URL
from sandbox.shared.messages import (
    DnsSettings,
    LoadFragmentRequest,
    MemoryVolumeKind,
    SetPolicyRequest,
    SetupScratchRequest,
)
from sandbox.shared.policy.model import Policy, is_rego, parse_policy
from sandbox.shared.protocol import PORT_COUNT
from sandbox.state import (
    LAUNCHER,
    PSP,
    ContainerRecord,
    ContainerRun,
    DeviceRecord,
    KbsRecord,
    PortRecord,
    ProcessRef,
    SandboxRecord,
    SandboxStatus,
    StateStore,
    UvmRecord,
)
from sandbox.vmm import backend as vmm
from sandbox.vmm.config import (
    ROOT_DISK_SERIAL,
    Backend,
    Disk,
    DiskBus,
    FwCfgFile,
    GuestForward,
    PortForward,
    VmConfig,
)

BOOT_TIMEOUT = float(os.environ.get("PARMA_SANDBOX_BOOT_TIMEOUT", "180"))
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the NUL
# Where the guest reaches `up --dns-server`: an address in QEMU's user network that slirp relays to it
# (DNS over TCP: slirp relays TCP connections only, so resolv.conf gets `options use-vc`).
DNS_FORWARD_ADDRESS = "10.0.2.53"


@dataclass(frozen=True)
class UpOptions:
    name: str | None = None
    policy_file: Path | None = None
    tee: TeeMode | None = None
    backend: Backend = Backend.qemu
    detach: bool = False
    kbs_url: str | None = None          # key broker for the containers' attestation API (docs/kbs.md)
    kbs_keys: tuple[str, ...] = ()      # broker pins for the policy; default: the broker at kbs_url
    identity: measured.IdentityOptions = field(default_factory=measured.IdentityOptions)  # ID block, reference
    # False: launch, set the policy and mount every layer and volume, but create no container. The
    # containerd shim (sandbox/shim) creates and starts them one by one, as containerd asks.
    create_containers: bool = True
    policy_group: str | None = None     # policy_file is an ARM template with several groups: this one's ccePolicy
    fragments: tuple[str, ...] = ()     # signed policy fragments to load: .cose files or registry references
    fetch_fragments: bool = True        # False (--drop-fragments): load only those named in `fragments`
    # A DNS server on the host (address, port) that the containers' resolv.conf points at, through slirp.
    dns_server: tuple[str, int] | None = None
    # Also write the launch's requests, as the agent checked them, here (a `policy check` trace), whether
    # the launch succeeds or not. The sandbox record keeps them either way (`inspect --trace`).
    record_trace: Path | None = None
    # Run QEMU in this network namespace (a path, e.g. a pod's netns): its user-mode network, and the
    # group's port forwards, are then that namespace's (the containerd shim's pods).
    netns: str | None = None


@dataclass
class Timings:
    marks: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    def mark(self, name: str) -> None:
        self.marks[name] = round(time.monotonic() - self.t0, 3)


@dataclass
class Launched:
    name: str
    record: SandboxRecord
    vm: vmm.Vm
    plan: LaunchPlan
    timings: Timings
    runs: dict[str, ContainerRun] = field(default_factory=dict)   # each container's lifecycle so far
    outcome: GroupOutcome | None = None        # done: the group was over before `up` handed it over


def sandbox_paths(state_dir: Path) -> dict[str, Path]:
    return {
        "qmp": state_dir / "qmp.sock",
        "console": state_dir / "console.log",
        "qemu_log": state_dir / "qemu.log",
        "pidfile": state_dir / "qemu.pid",
        "policy": state_dir / "policy",
        "psp": state_dir / "psp.json",
        "psp_socket": state_dir / "psp.sock",
        "kbs_url": state_dir / "kbs_url",
    }


def agent_sockets(state_dir: Path) -> tuple[Path, ...]:
    return tuple(state_dir / f"agent-{i}.sock" for i in range(PORT_COUNT))


def choose_tee(requested: TeeMode, report: CheckReport) -> tuple[Tee, Accel, str]:
    """The TEE and accelerator to use, and a sentence saying why."""
    if requested == TeeMode.sev_snp:
        if report.tee != Tee.sev_snp:
            raise CheckFailed("SEV-SNP was requested but this host cannot launch SEV-SNP guests",
                              hint="\n".join(report.reasons) or "see 'parma-sandbox check'")
        return Tee.sev_snp, Accel.kvm, "sev-snp (requested)"
    accel = report.accel
    if requested == TeeMode.emulated:
        return Tee.emulated, accel, f"emulated (requested), {accel.value}"
    if report.tee == Tee.sev_snp:
        return Tee.sev_snp, Accel.kvm, "auto -> sev-snp (this host supports it)"
    why = "; ".join(report.reasons) or "no SEV-SNP"
    return Tee.emulated, accel, f"auto -> emulated with {accel.value} ({why})"


def policy_bytes(spec: GroupSpec, images: Mapping[str, ResolvedImage], volume_hashes: Mapping[str, str],
                 policy_file: Path | None, key_brokers: Sequence[str] = (), policy_group: str | None = None) -> bytes:
    """The exact policy bytes to launch with: a supplied policy (JSON, or ACI's Rego text from a Rego
    file, its base64 or an ARM template's ccePolicy, docs/aci.md), else the one generated for the group."""
    if policy_file is not None:
        # ARM and Rego reading: only for supplied policies
        from sandbox.aci.ccepolicy import policy_file_bytes

        return policy_file_bytes(Path(policy_file), policy_group)
    with step("Generate the execution policy"):
        return generate_policy(spec, images, volume_hashes=dict(volume_hashes), key_brokers=key_brokers)


def load_fragments_plan(spec: GroupSpec, policy: Policy, opts: UpOptions) -> Any:
    """Which fragments to load (sandbox/aci/fragment_sources.py); notes on imports left without one."""
    # registry and crypto: only when fragments are in play
    from sandbox.aci.fragment_sources import plan_fragments

    images = [c.image for c in spec.containers + spec.init_containers
              if parse_reference(c.image, base_dir=spec.base_dir).transport == Transport.registry]
    with step("Find the policy's fragments"):
        plan = plan_fragments(policy, opts.fragments, list(dict.fromkeys(images)), base_dir=spec.base_dir,
                              fetch=opts.fetch_fragments)
    for note in plan.notes:
        log.warning("%s", note)
    return plan


def _check_socket_paths(state_dir: Path) -> None:
    longest = max([*agent_sockets(state_dir), state_dir / "qmp.sock"], key=lambda p: len(str(p)))
    if len(os.fsencode(longest)) > SOCKET_PATH_MAX:
        raise InputError(f"the state directory {state_dir} is too deep for unix sockets ({longest})",
                         hint="set PARMA_SANDBOX_RUNTIME (or XDG_RUNTIME_DIR) to a shorter directory")


def dns_override(plan: LaunchPlan, server: tuple[str, int]) -> LaunchPlan:
    """The plan with the containers resolving names through `server` on the host (`up --dns-server`): the
    group's search domains and options stay, the name server is slirp's relay to it, over TCP."""
    dns = plan.network.dns if plan.network is not None else None
    options = tuple(o for o in (dns.options if dns else ()) if o != "use-vc") + ("use-vc",)
    return plan.with_dns(DnsSettings((DNS_FORWARD_ADDRESS,), dns.search if dns else (), options))


def _vm_config(name: str, spec: GroupSpec, plan: LaunchPlan, uvm: Any, tee: Tee, accel: Accel,
               state_dir: Path, identity: measured.LaunchIdentity, kbs_url: str | None = None,
               dns_server: tuple[str, int] | None = None, netns: str | None = None) -> VmConfig:
    paths = sandbox_paths(state_dir)
    # Layers and files volumes are SCSI LUNs (hundreds fit; the root disk stays the first virtio-blk disk, so
    # the measured command line does not depend on them); the scratch is a writable virtio-blk disk.
    disks = [Disk(Path(uvm.rootfs), ROOT_DISK_SERIAL)] + [Disk(d.path, d.serial, bus=DiskBus.scsi) for d in plan.disks]
    if plan.scratch_gib:
        disks.append(scratch_vm_disk(create_scratch_disk(state_dir, plan.scratch_gib)))
    forwards = tuple(PortForward(p.port, p.host_port, p.protocol.lower(), p.host_address) for p in spec.ports)
    guest_forwards = (GuestForward(DNS_FORWARD_ADDRESS, 53, *dns_server),) if dns_server else ()
    fw_cfg: tuple[FwCfgFile, ...] = ()
    psp_socket = None
    if tee != Tee.sev_snp:
        # Emulation: the emulated PSP signs reports with HOST_DATA = the policy hash and MEASUREMENT = the
        # predicted launch measurement (sandbox/launch/measured.py). It runs on the host (its key never enters
        # the guest, as on hardware); the guest reaches it through the port org.parma.psp.
        measured.write_emulated_psp(identity, paths["psp"])
        psp_socket = paths["psp_socket"]
    if kbs_url:
        # Where the key broker is, as the guest sees it: a hint, not trusted (docs/kbs.md).
        atomic_write(paths["kbs_url"], guest_url(kbs_url).encode())
        fw_cfg += (FwCfgFile(FW_CFG_KBS_URL, paths["kbs_url"]),)
    return VmConfig(
        name=name, tee=tee, accel=accel, vcpus=spec.resources.vcpus, memory_mib=spec.resources.memory_mib,
        kernel=Path(uvm.kernel), cmdline=str(uvm.cmdline), disks=tuple(disks),
        agent_sockets=agent_sockets(state_dir), console_log=paths["console"], qmp_socket=paths["qmp"],
        forwards=forwards, guest_forwards=guest_forwards, fw_cfg=fw_cfg, psp_socket=psp_socket, snp=identity.snp,
        initrd=getattr(uvm, "initrd", None), pidfile=paths["pidfile"], netns=Path(netns) if netns else None,
    )


def _setup_guest(client: AgentClient, policy: bytes, plan: LaunchPlan, timings: Timings, *,
                 fragments: Sequence[Any] = (), verified: Callable[[], object] = lambda: None) -> dict[str, Any]:
    """set_policy, fragments, the layer and volume mounts, the encrypted scratch and the group's names.
    Returns per-step results.

    `verified()` returns once the launch self-check has passed (it raises if it failed): it is called
    before a secret volume is made, and the caller calls it before the first container is created."""
    results: dict[str, Any] = {"containers": {}}
    with step("Set the execution policy"):
        results["policy"] = client.call(SetPolicyRequest(policy)).to_json()
    if fragments:
        with step("Load policy fragments", total=len(fragments)) as task:
            loaded = []
            for f in fragments:
                try:
                    loaded.append(client.call(LoadFragmentRequest(f.envelope)).to_json() | {"origin": f.origin})
                except PolicyDenied as e:
                    raise PolicyDenied(f"fragment {f.origin}: {e.message}",
                                       hint="the policy's fragment imports decide which fragments load "
                                            "('parma-sandbox policy fragment verify FILE --policy POLICY')") from None
                task.advance()
        results["fragments"] = loaded
    with step("Mount layers and volumes", total=len(plan.disks) + len(plan.memory_volumes)) as task:
        devices = {}
        for d in plan.disks:
            r = client.call(d.mount)
            if r.root_hash != d.root_hash:
                # The policy already decided; this only catches a host-side cache mix-up early.
                log.warning("device %s: the guest derived root hash %s, the host expected %s",
                            d.serial, r.root_hash, d.root_hash)
            devices[d.target] = r.to_json()
            task.advance()
        for v in plan.memory_volumes:
            if v.kind == MemoryVolumeKind.secret:
                verified()      # secrets go only to a verified guest
            client.call(v)
            task.advance()
        results["devices"] = devices
    timings.mark("mounted")
    if plan.scratch_gib:
        with step(f"Set up the encrypted scratch ({plan.scratch_gib} GiB)"):
            results["scratch"] = client.call(SetupScratchRequest(SCRATCH_DISK_SERIAL), timeout=300).to_json()
        timings.mark("scratch")
    if plan.network is not None:
        client.call(plan.network)
    verified()                  # nothing runs before the launch is verified (containers start after this)
    return results


def _start_group(client: AgentClient, plan: LaunchPlan,
                 timings: Timings) -> tuple[dict[str, ContainerRun], GroupOutcome, dict[str, Any]]:
    """The group's first run: the init containers in order, each to completion, then every container
    started (sandbox/launch/supervisor.py). Returns early when the group is over already, or when an init
    container failed and waits to be restarted (its back-off is the supervisor's to sit out)."""
    def notify(runs: Any, event: str | None) -> None:
        if event:
            log.info("%s", event)
        for name, r in runs.items():
            if r.status != "waiting" and f"started:{name}" not in timings.marks:
                timings.mark(f"started:{name}")

    supervisor = Supervisor(client, SupervisedGroup.of(plan), notify=notify, clock=time.time)
    with step(f"Start {len(plan.all_containers)} container(s)"):
        outcome = supervisor.run(until_started=True)
    return supervisor.runs, outcome, supervisor.start_results


def _await_selfcheck(pending: selfcheck.PendingSelfCheck) -> selfcheck.SelfCheck:
    """The passed launch self-check (raises its failure), with a progress step while it still runs."""
    if pending.done:
        return pending.result()
    with step("Verify the launch (a fresh attestation report)"):
        return pending.result()


def up(spec: GroupSpec, opts: UpOptions, store: StateStore | None = None) -> Launched:
    """Bring the group up (detached semantics: returns once every container has started)."""
    store = store or StateStore()
    timings = Timings()
    name = opts.name or spec.name
    runs: dict[str, ContainerRun] = {}
    outcome: GroupOutcome | None = None
    # Under --debug a failure before the state directory exists keeps what is known too (diagnostics.py).
    try:
        requested = opts.tee or spec.tee
        with step("Probe host"):
            report = check_host()
        tee, accel, why = choose_tee(requested, report)
        log.info("tee: %s", why)
        timings.mark("probed")

        images = resolve_group_images(spec)
        timings.mark("images")
        volumes = package_files_volumes(spec)
        if opts.policy_file is not None and opts.kbs_keys:
            raise InputError("--kbs-key pins brokers in a generated policy; with --policy the file's key_brokers apply")
        pins = broker_pins(opts.kbs_url, opts.kbs_keys) if opts.policy_file is None else []
        policy = policy_bytes(spec, images, {k: h for k, (h, _) in volumes.items()}, opts.policy_file, pins,
                              opts.policy_group)
        policy_hash = hashlib.sha256(policy).digest()
        # A supplied policy decides how the launcher asks for mounts (ACI's sources where it names them) and which
        # fragments to load; it is read here too so that a bad one fails before a VM starts.
        supplied = parse_policy(policy, str(opts.policy_file)) if opts.policy_file is not None else None
        fragments = (load_fragments_plan(spec, supplied, opts).load
                     if supplied is not None and (supplied.fragments or opts.fragments) else ())
        if opts.fragments and supplied is None:
            raise InputError("--fragment needs a policy that imports fragments (--policy, or a template's ccePolicy)")
        plan = build_plan(spec, images, volumes, policy=supplied)
        if opts.dns_server is not None:
            plan = dns_override(plan, opts.dns_server)
        from sandbox.uvm.build import ensure_uvm  # heavy (sev-snp-measure); only `up` needs it

        with step("Prepare the UVM"):
            uvm = ensure_uvm()
        identity = measured.prepare(tee, uvm, policy, spec.resources.vcpus, opts.identity)
        measurement = identity.measurement.hex() if identity.measurement else None
        timings.mark("prepared")
    except BaseException as e:
        keep_early_diagnostics(name, e, timings.marks)
        raise

    with store.lock(name) as state_dir:
        existing = store.load(name)
        if existing is not None:
            if existing.alive():
                raise InputError(f"a sandbox named {name!r} already exists ({existing.status})",
                                 hint=f"'parma-sandbox down {name}' first, or choose another --name")
            store.remove(name)
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _check_socket_paths(state_dir)
        for sock in agent_sockets(state_dir):
            sock.unlink(missing_ok=True)
        paths = sandbox_paths(state_dir)
        atomic_write(paths["policy"].with_suffix(".rego" if is_rego(policy) else ".json"), policy, 0o600)
        record = SandboxRecord(
            name=name, status=SandboxStatus.starting, processes={LAUNCHER: ProcessRef.of(os.getpid())},
            group=spec.name, group_file=str(spec.base_dir), tee=tee.value, accel=accel.value,
            backend=opts.backend.value, policy_hash=policy_hash.hex(), measurement=measurement,
            detached=opts.detach,
            ports=tuple(PortRecord(p.port, p.host_port, p.protocol, p.host_address) for p in spec.ports),
            devices=tuple(DeviceRecord(d.serial, str(d.path), d.root_hash, d.target) for d in plan.disks),
            containers=tuple(ContainerRecord(c.name, spec.container(c.name).image, c.create.argv, c.create.env,
                                             c.create.working_dir, c.stdio, c.exec_processes, init=c.init)
                             for c in plan.all_containers),
            restart_policy=plan.restart_policy.value,
            uvm=UvmRecord(str(uvm.kernel), str(uvm.rootfs), str(uvm.cmdline)),
            kbs=KbsRecord(opts.kbs_url, guest_url(opts.kbs_url), tuple(pins)) if opts.kbs_url else None,
            launch=identity.to_json(),
        )
        store.save(record)
        recorder = TraceRecorder(secure_env=_secure_env(spec))
        vm: vmm.Vm | None = None
        try:
            cfg = _vm_config(name, spec, plan, uvm, tee, accel, state_dir, identity, opts.kbs_url, opts.dns_server,
                             opts.netns)
            measured.check_config(identity, cfg)
            if cfg.psp_socket is not None:
                # Started first: it connects as soon as QEMU has made the socket, well before the guest asks.
                cfg.psp_socket.unlink(missing_ok=True)
                record = record.with_process(PSP, psp_service.spawn(cfg.psp_socket, paths["psp"],
                                                                    state_dir / psp_service.LOG_FILE))
                store.save(record)
            with step(f"Launch the UVM ({tee.value}, {accel.value}, {opts.backend.value})"):
                vm = vmm.launch(cfg, opts.backend, log_file=paths["qemu_log"], attached=not opts.detach)
            ref = vm.process()
            if ref is not None:
                record = record.with_process("qemu", ref)
            record = replace(record, vm=vm.record())
            store.save(record)
            timings.mark("launched")
            with step("Wait for the guest agent"):
                wait_for_agent(cfg.agent_sockets, timeout=BOOT_TIMEOUT, alive=vm.alive, console=cfg.console_log)
            timings.mark("agent")
            with AgentClient.connect(cfg.agent_sockets, recorder=recorder) as client:
                # The launch self-check runs on a port of its own while the policy is set and the layers
                # and volumes are mounted (none of that runs anything or hands the guest a secret), so
                # the guest's work for the report overlaps the host's and the set-up's. It must pass before
                # a secret volume is made and before the first container; a failure stops the VM before
                # anything has started (docs/attestation.md).
                pending = selfcheck.start(cfg.agent_sockets, identity, record_to=state_dir / "selfcheck.json",
                                          on_pass=lambda: timings.mark("verified"))
                try:
                    results = _setup_guest(client, policy, plan, timings, fragments=fragments,
                                           verified=lambda: _await_selfcheck(pending))
                    check = _await_selfcheck(pending)       # nothing runs before the launch is verified
                except BaseException:
                    if not pending.done:
                        try:
                            vm.stop(3)  # ends the self-check's call too (and below, stopping is a no-op)
                        except SandboxError:
                            pass
                        pending.abandon(10)
                    raise
                record = replace(record, selfcheck=check.summary())
                if opts.create_containers:
                    write_plan(state_dir, SupervisedGroup.of(plan))
                    runs, outcome, results["containers"] = _start_group(client, plan, timings)
                    record = replace(record, runs=tuple(runs.values()))
            record = replace(record, status=SandboxStatus.running, trace=recorder.lines(),
                             startup={"timings": timings.marks, "containers": results["containers"],
                                      "fragments": results.get("fragments", []), "scratch": results.get("scratch")})
            store.save(record)
            keep_diagnostics(state_dir, record)
            _write_trace(recorder, opts.record_trace)
        except BaseException as e:
            keep_diagnostics(state_dir, record, error=e)
            _write_trace(recorder, opts.record_trace, failed=True)
            if vm is not None:
                try:
                    vm.stop(3)
                except SandboxError as e:
                    log.warning("could not stop the VM: %s", e)
            if (psp := record.processes.get(PSP)) is not None and psp.alive():
                os.kill(psp.pid, signal.SIGTERM)   # it would otherwise wait for a VM that never comes
            store.remove(name)
            raise
    return Launched(name, record, vm, plan, timings, runs, outcome)


def _secure_env(spec: GroupSpec) -> set[str]:
    """The env entries whose values are secret (secureValue): a trace shows them as NAME=<secure>."""
    return {f"{v.name}={v.value}" for c in spec.containers for v in c.env if v.secure}


def _write_trace(recorder: TraceRecorder, path: Path | None, *, failed: bool = False) -> None:
    """--record-trace: write what the agent checked so far. Never masks the launch's own error."""
    if path is None or (failed and not recorder.lines()):
        return   # nothing reached the agent: there is nothing to replay
    try:
        recorder.write(path)
    except SandboxError as e:
        log.warning("could not write the trace: %s", e)
        return
    if failed:
        log.info("the requests sent before the failure are in %s: 'parma-sandbox policy check POLICY %s' "
                 "replays them without a VM (docs/policy-trace.md)", path, path)
    else:
        log.info("trace of the launch's requests written to %s (docs/policy-trace.md)", path)


def load_running(name: str, store: StateStore | None = None) -> SandboxRecord:
    store = store or StateStore()
    record = store.require(name)
    if record.vm is None:
        raise StateError(f"sandbox {name!r} is still starting (or its launch failed)",
                         hint=f"'parma-sandbox down {name}' cleans it up")
    return record
