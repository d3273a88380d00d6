"""The audit log's head: a hash chain cannot see its own tail cut off, the head (record count, size and the last
line's hash, kept in a separate file) can. Every way of damaging the log is detected by verify()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.kbs.audit import AuditLog, Head


def _log(tmp_path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(tmp_path / "audit.log")
    for i in range(n):
        log.append("refuse", secret=f"s{i}", reason="no")
    return log


def _lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines(keepends=True)


def test_an_intact_log_verifies_and_its_head_matches(tmp_path: Path) -> None:
    log = _log(tmp_path)
    check = log.verify()
    assert check.intact and check.records == 5, check.problems
    assert check.head == Head(5, log.path.stat().st_size, check.head.last if check.head else "")
    assert log.head_path == tmp_path / "audit.head"
    assert log.head_path.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".audit.head.*"))  # no temporary file left behind


def test_deleting_the_last_record_is_detected(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.path.write_bytes(b"".join(_lines(log)[:-1]))
    check = log.verify()
    assert not check.intact and check.records == 4
    assert "4 records but its head says 5" in check.problems[0] and "removed from the end" in check.problems[0]


def test_deleting_every_record_is_detected(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.path.write_bytes(b"")
    assert not log.verify().intact
    log.path.unlink()
    check = log.verify()
    assert not check.intact and "missing" in check.problems[0]


def test_truncating_inside_the_last_record_is_detected(tmp_path: Path) -> None:
    log = _log(tmp_path)
    data = log.path.read_bytes()
    log.path.write_bytes(data[:-20])
    problems = log.verify().problems
    assert any("incomplete" in p for p in problems)
    assert any("not JSON" in p for p in problems)
    assert any("removed from the end" in p or "not the one it was" in p for p in problems)


def test_reordering_records_is_detected(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    log.path.write_bytes(b"".join([lines[0], lines[2], lines[1], *lines[3:]]))
    check = log.verify()
    assert not check.intact and "line 2" in check.problems[0]
    # Swapping the last two moves the anchored record too.
    log.path.write_bytes(b"".join([*lines[:3], lines[4], lines[3]]))
    assert any("not the one it was" in p for p in log.verify().problems)


def test_replacing_the_tail_with_a_valid_chain_is_detected(tmp_path: Path) -> None:
    """Cut the last two records and append one forged record that chains correctly: the chain alone passes."""
    log = _log(tmp_path)
    lines = _lines(log)
    log.path.write_bytes(b"".join(lines[:3]))
    head = log.head_path.read_bytes()
    forged = AuditLog(tmp_path / "forge.log")
    forged.path.write_bytes(b"".join(lines[:3]))
    forged.append("release", secret="s9")
    log.path.write_bytes(forged.path.read_bytes())
    log.head_path.write_bytes(head)
    check = log.verify()
    assert not check.intact and check.records == 4
    assert "removed from the end" in check.problems[0]


def test_records_appended_behind_the_brokers_back_are_detected(tmp_path: Path) -> None:
    log = _log(tmp_path)
    head = log.head_path.read_bytes()
    log.append("release", secret="extra")
    log.head_path.write_bytes(head)  # as if the head was never updated
    check = log.verify()
    assert not check.intact and "1 record(s) after the head" in check.problems[0]


def test_a_missing_or_damaged_head_fails_verification(tmp_path: Path) -> None:
    log = _log(tmp_path)
    head = log.head_path.read_bytes()
    log.head_path.unlink()
    check = log.verify()
    assert not check.intact and "no head" in check.problems[0]
    log.head_path.write_bytes(b"{junk")
    check = log.verify()
    assert not check.intact and "unreadable" in check.problems[0]
    log.head_path.write_bytes(head)
    assert log.verify().intact


def test_an_append_after_a_cut_leaves_the_head_as_evidence(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    log.path.write_bytes(b"".join(lines[:-2]))
    head = log.head_path.read_bytes()
    for i in range(3):  # the log grows past its old size again
        log.append("refuse", secret=f"after-{i}")
    assert log.head_path.read_bytes() == head
    check = log.verify()
    assert not check.intact and any("not the one it was" in p for p in check.problems)


def test_an_append_never_continues_a_cut_off_line(tmp_path: Path) -> None:
    log = _log(tmp_path, 2)
    log.path.write_bytes(log.path.read_bytes()[:-10])
    log.append("refuse", secret="next")
    lines = _lines(log)
    assert len(lines) == 3 and json.loads(lines[2])["secret"] == "next"
    assert not log.verify().intact


def test_a_log_without_a_head_is_anchored_by_the_next_append(tmp_path: Path) -> None:
    """Stores written before heads existed: the next append (e.g. `kbs serve` starting) anchors them."""
    log = _log(tmp_path, 3)
    log.head_path.unlink()
    assert not log.verify().intact
    log.append("serve")
    check = log.verify()
    assert check.intact and check.records == 4 and check.head is not None and check.head.records == 4


def test_an_interrupted_head_update_is_repaired_by_the_next_append(tmp_path: Path) -> None:
    log = _log(tmp_path, 2)
    head = log.head_path.read_bytes()
    log.append("refuse", secret="crash-before-head")
    log.head_path.write_bytes(head)  # the crash: the line is there, the head is not updated
    log.append("refuse", secret="after-restart")
    check = log.verify()
    assert check.intact and check.records == 4 and check.head is not None and check.head.records == 4


@pytest.mark.parametrize("text", ["[]", '{"format": "x"}', '{"format": "parma-sandbox/kbs-audit-head/v1"}',
                                  '{"format": "parma-sandbox/kbs-audit-head/v1", "records": -1, "size": 0, '
                                  '"last": "' + "0" * 64 + '"}'])
def test_malformed_heads_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        Head.from_bytes(text.encode())
