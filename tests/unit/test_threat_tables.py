"""The threat tables (docs/security.md, docs/kbs.md) name the tests that prove each defence: those tests exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = ("docs/security.md", "docs/kbs.md")
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)((?:::\w+)?)`|`::(\w+)`")


def references(doc: str) -> list[tuple[str, str]]:
    """(test file, test function or "") for every test a table row names; `::name` continues the file before."""
    out = []
    for line in (REPO / doc).read_text().splitlines():
        if not line.startswith("|"):
            continue
        current = ""
        for match in REFERENCE.finditer(line):
            path, function, continued = match.groups()
            if path:
                current = path
                out.append((path, function.removeprefix("::")))
            else:
                assert current, f"{doc}: `::{continued}` follows no test file"
                out.append((current, continued))
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_test_exists(doc: str) -> None:
    refs = references(doc)
    assert len(refs) >= 10
    for path, function in refs:
        source = REPO / path
        assert source.is_file(), f"{doc} names {path}, which does not exist"
        if function:
            assert re.search(rf"^def {function}\(", source.read_text(), re.M), f"{doc}: no {function} in {path}"


def test_every_security_row_has_a_test_or_says_it_has_none() -> None:
    tables = (REPO / "docs/security.md").read_text().split("## Measured costs")[0]
    rows = [line for line in tables.splitlines()
            if line.startswith("| ") and not line.startswith(("| host-controlled", "|---"))]
    assert len(rows) >= 15
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 3 and ("`tests/" in cells[2] or cells[2] == "none yet"), row
