"""`containerd-shim-parma-v2`: the command containerd runs for runtime `io.containerd.parma.v2`.

containerd's shim v2 protocol (containerd 1.6, runtime/v2):
- `start` (cwd: the bundle; runtime options on stdin as a protobuf Any): make or find the shim of the
  container's sandbox, print its socket address on stdout and exit. The first container of a sandbox
  creates the socket and re-executes this program as the daemon, with the listening socket as an
  inherited fd and stdout/stderr on the bundle's `log` FIFO (containerd copies it to its own log).
  Later containers of the same pod (CRI's io.kubernetes.cri.sandbox-id) get the running shim's address.
- (no action): the daemon, serving the Task API over ttrpc on that socket until Shutdown.
- `delete` (cwd or -bundle: the bundle): clean up after a shim that is gone; print a DeleteResponse.

Flags are Go-style, as containerd passes them: -namespace, -address, -publish-binary, -id, -bundle,
-debug. The daemon gets two of ours: -socket-fd and -config.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from sandbox.fsutil import atomic_write
from sandbox.launch import lifecycle
from sandbox.shared.errors import SandboxError
from sandbox.shim import messages as M
from sandbox.shim.bundle import NodeConfig, load_node_config, read_bundle
from sandbox.shim.events import Publisher
from sandbox.shim.task import STATE_FILE, TaskService
from sandbox.shim.ttrpc import Server, listen, unix_path
from sandbox.state import StateStore

log = logging.getLogger("parma-sandbox.shim")

_STRING_FLAGS = {"namespace", "address", "publish-binary", "id", "bundle", "socket-fd", "config", "socket"}
_BOOL_FLAGS = {"debug", "v", "version"}
EXIT_KILLED = 128 + signal.SIGKILL


@dataclass(frozen=True)
class ShimFlags:
    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    socket_fd: str = ""
    config: str = ""
    debug: bool = False
    version: bool = False
    action: str = ""


class UsageError(Exception):
    pass


def parse_flags(argv: list[str]) -> ShimFlags:
    """Go `flag` syntax: -name value, -name=value, --name; bool flags take no value; stop at the action."""
    values: dict[str, object] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            values["version" if name in ("v", "version") else name] = value.lower() not in ("false", "0") if eq else True
        elif name in _STRING_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            values[name.replace("-", "_")] = value
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    rest = argv[i + 1:] if i < len(argv) and argv[i] == "--" else argv[i:]
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments after {rest[0]!r}: {' '.join(rest[1:])}")
    return ShimFlags(**values, action=rest[0] if rest else "")  # type: ignore[arg-type]


def socket_address(node: NodeConfig, containerd_address: str, namespace: str, grouping: str) -> str:
    """Where a sandbox's shim listens: one socket per (containerd, namespace, sandbox), as containerd's own
    shims name them (sha256 of address/namespace/id under the socket directory; 128 bits of it, which
    leaves room in the 107 bytes of a socket path for a deeper socket directory)."""
    digest = hashlib.sha256(os.path.join(containerd_address, namespace, grouping).encode()).hexdigest()[:32]
    return f"unix://{os.path.join(node.socket_dir, digest)}"


def _can_connect(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def _read_options() -> str | None:
    """The runtime options containerd sends on `start`'s stdin; returns their ConfigPath."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    data = sys.stdin.buffer.read()
    if not data:
        return None
    opts = M.parse(M.AnyMessage, data)
    if opts.type_url.rpartition("/")[2] == "runtimeoptions.v1.Options":
        return M.parse(M.RuntimeOptions, opts.value).config_path or None
    return None


