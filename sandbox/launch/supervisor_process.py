"""The supervisor process of a detached group: `up -d` starts it, `down` stops it (SIGTERM) first.

    python -m sandbox.launch.supervisor_process NAME

It takes the group over where `up` left it (sandbox.launch.lifecycle.supervise_detached: the state record's
runs and plan.json) and restarts containers as the group's restartPolicy says until the group is over. It
runs in a session of its own, so that it outlives the terminal `up -d` ran in, and writes what happens to
supervisor.log in the sandbox's state directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from sandbox.launch import lifecycle
from sandbox.log import setup_logging
from sandbox.shared.errors import SandboxError, StateError
from sandbox.state import SUPERVISOR, ProcessRef, StateStore

LOG_FILE = "supervisor.log"
START_TIMEOUT_S = 30.0


def spawn(name: str, store: StateStore) -> ProcessRef:
    """Start the supervisor of sandbox `name`; return once it has recorded itself in the sandbox's state
    (so that a `down` right after `up -d` finds it and stops it first)."""
    state_dir = store.dir(name)
    with open(state_dir / LOG_FILE, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sandbox.launch.supervisor_process", name],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                env=os.environ.copy())
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        record = store.load(name)
        ref = record.processes.get(SUPERVISOR) if record is not None else None
        if ref is not None and ref.pid == proc.pid:
            return ref
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise StateError(f"the supervisor of sandbox {name!r} did not start",
                     hint=f"see {state_dir / LOG_FILE}; the containers run, but none will be restarted")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m sandbox.launch.supervisor_process NAME", file=sys.stderr)
        return 2

    def terminate(_signum: int, _frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setup_logging(debug=False, quiet=False)
    try:
        outcome = lifecycle.supervise_detached(args[0])
    except SandboxError as e:
        print(f"supervisor: {e.message}", file=sys.stderr, flush=True)
        return 1
    print(f"supervisor: the group is over (exit code {outcome.exit_code})", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

