"""Text renderings of results, without click: the fast path (sandbox/cli/entry.py) prints them too."""

from __future__ import annotations

from collections.abc import Sequence


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h).upper() for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def json_text(data: object) -> str:
    """A result document as `--format json` prints it."""
    import json  # imported on use: most runs print no JSON

    return json.dumps(data, indent=2, sort_keys=False, default=str)
