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
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, assert_never

from sandbox.guest import oci, runtime, sysapi
from sandbox.guest.gate import NO_POLICY_REASON, Gate
from sandbox.guest.hostdata import HostData, read_host_data, uptime
from sandbox.guest.lazy import LazyModule
from sandbox.guest.runtime import ContainerStatus, CrunError, RuntimeContainer
from sandbox.guest.users import ResolvedUser, UserError, resolve_user
from sandbox.shared import messages as M
from sandbox.shared import protocol as P
from sandbox.shared.codec import shown
from sandbox.shared.errors import AttestationError, CheckFailed, InputError
from sandbox.shared.policy import defaults
from sandbox.shared.policy.inputs import (
    CreateContainerInput,
    ExecInContainerInput,
    LoadFragmentInput,
    MountDeviceInput,
    NamedId,
    RuntimeLoggingInput,
    ScratchMountInput,
    ScratchUnmountInput,
    SignalContainerProcessInput,
)
from sandbox.shared.protocol import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from pathlib import Path

    from sandbox.guest import blockdev, snp_report
    from sandbox.shared import kbs_protocol
    from sandbox.shared.policy.engine import Decision
else:
    def Path(*parts: Any) -> Any:  # noqa: N802 - stands for pathlib.Path (see below)
        """pathlib.Path(*parts). pathlib (which loads urllib.parse and ipaddress) is imported by the first
        request that makes a path, after "ready": the requests served before a policy make none."""
        from pathlib import Path as path_type

        return path_type(*parts)

    # Loaded on first use (see agent.py: after "ready", in the order `up` needs them): device-mapper and
    # verity with the first mount, the report backends and their crypto with the first report.
    blockdev = LazyModule("sandbox.guest.blockdev")
    snp_report = LazyModule("sandbox.guest.snp_report")
    kbs_protocol = LazyModule("sandbox.shared.kbs_protocol")

AGENT_VERSION = "1"
ATTEST_API_START_TIMEOUT = 60.0   # seconds; the agent starts the API when a container first binds it
NETWORK_WAIT_S = 60.0              # seconds a create_container waits for the network the agent sets up
# What the host may ask before a policy is set: nothing that touches guest state.
OPEN_REQUESTS = (M.PingRequest, M.SetPolicyRequest, M.GetReportRequest, M.PoweroffRequest)
# ACI's volume sources, `sandbox:///tmp/atlas/<kind>/<volume>` in its policies, in the guest.
ACI_VOLUMES_PREFIX = f"{defaults.DEFAULT_SANDBOX_DIR}/{defaults.ACI_VOLUMES_SUBDIR}/"
# Requests that block waiting (for output, for a process) and must not hold the state lock.
UNLOCKED_REQUESTS = (M.ReadOutputRequest, M.WaitProcessRequest, M.PingRequest, M.GetReportRequest,
                     M.PoweroffRequest, M.ShutdownContainerRequest)
# The mounts the runtime gives every container, as the engine sees them (oci.base_mounts in the spec).
BASE_MOUNTS = tuple(M.ContainerMount(m["destination"], m["source"], m["type"], tuple(m["options"]))
                    for m in oci.base_mounts())
MAX_WAIT_PROCESS_S = 600.0
MAX_READ_WAIT_S = 60.0
MAX_READ_BYTES = 512 * 1024
MAX_SHUTDOWN_S = 300.0

Result = M.Message | M.JsonObject


def _err(code: ErrorCode, message: str, **details: Any) -> ProtocolError:
    return ProtocolError(code, message, details=details)


