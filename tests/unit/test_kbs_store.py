"""The broker's store, audit log and challenges: modes, atomicity under crashes, the hash chain, nonce life."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from sandbox import fsutil
from sandbox.kbs.audit import AuditLog
from sandbox.kbs.challenges import ChallengesFull, ChallengeStore, NonceStatus
from sandbox.kbs.store import KbsStore, ReleasePolicy, SecretRecord, new_secret
from sandbox.shared.errors import InputError, NotFoundError, StateError

HD = "ab" * 32
HD2 = "cd" * 32
M = "ee" * 48


def _policy(**kw: object) -> ReleasePolicy:
    return ReleasePolicy((HD,), **{"measurement": (M,), **kw})  # type: ignore[arg-type]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_secrets_are_0600_in_a_0700_store(tmp_path: Path) -> None:
    store = KbsStore.open(tmp_path / "kbs")
    store.put(new_secret("db-key", b"value", _policy()))
    assert _mode(store.root) == 0o700 and _mode(store.secrets_dir) == 0o700
    assert _mode(store.secrets_dir / "db-key.json") == 0o600
    store.broker_key()
    assert _mode(store.key_path) == 0o600
    assert store.get("db-key").value == b"value"  # type: ignore[union-attr]
    assert store.names() == ["db-key"]
    with pytest.raises(InputError, match="already exists"):
        store.put(new_secret("db-key", b"other", _policy()))
    store.put(new_secret("db-key", b"other", _policy()), replace=True)
    assert store.get("db-key").value == b"other"  # type: ignore[union-attr]
    store.remove("db-key")
    assert store.get("db-key") is None
    with pytest.raises(NotFoundError):
        store.remove("db-key")


def test_a_store_readable_by_others_is_refused(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    with pytest.raises(InputError, match="accessible by other users") as e:
        KbsStore.open(tmp_path / "open")
    assert "chmod 700" in (e.value.hint or "")


def test_release_policy_validation() -> None:
    p = ReleasePolicy(("AB" * 32, "0x" + HD, HD2), ("ee" * 48,), "bl=1,tee=0,snp=8,ucode=100", True)
    assert p.host_data == (HD, HD2) and p.measurement == ("ee" * 48,)
    assert ReleasePolicy.from_dict(p.to_dict(), source="t") == p
    assert p.to_dict()["allow_debug"] is False
    for bad in ({"host_data": ()}, {"host_data": ("ab",)}, {"host_data": (HD,), "measurement": (HD,)},
                {"host_data": (HD,), "min_tcb": "bogus=1"}):
        with pytest.raises(InputError):
            ReleasePolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="limit"):
        new_secret("big", b"x" * (64 * 1024 + 1), p)
    with pytest.raises(InputError):
        new_secret("empty", b"", p)
    with pytest.raises(InputError, match="--any-uvm contradicts"):
        ReleasePolicy((HD,), (M,), any_uvm=True)


def test_what_a_policy_binds() -> None:
    assert _policy(min_tcb="0").uvm_problem() is None and _policy(min_tcb="0").hardware_problem() is None
    assert "HOST_DATA alone" in (ReleasePolicy((HD,)).uvm_problem() or "")
    assert ReleasePolicy((HD,), any_uvm=True).uvm_problem() is None
    assert "no minimum TCB" in (_policy().hardware_problem() or "")
    assert _policy(any_uvm=False).to_dict() == {"host_data": [HD], "measurement": [M], "min_tcb": None,
                                                "allow_emulated": False, "allow_debug": False, "any_uvm": False}


def test_secrets_stored_by_older_versions_still_load(tmp_path: Path) -> None:
    """v1 files (no any_uvm) load; the broker then decides (release.py): with measurements they keep
    working, with HOST_DATA alone they are refused with the way to re-store them."""
    store = KbsStore.open(tmp_path / "kbs")
    for name, measurement in (("bound", [M]), ("legacy", [])):
        doc = json.loads(new_secret(name, b"value", _policy()).to_bytes())
        doc["format"] = "parma-sandbox/kbs-secret/v1"
        doc["release_policy"] = {"host_data": [HD], "measurement": measurement, "min_tcb": None,
                                 "allow_emulated": True, "allow_debug": False}
        (store.secrets_dir / f"{name}.json").write_text(json.dumps(doc))
    bound, legacy = store.get("bound"), store.get("legacy")
    assert bound is not None and bound.policy.uvm_problem() is None and not bound.policy.any_uvm
    assert legacy is not None and legacy.policy.uvm_problem() is not None
    assert [r.name for r in store.list()] == ["bound", "legacy"]  # listing never fails on an old secret
    store.put(legacy, replace=True)
    assert json.loads((store.secrets_dir / "legacy.json").read_bytes())["format"] == "parma-sandbox/kbs-secret/v2"
    doc = json.loads((store.secrets_dir / "bound.json").read_bytes())
    doc["release_policy"]["any_uvm"] = True  # a v1 document has no such key
    (store.secrets_dir / "bound.json").write_text(json.dumps(doc))
    with pytest.raises(StateError, match="exactly the keys"):
        store.get("bound")


def test_damaged_secret_files_are_state_errors(tmp_path: Path) -> None:
    store = KbsStore.open(tmp_path / "kbs")
    store.put(new_secret("k", b"value", _policy()))
    path = store.secrets_dir / "k.json"
    doc = json.loads(path.read_bytes())
    doc["value"] = "b3RoZXI="  # another value under the recorded SHA-256
    path.write_text(json.dumps(doc))
    with pytest.raises(StateError, match="SHA-256"):
        store.get("k")
    path.write_text("{")
    with pytest.raises(StateError):
        store.get("k")
    doc["format"] = ["not", "a", "name"]  # unhashable: once a TypeError out of the format lookup
    path.write_text(json.dumps(doc))
    with pytest.raises(StateError, match="not a parma-sandbox/kbs-secret/v2 document"):
        store.get("k")


def test_a_failed_write_leaves_the_old_secret_and_no_debris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = KbsStore.open(tmp_path / "kbs")
    store.put(new_secret("k", b"old value", _policy()))

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", no_space)
    with pytest.raises(Exception, match="no space"):
        store.put(new_secret("k", b"new value", _policy()), replace=True)
    monkeypatch.undo()
    assert store.get("k").value == b"old value"  # type: ignore[union-attr]
    assert sorted(p.name for p in store.secrets_dir.iterdir()) == ["k.json"]


def _writer(root: str) -> None:
    store = KbsStore(Path(root))
    i = 0
    while True:
        i += 1
        store.put(new_secret("k", os.urandom(1 + i % 65536), _policy()), replace=True)


def test_secret_files_are_never_seen_half_written(tmp_path: Path) -> None:
    """A writer replacing a 64 KiB secret in a loop is killed at random moments while a reader parses the file:
    the reader always sees a complete record and the store stays readable after every crash."""
    store = KbsStore.open(tmp_path / "kbs")
    store.put(new_secret("k", b"first", _policy()))
    ctx = multiprocessing.get_context("fork")
    reads = 0
    for delay in (0.05, 0.13, 0.21, 0.08, 0.3):
        proc = ctx.Process(target=_writer, args=(str(store.root),), daemon=True)
        proc.start()
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            record = SecretRecord.from_bytes((store.secrets_dir / "k.json").read_bytes(), source="k")
            assert record.name == "k"  # from_bytes also checks size and SHA-256 of the value
            reads += 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert store.get("k") is not None
        assert store.names() == ["k"]  # a temporary file left by the crash is never listed
    assert reads > 20


def test_audit_log_chain_detects_edits_and_deletions(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    for i in range(5):
        log.append("refuse", secret=f"s{i}", reason="x" * 5000 if i == 2 else "no")
    assert log.verify().intact and log.verify().records == 5
    assert _mode(log.path) == 0o600
    records = list(log.records())
    assert len(records[2]["reason"]) < 2100  # a hostile request cannot bloat the log
    lines = log.path.read_bytes().splitlines(keepends=True)
    log.path.write_bytes(b"".join(lines[:2] + lines[3:]))
    assert not log.verify().intact
    log.path.write_bytes(b"".join(lines).replace(b'"s3"', b'"s9"'))
    check = log.verify()
    assert not check.intact and "line 5" in check.problems[0]


def _appender(path: str, n: int) -> None:
    log = AuditLog(Path(path))
    for i in range(n):
        log.append("release", secret=f"p{os.getpid()}-{i}")


def test_audit_log_chain_holds_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_appender, args=(str(path), 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    check = AuditLog(path).verify()
    assert check.records == 100 and check.intact, check.problems


def test_challenges_live_once_and_briefly() -> None:
    now = [1000.0]
    store = ChallengeStore(ttl=30, capacity=3, clock=lambda: now[0])
    a, b = store.issue(), store.issue()
    assert len(a) == 32 and a != b
    assert store.consume(a) == (NonceStatus.OK, 0.0)
    assert store.consume(a)[0] == NonceStatus.USED
    assert store.consume(os.urandom(32))[0] == NonceStatus.UNKNOWN
    now[0] += 31
    status, late = store.consume(b)
    assert status == NonceStatus.EXPIRED and late == pytest.approx(1.0)
    store.issue()
    with pytest.raises(ChallengesFull):
        store.issue()
    now[0] += 100  # old entries are forgotten, making room again
    store.issue()