def _log_fifo(bundle: Path) -> int:
    """The bundle's `log` FIFO for writing (containerd holds its read end), else /dev/null."""
    try:
        fd = os.open(bundle / "log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd
    except OSError:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


def cmd_start(flags: ShimFlags) -> int:
    bundle = Path.cwd()
    config_path = _read_options()
    node = load_node_config(config_path)
    oci = read_bundle(bundle)
    address = socket_address(node, flags.address, flags.namespace, oci.sandbox_id(flags.id))
    path = unix_path(address)
    try:
        listener = listen(path)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        if _can_connect(path):          # the pod's shim is running: this container joins it
            atomic_write(bundle / "address", address.encode())
            sys.stdout.write(address)
            return 0
        os.unlink(path)
        listener = listen(path)
    try:
        args = [sys.executable, "-m", "sandbox.shim.main", "-namespace", flags.namespace, "-id", flags.id,
                "-address", flags.address, "-publish-binary", flags.publish_binary,
                "-socket-fd", str(listener.fileno()), "-config", node.path]
        if flags.debug:
            args.append("-debug")
        log_fd = _log_fifo(bundle)
        try:
            subprocess.Popen(args, cwd=bundle, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                             pass_fds=(listener.fileno(),), start_new_session=True)
        finally:
            os.close(log_fd)
        atomic_write(bundle / "address", address.encode())
    except BaseException:
        listener.close()
        os.unlink(path)
        raise
    listener.close()
    sys.stdout.write(address)
    return 0


def cmd_delete(flags: ShimFlags) -> int:
    """After the daemon is gone (crashed, killed, or done): take its sandbox down if it is still there."""
    bundle = Path(flags.bundle) if flags.bundle else Path.cwd()
    with contextlib.suppress(OSError, ValueError):
        state = json.loads((bundle / STATE_FILE).read_text())
        node = load_node_config(state.get("config") or None)
        if node.runtime_dir:
            os.environ["PARMA_SANDBOX_RUNTIME"] = node.runtime_dir
        if StateStore().load(state["sandbox"]) is not None:
            try:
                lifecycle.down(state["sandbox"])
            except SandboxError as e:
                print(f"parma shim delete: {e}", file=sys.stderr)
    sys.stdout.buffer.write(M.DeleteResponse(exit_status=EXIT_KILLED, exited_at=M.timestamp()).SerializeToString())
    return 0


def serve(flags: ShimFlags) -> int:
    node = load_node_config(flags.config or None)
    if node.runtime_dir:
        os.environ["PARMA_SANDBOX_RUNTIME"] = node.runtime_dir
    listener = socket.socket(fileno=int(flags.socket_fd))
    path = listener.getsockname()
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), flags.namespace)
    server: Server | None = None

    def shutdown() -> None:
        # After the Shutdown answer has gone out.
        threading.Timer(0.2, lambda: server.close() if server else None).start()

    service = TaskService(namespace=flags.namespace, node=node, publisher=publisher, on_shutdown=shutdown)
    server = Server(service.handlers(), on_error=lambda what, e: log.exception("%s failed", what, exc_info=e))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.close() if server else None)
    log.info("shim for %s/%s serving on %s (pid %d)", flags.namespace, flags.id, path, os.getpid())
    try:
        server.serve(listener)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            if isinstance(path, str) and path:
                os.unlink(path)
        try:
            service.shutdown(M.ShutdownRequest(now=True))   # a sandbox still up (SIGTERM) goes down too
        except SandboxError as e:
            log.warning("teardown: %s", e)
        publisher.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(args)
    except UsageError as e:
        print(f"containerd-shim-parma-v2: {e}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.DEBUG if flags.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s parma-shim[%(process)d] %(levelname)s %(message)s")
    if flags.version:
        from sandbox import __version__
        print(f"containerd-shim-parma-v2 (parma-sandbox {__version__})")
        sys.exit(0)
    if not flags.namespace:
        print("containerd-shim-parma-v2: shim namespace cannot be empty", file=sys.stderr)
        sys.exit(1)
    try:
        if flags.action == "start":
            code = cmd_start(flags)
        elif flags.action == "delete":
            code = cmd_delete(flags)
        elif flags.action == "":
            if not flags.socket_fd:
                raise UsageError("the daemon is started by 'start' (it needs -socket-fd)")
            code = serve(flags)
            # Handler threads may still block in Wait for processes that are gone with the sandbox;
            # the daemon has cleaned up, so it leaves now rather than joining them at interpreter exit.
            logging.shutdown()
            os._exit(code)
        else:
            raise UsageError(f"unknown action {flags.action!r} (start, delete)")
    except (SandboxError, UsageError, OSError, ValueError) as e:
        # containerd shows our output as the error of its shim start.
        print(f"containerd-shim-parma-v2: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


if __name__ == "__main__":
    main()
