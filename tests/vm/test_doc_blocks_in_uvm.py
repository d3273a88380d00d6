"""The runnable blocks of the documents that boot a UVM (few: the getting-started guide, the secret example),
followed as a reader would (tests/docblocks.py); each document boots and takes down its own sandboxes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docblocks import REPO, ensure_example_image, follow, runnable_documents

DOCS = runnable_documents(vm=True)


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_the_documents_commands_run_as_written(doc: Path, tmp_path: Path) -> None:
    ensure_example_image()
    follow(doc, tmp_path / "reader", timeout=900)
