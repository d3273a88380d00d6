"""The guest agent (placeholder until the `up` work lands): set up the basics and announce readiness.

The init in the UVM rootfs runs `python3 -m sandbox.guest.agent`. Readiness is the line
`parma-agent: ready` on the console; the host and the boot tests wait for it.
"""

from __future__ import annotations

import os
import sys
import time

READY_LINE = "parma-agent: ready"


def main() -> int:
    print(READY_LINE, file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
