"""Every shell block of README.md, docs/*.md and examples/*/README.md says whether it runs (tests/docblocks.py):
a new command example cannot slip in untested without saying why. The runner's own rules are tested here on
small documents (the real ones run in tests/tools/test_doc_blocks.py and tests/vm/test_doc_blocks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import docblocks
from tests.docblocks import REPO, blocks, classification_problems, documents, follow

# Documents whose blocks are not classified yet, with the reason. Keep this short.
UNCLASSIFIED = {
    "docs/aci.md": "owned by the ACI work, which is rewriting it; classify its blocks when it lands",
}


def test_every_shell_block_is_classified() -> None:
    problems = []
    for doc in documents():
        if str(doc.relative_to(REPO)) in UNCLASSIFIED:
            continue
        for block in blocks(doc):
            problems += classification_problems(block)
    assert not problems, "\n".join(problems)


def test_output_blocks_follow_runnable_blocks() -> None:
    bad = []
    for doc in documents():
        previous = None
        for block in blocks(doc):
            if block.output and (previous is None or not previous.runnable):
                bad.append(block.where)
            if block.is_shell or block.output:
                previous = block
    assert not bad, bad


def test_the_runnable_docs_are_the_expected_ones() -> None:
    """Guards the harness itself: a marker typo must not silently drop a document from the runs."""
    tools = {str(d.relative_to(REPO)) for d in docblocks.runnable_documents(vm=False)}
    vm = {str(d.relative_to(REPO)) for d in docblocks.runnable_documents(vm=True)}
    assert {"README.md", "docs/layers.md", "docs/policy-trace.md", "docs/group-spec.md"} <= tools
    assert {"docs/getting-started.md", "examples/secret/README.md"} <= vm
    assert not tools & vm


def _doc(tmp_path: Path, text: str) -> Path:
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    return doc


def test_blocks_are_parsed_with_their_markers(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "x\n```sh runnable exit=2\nfalse\n```\n\n```json file=a/b.json\n{}\n```\n"
                         "```text output\nhi ... there\n```\n```sh\nls\n```\n")
    b = blocks(doc)
    assert [x.line for x in b] == [2, 6, 9, 12]
    assert b[0].runnable and b[0].expected_exit == 2 and b[0].text == "false\n"
    assert b[1].file == "a/b.json" and b[2].output
    assert classification_problems(b[3]) and not classification_problems(b[0])
    assert classification_problems(blocks(_doc(tmp_path, "```sh skip\nx\n```\n"))[0])
    assert classification_problems(blocks(_doc(tmp_path, "```sh runnable fast\nx\n```\n"))[0])
    assert not classification_problems(blocks(_doc(tmp_path, "```sh skip=network\nx\n```\n"))[0])


def test_a_document_runs_in_order_with_files_outputs_and_ports(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "```text file=conf/port.txt\n127.0.0.1:8300\n```\n"
                         "```sh runnable\ncat conf/port.txt; echo \"hello $PARMA_SANDBOX_RUNTIME\" >&2\n"
                         "test -L examples && command -v parma-sandbox | grep -q \"$(dirname \"$(command -v python3)\")\"\n```\n"
                         "```text output\n127.0.0.1:\nhello .../.run\n```\n"
                         "```sh runnable exit=3\nexit 3\n```\n")
    follow(doc, tmp_path / "s", timeout=30)
    assert "8300" not in (tmp_path / "s" / "conf" / "port.txt").read_text()  # replaced by a free port


def test_a_failing_block_or_missing_output_is_reported_with_its_place(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "```sh runnable\necho one\nfalse\necho never\n```\n")
    with pytest.raises(AssertionError, match=r"doc.md:1: exited 1, expected 0[\s\S]*one"):
        follow(doc, tmp_path / "a", timeout=30)
    doc = _doc(tmp_path, "```sh runnable\necho one\n```\n```text output\ntwo\n```\n")
    with pytest.raises(AssertionError, match="'two' is not in what .*doc.md:1 printed"):
        follow(doc, tmp_path / "b", timeout=30)


def test_background_processes_are_stopped_when_the_document_ends(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "```sh runnable\nsleep 300 &\necho $! > pid\n```\n")
    follow(doc, tmp_path / "s", timeout=30)
    pid = int((tmp_path / "s" / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
