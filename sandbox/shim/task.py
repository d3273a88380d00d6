"""The Task service (`containerd.task.v2.Task`) of one shim: a pod sandbox and the containers in it.

The first Create a shim receives makes the sandbox: for CRI's sandbox (pause) container, a UVM with
the pod's policy and every image the policy lists, and no process (the UVM is the pod); for any other
container (`ctr run`), a UVM holding just that container. Later Creates with the same sandbox id are
policy-checked creates in that UVM. Deleting the sandbox's own task takes the UVM down.

Process ids: containerd shows the task's pid; ours is QEMU's (the process that holds the sandbox, as
Kata reports its hypervisor), while Pids lists the processes' pids inside the guest.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from sandbox.fsutil import atomic_write
from sandbox.group.spec import TeeMode, VolumeKind
from sandbox.launch.agent_client import AgentDenied, AgentError
from sandbox.shared.errors import InputError, PolicyDenied, SandboxError
from sandbox.shared.policy.model import parse_policy
from sandbox.shim import messages as M
from sandbox.shim.bundle import CRI_CONTAINER_NAME, CRI_SANDBOX_UID, NodeConfig, OciContainer, read_bundle
from sandbox.shim.events import Publisher
from sandbox.shim.sandbox import (
    GuestSandbox,
    Launch,
    containers_from_policy,
    cri_env_to_drop,
    guest_container_id,
    sandbox_name,
)
from sandbox.shim.stdio import OutputPump, StdioError, Stream, open_output
from sandbox.shim.ttrpc import Code, RpcError
from sandbox.shim.volumes import (
    check_bind_sources,
    kubelet_volume_dir,
    launch_volumes,
    pod_volumes,
    volume_binds,
)

log = logging.getLogger("parma-sandbox.shim")

SERVICE = "containerd.task.v2.Task"
VERSION = "parma-sandbox shim v2"
STATE_FILE = "parma-shim.json"      # in the sandbox container's bundle: what `delete` needs to clean up
VOLUME_STAGING = "parma-volumes"    # in the bundle: kubelet's configMap directories, dereferenced
CREATED, RUNNING, STOPPED = M.TASK_STATUS["CREATED"], M.TASK_STATUS["RUNNING"], M.TASK_STATUS["STOPPED"]


@dataclass
class Proc:
    """A task's init process or one of its exec processes, as containerd sees it."""

    exec_id: str                       # "" for the init process
    stdin: str
    stdout: str
    stderr: str
    terminal: bool = False
    status: int = CREATED
    guest_pid: int = 0
    exit_status: int = 0
    exited_at: float = 0.0
    exited: threading.Event = field(default_factory=threading.Event)
    argv: list[str] = field(default_factory=list)   # exec processes: what to run
    env: list[str] = field(default_factory=list)
    cwd: str = ""
    agent_exec_id: str | None = None


@dataclass
class Task:
    id: str
    bundle: Path
    oci: OciContainer
    guest_id: str
    init: Proc
    virtual: bool                      # CRI's pause container: the UVM itself, no process in it
    execs: dict[str, Proc] = field(default_factory=dict)

    def proc(self, exec_id: str) -> Proc:
        if not exec_id:
            return self.init
        if exec_id not in self.execs:
            raise RpcError(Code.NOT_FOUND, f"process {exec_id} does not exist in task {self.id}")
        return self.execs[exec_id]


