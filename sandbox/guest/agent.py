"""The guest agent: `python3 -m sandbox.guest.agent`, run by the UVM's init (possibly as PID 1).

It mounts the basics, configures the network, becomes the reaper of container processes, serves the
protocol on every virtio-serial port named org.parma.agent.*, and prints `parma-agent: ready` on the
console once it serves. It starts deny-all (see gate.py). The console is readable by the host, so the
agent logs only lifecycle events there, never container data.
"""

from __future__ import annotations

import gc
import os
import sys
import threading

from sandbox.guest import procs, sysapi, sysinit
from sandbox.guest.server import serve_ports
from sandbox.guest.service import AgentService
from sandbox.shared.protocol import PORT_COUNT, PORT_PREFIX, READY_LINE

HOSTNAME = "parma"


def log(message: str) -> None:
    print(f"parma-agent: {message}", file=sys.stderr, flush=True)


def main() -> int:
    notes: list[str] = []
    sysinit.mount_basics(notes)
    sysinit.set_hostname(HOSTNAME)
    nic = sysinit.configure_network(notes)
    for note in notes:
        log(note)
    log(f"network: {nic or 'no interface'}")
    try:
        sysapi.set_child_subreaper()
    except OSError as e:
        log(f"not a subreaper: {e}")
    procs.REAPER.start()
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")

    service = AgentService(hostname=HOSTNAME, runtime_logging=log)
    ports = serve_ports(service.answer, log=log)
    if len(ports) < PORT_COUNT:
        log(f"{len(ports)} of {PORT_COUNT} agent ports ({PORT_PREFIX}*) present; serving those and any that appear")
    # Everything allocated so far lives as long as the agent: keep it out of the collector's way, so a
    # full collection (slow under emulation) cannot land in the middle of a request.
    gc.freeze()
    print(READY_LINE, file=sys.stderr, flush=True)
    # The attestation API (http.server & co.) costs more imports than the rest of the agent; no container
    # can use it before the host has set a policy and created one, so it starts after "ready".
    threading.Thread(target=start_attestation_api, args=(service,), name="attestation-api-start",
                     daemon=True).start()
    threading.Event().wait()
    return 0


def start_attestation_api(service: AgentService) -> None:
    """Serve the attestation API for containers (docs/kbs.md); only policy-allowed containers see it."""
    try:
        from sandbox.guest import keyapi

        keyapi.start(keyapi.KeyApiConfig(pins=lambda: keyapi.policy_pins(service.gate.policy), log=log))
    except OSError as e:
        log(f"attestation API unavailable: {e}")
    finally:
        service.attest_api_started.set()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    try:
        sys.exit(main())
    except BaseException as e:  # noqa: BLE001 - as PID 1 a crash would panic the kernel without a word
        log(f"fatal: {type(e).__name__}: {e}")
        if os.getpid() == 1:
            try:
                sysapi.power_off()
            except OSError:
                pass
        raise
