"""Reference values for a secret's release policy: the launch measurements of the UVM it may go to.

HOST_DATA pins the execution policy, not the UVM: a host can boot a kernel and rootfs of its own with
the right HOST_DATA. What pins the UVM is the SNP launch MEASUREMENT (firmware, kernel, command line
with the rootfs root hash, vCPUs), which the UVM build computes into its manifest for every vCPU count
and CPU model it supports. `secret put` binds a secret to those by default.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sandbox.shared.errors import InputError
from sandbox.uvm.source_tree import BUILD_DIR

DEFAULT_MANIFEST = BUILD_DIR / "uvm" / "manifest.json"
_MEASUREMENT = re.compile(r"[0-9a-f]{96}")


def manifest_measurements(path: Path) -> tuple[str, ...]:
    """Every expected SNP launch measurement in a UVM manifest (`parma-sandbox build uvm` writes one)."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"no UVM manifest at {path}",
                         hint="'parma-sandbox build uvm' writes it (so does the first 'up'); or pass "
                              "--measurement HEX") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the UVM manifest {path}: {e}") from None
    snp = doc.get("snp") if isinstance(doc, dict) else None
    table = snp.get("measurements") if isinstance(snp, dict) else None
    if not isinstance(table, list) or not table:
        raise InputError(f"the UVM manifest {path} has no SNP launch measurements",
                         hint="it was built without the SEV-SNP firmware; run 'parma-sandbox build uvm'")
    out: list[str] = []
    for i, row in enumerate(table):
        value = row.get("measurement") if isinstance(row, dict) else None
        if not isinstance(value, str) or not _MEASUREMENT.fullmatch(value):
            raise InputError(f"the UVM manifest {path}: snp.measurements[{i}] is not 48 bytes of hex")
        if value not in out:
            out.append(value)
    return tuple(out)