class TaskService:
    """Task API handlers. One instance per shim process (one per pod sandbox)."""

    def __init__(self, *, namespace: str, node: NodeConfig, publisher: Publisher,
                 on_shutdown: Callable[[], None]) -> None:
        self.namespace = namespace
        self.node = node
        self.events = publisher
        self.on_shutdown = on_shutdown
        self.sandbox: GuestSandbox | None = None
        self.sandbox_task: str | None = None
        self.pump: OutputPump | None = None
        self.tasks: dict[str, Task] = {}
        self._lock = threading.RLock()
        self._create_lock = threading.Lock()

    def handlers(self) -> dict[tuple[str, str], Callable[[bytes], bytes]]:
        table: dict[str, tuple[type[M.DynamicMessage], Callable[[M.DynamicMessage], M.DynamicMessage]]] = {
            "Create": (M.CreateTaskRequest, self.create), "Start": (M.StartRequest, self.start),
            "State": (M.StateRequest, self.state), "Delete": (M.DeleteRequest, self.delete),
            "Pids": (M.PidsRequest, self.pids), "Kill": (M.KillRequest, self.kill),
            "Exec": (M.ExecProcessRequest, self.exec), "ResizePty": (M.ResizePtyRequest, self.resize_pty),
            "CloseIO": (M.CloseIORequest, self.close_io), "Wait": (M.WaitRequest, self.wait),
            "Connect": (M.ConnectRequest, self.connect), "Shutdown": (M.ShutdownRequest, self.shutdown),
            "Pause": (M.PauseRequest, self._unsupported("pausing a confidential sandbox")),
            "Resume": (M.ResumeRequest, self._unsupported("pausing a confidential sandbox")),
            "Stats": (M.StatsRequest, self._unsupported("task metrics")),
        }

        def wrap(cls: type[M.DynamicMessage], fn: Callable[[M.DynamicMessage], M.DynamicMessage]) -> Callable[[bytes], bytes]:
            def handler(payload: bytes) -> bytes:
                try:
                    return fn(M.parse(cls, payload)).SerializeToString()
                except RpcError:
                    raise
                except PolicyDenied as e:
                    raise RpcError(Code.PERMISSION_DENIED, _message(e)) from None
                except InputError as e:
                    raise RpcError(Code.INVALID_ARGUMENT, _message(e)) from None
                except SandboxError as e:
                    raise RpcError(Code.UNKNOWN, _message(e)) from None
            return handler

        return {(SERVICE, name): wrap(cls, fn) for name, (cls, fn) in table.items()}

    @staticmethod
    def _unsupported(what: str) -> Callable[[M.DynamicMessage], M.DynamicMessage]:
        def fn(_req: M.DynamicMessage) -> M.DynamicMessage:
            raise RpcError(Code.UNIMPLEMENTED, f"{what} is not supported by the parma runtime")
        return fn

    def _task(self, task_id: str) -> Task:
        with self._lock:
            if task_id not in self.tasks:
                raise RpcError(Code.NOT_FOUND, f"task {task_id} not found")
            return self.tasks[task_id]

    def _pid(self) -> int:
        return self.sandbox.qemu_pid if self.sandbox else 0

    # -- Create / Start ---------------------------------------------------------------------------

    def create(self, req: M.DynamicMessage) -> M.DynamicMessage:
        if req.terminal:
            raise RpcError(Code.FAILED_PRECONDITION, "the parma runtime gives containers no TTY (run without -t)")
        if req.checkpoint:
            raise RpcError(Code.UNIMPLEMENTED, "restoring a checkpoint is not supported by the parma runtime")
        oci = read_bundle(Path(req.bundle))
        with self._create_lock:
            with self._lock:
                if req.id in self.tasks:
                    raise RpcError(Code.ALREADY_EXISTS, f"task {req.id} already exists")
            init = Proc("", req.stdin, req.stdout, req.stderr)
            task = Task(req.id, Path(req.bundle), oci, guest_container_id(req.id), init, virtual=oci.is_pod_sandbox)
            if self.sandbox is None:
                self._launch(task)
            if not task.virtual:
                self._create_container(task)
            with self._lock:
                self.tasks[req.id] = task
        self.events.publish("TaskCreate", container_id=req.id, bundle=req.bundle, rootfs=list(req.rootfs),
                            io=M.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr),
                            pid=self._pid())
        return M.CreateTaskResponse(pid=self._pid())

    def _launch(self, task: Task) -> None:
        oci = task.oci
        policy = oci.policy()
        if task.virtual:
            if policy is None:
                raise RpcError(Code.FAILED_PRECONDITION,
                               "the pod has no io.parma.policy annotation (its containers are not known when "
                               "the sandbox starts, so a policy cannot be generated for a pod)"
                               "; hint: 'parma-sandbox export k8s' writes it, and containerd passes it only when "
                               "the runtime's pod_annotations include \"io.parma.*\"")
            parsed = parse_policy(policy, "io.parma.policy")
            containers = containers_from_policy(parsed)
            # kubelet has mounted the pod's volumes before it asks for the sandbox: every volume the
            # policy lists is made now, a files volume from kubelet's configMap directory of its name.
            volumes = pod_volumes(parsed, self.node.kubelet_dir, oci.annotations.get(CRI_SANDBOX_UID),
                                  task.bundle / VOLUME_STAGING)
            uid = oci.annotations.get(CRI_SANDBOX_UID) or ""
            shipped = {v.name: str(kubelet_volume_dir(self.node.kubelet_dir, uid, v.name))
                       for v in volumes if v.kind == VolumeKind.files}
        else:
            if policy is None and not self.node.allow_generated_policy:
                raise RpcError(Code.FAILED_PRECONDITION,
                               "no io.parma.policy annotation, and this node does not generate policies "
                               f"(allow_generated_policy in {self.node.source})")
            containers = (oci.group_container("main", self._image_of(oci, policy)),)
            # A container of its own: its sandbox has the volumes its binds map to.
            binds = volume_binds(parse_policy(policy, "io.parma.policy") if policy is not None else None, oci,
                                 oci.annotations.get(CRI_CONTAINER_NAME))
            volumes = launch_volumes(binds, task.bundle / VOLUME_STAGING)
            shipped = {b.volume: b.source for b in binds}
        ports = oci.ports()
        if ports and oci.netns is None:
            log.warning("%s lists ports (io.parma.ports) but names no network namespace: nothing is forwarded",
                        task.id)
        name = sandbox_name(self.namespace, oci.sandbox_id(task.id))
        t0 = time.monotonic()
        log.info("launching sandbox %s for %s", name, task.id)
        vcpus, memory_mib = oci.uvm_size(self.node)
        self.sandbox = GuestSandbox.launch(Launch(name=name, containers=containers, policy=policy,
                                                  tee=_tee(self.node), vcpus=vcpus, memory_mib=memory_mib,
                                                  volumes=volumes, netns=oci.netns, ports=ports),
                                           task.bundle)
        self.sandbox.volume_sources = shipped
        self.sandbox_task = task.id
        atomic_write(task.bundle / STATE_FILE, json.dumps({"sandbox": name, "config": self.node.path}).encode())
        log.info("sandbox %s up in %.1f s (qemu pid %d)", name, time.monotonic() - t0, self.sandbox.qemu_pid)
        self.pump = OutputPump(self.sandbox.connect)

    @staticmethod
    def _image_of(oci: OciContainer, policy: bytes | None) -> str:
        if ref := oci.image():
            return ref
        if policy is not None:
            ids = {c.id for c in parse_policy(policy, "io.parma.policy").containers if c.id}
            if len(ids) == 1:
                return ids.pop()
        raise RpcError(Code.INVALID_ARGUMENT, "cannot tell which image this container runs; "
                                              "hint: add --annotation io.parma.image=REF (the policy's image)")

    def _create_container(self, task: Task) -> None:
        assert self.sandbox is not None
        oci = task.oci
        name = oci.annotations.get(CRI_CONTAINER_NAME) or "main"
        image = self._image_of(oci, oci.policy() if task.id == self.sandbox_task else None)
        drop = cri_env_to_drop(self.sandbox.policy, name) if oci.is_cri_container else frozenset()
        try:
            binds = volume_binds(self.sandbox.policy, oci, oci.annotations.get(CRI_CONTAINER_NAME))
            check_bind_sources(binds, self.sandbox.volume_sources)
            container = replace(oci.group_container(_group_name(name), image, drop_env=drop),
                                mounts=tuple(b.mount for b in binds))
            result = self.sandbox.create(task.guest_id, container)
        except BaseException:
            if task.id == self.sandbox_task:
                self._teardown()
            raise
        task.init.guest_pid = int(result.get("pid") or 0)

    def start(self, req: M.DynamicMessage) -> M.DynamicMessage:
        task = self._task(req.id)
        proc = task.proc(req.exec_id)
        if proc.status != CREATED:
            raise RpcError(Code.FAILED_PRECONDITION, f"process {req.exec_id or req.id} was already started")
        assert self.sandbox is not None and self.pump is not None
        if task.virtual and not req.exec_id:
            proc.status = RUNNING
            self.events.publish("TaskStart", container_id=task.id, pid=self._pid())
            return M.StartResponse(pid=self._pid())
        if task.virtual:
            raise RpcError(Code.FAILED_PRECONDITION, "the pod sandbox container runs no processes")
        try:
            stdout, stderr = open_output(proc.stdout), open_output(proc.stderr)
        except (StdioError, OSError) as e:
            raise RpcError(Code.FAILED_PRECONDITION, str(e)) from None
        try:
            if req.exec_id:
                try:
                    r = self.sandbox.exec(task.guest_id, proc.argv, proc.env, proc.cwd)
                except AgentError as e:
                    code = Code.NOT_FOUND if e.details.get("reason") == "not_found" else Code.FAILED_PRECONDITION
                    raise RpcError(code, _message(e)) from None
                proc.agent_exec_id, proc.guest_pid = r["exec_id"], int(r.get("pid") or 0)
                stdio = bool(r.get("stdio", True))
            else:
                r = self.sandbox.start(task.guest_id)
                proc.guest_pid = int(r.get("pid") or proc.guest_pid)
                stdio = True
        except BaseException:
            for out in (stdout, stderr):
                if out is not None:
                    out.close()
            raise
        proc.status = RUNNING
        self.pump.add(Stream(task.guest_id, proc.agent_exec_id, stdout, stderr,
                             on_exit=lambda code: self._exited(task, proc, code), stdio=stdio))
        if req.exec_id:
            self.events.publish("TaskExecStarted", container_id=task.id, exec_id=req.exec_id, pid=self._pid())
        else:
            self.events.publish("TaskStart", container_id=task.id, pid=self._pid())
        return M.StartResponse(pid=self._pid())

    def _exited(self, task: Task, proc: Proc, code: int) -> None:
        if proc.exited.is_set():
            return
        proc.status, proc.exit_status, proc.exited_at = STOPPED, code, time.time()
        proc.exited.set()
        self.events.publish("TaskExit", container_id=task.id, id=proc.exec_id or task.id, pid=self._pid(),
                            exit_status=code, exited_at=M.timestamp(proc.exited_at))

    # -- Exec / Kill / Wait -----------------------------------------------------------------------

    def exec(self, req: M.DynamicMessage) -> M.DynamicMessage:
        task = self._task(req.id)
        if req.terminal:
            raise RpcError(Code.FAILED_PRECONDITION, "the parma runtime gives processes no TTY (exec without -t)")
        if task.virtual:
            raise RpcError(Code.FAILED_PRECONDITION, "the pod sandbox container runs no processes")
        try:
            process = M.unpack_oci_process(req.spec)
        except ValueError as e:
            raise RpcError(Code.INVALID_ARGUMENT, str(e)) from None
        argv = [str(a) for a in process.get("args") or []]
        if not argv:
            raise RpcError(Code.INVALID_ARGUMENT, "exec: no command")
        with self._lock:
            if req.exec_id in task.execs:
                raise RpcError(Code.ALREADY_EXISTS, f"exec process {req.exec_id} already exists")
            task.execs[req.exec_id] = Proc(req.exec_id, req.stdin, req.stdout, req.stderr, argv=argv,
                                           env=[str(e) for e in process.get("env") or []],
                                           cwd=str(process.get("cwd") or ""))
        self.events.publish("TaskExecAdded", container_id=task.id, exec_id=req.exec_id)
        return M.Empty()

    def kill(self, req: M.DynamicMessage) -> M.DynamicMessage:
        task = self._task(req.id)
        proc = task.proc(req.exec_id)
        sig = int(req.signal) or signal.SIGTERM
        if proc.status == STOPPED:
            raise RpcError(Code.NOT_FOUND, f"process {req.exec_id or req.id} is not running")
        if task.virtual:
            # The pod's pause "process": it ends as pause does (0 on SIGTERM/SIGINT, else 128+signal).
            self._exited(task, proc, 0 if sig in (signal.SIGTERM, signal.SIGINT) else 128 + sig)
            return M.Empty()
        if proc.status == CREATED:
            self._exited(task, proc, 128 + sig)
            return M.Empty()
        assert self.sandbox is not None
        exec_id = proc.agent_exec_id if req.exec_id else None
        if not req.exec_id and sig == signal.SIGKILL:
            self._background_shutdown(task, grace=0.0)
            return M.Empty()
        try:
            self.sandbox.signal(task.guest_id, exec_id, sig)
        except AgentDenied as e:
            if req.exec_id or sig != signal.SIGTERM:
                raise RpcError(Code.PERMISSION_DENIED, _message(e)) from None
            # The policy does not list SIGTERM for this container, but stopping it is always allowed:
            # the agent's shutdown sends SIGTERM and SIGKILL after the grace period.
            self._background_shutdown(task, grace=30.0)
        except AgentError as e:
            raise RpcError(Code.NOT_FOUND if e.code == "not_found" else Code.FAILED_PRECONDITION,
                           _message(e)) from None
        return M.Empty()

    def _background_shutdown(self, task: Task, grace: float) -> None:
        assert self.sandbox is not None
        sandbox = self.sandbox

        def run() -> None:
            try:
                sandbox.shutdown_container(task.guest_id, grace)
            except SandboxError as e:
                log.warning("stopping %s: %s", task.id, e)
        threading.Thread(target=run, daemon=True, name=f"stop-{task.guest_id[:12]}").start()

    def wait(self, req: M.DynamicMessage) -> M.DynamicMessage:
        proc = self._task(req.id).proc(req.exec_id)
        proc.exited.wait()
        return M.WaitResponse(exit_status=proc.exit_status, exited_at=M.timestamp(proc.exited_at))

    # -- State / Pids / Connect -------------------------------------------------------------------

    def state(self, req: M.DynamicMessage) -> M.DynamicMessage:
        task = self._task(req.id)
        proc = task.proc(req.exec_id)
        resp = M.StateResponse(id=req.id, bundle=str(task.bundle), pid=self._pid(), status=proc.status,
                               stdin=proc.stdin, stdout=proc.stdout, stderr=proc.stderr, terminal=proc.terminal,
                               exit_status=proc.exit_status, exec_id=req.exec_id)
        if proc.exited_at:
            resp.exited_at.CopyFrom(M.timestamp(proc.exited_at))
        return resp

    def pids(self, req: M.DynamicMessage) -> M.DynamicMessage:
        task = self._task(req.id)
        procs = [task.init, *task.execs.values()]
        return M.PidsResponse(processes=[M.ProcessInfo(pid=p.guest_pid) for p in procs
                                         if p.status == RUNNING and p.guest_pid])

    def connect(self, req: M.DynamicMessage) -> M.DynamicMessage:
        return M.ConnectResponse(shim_pid=os.getpid(), task_pid=self._pid(), version=VERSION)

    def resize_pty(self, req: M.DynamicMessage) -> M.DynamicMessage:
        raise RpcError(Code.FAILED_PRECONDITION, "the parma runtime gives processes no TTY")

    def close_io(self, req: M.DynamicMessage) -> M.DynamicMessage:
        self._task(req.id).proc(req.exec_id)   # stdin is never attached: closing it is a no-op
        return M.Empty()

    # -- Delete / Shutdown ------------------------------------------------------------------------

    def delete(self, req: M.DynamicMessage) -> M.DynamicMessage:
        task = self._task(req.id)
        proc = task.proc(req.exec_id)
        if proc.status == RUNNING:
            raise RpcError(Code.FAILED_PRECONDITION, f"process {req.exec_id or req.id} is still running; kill it first")
        if proc.status == CREATED and not req.exec_id and not task.virtual:
            self._exited(task, proc, 128 + signal.SIGKILL)
        resp = M.DeleteResponse(pid=self._pid(), exit_status=proc.exit_status,
                                exited_at=M.timestamp(proc.exited_at or time.time()))
        if req.exec_id:
            with self._lock:
                task.execs.pop(req.exec_id, None)
            return resp
        with self._lock:
            self.tasks.pop(req.id, None)
        if req.id == self.sandbox_task:
            self._teardown()
        self.events.publish("TaskDelete", container_id=req.id, pid=resp.pid, exit_status=resp.exit_status,
                            exited_at=resp.exited_at, id=req.id)
        return resp

    def _teardown(self) -> None:
        """Take the UVM down: containers first, then the VM, then its state (`parma-sandbox down`)."""
        if self.pump is not None:
            self.pump.stop()
            self.pump = None
        if self.sandbox is not None:
            log.info("taking sandbox %s down", self.sandbox.name)
            try:
                self.sandbox.down()
            finally:
                self.sandbox = None

    def shutdown(self, req: M.DynamicMessage) -> M.DynamicMessage:
        with self._lock:
            busy = bool(self.tasks) and not req.now
        if not busy:
            self._teardown()
            self.on_shutdown()
        return M.Empty()


def _group_name(name: str) -> str:
    """A CRI container name as a group container name (the plan names containers, the guest does not)."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return cleaned or "main"


def _tee(node: NodeConfig) -> TeeMode:
    return TeeMode(node.tee)


def _message(e: BaseException) -> str:
    if isinstance(e, SandboxError) and e.hint:
        return f"{e.message} (hint: {e.hint})"
    return str(e)
