"""The agent's operations: one method per protocol op, each enforced by the policy where it changes state.

Requests arrive typed (sandbox/shared/messages.py) and are dispatched on their type; each method
builds the policy engine's typed input from the request and what the guest finds out itself
(sandbox/shared/policy/inputs.py), and returns a typed result.

Guest-side invariants hold regardless of the policy (the host chooses none of these): mount targets
live in fixed directories, a container's rootfs is its own overlay, bind sources are group volumes,
the OCI spec is written here without hooks, and stdio is readable only when the policy allowed it.
"""

from __future__ import annotations

import gc
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, assert_never

from sandbox.guest import sysapi
from sandbox.guest.gate import NO_POLICY_REASON, Gate
from sandbox.guest.hostdata import HostData, read_host_data, uptime
from sandbox.guest.lazy import LazyModule
from sandbox.shared import messages as M
from sandbox.shared import protocol as P
from sandbox.shared.codec import Message, shown
from sandbox.shared.errors import AttestationError, CheckFailed, InputError
from sandbox.shared.protocol import ErrorCode, ProtocolError

if TYPE_CHECKING:
    import shutil
    from pathlib import Path

    from sandbox.guest import blockdev, etcfiles, oci, runtime, snp_report, terminal, users
    from sandbox.shared import agent_rules, kbs_protocol, seccomp
    from sandbox.shared.policy import defaults, inputs
    from sandbox.shared.policy.engine import Decision
else:
    def Path(*parts: Any) -> Any:  # stands for pathlib.Path (see below)
        """pathlib.Path(*parts). pathlib (which loads urllib.parse and ipaddress) is imported by the first
        request that makes a path, after "ready": the requests served before a policy make none."""
        from pathlib import Path as path_type

        return path_type(*parts)

    # Loaded on first use (see agent.py: after "ready", in the order `up` needs them): device-mapper and
    # verity with the first mount, the report backends and their crypto with the first report.
    blockdev = LazyModule("sandbox.guest.blockdev")
    snp_report = LazyModule("sandbox.guest.snp_report")
    kbs_protocol = LazyModule("sandbox.shared.kbs_protocol")
    # Interactive execs and seccomp profiles (socket, pathlib, hashlib) with their first use.
    terminal = LazyModule("sandbox.guest.terminal")
    seccomp = LazyModule("sandbox.shared.seccomp")
    # What containers need (the runtime and its process reaper, the OCI spec, users, the engine's typed
    # inputs, the guest-side path rules, the /etc files and the policy's defaults): no request served
    # before a policy uses them. The agent preloads them after "ready" (agent.py).
    runtime = LazyModule("sandbox.guest.runtime")
    etcfiles = LazyModule("sandbox.guest.etcfiles")
    defaults = LazyModule("sandbox.shared.policy.defaults")
    oci = LazyModule("sandbox.guest.oci")
    users = LazyModule("sandbox.guest.users")
    inputs = LazyModule("sandbox.shared.policy.inputs")
    agent_rules = LazyModule("sandbox.shared.agent_rules")
    shutil = LazyModule("shutil")   # bz2 and lzma come with it

AGENT_VERSION = "1"
ATTEST_API_START_TIMEOUT = 60.0   # seconds; the agent starts the API when a container first binds it
NETWORK_WAIT_S = 60.0              # seconds a create_container waits for the network the agent sets up
# What the host may ask before a policy is set: nothing that touches guest state.
OPEN_REQUESTS = (M.PingRequest, M.SetPolicyRequest, M.GetReportRequest, M.PoweroffRequest)
# Requests that block waiting (for output, for a process) and must not hold the state lock, and the
# keystrokes of interactive sessions, which must not wait behind a slow create on another port.
UNLOCKED_REQUESTS = (M.ReadOutputRequest, M.WaitProcessRequest, M.PingRequest, M.GetReportRequest,
                     M.PoweroffRequest, M.ShutdownContainerRequest, M.WatchContainersRequest,
                     M.WriteStdinRequest, M.CloseStdinRequest, M.ResizeTerminalRequest)
_base_mounts: tuple[M.ContainerMount, ...] | None = None
MAX_WAIT_PROCESS_S = 600.0
MAX_READ_WAIT_S = 60.0
MAX_READ_BYTES = 512 * 1024
MAX_SHUTDOWN_S = 300.0
MAX_WATCH_S = 60.0
OUTPUT_DRAIN_S = 2.0     # how long a finished process's terminal may keep delivering buffered output
MAX_SECRET_ITEMS = 1024

Result = Message | M.JsonObject


def base_mounts() -> tuple[M.ContainerMount, ...]:
    """The mounts the runtime gives every container, as the engine sees them (oci.base_mounts in the
    spec); made with the first container, as oci loads after "ready"."""
    global _base_mounts
    if _base_mounts is None:
        _base_mounts = tuple(M.ContainerMount(m["destination"], m["source"], m["type"], tuple(m["options"]))
                             for m in oci.base_mounts())
    return _base_mounts


def aci_volumes_prefix() -> str:
    """ACI's volume sources, `sandbox:///tmp/atlas/<kind>/<volume>` in its policies, in the guest."""
    return f"{defaults.DEFAULT_SANDBOX_DIR}/{defaults.ACI_VOLUMES_SUBDIR}/"


def _err(code: ErrorCode, message: str, **details: Any) -> ProtocolError:
    return ProtocolError(code, message, details=details)


@dataclass
class Overlay:
    container_id: str
    target: Path
    layer_paths: tuple[str, ...]
    writable: Path              # its own upper and work directories, on the container's scratch
    served: bool = False        # a container was created on it: one incarnation per overlay


