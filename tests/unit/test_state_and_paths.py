"""Runtime state: atomic JSON under a lock, stale-PID detection, and cache/runtime dir overrides."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sandbox.fsutil import atomic_dir, atomic_output, atomic_write, file_lock
from sandbox.paths import cache_dir, check_name, runtime_dir
from sandbox.shared.errors import InputError, StateError
from sandbox.state import ProcessRef, SandboxRecord, StateStore


def test_dirs_follow_env(isolated_dirs: Path) -> None:
    assert cache_dir() == isolated_dirs / "cache"
    assert runtime_dir() == isolated_dirs / "run"


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PARMA_SANDBOX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "parma-sandbox"


def test_runtime_dir_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARMA_SANDBOX_RUNTIME", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent-dir")
    assert runtime_dir() == Path(f"/tmp/parma-sandbox-{os.getuid()}")


@pytest.mark.parametrize("name", ["", "A", "-a", "a-", "a_b", "x" * 64, "../etc"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InputError):
        check_name(name)


def test_save_load_roundtrip(isolated_dirs: Path) -> None:
    store = StateStore()
    rec = SandboxRecord(name="demo", status="running", processes={"vmm": ProcessRef.of(os.getpid())},
                        details={"tee": "emulated"})
    store.save(rec)
    loaded = store.load("demo")
    assert loaded == rec
    assert (store.dir("demo") / "state.json").stat().st_mode & 0o777 == 0o600
    assert [r.name for r in store.list()] == ["demo"]
    assert store.list()[0].status == "running"


def test_stale_pid_detected_and_cleaned(isolated_dirs: Path) -> None:
    proc = subprocess.Popen(["sleep", "0"])
    ref = ProcessRef.of(proc.pid) if proc.poll() is None else ProcessRef(proc.pid, 1)
    proc.wait()
    store = StateStore()
    store.save(SandboxRecord(name="dead", status="running", processes={"vmm": ref}))
    assert store.list()[0].status == "stale"
    assert store.cleanup_stale() == ["dead"]
    assert store.list() == []


def test_recycled_pid_is_not_ours(isolated_dirs: Path) -> None:
    me = ProcessRef.of(os.getpid())
    assert me.alive()
    assert not ProcessRef(os.getpid(), me.start_time + 1).alive()


def test_corrupt_state_is_reported(isolated_dirs: Path) -> None:
    store = StateStore()
    d = store.dir("bad")
    d.mkdir(parents=True)
    (d / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="corrupt"):
        store.load("bad")
    assert store.list()[0].status == "corrupt"


def test_lock_is_exclusive(isolated_dirs: Path) -> None:
    store = StateStore()
    with store.lock("x"):
        with pytest.raises(StateError, match="locked"):
            with store.lock("x", blocking=False):
                pass


def test_atomic_write_never_leaves_partial(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"one")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_atomic_dir(tmp_path: Path) -> None:
    target = tmp_path / "d"
    with atomic_dir(target) as stage:
        (stage / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as stage:
            (stage / "b").write_text("2")
            raise RuntimeError
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_file_lock_shared(tmp_path: Path) -> None:
    with file_lock(tmp_path / "l", shared=True):
        with file_lock(tmp_path / "l", shared=True, blocking=False):
            pass
