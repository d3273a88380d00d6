"""The agent's operations: one method per protocol op, each enforced by the policy where it changes state.

Guest-side invariants hold regardless of the policy (the host chooses none of these): mount targets
live in fixed directories, a container's rootfs is its own overlay, bind sources are group volumes,
the OCI spec is written here without hooks, and stdio is readable only when the policy allowed it.
"""

from __future__ import annotations

import base64
import gc
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.guest import blockdev, oci, runtime, snp_report, sysapi
from sandbox.guest.gate import NO_POLICY_REASON, Gate
from sandbox.guest.hostdata import HostData, read_host_data, uptime
from sandbox.guest.runtime import Container, ContainerStatus, CrunError
from sandbox.guest.users import ResolvedUser, UserError, resolve_user
from sandbox.shared import protocol as P
from sandbox.shared.errors import AttestationError, InputError
from sandbox.shared.kbs_protocol import ATTEST_API_DIR
from sandbox.shared.protocol import ErrorCode, Op, ProtocolError

AGENT_VERSION = "1"
ATTEST_API_START_TIMEOUT = 60.0   # seconds; the agent starts the API in the background right after boot
# What the host may ask before a policy is set: nothing that touches guest state.
OPEN_OPS = frozenset({Op.ping, Op.set_policy, Op.get_report, Op.poweroff})


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
        self.containers: dict[str, Container] = {}
        self._dm_counter = 0
        self._console = runtime_logging or (lambda msg: None)
        self.verbose_logging = False   # the policy's allow_runtime_logging (ep runtime_logging) turns it on
        self.poweroff_hook: Callable[[], None] = sysapi.power_off
        self.attest_api_started = threading.Event()   # set by the agent once the API socket is up (or failed)

    # -- dispatch -------------------------------------------------------------------------------

    def handle(self, request: P.Request) -> dict[str, Any]:
        method = getattr(self, f"op_{request.op.value}")
        if not self.gate.active and request.op not in OPEN_OPS:
            raise ProtocolError(ErrorCode.policy_denied, NO_POLICY_REASON, details={"op": request.op.value})
        # Ops that block waiting (for output, for a process) must not hold the state lock.
        if request.op in (Op.read_output, Op.wait_process, Op.ping, Op.get_report, Op.poweroff,
                          Op.shutdown_container):
            return method(**request.payload)
        with self._lock:
            return method(**request.payload)

    def _log(self, message: str) -> None:
        """Details of what runs go to the (host-readable) console only when the policy allows it."""
        if self.verbose_logging:
            self._console(message)

    # -- basics ---------------------------------------------------------------------------------

    def op_ping(self) -> dict[str, Any]:
        return {"protocol": P.PROTOCOL_VERSION, "agent": AGENT_VERSION, "policy_set": self.gate.active,
                "policy_hash": self.gate.policy_hash, "uptime_s": round(uptime(), 3)}

    def op_set_policy(self, policy: str) -> dict[str, Any]:
        raw = base64.b64decode(policy, validate=True)
        digest = self.gate.install(raw)
        self._console(f"policy {digest} installed (HOST_DATA from {self.gate.host_data_source})")
        self.verbose_logging = self.gate.allows("runtime_logging", {})
        gc.freeze()  # the compiled policy lives as long as the agent (see agent.py)
        return {"policy_hash": digest, "host_data_source": self.gate.host_data_source}

    def op_get_properties(self) -> dict[str, Any]:
        self.gate.enforce("get_properties", {})
        return {
            "policy_hash": self.gate.policy_hash,
            "host_data_source": self.gate.host_data_source,
            "uptime_s": round(uptime(), 3),
            "devices": {t: {"root_hash": m.root_hash, "dm": str(m.dm.node)} for t, m in self.devices.items()},
            "containers": {cid: c.refresh().value for cid, c in self.containers.items()},
            "enforce_seconds_total": round(self.gate.enforce_seconds, 6),
        }

    def op_dump_stacks(self) -> dict[str, Any]:
        self.gate.enforce("dump_stacks", {})
        frames = sys._current_frames()
        names = {t.ident: t.name for t in threading.enumerate()}
        text = "".join(f"--- thread {names.get(tid, tid)}\n" + "".join(traceback.format_stack(f))
                       for tid, f in frames.items())
        return {"stacks": text}

    def op_get_report(self, nonce: str) -> dict[str, Any]:
        # REPORT_DATA = SHA-512(nonce || runtime public key DER); docs/attestation.md.
        try:
            return snp_report.evidence_for(bytes.fromhex(nonce)).to_payload()
        except InputError as e:
            raise _err(ErrorCode.invalid_request, e.message) from e
        except AttestationError as e:
            raise _err(ErrorCode.unavailable, e.message) from e

    def op_poweroff(self) -> dict[str, Any]:
        def later() -> None:
            time.sleep(0.2)  # let the reply reach the host first
            self.poweroff_hook()
        threading.Thread(target=later, name="poweroff", daemon=True).start()
        return {}

    # -- devices --------------------------------------------------------------------------------

    @staticmethod
    def _check_device_target(target: str) -> Path:
        if not (re.fullmatch(P.LAYER_TARGET_RE, target) or re.fullmatch(P.VOLUME_TARGET_RE, target)):
            raise _err(ErrorCode.invalid_request,
                       f"mount target {target!r} must be {P.LAYERS_DIR}/<name> or {P.VOLUMES_DIR}/<volume>")
        return Path(target)

    def op_mount_device(self, device: str, target: str) -> dict[str, Any]:
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

        def action(_decision: Any) -> blockdev.VerityMount:
            try:
                return blockdev.mount_verity(node, dm_name, layout, path)
            except (blockdev.BlockError, OSError) as e:
                raise _err(ErrorCode.failed, str(e)) from None

        mounted: list[blockdev.VerityMount] = []
        self.gate.enforce("mount_device", {"target": target, "device_hash": str(layout.root_hash)},
                          lambda d: mounted.append(action(d)))
        self.devices[target] = mounted[0]
        self._log(f"mounted {device} ({node}) root hash {layout.root_hash} at {target}")
        return {"root_hash": str(layout.root_hash), "data_blocks": int(layout.data_blocks),
                "dm_device": str(mounted[0].dm.node), "enforce_s": self.gate.last_enforce_seconds}

    def op_unmount_device(self, target: str) -> dict[str, Any]:
        mount = self.devices.get(target)
        if mount is None:
            raise _err(ErrorCode.not_found, f"nothing is mounted at {target}")
        users = [o.container_id for o in self.overlays.values() if target in o.layer_paths]
        if users:
            raise _err(ErrorCode.conflict, f"{target} is a layer of the overlay of {', '.join(users)}")

        def action(_decision: Any) -> None:
            try:
                blockdev.unmount_verity(mount)
            except OSError as e:
                raise _err(ErrorCode.failed, f"cannot unmount {target}: {e}") from None

        self.gate.enforce("unmount_device", {"target": target}, action)
        del self.devices[target]
        return {}

    # -- scratch and overlays -------------------------------------------------------------------

    def op_mount_scratch(self, container_id: str, encrypted: bool) -> dict[str, Any]:
        if container_id in self.scratch:
            raise _err(ErrorCode.conflict, f"container {container_id} already has a scratch")
        target = P.container_dir(container_id) + "/scratch"

        def action(_decision: Any) -> None:
            if encrypted:
                raise _err(ErrorCode.failed, "encrypted (dm-crypt) scratch is not supported by this agent; "
                                             "the tmpfs scratch lives in guest memory, which SEV-SNP encrypts")
            try:
                Path(target).mkdir(parents=True, exist_ok=True)
                sysapi.mount("tmpfs", target, "tmpfs", sysapi.MS_NODEV | sysapi.MS_NOSUID, "mode=0700")
                (Path(target) / "upper").mkdir()
                (Path(target) / "work").mkdir()
            except OSError as e:
                raise _err(ErrorCode.failed, f"cannot create scratch {target}: {e}") from None

        self.gate.enforce("scratch_mount", {"target": target, "encrypted": encrypted}, action)
        self.scratch[container_id] = Path(target)
        return {"target": target}

    def op_unmount_scratch(self, container_id: str) -> dict[str, Any]:
        target = self.scratch.get(container_id)
        if target is None:
            raise _err(ErrorCode.not_found, f"container {container_id} has no scratch")
        if any(o.container_id == container_id for o in self.overlays.values()):
            raise _err(ErrorCode.conflict, f"the overlay of {container_id} still uses its scratch")

        self.gate.enforce("scratch_unmount", {"target": str(target)}, _unmount_action(target))
        del self.scratch[container_id]
        return {}

    def op_mount_overlay(self, container_id: str, layer_paths: list[str], target: str) -> dict[str, Any]:
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

        def action(_decision: Any) -> None:
            # overlayfs lowerdir lists the top-most layer first, like layer_paths.
            opts = f"lowerdir={':'.join(layer_paths)},upperdir={scratch}/upper,workdir={scratch}/work"
            try:
                Path(target).mkdir(parents=True, exist_ok=True)
                sysapi.mount("overlay", target, "overlay", sysapi.MS_NODEV, opts)
            except OSError as e:
                raise _err(ErrorCode.failed, f"cannot mount the overlay at {target}: {e}") from None

        self.gate.enforce("mount_overlay", {"container_id": container_id, "layer_paths": list(layer_paths),
                                            "target": target}, action)
        self.overlays[target] = Overlay(container_id, Path(target), tuple(layer_paths))
        return {"enforce_s": self.gate.last_enforce_seconds}

    def op_unmount_overlay(self, target: str) -> dict[str, Any]:
        overlay = self.overlays.get(target)
        if overlay is None:
            raise _err(ErrorCode.not_found, f"no overlay is mounted at {target}")
        c = self.containers.get(overlay.container_id)
        if c is not None and not c.deleted:
            raise _err(ErrorCode.conflict, f"container {c.id} still uses {target}")

        self.gate.enforce("unmount_overlay", {"target": target}, _unmount_action(target))
        del self.overlays[target]
        return {}

    # -- volumes --------------------------------------------------------------------------------

    def op_create_volume(self, name: str, kind: str, size_mib: int | None,
                         items: dict[str, str] | None) -> dict[str, Any]:
        # Not a policy endpoint: it makes an empty (or host-filled, for secrets) tmpfs that no
        # container sees until a create_container, whose mounts the policy checks, binds it.
        path = Path(P.VOLUMES_DIR) / name
        if name in self.volumes or str(path) in self.devices:
            raise _err(ErrorCode.conflict, f"volume {name} already exists")
        if kind == "secret":
            for fname in items or {}:
                if not re.fullmatch(r"[A-Za-z0-9._-]{1,255}", fname) or fname in (".", ".."):
                    raise _err(ErrorCode.invalid_request, f"invalid secret item name {fname!r}")
        size = f",size={int(size_mib)}m" if kind == "tmpfs" and size_mib else ""
        try:
            path.mkdir(parents=True, exist_ok=True)
            sysapi.mount("tmpfs", path, "tmpfs", sysapi.MS_NODEV | sysapi.MS_NOSUID, "mode=0777" + size)
            if kind == "secret":
                for fname, b64 in (items or {}).items():
                    f = path / fname
                    f.write_bytes(base64.b64decode(b64, validate=True))
                    f.chmod(0o444)
                path.chmod(0o755)
                sysapi.mount("none", path, None, sysapi.MS_REMOUNT | sysapi.MS_RDONLY | sysapi.MS_NODEV
                             | sysapi.MS_NOSUID)
        except OSError as e:
            raise _err(ErrorCode.failed, f"cannot create volume {name}: {e}") from None
        self.volumes[name] = path
        return {"path": str(path)}

    # -- containers -----------------------------------------------------------------------------

    def _container(self, container_id: str) -> Container:
        c = self.containers.get(container_id)
        if c is None:
            raise _err(ErrorCode.not_found, f"no container {container_id}")
        return c

    def _bind_mounts(self, mounts: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[oci.BindMount]]:
        """Validate host-requested mounts: only binds of group volumes to clean container paths."""
        inputs, binds = [], []
        for i, m in enumerate(mounts):
            unknown = sorted(set(m) - {"destination", "source", "type", "options"})
            if unknown:
                raise _err(ErrorCode.invalid_request, f"mounts[{i}]: unknown fields {', '.join(unknown)}")
            dest = oci.clean_container_path(str(m.get("destination", "")))
            source = str(m.get("source", ""))
            mtype = m.get("type", "bind")
            options = m.get("options", [])
            if dest is None or dest == "/":
                raise _err(ErrorCode.invalid_request, f"mounts[{i}].destination must be an absolute path")
            if mtype != "bind" or not isinstance(options, list) or not all(isinstance(o, str) for o in options):
                raise _err(ErrorCode.invalid_request, f"mounts[{i}]: only bind mounts with string options")
            if source == ATTEST_API_DIR:
                # The attestation API socket directory (docs/kbs.md); the policy decides who gets it.
                if "ro" not in options or "rw" in options:
                    raise _err(ErrorCode.invalid_request, f"mounts[{i}]: {ATTEST_API_DIR} is bound read-only")
                if not self.attest_api_started.wait(ATTEST_API_START_TIMEOUT):
                    raise _err(ErrorCode.unavailable, "the attestation API has not started")
                inputs.append({"destination": dest, "source": source, "type": "bind", "options": list(options)})
                binds.append(oci.BindMount(dest, source, tuple(options)))
                continue
            volume = source.removeprefix(P.VOLUMES_DIR + "/")
            vpath = self.volumes.get(volume) or (Path(source) if source in self.devices else None)
            if not source.startswith(P.VOLUMES_DIR + "/") or vpath is None:
                raise _err(ErrorCode.invalid_request, f"mounts[{i}].source {source!r} is not a group volume")
            if "rbind" not in options and "bind" not in options:
                raise _err(ErrorCode.invalid_request, f"mounts[{i}]: a bind mount needs the rbind or bind option")
            inputs.append({"destination": dest, "source": source, "type": "bind", "options": list(options)})
            binds.append(oci.BindMount(dest, source, tuple(options)))
        return inputs, binds

    def op_create_container(self, container_id: str, argv: list[str], env: list[str], working_dir: str,
                            user: str, mounts: list[dict[str, Any]], capabilities: dict[str, Any] | None,
                            privileged: bool, no_new_privileges: bool, umask: str,
                            seccomp_profile_sha256: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        if container_id in self.containers:
            raise _err(ErrorCode.conflict, f"container {container_id} already exists")
        rootfs = P.container_dir(container_id) + "/rootfs"
        if rootfs not in self.overlays:
            raise _err(ErrorCode.conflict, f"mount_overlay for {container_id} first (at {rootfs})")
        if not argv:
            raise _err(ErrorCode.invalid_request, "argv is empty")
        for e in env:
            if "=" not in e:
                raise _err(ErrorCode.invalid_request, f"env entry {e.split('=')[0]!r} has no '='")
        caps = _capabilities(capabilities)
        try:
            who = resolve_user(rootfs, user)
        except UserError as e:
            raise _err(ErrorCode.failed, str(e)) from None
        mount_inputs, binds = self._bind_mounts(mounts)
        identity = _identity(who, umask)
        input = {
            "container_id": container_id, "argv": list(argv), "env": list(env), "working_dir": working_dir,
            "mounts": oci.base_mounts() + mount_inputs, **identity,
            "capabilities": {k: list(v) for k, v in caps.items()},
            "privileged": privileged, "no_new_privileges": no_new_privileges,
            "seccomp_profile_sha256": seccomp_profile_sha256,
        }
        created: list[Container] = []

        def action(decision: Any) -> None:
            results = getattr(decision, "results", None) or {}
            final_env = tuple(results.get("env_list") if results.get("env_list") is not None else env)
            final_caps = _capabilities(results.get("caps_list")) if results.get("caps_list") is not None else caps
            stdio = bool(results.get("allow_stdio_access", False))
            process = oci.ProcessSpec(argv=tuple(argv), env=final_env, cwd=working_dir, uid=who.uid, gid=who.gid,
                                      additional_gids=tuple(g for g, _ in who.additional_gids),
                                      umask=int(umask, 8), capabilities=final_caps,
                                      no_new_privileges=no_new_privileges)
            spec = oci.build_spec(oci.ContainerSpec(container_id, rootfs, process, self.hostname, tuple(binds),
                                                    privileged))
            c = Container(container_id, Path(P.container_dir(container_id)), Path(rootfs), tuple(argv), stdio,
                          exec_caps=final_caps, user=(who.uid, who.gid, process.additional_gids),
                          identity=identity, working_dir=working_dir, no_new_privileges=no_new_privileges)
            try:
                runtime.create(c, spec)
            except (CrunError, OSError) as e:
                runtime.delete(c)
                raise _err(ErrorCode.failed, f"crun create {container_id}: {e}") from None
            created.append(c)

        self.gate.enforce("create_container", input, action)
        c = created[0]
        self.containers[container_id] = c
        self._log(f"created container {container_id}")
        return {"pid": c.init.pid if c.init else None, "stdio": c.stdio,
                "enforce_s": self.gate.last_enforce_seconds, "enforce_cpu_s": self.gate.last_enforce_cpu_seconds,
                "total_s": time.perf_counter() - t0}

    def op_start_container(self, container_id: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        c = self._container(container_id)
        if c.status != ContainerStatus.created:
            raise _err(ErrorCode.conflict, f"container {container_id} is {c.refresh().value}, not created")
        try:
            runtime.start(c)
        except CrunError as e:
            raise _err(ErrorCode.failed, f"crun start {container_id}: {e}") from None
        return {"pid": c.init.pid if c.init else None, "total_s": time.perf_counter() - t0}

    def op_exec_process(self, container_id: str, argv: list[str], env: list[str], working_dir: str) -> dict[str, Any]:
        c = self._container(container_id)
        if c.refresh() != ContainerStatus.running:
            raise _err(ErrorCode.conflict, f"container {container_id} is {c.status.value}, not running")
        if not argv:
            raise _err(ErrorCode.invalid_request, "argv is empty")
        exec_id = runtime.next_exec_id(c)
        started: list[runtime.Process] = []

        def action(decision: Any) -> None:
            results = getattr(decision, "results", None) or {}
            final_env = tuple(results.get("env_list") if results.get("env_list") is not None else env)
            try:
                started.append(runtime.exec_process(c, exec_id, tuple(argv), final_env, cwd))
            except (CrunError, OSError) as e:
                reason = e.reason if isinstance(e, CrunError) else "other"
                raise _err(ErrorCode.failed, f"exec in {container_id}: {e}", reason=reason) from None

        # The process runs as the container's user with its capabilities, in its working dir unless asked.
        cwd = working_dir or c.working_dir
        self.gate.enforce("exec_in_container", {"container_id": container_id, "argv": list(argv), "env": list(env),
                                                "working_dir": cwd, **c.identity,
                                                "capabilities": {k: list(v) for k, v in c.exec_caps.items()},
                                                "no_new_privileges": c.no_new_privileges}, action)
        return {"exec_id": exec_id, "pid": started[0].pid, "stdio": c.stdio}

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

    def op_signal_process(self, container_id: str, exec_id: str | None, signal: int) -> dict[str, Any]:
        proc = self._process(container_id, exec_id)
        if not 1 <= signal <= 64:
            raise _err(ErrorCode.invalid_request, f"invalid signal {signal}")
        self.gate.enforce("signal_container_process",
                          {"container_id": container_id, "signal": signal, "is_init": exec_id is None,
                           "argv": list(proc.argv)},
                          lambda _d: runtime.kill(proc, signal))
        return {}

    def op_wait_process(self, container_id: str, exec_id: str | None, timeout: float) -> dict[str, Any]:
        with self._lock:
            proc = self._process(container_id, exec_id)
        status = proc.status(min(max(0.0, float(timeout)), 600.0))
        if status is None:
            return {"running": True, "exit_code": None, "signal": None}
        return {"running": False, "exit_code": status.shell_code, "signal": status.signal}

    def op_read_output(self, container_id: str, exec_id: str | None, offset: int, max_bytes: int,
                       wait: float) -> dict[str, Any]:
        with self._lock:
            c = self._container(container_id)
            proc = self._process(container_id, exec_id)
        if not c.stdio or proc.log is None:
            raise _err(ErrorCode.policy_denied,
                       f"the policy does not allow access to the stdio of container {container_id} "
                       "(allow_stdio_access is false)", endpoint="create_container")
        res = proc.log.read(max(0, offset), min(max(1, max_bytes), 512 * 1024), min(max(0.0, float(wait)), 60.0))
        return {"chunks": [{"stream": ch.stream, "data": P.b64encode(ch.data)} for ch in res.chunks],
                "next_offset": res.next_offset, "dropped": res.dropped, "eof": res.eof}

    def op_shutdown_container(self, container_id: str, timeout: float) -> dict[str, Any]:
        # Decide and send SIGTERM under the lock; wait for the exit without it, so that the containers
        # of a group can be stopped in parallel (one port each) and other requests are not held up.
        with self._lock:
            c = self._container(container_id)
            if c.stopping:
                raise _err(ErrorCode.conflict, f"container {container_id} is already being shut down")
            self.gate.enforce("shutdown_container", {"container_id": container_id},
                              lambda _d: runtime.begin_stop(c))
            c.stopping = True
        status = runtime.finish_stop(c, min(max(0.0, float(timeout)), 300.0))
        return {"exit_code": status.shell_code if status else None, "signal": status.signal if status else None}

    def op_list_containers(self) -> dict[str, Any]:
        out = []
        for cid, c in self.containers.items():
            status = c.refresh()
            exit_status = c.init.status() if c.init and status == ContainerStatus.exited else None
            out.append({"id": cid, "status": status.value, "pid": c.init.pid if c.init else None,
                        "exit_code": exit_status.shell_code if exit_status else None, "stdio": c.stdio})
        return {"containers": out}


def _unmount_action(target: str | Path) -> Callable[[Any], None]:
    """A policy action that lazily unmounts `target` (processes still using it keep their view)."""
    def action(_decision: Any) -> None:
        try:
            sysapi.umount(target, detach=True)
        except OSError as e:
            raise _err(ErrorCode.failed, f"cannot unmount {target}: {e}") from None
    return action


def _identity(who: ResolvedUser, umask: str) -> dict[str, Any]:
    """The user, groups and umask fields of create/exec policy inputs."""
    return {"user": {"id": str(who.uid), "name": who.user_name},
            "groups": [{"id": str(who.gid), "name": who.group_name}]
                      + [{"id": str(g), "name": n} for g, n in who.additional_gids],
            "umask": umask.rjust(4, "0")}


def _capabilities(raw: Any) -> dict[str, tuple[str, ...]]:
    """Normalise a {set: [CAP_...]} object; missing sets are empty. Raises invalid_request."""
    if raw is None:
        default = tuple(oci.DEFAULT_CAPABILITIES)
        return {"bounding": default, "effective": default, "inheritable": (), "permitted": default,
                "ambient": ()}
    if not isinstance(raw, dict) or set(raw) - set(oci.CAPABILITY_SETS):
        raise _err(ErrorCode.invalid_request, f"capabilities must be an object with keys {oci.CAPABILITY_SETS}")
    out = {}
    for name in oci.CAPABILITY_SETS:
        values = raw.get(name) or []
        if not isinstance(values, list | tuple) or not all(isinstance(v, str) and re.fullmatch(r"CAP_[A-Z_]+", v)
                                                           for v in values):
            raise _err(ErrorCode.invalid_request, f"capabilities.{name} must be a list of CAP_* names")
        out[name] = tuple(values)
    return out
