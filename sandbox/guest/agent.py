"""The guest agent, PID 1 of the UVM: the init (/usr/lib/parma-sandbox/init) calls `run()`.

It mounts the basics, configures the network, becomes the reaper of container processes, serves the
protocol on every virtio-serial port named org.parma.agent.*, and prints `parma-agent: ready` on the
console once it serves. It starts deny-all (see gate.py). The console is readable by the host, so the
agent logs only lifecycle events there, never container data.

Start-up is on the critical path of every `up`, and under emulation (TCG) every module costs, so:
- Before "ready" it imports only what serving the requests before a policy needs: the mounts (through
  `_ctypes`, sysapi.py), the ports, the protocol, and the service with its deny-all gate; what only
  containers need (the runtime, OCI spec, users, /etc files, the engine's inputs, shutil) is lazy in
  service.py. `dataclasses` and `re` take what they would compute from the image (boot_cache.py), and
  the garbage collector waits (start-up allocates only what lives as long as the agent).
- Right after, the port watcher starts (ports that appear later), and a thread starts the reaper,
  delegates the cgroup controllers and configures the network (create_container waits for it), then,
  at low priority, imports the rest in the order `up` needs it - the report backends (the launch
  self-check; the emulated PSP signs on the host, and keyless evidence needs no runtime key), the policy engine and its RE2 matcher (set_policy), device-mapper and
  verity (the mounts), the container modules - so that those imports use the time the guest spends
  waiting for the host. A request that
  needs a module still loading waits for it (the import lock); nothing is answered differently or
  earlier than before.
- The attestation API for containers starts when a container first binds it (service.py); cryptography
  (OpenSSL's bindings, ~1 s under TCG) loads with the first runtime key or key release, never for `up`.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from sandbox.guest import boot_cache, boot_modules

if TYPE_CHECKING:
    from sandbox.guest.service import AgentService

HOSTNAME = "parma"
# After "ready", on the preload thread, in the order `up` asks for them (sandbox/launch/pipeline.py):
# the launch self-check's report, set_policy (the engine, and the RE2 matcher its regexes compile
# with), the mounts, the containers (runtime, OCI spec, users, the guest-side path rules, /etc files).
PRELOAD = ("sandbox.guest.snp_report", "sandbox.shared.policy.engine", "sandbox.shared.policy.re2syntax",
           "sandbox.shared.policy.re2machine", "sandbox.guest.blockdev", "sandbox.shared.agent_rules",
           "sandbox.guest.runtime", "sandbox.guest.oci", "sandbox.guest.users", "sandbox.guest.etcfiles")
PRELOAD_NICE = 19   # the preload thread runs when request threads wait (Linux: per-thread niceness)
# The modules main() imports to serve, after the boot cache: the image build imports the same to know what
# goes in the boot-modules bundle (boot_modules.py); tests/unit/test_agent_startup.py keeps the two equal.
SERVING = ("sandbox.guest.sysapi", "sandbox.guest.sysinit", "sandbox.guest.server", "sandbox.guest.service",
           "sandbox.shared.protocol")


def log(message: str) -> None:
    print(f"parma-agent: {message}", file=sys.stderr, flush=True)


def main() -> int:
    gc.disable()
    boot_cache.install()
    # Imported here, after the two lines above, which must come first. Each module imports only what
    # serving needs (the rest is lazy, see the docstring).
    from sandbox.guest import sysapi, sysinit
    from sandbox.guest.server import start_ports, watch_ports
    from sandbox.guest.service import AgentService
    from sandbox.shared.protocol import PORT_COUNT, PORT_PREFIX, READY_LINE

    notes: list[str] = []
    sysinit.mount_basics(notes)
    sysinit.set_hostname(HOSTNAME)
    for note in notes:
        log(note)
    try:
        sysapi.set_child_subreaper()
    except OSError as e:
        log(f"not a subreaper: {e}")
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")

    service = AgentService(hostname=HOSTNAME, runtime_logging=log)
    service.start_attest_api = AttestationApiStarter(service)
    service.network_ready.clear()   # configured just after "ready"; create_container waits for it
    ports = start_ports(service.answer, log=log)
    print(f"{READY_LINE} (uptime {time.monotonic():.2f} s)", file=sys.stderr, flush=True)
    # After "ready": the watcher's thread (ports that appear later, or whose thread died) is not needed
    # to serve the ports there are.
    watch_ports(ports)
    if len(ports.devices) < PORT_COUNT:
        log(f"{len(ports.devices)} of {PORT_COUNT} agent ports ({PORT_PREFIX}*) present; serving those and any "
            "that appear")
    log(bundle_note())
    threading.Thread(target=after_ready, args=(service,), name="after-ready", daemon=True).start()
    threading.Event().wait()
    return 0


def bundle_note() -> str:
    """Whether the start-up imports came from the boot-modules bundle (a stale bundle is only slower)."""
    bundle = next((f for f in sys.meta_path if isinstance(f, boot_modules.BundleFinder)), None)
    if bundle is None:
        return "boot modules: no bundle, imported the usual way"
    return f"boot modules: {len(bundle.loaded)} from the bundle, {len(bundle.entries)} of it unused"


def after_ready(service: AgentService) -> None:
    """The reaper of orphans, the cgroup controllers and the network (no container runs before them),
    then the preload."""
    from sandbox.guest import procs, sysinit

    procs.REAPER.start()   # nothing runs a program before "ready"; create_container waits for the network

    notes: list[str] = []
    sysinit.enable_cgroup_controllers(notes)
    nic = None
    try:
        nic = sysinit.configure_network(notes)
    except Exception as e:  # as before "ready": a guest without network still serves
        notes.append(f"network not configured: {type(e).__name__}: {e}")
    finally:
        service.network_ready.set()
    for note in notes:
        log(note)
    log(f"network: {nic or 'no interface'}")
    preload()


def preload(modules: tuple[str, ...] = PRELOAD) -> None:
    """Import what the next requests of an `up` need, at low priority; then let the collector work."""
    import importlib

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PRELOAD_NICE)
    except OSError:
        pass  # only slower
    try:
        for name in modules:
            importlib.import_module(name)
    except Exception as e:  # the request that needs it will import it and say what failed
        log(f"preload stopped: {type(e).__name__}: {e}")
    finally:
        # Everything allocated so far lives as long as the agent: keep it out of the collector's way,
        # so a full collection (slow under emulation) cannot land in the middle of a request.
        gc.freeze()
        gc.enable()
    log(f"loaded (uptime {time.monotonic():.2f} s)")


class AttestationApiStarter:
    """Starts the attestation API for containers (docs/kbs.md) once, on a thread of its own."""

    def __init__(self, service: AgentService) -> None:
        self._service = service
        self._lock = threading.Lock()
        self._started = False

    def __call__(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=start_attestation_api, args=(self._service,), name="attestation-api-start",
                         daemon=True).start()


def start_attestation_api(service: AgentService) -> None:
    """Serve the attestation API for containers; only policy-allowed containers see it."""
    from sandbox.guest import keyapi

    try:
        keyapi.start(keyapi.KeyApiConfig(pins=lambda: keyapi.policy_pins(service.gate.policy), log=log))
    except OSError as e:
        log(f"attestation API unavailable: {e}")
    finally:
        service.attest_api_started.set()


def run() -> None:
    """The init's entry point: main(), and as PID 1 a power-off rather than a kernel panic on a crash."""
    try:
        sys.exit(main())
    except BaseException as e:  # as PID 1 a crash would panic the kernel without a word
        log(f"fatal: {type(e).__name__}: {e}")
        if os.getpid() == 1:
            try:
                from sandbox.guest import sysapi

                sysapi.power_off()
            except OSError:
                pass
        raise


if __name__ == "__main__":
    run()
