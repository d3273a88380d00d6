"""Real ccePolicies import as they are, and export back to Rego that imports to the same policy.

Runs when PARMA_SANDBOX_ACI_CORPUS names a directory of real policy files (`*.rego`: Rego text, one or
more modules each), e.g. confcom's published samples across its history; the corpus is never in the
repository. Provenance, when the corpus has it (`../provenance.tsv`: `policies/<stem>\\t<origin>`), splits
the figures by origin; confcom's `samples/` must import at 95 % or more without --drop-fragments.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import pytest

from sandbox.aci.rego import export_rego, import_rego
from sandbox.shared.errors import InputError
from sandbox.shared.policy import PolicyEngine
from sandbox.shared.rego.syntax import parse_modules

CORPUS = os.environ.get("PARMA_SANDBOX_ACI_CORPUS")
pytestmark = [pytest.mark.tools,
              pytest.mark.skipif(not CORPUS, reason="set PARMA_SANDBOX_ACI_CORPUS to a directory of real ccePolicies")]


def origins(corpus: Path) -> dict[str, str]:
    table = corpus.parent / "provenance.tsv"
    if not table.is_file():
        return {}
    out = {}
    for line in table.read_text().splitlines():
        key, _, origin = line.partition("\t")
        out[key.removeprefix("policies/")] = origin
    return out


def test_real_policies_import_and_round_trip() -> None:
    logging.getLogger("parma-sandbox").setLevel(logging.ERROR)    # the reader's warnings, one per dropped object
    corpus = Path(CORPUS or ".")
    where = origins(corpus)
    counts: Counter[str] = Counter()
    refused = []
    for path in sorted(corpus.glob("*.rego")):
        group = "confcom samples" if "confcom/samples/" in where.get(path.stem, "") else "other"
        text = path.read_text(errors="replace")
        counts[f"{group}: files"] += 1
        try:
            modules = parse_modules(text, str(path))
            policies = [import_rego(text[m.start:m.end], source=str(path)) for m in modules]
        except InputError as e:
            refused.append(f"{path.name}: {e}")
            continue
        counts[f"{group}: imported"] += 1
        for m, policy in zip(modules, policies, strict=True):
            counts["modules"] += 1
            again = import_rego(export_rego(policy), source=f"{path} (exported)")
            counts["round trips identical"] += again.canonical_bytes() == policy.canonical_bytes()
            # the engine reads the module as it is to the same policy
            counts["engine reads the same policy"] += PolicyEngine.from_bytes(text[m.start:m.end].encode()).policy == policy
    print(json.dumps(dict(sorted(counts.items())), indent=1))
    print("\n".join(refused))
    assert counts["modules"] and counts["round trips identical"] == counts["modules"]
    assert counts["engine reads the same policy"] == counts["modules"]
    assert counts["confcom samples: imported"] >= 0.95 * counts["confcom samples: files"]
    total = counts["confcom samples: files"] + counts["other: files"]
    assert counts["confcom samples: imported"] + counts["other: imported"] >= 0.95 * total