@dataclass
class Overlay:
    container_id: str
    target: Path
    layer_paths: tuple[str, ...]


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
        self.containers: dict[str, RuntimeContainer] = {}
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

    # -- dispatch -------------------------------------------------------------------------------

    def handle(self, request: M.AgentRequest) -> Result:
        """Serve one typed request; raises ProtocolError when it cannot be served."""
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
            case M.CreateContainerRequest():
                return self.op_create_container(r)
            case M.StartContainerRequest():
                return self.op_start_container(r)
            case M.ExecProcessRequest():
                return self.op_exec_process(r)
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
        self.verbose_logging = self.gate.allows(RuntimeLoggingInput())
        gc.freeze()  # the compiled policy lives as long as the agent (see agent.py)
        return M.SetPolicyResult(digest, self.gate.host_data_source or "")

    def op_load_fragment(self, r: M.LoadFragmentRequest) -> M.LoadFragmentResult:
        """Verify a fragment's envelope (chain, signature, did:x509 issuer) and ask endpoint load_fragment;
        a refusal, for whatever reason, leaves the policy as it was."""
        # Loaded with the first fragment: OpenSSL's bindings stay off the boot path.
        from sandbox.guest.fragments import verify_fragment  # noqa: PLC0415

        try:
            verified = verify_fragment(r.fragment)
            rego = verified.payload.decode("utf-8")
        except (InputError, CheckFailed) as e:
            raise _err(ErrorCode.policy_denied, f"load_fragment denied: {e.message}", endpoint="load_fragment") from None
        except UnicodeDecodeError as e:
            raise _err(ErrorCode.policy_denied, f"load_fragment denied: the fragment's payload is not UTF-8 text "
                                                f"(byte {e.start})", endpoint="load_fragment") from None
        self.gate.require(LoadFragmentInput(verified.issuer, verified.feed, rego, verified.header_svn))
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
        # REPORT_DATA = SHA-512(nonce || runtime public key DER); docs/attestation.md.
        try:
            return snp_report.evidence_for(r.nonce).to_payload()
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
        if not (re.fullmatch(P.LAYER_TARGET_RE, target) or re.fullmatch(P.VOLUME_TARGET_RE, target)):
            raise _err(ErrorCode.invalid_request,
                       f"mount target {shown(target)} must be {P.LAYERS_DIR}/<name> or {P.VOLUMES_DIR}/<volume>")
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

        mounted = self.gate.enforce(MountDeviceInput.from_request(r, str(layout.root_hash)), action)
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

        def action(_decision: Decision) -> None:
            try:
                blockdev.unmount_verity(mount)
            except OSError as e:
                raise _err(ErrorCode.failed, f"cannot unmount {target}: {e}") from None

        self.gate.enforce(r, action)
        del self.devices[target]
        return M.EmptyResult()

    # -- scratch and overlays -------------------------------------------------------------------

    def op_mount_scratch(self, r: M.MountScratchRequest) -> M.MountScratchResult:
        container_id = r.container_id
        if container_id in self.scratch:
            raise _err(ErrorCode.conflict, f"container {container_id} already has a scratch")
        check = ScratchMountInput.from_request(r)
        target = check.target

        def action(_decision: Decision) -> None:
            if r.encrypted:
                raise _err(ErrorCode.failed, "encrypted (dm-crypt) scratch is not supported by this agent; "
                                             "the tmpfs scratch lives in guest memory, which SEV-SNP encrypts")
            try:
                Path(target).mkdir(parents=True, exist_ok=True)
                sysapi.mount("tmpfs", target, "tmpfs", sysapi.MS_NODEV | sysapi.MS_NOSUID, "mode=0700")
                (Path(target) / "upper").mkdir()
                (Path(target) / "work").mkdir()
            except OSError as e:
                raise _err(ErrorCode.failed, f"cannot create scratch {target}: {e}") from None

        self.gate.enforce(check, action)
        self.scratch[container_id] = Path(target)
        return M.MountScratchResult(target)

    def op_unmount_scratch(self, r: M.UnmountScratchRequest) -> M.EmptyResult:
        container_id = r.container_id
        target = self.scratch.get(container_id)
        if target is None:
            raise _err(ErrorCode.not_found, f"container {container_id} has no scratch")
        if any(o.container_id == container_id for o in self.overlays.values()):
            raise _err(ErrorCode.conflict, f"the overlay of {container_id} still uses its scratch")

        self.gate.enforce(ScratchUnmountInput.from_request(r), _unmount_action(target))
        del self.scratch[container_id]
        return M.EmptyResult()

    def op_mount_overlay(self, r: M.MountOverlayRequest) -> M.MountOverlayResult:
        container_id, layer_paths, target = r.container_id, r.layer_paths, r.target
        expected = P.container_dir(container_id) + "/rootfs"
        if target != expected:
            raise _err(ErrorCode.invalid_request, f"the rootfs of {container_id} must be mounted at {expected}")
        if target in self.overlays:
            raise _err(ErrorCode.conflict, f"{target} is already mounted")
        if not layer_paths:
            raise _err(ErrorCode.invalid_request, "layer_paths is empty")
        for lp in layer_paths:
            if lp not in self.devices or not re.fullmatch(P.LAYER_TARGET_RE, lp):
                raise _err(ErrorCode.not_found, f"{lp} is not a mounted layer device")
        scratch = self.scratch.get(container_id)
        if scratch is None:
            raise _err(ErrorCode.conflict, f"mount_scratch for {container_id} first")

        def action(_decision: Decision) -> None:
            # overlayfs lowerdir lists the top-most layer first, like layer_paths.
            opts = f"lowerdir={':'.join(layer_paths)},upperdir={scratch}/upper,workdir={scratch}/work"
            try:
                Path(target).mkdir(parents=True, exist_ok=True)
                sysapi.mount("overlay", target, "overlay", sysapi.MS_NODEV, opts)
            except OSError as e:
                raise _err(ErrorCode.failed, f"cannot mount the overlay at {target}: {e}") from None

        self.gate.enforce(r, action)
        self.overlays[target] = Overlay(container_id, Path(target), layer_paths)
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
        return M.EmptyResult()

    # -- volumes --------------------------------------------------------------------------------

    def op_create_volume(self, r: M.CreateVolumeRequest) -> M.CreateVolumeResult:
        name, kind, size_mib, items = r.name, r.kind, r.size_mib, r.items
        # Not a policy endpoint: it makes an empty (or host-filled, for secrets) tmpfs that no
        # container sees until a create_container, whose mounts the policy checks, binds it.
        path = Path(P.VOLUMES_DIR) / name
        if name in self.volumes or str(path) in self.devices:
            raise _err(ErrorCode.conflict, f"volume {name} already exists")
        if kind == M.MemoryVolumeKind.secret:
            for fname in items or {}:
                if not re.fullmatch(r"[A-Za-z0-9._-]{1,255}", fname) or fname in (".", ".."):
                    raise _err(ErrorCode.invalid_request, f"invalid secret item name {shown(fname)}")
        size = f",size={size_mib}m" if kind == M.MemoryVolumeKind.tmpfs and size_mib else ""
        try:
            path.mkdir(parents=True, exist_ok=True)
            sysapi.mount("tmpfs", path, "tmpfs", sysapi.MS_NODEV | sysapi.MS_NOSUID, "mode=0777" + size)
            if kind == M.MemoryVolumeKind.secret:
                for fname, content in (items or {}).items():
                    f = path / fname
                    f.write_bytes(content)
                    f.chmod(0o444)
                path.chmod(0o755)
                sysapi.mount("none", path, None, sysapi.MS_REMOUNT | sysapi.MS_RDONLY | sysapi.MS_NODEV
                             | sysapi.MS_NOSUID)
        except OSError as e:
            raise _err(ErrorCode.failed, f"cannot create volume {name}: {e}") from None
        self.volumes[name] = path
        self.volume_kinds[name] = kind
        return M.CreateVolumeResult(str(path))

    # -- containers -----------------------------------------------------------------------------

    def _container(self, container_id: str) -> RuntimeContainer:
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
            path = self._aci_volume(source, i) if source.startswith(ACI_VOLUMES_PREFIX) else source
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
        kind, _, volume = source.removeprefix(ACI_VOLUMES_PREFIX).partition("/")
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
        if container_id in self.containers:
            raise _err(ErrorCode.conflict, f"container {container_id} already exists")
        rootfs = P.container_dir(container_id) + "/rootfs"
        if rootfs not in self.overlays:
            raise _err(ErrorCode.conflict, f"mount_overlay for {container_id} first (at {rootfs})")
        for e in r.env:
            if "=" not in e:
                raise _err(ErrorCode.invalid_request, f"env entry {shown(e)} has no '='")
        caps = r.capabilities or _default_capabilities()
        try:
            who = resolve_user(rootfs, r.user)
        except UserError as e:
            raise _err(ErrorCode.failed, str(e)) from None
        binds = self._bind_mounts(r.mounts)
        user, groups = _identity(who)
        check = CreateContainerInput.from_request(r, mounts=BASE_MOUNTS + tuple(b for b, _ in binds), user=user,
                                                  groups=groups, capabilities=caps)

        def action(decision: Decision) -> RuntimeContainer:
            env = decision.env_list if decision.env_list is not None else r.env
            final_caps = (decision.caps_list or caps).sets()
            process = oci.ProcessSpec(argv=r.argv, env=env, cwd=r.working_dir, uid=who.uid, gid=who.gid,
                                      additional_gids=tuple(g for g, _ in who.additional_gids),
                                      umask=int(r.umask, 8), capabilities=final_caps,
                                      no_new_privileges=r.no_new_privileges)
            spec = oci.build_spec(oci.BundleSpec(container_id, rootfs, process, self.hostname,
                                                    tuple(oci.BindMount(b.destination, path, b.options)
                                                          for b, path in binds), r.privileged))
            c = RuntimeContainer(container_id, Path(P.container_dir(container_id)), Path(rootfs), r.argv,
                          decision.allow_stdio_access, exec_caps=final_caps,
                          user=(who.uid, who.gid, process.additional_gids), working_dir=r.working_dir,
                          no_new_privileges=r.no_new_privileges)
            try:
                runtime.create(c, spec)
            except (CrunError, OSError) as e:
                runtime.delete(c)
                raise _err(ErrorCode.failed, f"crun create {container_id}: {e}") from None
            return c

        c = self.gate.enforce(check, action)
        self.containers[container_id] = c
        self._log(f"created container {container_id}")
        return M.CreateContainerResult(c.init.pid if c.init else None, c.stdio, self.gate.last_enforce_seconds,
                                     self.gate.last_enforce_cpu_seconds, time.perf_counter() - t0)

    def op_start_container(self, r: M.StartContainerRequest) -> M.StartContainerResult:
        t0 = time.perf_counter()
        c = self._container(r.container_id)
        if c.status != ContainerStatus.created:
            raise _err(ErrorCode.conflict, f"container {c.id} is {c.refresh().value}, not created")
        try:
            runtime.start(c)
        except CrunError as e:
            raise _err(ErrorCode.failed, f"crun start {c.id}: {e}") from None
        return M.StartContainerResult(c.init.pid if c.init else None, time.perf_counter() - t0)

    def op_exec_process(self, r: M.ExecProcessRequest) -> M.ExecProcessResult:
        c = self._container(r.container_id)
        if c.refresh() != ContainerStatus.running:
            raise _err(ErrorCode.conflict, f"container {c.id} is {c.status.value}, not running")
        exec_id = runtime.next_exec_id(c)
        # The process runs as the container's user with its capabilities (the engine recorded them at
        # create_container and the input inherits them), in its working dir unless the host asks.
        cwd = r.working_dir or c.working_dir

        def action(decision: Decision) -> runtime.Process:
            env = decision.env_list if decision.env_list is not None else r.env
            try:
                return runtime.exec_process(c, exec_id, r.argv, env, cwd)
            except (CrunError, OSError) as e:
                reason = e.reason if isinstance(e, CrunError) else "other"
                raise _err(ErrorCode.failed, f"exec in {c.id}: {e}", reason=reason) from None

        started = self.gate.enforce(ExecInContainerInput(c.id, r.argv, r.env, cwd), action)
        return M.ExecProcessResult(exec_id, started.pid, c.stdio)

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
        check = SignalContainerProcessInput(r.container_id, r.signal, r.exec_id is None, proc.argv)
        self.gate.enforce(check, lambda _d: runtime.kill(proc, r.signal))
        return M.EmptyResult()

    def op_wait_process(self, r: M.WaitProcessRequest) -> M.ProcessExit:
        with self._lock:
            proc = self._process(r.container_id, r.exec_id)
        status = proc.status(_clamp(r.timeout, MAX_WAIT_PROCESS_S))
        if status is None:
            return M.ProcessExit(True, None, None)
        return M.ProcessExit(False, status.shell_code, status.signal)

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
        return M.ReadOutputResult(tuple(M.OutputChunk(M.OutputStream(ch.stream), ch.data) for ch in res.chunks),
                                res.next_offset, res.dropped, res.eof)

    def op_shutdown_container(self, r: M.ShutdownContainerRequest) -> M.ShutdownResult:
        # Decide and send SIGTERM under the lock; wait for the exit without it, so that the containers
        # of a group can be stopped in parallel (one port each) and other requests are not held up.
        with self._lock:
            c = self._container(r.container_id)
            if c.stopping:
                raise _err(ErrorCode.conflict, f"container {c.id} is already being shut down")
            self.gate.enforce(r, lambda _d: runtime.begin_stop(c))
            c.stopping = True
        status = runtime.finish_stop(c, _clamp(r.timeout, MAX_SHUTDOWN_S))
        return M.ShutdownResult(status.shell_code if status else None, status.signal if status else None)

    def op_list_containers(self) -> M.ListContainersResult:
        out = []
        for cid, c in self.containers.items():
            status = c.refresh()
            exit_status = c.init.status() if c.init and status == ContainerStatus.exited else None
            out.append(M.ContainerInfo(cid, status.value, c.init.pid if c.init else None,
                                     exit_status.shell_code if exit_status else None, c.stdio))
        return M.ListContainersResult(tuple(out))


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


def _identity(who: ResolvedUser) -> tuple[NamedId, tuple[NamedId, ...]]:
    """The user and groups of create_container's policy input."""
    return (NamedId(str(who.uid), who.user_name),
            (NamedId(str(who.gid), who.group_name), *(NamedId(str(g), n) for g, n in who.additional_gids)))


def _default_capabilities() -> M.Capabilities:
    """The runtime's sets for a container that asks for nothing special."""
    default = tuple(oci.DEFAULT_CAPABILITIES)
    return M.Capabilities(bounding=default, effective=default, permitted=default)
