"""Runtime state: atomic JSON under a lock, stale-PID detection, and cache/runtime dir overrides."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sandbox.fsutil import atomic_dir, atomic_output, atomic_write, file_lock
from sandbox.paths import cache_dir, check_name, runtime_dir
from sandbox.shared.errors import InputError, StateError
from sandbox.state import (
    ContainerRecord,
    DeviceRecord,
    KbsRecord,
    PortRecord,
    ProcessRef,
    SandboxRecord,
    SandboxStatus,
    StateStore,
    UvmRecord,
)


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


def full_record(**changes: Any) -> SandboxRecord:
    rec = SandboxRecord(
        name="demo", status=SandboxStatus.running, processes={"qemu": ProcessRef.of(os.getpid())},
        group="demo", group_file="/g", tee="emulated", accel="tcg", backend="qemu", policy_hash="ab" * 32,
        measurement="cd" * 48, ports=(PortRecord(8080, 18080, "TCP", "127.0.0.1"),),
        devices=(DeviceRecord("L0", "/cache/l0.img", "ef" * 32, "/run/parma/layers/l0"),),
        containers=(ContainerRecord("web", "busybox", ("/bin/httpd",), ("PATH=/bin",), "/", True,
                                    (("/bin/cat", "/x"),)),),
        uvm=UvmRecord("/k", "/r", "console=ttyS0"), kbs=KbsRecord("http://127.0.0.1:1", "http://10.0.2.2:1", ("01" * 32,)),
        launch={"tee": "emulated"}, vm={"backend": "qemu", "pid": 1}, selfcheck={"verified": True},
        startup={"timings": {"agent": 1.5}})
    return replace(rec, **changes)


def test_save_load_roundtrip(isolated_dirs: Path) -> None:
    store = StateStore()
    rec = full_record()
    store.save(rec)
    loaded = store.load("demo")
    assert loaded == rec
    assert (store.dir("demo") / "state.json").stat().st_mode & 0o777 == 0o600
    assert [r.name for r in store.list()] == ["demo"]
    assert store.list()[0].observed() == SandboxStatus.running


def test_the_state_file_is_snake_case_json(isolated_dirs: Path) -> None:
    store = StateStore()
    store.save(full_record())
    raw = json.loads((store.dir("demo") / "state.json").read_text())
    assert raw["version"] == 3 and raw["ports"] == [{"port": 8080, "host_port": 18080, "protocol": "TCP",
                                                     "host_address": "127.0.0.1"}]

    def keys(value: Any, opaque: bool = False) -> set[str]:
        if isinstance(value, dict):
            own = set() if opaque else set(value)
            return own | {k for key, v in value.items() for k in keys(v, opaque or key in OPAQUE)}
        if isinstance(value, list):
            return {k for v in value for k in keys(v, opaque)}
        return set()

    OPAQUE = {"launch", "vm", "selfcheck", "startup", "processes"}
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", k) for k in keys(raw)), keys(raw)


def test_a_version_1_record_is_migrated(isolated_dirs: Path) -> None:
    """What parma-sandbox wrote before the typed record: facts under "details", ports in camelCase."""
    store = StateStore()
    d = store.dir("old")
    d.mkdir(parents=True)
    me = ProcessRef.of(os.getpid())
    (d / "state.json").write_text(json.dumps({
        "version": 1, "name": "old", "status": "running", "created": 1.5,
        "processes": {"launcher": {"pid": 1, "start_time": 1}, "qemu": {"pid": me.pid, "start_time": me.start_time}},
        "details": {"group": "old", "tee": "emulated", "accel": "tcg", "backend": "qemu", "policy_hash": "ab" * 32,
                    "measurement": None, "detached": True, "kbs": None,
                    "ports": [{"port": 80, "hostPort": 8080, "protocol": "TCP", "hostAddress": "127.0.0.1"}],
                    "containers": [{"name": "web", "image": "busybox", "argv": ["/bin/sh"], "env": ["A=1"],
                                    "working_dir": "/", "stdio": True, "exec_processes": [["/bin/true"]]}],
                    "vm": {"backend": "qemu", "pid": me.pid}}}))
    rec = store.load("old")
    assert rec is not None and rec.status == SandboxStatus.running and rec.created == 1.5
    assert rec.ports == (PortRecord(80, 8080, "TCP", "127.0.0.1"),)
    assert rec.containers[0].exec_processes == (("/bin/true",),) and rec.vm == {"backend": "qemu", "pid": me.pid}
    assert rec.processes["qemu"] == me and rec.observed() == SandboxStatus.running
    store.save(rec)
    assert json.loads((d / "state.json").read_text())["version"] == 3


def test_a_version_2_record_reads_as_is_and_its_runs_have_no_probe_state(isolated_dirs: Path) -> None:
    """Version 3 added ContainerRun.ready and probe_error; a version 2 file has neither (their defaults)."""
    store = StateStore()
    d = store.dir("two")
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({
        "version": 2, "name": "two", "status": "running", "created": 2.5,
        "runs": [{"name": "web", "init": False, "status": "running", "restarts": 1, "exit_code": 1,
                  "started_at": 3.0, "finished_at": 2.0, "restart_at": None, "backoff": 1, "error": None}]}))
    rec = store.load("two")
    assert rec is not None and rec.runs[0].restarts == 1
    assert (rec.runs[0].ready, rec.runs[0].probe_error) == (None, None)
    store.save(rec)
    assert json.loads((d / "state.json").read_text())["version"] == 3


@pytest.mark.parametrize(("raw", "problem"), [
    ({"version": 7, "name": "x"}, "unknown version 7"),
    ({"version": 2, "name": "x", "status": "stale"}, "derived, never written"),
    ({"version": 2, "name": "x", "status": "paused"}, "not a sandbox status"),
    ({"version": 2, "name": "x", "details": {}}, "details"),
    ({"version": 2, "name": "x", "ports": [{"port": 1, "hostPort": 2, "protocol": "TCP", "hostAddress": "a"}]},
     "hostPort"),
])
def test_unreadable_records_are_clear_errors(isolated_dirs: Path, raw: dict[str, Any], problem: str) -> None:
    store = StateStore()
    d = store.dir("x")
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps(raw))
    with pytest.raises(StateError, match=re.escape(problem)):
        store.load("x")
    assert store.list()[0].status == SandboxStatus.corrupt


def test_stale_pid_detected_and_cleaned(isolated_dirs: Path) -> None:
    proc = subprocess.Popen(["sleep", "0"])
    ref = ProcessRef.of(proc.pid) if proc.poll() is None else ProcessRef(proc.pid, 1)
    proc.wait()
    store = StateStore()
    store.save(SandboxRecord(name="dead", status=SandboxStatus.running, processes={"qemu": ref}))
    assert store.list()[0].observed() == SandboxStatus.stale
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