class AgentService:
    def __init__(self, *, host_data: Callable[[], HostData] = read_host_data, hostname: str = "parma",
                 runtime_logging: Callable[[str], None] | None = None) -> None:
        self.gate = Gate(host_data)
        self.hostname = hostname
        self.started = time.monotonic()
        self._lock = threading.RLock()
        self.devices: dict[str, blockdev.VerityMount] = {}      # target -> mount
        self.scratch: dict[str, Path] = {}                      # container id -> scratch dir
        self.overlays: dict[str, Overlay] = {}                  # target -> overlay
        self.volumes: dict[str, Path] = {}                      # volume name -> dir
        self.volume_kinds: dict[str, M.MemoryVolumeKind] = {}   # volume name -> kind (create_volume's)
        self.containers: dict[str, runtime.RuntimeContainer] = {}
        self._network: etcfiles.NameFiles | None = None        # what the containers' /etc files say
        self.group_scratch: Any = None                          # sandbox.guest.scratch.Scratch, once set up
        self._scratch_dirs: dict[str, Path] = {}                # container id -> its directory on the scratch
        self._scratch_counter = 0
        self._overlay_counter = 0                               # names each overlay's writable directory
        self._changes = threading.Condition()                   # watch_containers waits on it
        self._generation = 0
        self._dm_counter = 0
        self._console = runtime_logging or (lambda msg: None)
        self.verbose_logging = False   # the policy's allow_runtime_logging (ep runtime_logging) turns it on
        self.poweroff_hook: Callable[[], None] = sysapi.power_off
        self.attest_api_started = threading.Event()   # set by the agent once the API socket is up (or failed)
        # Starts the attestation API (the agent's hook; idempotent): on first use, as no container can
        # reach it before a create_container binds it, and most groups never do.
        self.start_attest_api: Callable[[], None] = lambda: None
        # Set once the guest's network is up; containers share it. The agent configures it just after
        # "ready" (clearing this first); a service on its own, as in tests, has nothing to wait for.
        self.network_ready = threading.Event()
        self.network_ready.set()

    @property
    def network(self) -> etcfiles.NameFiles:
        """What the containers' /etc files say: the hostname alone until set_group_network (made on first
        use: the /etc files' module loads after "ready")."""
        if self._network is None:
            self._network = etcfiles.NameFiles(self.hostname)
        return self._network

    @network.setter
    def network(self, files: etcfiles.NameFiles) -> None:
        self._network = files

    # -- dispatch -------------------------------------------------------------------------------

    def handle(self, request: M.AgentRequest) -> Result:
        """Serve one typed request; raises ProtocolError when it cannot be served."""
        return self._serve(request)

    def answer(self, request: M.AgentRequest) -> Result | P.CheckedResult:
        """handle() for the frame loop: the policy checks the request went through travel with the reply
        (P.CheckedResult, ProtocolError.policy), and the host's trace of them is what `policy check`
        replays (docs/policy-trace.md)."""
        with self.gate.recording() as checks:
            try:
                result = self._serve(request)
            except ProtocolError as e:
                e.policy = tuple(checks)
                raise
        return P.CheckedResult(result, tuple(checks)) if checks else result

    def _serve(self, request: M.AgentRequest) -> Result:
        if not self.gate.active and not isinstance(request, OPEN_REQUESTS):
            raise ProtocolError(ErrorCode.policy_denied, NO_POLICY_REASON, details={"op": request.op.value})
        if isinstance(request, UNLOCKED_REQUESTS):
            return self._dispatch(request)
        with self._lock:
            return self._dispatch(request)

    def _dispatch(self, r: M.AgentRequest) -> Result:
        match r:
            case M.PingRequest():
                return self.op_ping()
            case M.SetPolicyRequest():
                return self.op_set_policy(r)
            case M.LoadFragmentRequest():
                return self.op_load_fragment(r)
            case M.GetPropertiesRequest():
                return self.op_get_properties(r)
            case M.DumpStacksRequest():
                return self.op_dump_stacks(r)
            case M.GetReportRequest():
                return self.op_get_report(r)
            case M.MountDeviceRequest():
                return self.op_mount_device(r)
            case M.UnmountDeviceRequest():
                return self.op_unmount_device(r)
            case M.SetupScratchRequest():
                return self.op_setup_scratch(r)
            case M.MountScratchRequest():
                return self.op_mount_scratch(r)
            case M.UnmountScratchRequest():
                return self.op_unmount_scratch(r)
            case M.MountOverlayRequest():
                return self.op_mount_overlay(r)
            case M.UnmountOverlayRequest():
                return self.op_unmount_overlay(r)
            case M.CreateVolumeRequest():
                return self.op_create_volume(r)
            case M.SetGroupNetworkRequest():
                return self.op_set_group_network(r)
            case M.CreateContainerRequest():
                return self.op_create_container(r)
            case M.StartContainerRequest():
                return self.op_start_container(r)
            case M.ExecProcessRequest():
                return self.op_exec_process(r)
            case M.WriteStdinRequest():
                return self.op_write_stdin(r)
            case M.CloseStdinRequest():
                return self.op_close_stdin(r)
            case M.ResizeTerminalRequest():
                return self.op_resize_terminal(r)
            case M.SignalProcessRequest():
                return self.op_signal_process(r)
            case M.WaitProcessRequest():
                return self.op_wait_process(r)
            case M.ReadOutputRequest():
                return self.op_read_output(r)
            case M.ShutdownContainerRequest():
                return self.op_shutdown_container(r)
            case M.ListContainersRequest():
                return self.op_list_containers()
            case M.WatchContainersRequest():
                return self.op_watch_containers(r)
            case M.PoweroffRequest():
                return self.op_poweroff()
            case _:
                assert_never(r)

    def _log(self, message: str) -> None:
        """Details of what runs go to the (host-readable) console only when the policy allows it."""
        if self.verbose_logging:
            self._console(message)

    # -- basics ---------------------------------------------------------------------------------

    def op_ping(self) -> M.PingResult:
        return M.PingResult(P.PROTOCOL_VERSION, AGENT_VERSION, self.gate.active, self.gate.policy_hash,
                          round(uptime(), 3))

    def op_set_policy(self, r: M.SetPolicyRequest) -> M.SetPolicyResult:
        digest = self.gate.install(r.policy)
        self._console(f"policy {digest} installed (HOST_DATA from {self.gate.host_data_source})")
        self.verbose_logging = self.gate.allows(inputs.RuntimeLoggingInput())
        gc.freeze()  # the compiled policy lives as long as the agent (see agent.py)
        return M.SetPolicyResult(digest, self.gate.host_data_source or "")

    def op_load_fragment(self, r: M.LoadFragmentRequest) -> M.LoadFragmentResult:
        """Verify a fragment's envelope (chain, signature, did:x509 issuer) and ask endpoint load_fragment;
        a refusal, for whatever reason, leaves the policy as it was."""
        # Loaded with the first fragment: OpenSSL's bindings stay off the boot path.
        from sandbox.guest.fragments import verify_fragment

        try:
            verified = verify_fragment(r.fragment)
            rego = verified.payload.decode("utf-8")
        except (InputError, CheckFailed) as e:
            raise _err(ErrorCode.policy_denied, f"load_fragment denied: {e.message}", endpoint="load_fragment") from None
        except UnicodeDecodeError as e:
            raise _err(ErrorCode.policy_denied, f"load_fragment denied: the fragment's payload is not UTF-8 text "
                                                f"(byte {e.start})", endpoint="load_fragment") from None
        self.gate.require(inputs.LoadFragmentInput(verified.issuer, verified.feed, rego, verified.header_svn))
        namespace = self.gate.fragments()[-1]
        self._console(f"fragment {namespace} loaded from {verified.issuer} ({verified.feed})")
        return M.LoadFragmentResult(verified.issuer, verified.feed, namespace, verified.header_svn)

    def op_get_properties(self, r: M.GetPropertiesRequest) -> M.JsonObject:
        self.gate.require(r)
        return {
            "policy_hash": self.gate.policy_hash,
            "host_data_source": self.gate.host_data_source,
            "uptime_s": round(uptime(), 3),
            "devices": {t: {"root_hash": m.root_hash, "dm": str(m.dm.node)} for t, m in self.devices.items()},
            "containers": {cid: c.refresh().value for cid, c in self.containers.items()},
            "enforce_seconds_total": round(self.gate.enforce_seconds, 6),
        }

    def op_dump_stacks(self, r: M.DumpStacksRequest) -> M.DumpStacksResult:
        self.gate.require(r)
        import traceback  # only for this debugging request: traceback pulls in linecache and tokenize

        frames = sys._current_frames()
        names = {t.ident: t.name for t in threading.enumerate()}
        text = "".join(f"--- thread {names.get(tid, tid)}\n" + "".join(traceback.format_stack(f))
                       for tid, f in frames.items())
        return M.DumpStacksResult(text)

    def op_get_report(self, r: M.GetReportRequest) -> M.JsonObject:
        # REPORT_DATA = SHA-512(nonce || runtime public key DER), or SHA-512(nonce) without the key; docs/attestation.md.
        try:
            return snp_report.evidence_for(r.nonce, bind_runtime_key=r.runtime_key).to_payload()
        except InputError as e:
            raise _err(ErrorCode.invalid_request, e.message) from e
        except AttestationError as e:
            raise _err(ErrorCode.unavailable, e.message) from e

    def op_poweroff(self) -> M.EmptyResult:
        def later() -> None:
            time.sleep(0.2)  # let the reply reach the host first
            self.poweroff_hook()
        threading.Thread(target=later, name="poweroff", daemon=True).start()
        return M.EmptyResult()

    # -- devices --------------------------------------------------------------------------------

    @staticmethod
    def _check_device_target(target: str) -> Path:
        problem = agent_rules.device_target_problem(target)
        if problem is not None:
            raise _err(ErrorCode.invalid_request, problem)
        return Path(target)

    def op_mount_device(self, r: M.MountDeviceRequest) -> M.MountDeviceResult:
        device, target = r.device, r.target
        path = self._check_device_target(target)
        if target in self.devices or (re.fullmatch(P.VOLUME_TARGET_RE, target) and
                                      Path(target).name in self.volumes):
            raise _err(ErrorCode.conflict, f"{target} is already mounted")
        try:
            node = blockdev.find_by_serial(device)
            layout = blockdev.read_layout(node)
        except blockdev.BlockError as e:
            raise _err(ErrorCode.failed, str(e)) from None
        self._dm_counter += 1
        dm_name = f"parma-{self._dm_counter}"

        def action(_decision: Decision) -> blockdev.VerityMount:
            try:
                return blockdev.mount_verity(node, dm_name, layout, path)
            except (blockdev.BlockError, OSError) as e:
                raise _err(ErrorCode.failed, str(e)) from None

        mounted = self.gate.enforce(inputs.MountDeviceInput.from_request(r, str(layout.root_hash)), action)
        self.devices[target] = mounted
        self._log(f"mounted {device} ({node}) root hash {layout.root_hash} at {target}")
        return M.MountDeviceResult(str(layout.root_hash), int(layout.data_blocks), str(mounted.dm.node),
                                 self.gate.last_enforce_seconds)

    def op_unmount_device(self, r: M.UnmountDeviceRequest) -> M.EmptyResult:
        target = r.target
        mount = self.devices.get(target)
        if mount is None:
            raise _err(ErrorCode.not_found, f"nothing is mounted at {target}")
        users = [o.container_id for o in self.overlays.values() if target in o.layer_paths]
        if users:
            raise _err(ErrorCode.conflict, f"{target} is a layer of the overlay of {', '.join(users)}")
        # A volume's device stays while a container binds it: once unmounted, the agent could no longer
        # tell the pinned volume from the empty directory under it.
        binders = [c.id for c in self.containers.values() if not c.deleted and target in c.volume_sources]
        if binders:
            raise _err(ErrorCode.conflict, f"{target} is bound into container {', '.join(binders)}")

        def action(_decision: Decision) -> None:
            try:
                note = blockdev.unmount_verity(mount)
            except OSError as e:
                raise _err(ErrorCode.failed, f"cannot unmount {target}: {e}") from None
            if note:    # unmounted all the same: the state must say so
                self._console(f"{target} unmounted; {note}")

        self.gate.enforce(r, action)
        del self.devices[target]
        return M.EmptyResult()

    # -- scratch and overlays -------------------------------------------------------------------

    def op_setup_scratch(self, r: M.SetupScratchRequest) -> M.SetupScratchResult:
        from sandbox.guest import scratch  # dm-crypt, dm-integrity, mkext4: off the agent's boot path

        if self.group_scratch is not None:
            raise _err(ErrorCode.conflict, f"the group's scratch is already set up at {P.GROUP_SCRATCH_DIR}")
        try:
            node = blockdev.find_by_serial(r.device)
        except blockdev.BlockError as e:
            raise _err(ErrorCode.failed, str(e)) from None
        t0 = time.perf_counter()

        def action(_decision: Decision) -> Any:
            try:
                return scratch.setup(node, mountpoint=Path(P.GROUP_SCRATCH_DIR))
            except scratch.ScratchError as e:
                raise _err(ErrorCode.failed, str(e)) from None

        # What the guest builds here is encrypted whatever the host asked: the policy sees it as such.
        self.group_scratch = self.gate.enforce(inputs.ScratchMountInput(P.GROUP_SCRATCH_DIR, encrypted=True), action)
        self._console(f"encrypted scratch on {node}: {self.group_scratch.size_bytes >> 20} MiB")
        return M.SetupScratchResult(P.GROUP_SCRATCH_DIR, self.group_scratch.size_bytes,
                                    round(time.perf_counter() - t0, 3))

    def op_mount_scratch(self, r: M.MountScratchRequest) -> M.MountScratchResult:
        container_id = r.container_id
        if container_id in self.scratch:
            raise _err(ErrorCode.conflict, f"container {container_id} already has a scratch")
        if r.encrypted and self.group_scratch is None:
            raise _err(ErrorCode.conflict, "an encrypted scratch lives on the group's scratch disk: setup_scratch first")
        check = inputs.ScratchMountInput.from_request(r)
        target = check.target
        backing: list[Path] = []

        def action(_decision: Decision) -> None:
            try:
                Path(target).mkdir(parents=True, exist_ok=True)
                if r.encrypted:
                    # A fresh directory on the encrypted scratch for every incarnation of the container.
                    self._scratch_counter += 1
                    base = Path(P.GROUP_SCRATCH_DIR) / "containers" / f"{container_id}.{self._scratch_counter}"
                    base.mkdir(mode=0o700, parents=True)
                    backing.append(base)
                    sysapi.mount(str(base), target, None, sysapi.MS_BIND)
                else:
                    sysapi.mount("tmpfs", target, "tmpfs", sysapi.MS_NODEV | sysapi.MS_NOSUID, "mode=0700")
            except OSError as e:
                raise _err(ErrorCode.failed, f"cannot create scratch {target}: {e}") from None

        self.gate.enforce(check, action)
        self.scratch[container_id] = Path(target)
        if backing:
            self._scratch_dirs[container_id] = backing[0]
        return M.MountScratchResult(target)

    def op_unmount_scratch(self, r: M.UnmountScratchRequest) -> M.EmptyResult:
        container_id = r.container_id
        target = self.scratch.get(container_id)
        if target is None:
            raise _err(ErrorCode.not_found, f"container {container_id} has no scratch")
        if any(o.container_id == container_id for o in self.overlays.values()):
            raise _err(ErrorCode.conflict, f"the overlay of {container_id} still uses its scratch")

        self.gate.enforce(inputs.ScratchUnmountInput.from_request(r), _unmount_action(target))
        del self.scratch[container_id]
        base = self._scratch_dirs.pop(container_id, None)
        if base is not None:
            # Its space goes back to the group; a big upper layer takes a while to delete, so not here.
            threading.Thread(target=shutil.rmtree, args=(base, True), name="scratch-cleanup", daemon=True).start()
        return M.EmptyResult()

    def op_mount_overlay(self, r: M.MountOverlayRequest) -> M.MountOverlayResult:
        container_id, layer_paths, target = r.container_id, r.layer_paths, r.target
        problem = agent_rules.overlay_problem(container_id, layer_paths, target)
        if problem is not None:
            raise _err(ErrorCode.invalid_request, problem)
        if target in self.overlays:
            raise _err(ErrorCode.conflict, f"{target} is already mounted")
        for lp in layer_paths:
            if lp not in self.devices or not agent_rules.is_layer_target(lp):
                raise _err(ErrorCode.not_found, f"{lp} is not a mounted layer device")
        scratch = self.scratch.get(container_id)
        if scratch is None:
            raise _err(ErrorCode.conflict, f"mount_scratch for {container_id} first")

        # Every overlay gets a writable layer of its own, made empty here, whatever the scratch held before:
        # an id re-created on a remounted overlay (a restart) never sees what an earlier incarnation wrote,
        # be it a rewritten /etc/passwd that user names then resolve from, whether or not the host also
        # remounted the scratch.
        self._overlay_counter += 1
        writable = scratch / f"rootfs.{self._overlay_counter}"

        def action(_decision: Decision) -> None:
            # overlayfs lowerdir lists the top-most layer first, like layer_paths.
            opts = f"lowerdir={':'.join(layer_paths)},upperdir={writable}/upper,workdir={writable}/work"
            try:
                writable.mkdir(mode=0o700)      # never there before: exist_ok would reuse one
                (writable / "upper").mkdir()
                (writable / "work").mkdir()
                Path(target).mkdir(parents=True, exist_ok=True)
                sysapi.mount("overlay", target, "overlay", sysapi.MS_NODEV, opts)
            except OSError as e:
                shutil.rmtree(writable, ignore_errors=True)
                raise _err(ErrorCode.failed, f"cannot mount the overlay at {target}: {e}") from None

        self.gate.enforce(r, action)
        self.overlays[target] = Overlay(container_id, Path(target), layer_paths, writable)
        return M.MountOverlayResult(self.gate.last_enforce_seconds)

    def op_unmount_overlay(self, r: M.UnmountOverlayRequest) -> M.EmptyResult:
        target = r.target
        overlay = self.overlays.get(target)
        if overlay is None:
            raise _err(ErrorCode.not_found, f"no overlay is mounted at {target}")
        c = self.containers.get(overlay.container_id)
        if c is not None and not c.deleted:
            raise _err(ErrorCode.conflict, f"container {c.id} still uses {target}")

        self.gate.enforce(r, _unmount_action(target))
        del self.overlays[target]
        # What the incarnation wrote goes: no later overlay uses it (a big upper layer takes a while, so not here).
        threading.Thread(target=shutil.rmtree, args=(overlay.writable, True), name="overlay-cleanup",
                         daemon=True).start()
        return M.EmptyResult()

    # -- volumes --------------------------------------------------------------------------------

    def op_create_volume(self, r: M.CreateVolumeRequest) -> M.CreateVolumeResult:
        """A volume in guest memory, of the kind the policy pins for its name (enforcement point
        create_volume). emptyDir and tmpfs volumes are new, empty tmpfs mounts: nothing of the host's
        is in them. A secret volume holds exactly the host's items, as regular read-only files."""
        name, kind, size_mib, items = r.name, r.kind, r.size_mib, r.items
        path = Path(P.VOLUMES_DIR) / name
        if name in self.volumes or str(path) in self.devices:
            raise _err(ErrorCode.conflict, f"volume {name} already exists")
        if items is not None and kind != M.MemoryVolumeKind.secret:
            raise _err(ErrorCode.invalid_request, f"a {kind.value} volume is created empty: items are for secrets")
        if size_mib is not None and kind != M.MemoryVolumeKind.tmpfs:
            raise _err(ErrorCode.invalid_request, f"size_mib is for tmpfs volumes, not {kind.value}")
        if kind == M.MemoryVolumeKind.secret:
            if len(items or {}) > MAX_SECRET_ITEMS:
                raise _err(ErrorCode.invalid_request, f"a secret volume holds at most {MAX_SECRET_ITEMS} items")
            for fname in items or {}:
                if not re.fullmatch(r"[A-Za-z0-9._-]{1,255}", fname) or fname in (".", ".."):
                    raise _err(ErrorCode.invalid_request, f"invalid secret item name {shown(fname)}")
        size = f",size={size_mib}m" if kind == M.MemoryVolumeKind.tmpfs and size_mib else ""

        def action(_decision: Decision) -> None:
            mounted = False
            try:
                path.mkdir(parents=True, exist_ok=True)
                sysapi.mount("tmpfs", path, "tmpfs", sysapi.MS_NODEV | sysapi.MS_NOSUID, "mode=0777" + size)
                mounted = True
                if kind == M.MemoryVolumeKind.secret:
                    for fname, content in (items or {}).items():
                        fd = os.open(path / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o444)
                        with os.fdopen(fd, "wb") as f:
                            f.write(content)
                    path.chmod(0o755)
                    sysapi.mount("none", path, None, sysapi.MS_REMOUNT | sysapi.MS_RDONLY | sysapi.MS_NODEV
                                 | sysapi.MS_NOSUID)
            except OSError as e:
                if mounted:     # nothing half-made stays behind for a later create_container to bind
                    try:
                        sysapi.umount(path, detach=True)
                    except OSError:
                        pass
                raise _err(ErrorCode.failed, f"cannot create volume {name}: {e}") from None

        self.gate.enforce(inputs.CreateVolumeInput.from_request(r), action)
        self.volumes[name] = path
        self.volume_kinds[name] = kind
        return M.CreateVolumeResult(str(path))

    # -- names --------------------------------------------------------------------------------------

    def op_set_group_network(self, r: M.SetGroupNetworkRequest) -> M.EmptyResult:
        # Not a policy endpoint, as in ACI: what names resolve to is the host's to answer anyway (it carries
        # every packet). The guest checks the shape, so that no value can add a line or a directive.
        try:
            dns = etcfiles.DnsConfig(r.dns.nameservers, r.dns.search, r.dns.options) if r.dns else etcfiles.DnsConfig()
            self.network = etcfiles.NameFiles(r.hostname, r.names, dns)
        except etcfiles.EtcFilesError as e:
            raise _err(ErrorCode.invalid_request, str(e)) from None
        self.hostname = r.hostname
        return M.EmptyResult()

    def _etc_mounts(self, container_id: str,
                    binds: tuple[tuple[M.ContainerMount, str], ...]) -> tuple[M.ContainerMount, ...]:
        """Write the container's /etc/hostname, hosts and resolv.conf and return their binds (the policy's
        default mounts), except where the container binds a volume of its own."""
        taken = {b.destination for b, _ in binds}
        try:
            etcfiles.write_files(Path(defaults.etc_files_dir(container_id)), self.network)
        except OSError as e:
            raise _err(ErrorCode.failed, f"cannot write the /etc files of {container_id}: {e}") from None
        return tuple(M.ContainerMount(m["destination"], m["source"], m["type"], tuple(m["options"]))
                     for m in defaults.etc_file_mounts(container_id) if m["destination"] not in taken)

    # -- containers -----------------------------------------------------------------------------

    def _changed(self) -> None:
        """A container was created, started, exited or deleted: wake watch_containers."""
        with self._changes:
            self._generation += 1
            self._changes.notify_all()

    def _watch_exit(self, proc: runtime.Process) -> None:
        def wait() -> None:
            proc.status(None)
            self._changed()
        threading.Thread(target=wait, name=f"watch-{proc.pid}", daemon=True).start()

    def _container(self, container_id: str) -> runtime.RuntimeContainer:
        c = self.containers.get(container_id)
        if c is None:
            raise _err(ErrorCode.not_found, f"no container {container_id}")
        return c

    def _bind_mounts(self, mounts: tuple[M.ContainerMount, ...]) -> tuple[tuple[M.ContainerMount, str], ...]:
        """Validate host-requested mounts: only binds of group volumes to clean container paths. Each comes back
        as the policy sees it, with the guest path the agent binds (the same, except for ACI's sources)."""
        binds = []
        for i, m in enumerate(mounts):
            dest = oci.clean_container_path(m.destination)
            source, options = m.source, m.options
            if dest is None or dest == "/":
                raise _err(ErrorCode.invalid_request, f"mounts[{i}].destination must be an absolute path")
            if m.type != "bind":
                raise _err(ErrorCode.invalid_request, f"mounts[{i}]: only bind mounts")
            if source == kbs_protocol.ATTEST_API_DIR:
                # The attestation API socket directory (docs/kbs.md); the policy decides who gets it.
                if "ro" not in options or "rw" in options:
                    raise _err(ErrorCode.invalid_request,
                               f"mounts[{i}]: {kbs_protocol.ATTEST_API_DIR} is bound read-only")
                self.start_attest_api()
                if not self.attest_api_started.wait(ATTEST_API_START_TIMEOUT):
                    raise _err(ErrorCode.unavailable, "the attestation API has not started")
                binds.append((M.ContainerMount(dest, source, "bind", options), source))
                continue
            path = self._aci_volume(source, i) if source.startswith(aci_volumes_prefix()) else source
            volume = path.removeprefix(P.VOLUMES_DIR + "/")
            vpath = self.volumes.get(volume) or (Path(path) if path in self.devices else None)
            if not path.startswith(P.VOLUMES_DIR + "/") or vpath is None:
                raise _err(ErrorCode.invalid_request, f"mounts[{i}].source {shown(source)} is not a group volume")
            if "rbind" not in options and "bind" not in options:
                raise _err(ErrorCode.invalid_request, f"mounts[{i}]: a bind mount needs the rbind or bind option")
            binds.append((M.ContainerMount(dest, source, "bind", options), path))
        return tuple(binds)

    def _aci_volume(self, source: str, i: int) -> str:
        """The group volume behind one of ACI's volume sources, `<sandbox dir>/tmp/atlas/<kind>/<volume>`
        (docs/aci.md, "Running ACI policies locally"): the policy pins the kind by the source's pattern, and the agent makes
        sure the volume is of that kind (emptydir: emptyDir or tmpfs; secretsVolume: secret; azureFileVolume
        and gitRepoVolume: a files volume, mounted from its device)."""
        kind, _, volume = source.removeprefix(aci_volumes_prefix()).partition("/")
        path = P.volume_path(volume) if re.fullmatch(M.VOLUME_NAME, volume) else ""
        if kind == "emptydir":
            ok = self.volume_kinds.get(volume) in (M.MemoryVolumeKind.empty_dir, M.MemoryVolumeKind.tmpfs)
        elif kind == "secretsVolume":
            ok = self.volume_kinds.get(volume) == M.MemoryVolumeKind.secret
        elif kind in ("azureFileVolume", "gitRepoVolume"):
            ok = path in self.devices
        else:
            ok = False
        if not ok:
            raise _err(ErrorCode.invalid_request, f"mounts[{i}].source {shown(source)} is not a group volume of "
                                                  f"the kind {kind!r} names")
        return path

    def op_create_container(self, r: M.CreateContainerRequest) -> M.CreateContainerResult:
        t0 = time.perf_counter()
        if not self.network_ready.wait(NETWORK_WAIT_S):
            raise _err(ErrorCode.unavailable, "the guest's network is not configured yet")
        container_id = r.container_id
        previous = self.containers.get(container_id)
        if previous is not None and not previous.deleted:
            raise _err(ErrorCode.conflict, f"container {container_id} already exists")
        rootfs = agent_rules.rootfs_target(container_id)
        overlay = self.overlays.get(rootfs)
        if overlay is None:
            raise _err(ErrorCode.conflict, f"mount_overlay for {container_id} first (at {rootfs})")
        if overlay.served:
            raise _err(ErrorCode.conflict, f"the overlay at {rootfs} holds what an earlier incarnation of "
                                           f"{container_id} wrote: unmount_overlay and mount_overlay again for an "
                                           "empty writable layer")
        _check_env(r.env)
        caps = r.capabilities or _default_capabilities()
        try:
            who = users.resolve_user(rootfs, r.user)
        except users.UserError as e:
            raise _err(ErrorCode.failed, str(e)) from None
        binds = self._bind_mounts(r.mounts)
        etc = self._etc_mounts(container_id, binds)
        user, groups = _identity(who)
        # The profile crun will apply is the one measured here (never a hash the host names).
        try:
            profile = seccomp.parse_profile(r.seccomp_profile) if r.seccomp_profile is not None else None
        except seccomp.SeccompError as e:
            raise _err(ErrorCode.invalid_request, e.message) from None
        check = inputs.CreateContainerInput.from_request(r, mounts=base_mounts() + tuple(b for b, _ in binds) + etc,
                                                  user=user, groups=groups, capabilities=caps,
                                                  seccomp_profile_sha256=seccomp.measure(profile))

        def action(decision: Decision) -> runtime.RuntimeContainer:
            env = decision.env_list if decision.env_list is not None else r.env
            final_caps = (decision.caps_list or caps).sets()
            process = oci.ProcessSpec(argv=r.argv, env=env, cwd=r.working_dir, uid=who.uid, gid=who.gid,
                                      additional_gids=tuple(g for g, _ in who.additional_gids),
                                      umask=int(r.umask, 8), capabilities=final_caps,
                                      no_new_privileges=r.no_new_privileges)
            spec = oci.build_spec(oci.BundleSpec(container_id, rootfs, process, self.network.hostname,
                                                 tuple(oci.BindMount(b.destination, path, b.options)
                                                       for b, path in binds + tuple((e, e.source) for e in etc)),
                                                 r.privileged, profile.to_oci() if profile is not None else None))
            c = runtime.RuntimeContainer(container_id, Path(P.container_dir(container_id)), Path(rootfs), r.argv,
                          decision.allow_stdio_access, exec_caps=final_caps,
                          volume_sources=frozenset(path for _, path in binds),
                          user=(who.uid, who.gid, process.additional_gids), working_dir=r.working_dir,
                          no_new_privileges=r.no_new_privileges)
            try:
                # A re-created container's output goes on in the log of its previous incarnation.
                runtime.create(c, spec, previous.init.log if previous and previous.init else None)
            except (runtime.CrunError, OSError) as e:
                runtime.delete(c)
                raise _err(ErrorCode.failed, f"crun create {container_id}: {e}") from None
            overlay.served = True       # the container's own code may run in it from here on
            return c

        c = self.gate.enforce(check, action)
        self.containers[container_id] = c
        self._changed()
        self._log(f"created container {container_id}")
        return M.CreateContainerResult(c.init.pid if c.init else None, c.stdio, self.gate.last_enforce_seconds,
                                     self.gate.last_enforce_cpu_seconds, time.perf_counter() - t0)

    def op_start_container(self, r: M.StartContainerRequest) -> M.StartContainerResult:
        t0 = time.perf_counter()
        c = self._container(r.container_id)
        if c.status != runtime.ContainerStatus.created:
            raise _err(ErrorCode.conflict, f"container {c.id} is {c.refresh().value}, not created")
        try:
            runtime.start(c)
        except runtime.CrunError as e:
            raise _err(ErrorCode.failed, f"crun start {c.id}: {e}") from None
        if c.init is not None:
            self._watch_exit(c.init)
        self._changed()
        return M.StartContainerResult(c.init.pid if c.init else None, time.perf_counter() - t0)

    def op_exec_process(self, r: M.ExecProcessRequest) -> M.ExecProcessResult:
        c = self._container(r.container_id)
        _check_env(r.env or ())   # absent: the container's env, checked at its create
        if c.refresh() != runtime.ContainerStatus.running:
            raise _err(ErrorCode.conflict, f"container {c.id} is {c.status.value}, not running")
        if (r.tty or r.stdin) and not c.stdio:
            # An interactive session is stdio: what the policy decided for the container at create decides it.
            raise _err(ErrorCode.policy_denied,
                       f"an interactive exec needs access to the stdio of container {c.id}, which the policy "
                       "does not allow (allow_stdio_access is false)", endpoint="create_container")
        exec_id = runtime.next_exec_id(c)
        # The process runs as the container's user with its capabilities (the engine recorded them at
        # create_container and the input inherits them), with its env and in its working dir unless the
        # host asks otherwise.
        cwd = r.working_dir or c.working_dir
        check = inputs.ExecInContainerInput(c.id, r.argv, inputs.INHERIT if r.env is None else r.env, r.working_dir or inputs.INHERIT)
        window = terminal.WindowSize(r.rows or 24, r.cols or 80) if r.tty else None

        def action(decision: Decision) -> runtime.Process:
            env = decision.env_list if decision.env_list is not None else (r.env or ())
            try:
                return runtime.exec_process(c, exec_id, r.argv, env, cwd, window=window, stdin=r.stdin)
            except (runtime.CrunError, OSError) as e:
                reason = e.reason if isinstance(e, runtime.CrunError) else "other"
                raise _err(ErrorCode.failed, f"exec in {c.id}: {e}", reason=reason) from None

        started = self.gate.enforce(check, action)
        if started.input is not None:
            threading.Thread(target=_finish_input, args=(started,), name=f"input-{started.pid}",
                             daemon=True).start()
        return M.ExecProcessResult(exec_id, started.pid, c.stdio)

    def _interactive(self, container_id: str, exec_id: str) -> terminal.Terminal | terminal.StdinPipe:
        """The input side of an interactive exec. Looked up without the state lock (a dict read), so that
        keystrokes never wait behind a create on another port."""
        c = self.containers.get(container_id)
        proc = c.execs.get(exec_id) if c is not None else None
        if proc is None:
            raise _err(ErrorCode.not_found, f"no process {exec_id} in container {container_id}")
        if proc.input is None:
            raise _err(ErrorCode.conflict, f"process {exec_id} in container {container_id} was started without stdin")
        return proc.input

    def op_write_stdin(self, r: M.WriteStdinRequest) -> M.WriteStdinResult:
        target = self._interactive(r.container_id, r.exec_id)
        try:
            return M.WriteStdinResult(target.write_input(r.data))
        except (terminal.TerminalError, OSError) as e:
            raise _err(ErrorCode.conflict, f"cannot write to the input of {r.exec_id}: {e}") from None

    def op_close_stdin(self, r: M.CloseStdinRequest) -> M.EmptyResult:
        target = self._interactive(r.container_id, r.exec_id)
        try:
            target.close_input()
        except (terminal.TerminalError, OSError) as e:
            raise _err(ErrorCode.conflict, f"cannot close the input of {r.exec_id}: {e}") from None
        return M.EmptyResult()

    def op_resize_terminal(self, r: M.ResizeTerminalRequest) -> M.EmptyResult:
        target = self._interactive(r.container_id, r.exec_id)
        if not isinstance(target, terminal.Terminal):
            raise _err(ErrorCode.conflict, f"process {r.exec_id} has no terminal")
        try:
            target.resize(terminal.WindowSize(r.rows, r.cols))
        except (terminal.TerminalError, OSError) as e:
            raise _err(ErrorCode.conflict, f"cannot resize the terminal of {r.exec_id}: {e}") from None
        return M.EmptyResult()

    def _process(self, container_id: str, exec_id: str | None) -> runtime.Process:
        c = self._container(container_id)
        if exec_id is None:
            if c.init is None:
                raise _err(ErrorCode.not_found, f"container {container_id} has no process")
            return c.init
        proc = c.execs.get(exec_id)
        if proc is None:
            raise _err(ErrorCode.not_found, f"no process {exec_id} in container {container_id}")
        return proc

    def op_signal_process(self, r: M.SignalProcessRequest) -> M.EmptyResult:
        proc = self._process(r.container_id, r.exec_id)
        what = f"process {r.exec_id}" if r.exec_id else "init process"
        if proc.status() is not None:
            raise _err(ErrorCode.conflict, f"the {what} of container {r.container_id} has exited")
        check = inputs.SignalContainerProcessInput(r.container_id, r.signal, r.exec_id is None, proc.argv)

        def action(_decision: Decision) -> None:
            # Through the process handle: once the process is gone this fails, whoever has its pid now.
            if not runtime.kill(proc, r.signal):
                raise _err(ErrorCode.conflict, f"the {what} of container {r.container_id} has exited")

        self.gate.enforce(check, action)
        return M.EmptyResult()

    def op_wait_process(self, r: M.WaitProcessRequest) -> M.ProcessExit:
        with self._lock:
            c = self._container(r.container_id)
            proc = self._process(r.container_id, r.exec_id)
        status = proc.status(_clamp(r.timeout, MAX_WAIT_PROCESS_S))
        if status is None:
            return M.ProcessExit(True, None, None)
        if r.exec_id is not None:
            with self._lock:
                proc.reported = True
                self._forget_if_done(c, r.exec_id, proc)
        return M.ProcessExit(False, status.shell_code, status.signal)

    def _forget_if_done(self, c: runtime.RuntimeContainer, exec_id: str, proc: runtime.Process) -> None:
        """An exec process whose exit the host has been told and whose output it has read to the end is
        forgotten: its handle is closed, and its id answers not_found from then on."""
        if proc.reported and (proc.log is None or proc.drained) and c.execs.get(exec_id) is proc:
            del c.execs[exec_id]
            proc.forget()

    def op_read_output(self, r: M.ReadOutputRequest) -> M.ReadOutputResult:
        with self._lock:
            c = self._container(r.container_id)
            proc = self._process(r.container_id, r.exec_id)
        if not c.stdio or proc.log is None:
            raise _err(ErrorCode.policy_denied,
                       f"the policy does not allow access to the stdio of container {c.id} "
                       "(allow_stdio_access is false)", endpoint="create_container")
        res = proc.log.read(max(0, r.offset), min(max(1, r.max_bytes), MAX_READ_BYTES),
                            _clamp(r.wait, MAX_READ_WAIT_S))
        if res.eof and r.exec_id is not None:
            with self._lock:
                proc.drained = True
                self._forget_if_done(c, r.exec_id, proc)
        return M.ReadOutputResult(tuple(M.OutputChunk(M.OutputStream(ch.stream), ch.data) for ch in res.chunks),
                                res.next_offset, res.dropped, res.eof)

    def op_shutdown_container(self, r: M.ShutdownContainerRequest) -> M.ShutdownResult:
        # Decide and send SIGTERM under the lock; wait for the exit without it, so that the containers
        # of a group can be stopped in parallel (one port each) and other requests are not held up.
        with self._lock:
            c = self._container(r.container_id)
            if c.deleted:
                raise _err(ErrorCode.not_found, f"container {c.id} was shut down already")
            if c.stopping:
                raise _err(ErrorCode.conflict, f"container {c.id} is already being shut down")
            self.gate.enforce(r, lambda _d: runtime.begin_stop(c))
            c.stopping = True
        try:
            status = runtime.finish_stop(c, _clamp(r.timeout, MAX_SHUTDOWN_S))
        finally:
            self._changed()
        return M.ShutdownResult(status.shell_code if status else None, status.signal if status else None)

    def _container_infos(self) -> tuple[M.ContainerInfo, ...]:
        out = []
        for cid, c in list(self.containers.items()):    # a copy: a create on another port may add one
            status = c.refresh()
            exit_status = c.init.status() if c.init and status == runtime.ContainerStatus.exited else None
            out.append(M.ContainerInfo(cid, status.value, c.init.pid if c.init else None,
                                       exit_status.shell_code if exit_status else None, c.stdio))
        return tuple(out)

    def op_list_containers(self) -> M.ListContainersResult:
        return M.ListContainersResult(self._container_infos())

    def op_watch_containers(self, r: M.WatchContainersRequest) -> M.WatchContainersResult:
        with self._changes:
            self._changes.wait_for(lambda: self._generation != r.since, _clamp(r.wait, MAX_WATCH_S))
            generation = self._generation
        return M.WatchContainersResult(generation, self._container_infos())


