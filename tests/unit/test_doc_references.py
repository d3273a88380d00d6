"""References into the docs resolve: relative links (and their #anchors) in README.md, docs/ and examples/, and
the `docs/NAME.md ('Section')` pointers that error hints and docstrings give. A renamed section or file fails
here instead of sending a user to a title that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

from tests.docblocks import REPO, documents

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
# docs/x.md ('Title'), docs/x.md, 'Title', docs/x.md ("Title"), docs/x.md, "Title"
CODE_POINTER = re.compile(r"""docs/([\w-]+\.md)(?:,\s*|\s*\(\s*)(?:\\?["'])([^"'\\]+)(?:\\?["'])""")
CODE_FILE = re.compile(r"docs/([\w-]+\.md)")


def _headings(doc: Path) -> list[str]:
    out, fenced = [], False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            out.append(m.group(1))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _plain(heading: str) -> str:
    return heading.replace("`", "")


def _names_section(title: str, headings: list[str]) -> bool:
    """A pointer names a heading exactly, or its words before a parenthesised remark ('X' for 'X (yet)')."""
    title = _plain(title)
    return any(_plain(h) == title or _plain(h).startswith(title + " (") for h in headings)


def test_slug_follows_github() -> None:
    assert slug("Layer root hashes identical to ACI's (`--compat aci`)") == \
        "layer-root-hashes-identical-to-acis---compat-aci"
    assert slug("Sandboxes and their state") == "sandboxes-and-their-state"


def test_relative_links_and_anchors_resolve() -> None:
    problems = []
    for doc in documents():
        text = doc.read_text()
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code blocks are not links
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            path_part, _, anchor = target.partition("#")
            dest = (doc.parent / path_part).resolve() if path_part else doc
            if not dest.exists():
                problems.append(f"{doc.relative_to(REPO)}: link to {target}: {path_part} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in {slug(h) for h in _headings(dest)}:
                problems.append(f"{doc.relative_to(REPO)}: link to {target}: no heading with anchor #{anchor}")
    assert not problems, "\n".join(problems)


def test_code_points_at_docs_and_sections_that_exist() -> None:
    problems = []
    for source in sorted((REPO / "sandbox").rglob("*.py")):
        text = source.read_text()
        where = source.relative_to(REPO)
        for name in set(CODE_FILE.findall(text)):
            if not (REPO / "docs" / name).is_file():
                problems.append(f"{where}: names docs/{name}, which does not exist")
        for name, title in CODE_POINTER.findall(text):
            doc = REPO / "docs" / name
            if doc.is_file() and not _names_section(title, _headings(doc)):
                problems.append(f"{where}: points at docs/{name} section {title!r}, which it does not have")
    assert not problems, "\n".join(problems)