def _finish_input(proc: runtime.Process) -> None:
    """Once an interactive process has exited: let its terminal deliver what it still holds, then close it
    (or close the pipe's write end), so that its output ends and nothing is left open."""
    proc.status(None)
    target = proc.input
    if isinstance(target, terminal.Terminal):
        if proc.log is not None:
            proc.log.wait_closed(OUTPUT_DRAIN_S)
        target.close()
    elif target is not None:
        target.close_input()


def _check_env(env: tuple[str, ...]) -> None:
    """Every entry NAME=VALUE with a NAME: the policy's rules and the process see the same variables
    (the rule `policy check` also applies, sandbox/shared/agent_rules.py)."""
    problem = agent_rules.env_problem(env)
    if problem is not None:
        raise _err(ErrorCode.invalid_request, problem)


def _clamp(seconds: float, limit: float) -> float:
    """A host-given wait, within [0, limit]."""
    return min(max(0.0, seconds), limit)


def _unmount_action(target: str | Path) -> Callable[[Decision], None]:
    """A policy action that lazily unmounts `target` (processes still using it keep their view)."""
    def action(_decision: Decision) -> None:
        try:
            sysapi.umount(target, detach=True)
        except OSError as e:
            raise _err(ErrorCode.failed, f"cannot unmount {target}: {e}") from None
    return action


def _identity(who: users.ResolvedUser) -> tuple[inputs.NamedId, tuple[inputs.NamedId, ...]]:
    """The user and groups of create_container's policy input."""
    return (inputs.NamedId(str(who.uid), who.user_name),
            (inputs.NamedId(str(who.gid), who.group_name), *(inputs.NamedId(str(g), n) for g, n in who.additional_gids)))


def _default_capabilities() -> M.Capabilities:
    """The runtime's sets for a container that asks for nothing special."""
    default = tuple(oci.DEFAULT_CAPABILITIES)
    return M.Capabilities(bounding=default, effective=default, permitted=default)
