"""The agent's start-up: what "ready" imports, lazy modules, and the precompiled dataclass methods."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from sandbox.guest import boot_cache
from sandbox.guest.lazy import LazyModule

REPO = Path(__file__).resolve().parents[2]

# Serving does not need these; each loads on first use or on the preload thread after "ready".
NOT_AT_READY = ("sandbox.shared.policy.engine", "sandbox.shared.policy.model", "sandbox.guest.snp_report",
                "cryptography", "sandbox.guest.blockdev", "sandbox.shared.verity",
                "sandbox.guest.keyapi", "sandbox.shared.kbs_protocol", "hashlib", "_hashlib", "traceback",
                "http.server", "sandbox.shared.rego", "socket", "difflib",
                "sandbox.shared.policy.re2syntax", "sandbox.shared.policy.re2machine",
                "pathlib", "urllib.parse", "ipaddress", "sandbox.guest.runtime", "sandbox.guest.oci",
                "sandbox.guest.users", "sandbox.guest.procs", "sandbox.shared.policy.inputs",
                "sandbox.shared.agent_rules", "shutil", "bz2", "lzma", "sandbox.guest.etcfiles",
                "sandbox.shared.policy.defaults", "sandbox.shared.names", "base64")


def _python(code: str, *, env: dict[str, str] | None = None) -> str:
    return subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(code)], cwd=REPO, check=True,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
                          ).stdout


def test_ready_imports_only_what_serving_needs() -> None:
    """The imports of agent.main() up to "ready", and a ping served by them, load none of NOT_AT_READY."""
    out = _python("""
        import json, sys
        from sandbox.guest import agent, sysapi, sysinit
        from sandbox.guest.server import respond
        from sandbox.guest.service import AgentService
        service = AgentService(host_data=lambda: None)
        reply = respond(service.handle, b'{"v": 1, "id": 1, "op": "ping", "payload": {}}')
        assert json.loads(reply)["ok"], reply
        print(json.dumps(sorted(sys.modules)))
    """)
    loaded = set(json.loads(out))
    assert "sandbox.guest.service" in loaded
    assert sorted(loaded.intersection(NOT_AT_READY)) == []


def test_the_preload_list_names_the_lazy_modules() -> None:
    from sandbox.guest import agent

    assert set(agent.PRELOAD) <= set(NOT_AT_READY)
    for name in agent.PRELOAD:
        assert (REPO / (name.replace(".", "/") + ".py")).is_file(), name


def test_the_attestation_api_starts_when_a_container_first_binds_it() -> None:
    from sandbox.guest import agent
    from sandbox.guest.service import AgentService
    from sandbox.shared.kbs_protocol import ATTEST_API_DIR
    from sandbox.shared.messages import ContainerMount

    service = AgentService(host_data=lambda: None)  # type: ignore[arg-type, return-value]
    calls = []
    service.start_attest_api = lambda: calls.append(1) or service.attest_api_started.set()  # type: ignore[func-returns-value]
    mount = ContainerMount(ATTEST_API_DIR, ATTEST_API_DIR, "bind", ("rbind", "ro"))
    assert [m for m, _ in service._bind_mounts((mount,))] == [mount]
    assert calls == [1]
    assert isinstance(agent.AttestationApiStarter(service), agent.AttestationApiStarter)


def test_create_container_waits_for_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.guest import service as service_mod
    from sandbox.shared.messages import CreateContainerRequest
    from sandbox.shared.protocol import ErrorCode, ProtocolError

    monkeypatch.setattr(service_mod, "NETWORK_WAIT_S", 0.05)
    service = service_mod.AgentService(host_data=lambda: None)  # type: ignore[arg-type, return-value]
    assert service.network_ready.is_set()   # a service on its own (tests) has no network to wait for
    service.network_ready.clear()           # what the agent does until it has configured the network
    with pytest.raises(ProtocolError, match="network") as exc:
        service.op_create_container(CreateContainerRequest("c", ("/bin/true",), ()))
    assert exc.value.code == ErrorCode.unavailable


def test_attestation_api_starter_starts_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.guest import agent

    started = []
    monkeypatch.setattr(agent, "start_attestation_api", lambda service: started.append(service))
    starter = agent.AttestationApiStarter("service")  # type: ignore[arg-type]
    threads = [threading.Thread(target=starter) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for t in threading.enumerate():
        if t.name == "attestation-api-start":
            t.join()
    assert started == ["service"]


def test_lazy_module_imports_on_first_attribute_read_once() -> None:
    out = _python("""
        import sys, threading
        from sandbox.guest.lazy import LazyModule
        lazy = LazyModule("sandbox.shared.snp.tcb")
        before = "sandbox.shared.snp.tcb" in sys.modules
        got = []
        threads = [threading.Thread(target=lambda: got.append(lazy.TcbVersion)) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        import sandbox.shared.snp.tcb as real
        print(before, all(g is real.TcbVersion for g in got), len(got), repr(lazy))
    """)
    assert out.split(" ", 3)[:3] == ["False", "True", "8"]
    assert "loaded" in out and "not loaded" not in out


def test_lazy_module_reports_a_missing_name() -> None:
    with pytest.raises(AttributeError):
        LazyModule("sandbox.shared.snp.tcb").no_such_name  # noqa: B018


MODULE = '''
import re
from dataclasses import dataclass, field

WORD = re.compile(r"(?P<head>[a-z]+)(-(?P<tail>[0-9]+))?", re.I)
BYTES = re.compile(rb"\\x00+", re.S)

@dataclass(frozen=True)
class Point:
    x: int
    y: int = 0
    tags: tuple[str, ...] = field(default_factory=tuple)

@dataclass(order=True)
class Box:
    name: str
    size: float = 1.0
'''


@pytest.fixture
def module_dir(tmp_path: Path) -> Path:
    (tmp_path / "dc_sample.py").write_text(MODULE)
    return tmp_path


def _build_cache(module_dir: Path, out_dir: Path) -> Path:
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(module_dir)]), "PYTHONHASHSEED": "0"}
    entry = "import sys\nfrom sandbox.guest.boot_cache import main\nmain(sys.argv[1:])\n"
    run_env = {**os.environ, **env}
    sources = subprocess.run([sys.executable, "-S", "-c", entry, "record"], input=json.dumps(["dc_sample"]),
                             capture_output=True, text=True, check=True, env=run_env).stdout
    name = subprocess.run([sys.executable, "-S", "-c", entry, "dump", str(out_dir)], input=sources,
                          capture_output=True, text=True, check=True, env=run_env).stdout.strip()
    assert name == boot_cache.CACHE_NAME
    return out_dir / name


def test_recorded_sources_cover_every_generated_method(module_dir: Path, tmp_path: Path) -> None:
    cache = _build_cache(module_dir, tmp_path)
    packed, signatures, regexes = boot_cache.load(cache.read_bytes())
    assert list(packed) == ["dc_sample"]
    assert signatures == {"dc_sample:Point(x,y,tags)": "(x: int, y: int = 0, tags: tuple[str, ...] = <factory>) -> None",
                          "dc_sample:Box(name,size)": "(name: str, size: float = 1.0) -> None"}
    codes = boot_cache.unpack(packed["dc_sample"])
    names = {next(line.split("(")[0].split()[-1] for line in src.splitlines() if line.startswith(" def "))
             for src in codes}
    assert {"__init__", "__repr__", "__eq__", "__setattr__", "__delattr__", "__hash__", "__lt__"} <= names


def test_the_cache_is_deterministic(module_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _build_cache(module_dir, tmp_path / "a").read_bytes() == _build_cache(module_dir, tmp_path / "b").read_bytes()


def test_classes_built_from_the_cache_are_the_same(module_dir: Path, tmp_path: Path) -> None:
    cache = _build_cache(module_dir, tmp_path)
    probe = """
        import dis, json, sys
        from sandbox.guest import boot_cache
        cached = boot_cache.install(sys.argv[1]) if sys.argv[1] != "-" else None
        import dc_sample as m
        p = m.Point(1, tags=("a",))
        out = {"repr": repr(p), "eq": p == m.Point(1, 0, ("a",)), "hash": hash(p) == hash(m.Point(1, 0, ("a",))),
               "order": m.Box("a") < m.Box("b"), "doc": [m.Point.__doc__, m.Box.__doc__],
               "inspect": "inspect" in sys.modules,
               "code": {f"{c.__name__}.{n}": getattr(c, n).__code__.co_code.hex() for c in (m.Point, m.Box)
                        for n in ("__init__", "__repr__", "__eq__") },
               "hits": cached.exec.hits if cached else 0, "misses": cached.exec.misses if cached else 0}
        out["regex"] = [m.WORD.fullmatch("Ab-12").groupdict(), m.WORD.groupindex["tail"], m.WORD.flags,
                        m.BYTES.search(b"a\\0\\0").span()]
        out["regex_hits"] = cached.regexes.hits if cached else 0
        try:
            p.x = 2
        except Exception as e:
            out["frozen"] = type(e).__name__
        print(json.dumps(out))
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(module_dir)])}
    with_cache = json.loads(subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(probe), str(cache)],
                                           capture_output=True, text=True, check=True, env=env).stdout)
    without = json.loads(subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(probe), "-"],
                                        capture_output=True, text=True, check=True, env=env).stdout)
    assert with_cache["hits"] > 0 and with_cache["misses"] == 0
    for key in ("repr", "eq", "hash", "order", "doc", "code", "frozen", "regex"):
        assert with_cache[key] == without[key], key
    assert with_cache["regex_hits"] == 2
    assert (with_cache["inspect"], without["inspect"]) == (False, True)
    assert with_cache["frozen"] == "FrozenInstanceError"


def test_a_cache_for_another_interpreter_or_garbage_is_ignored(tmp_path: Path) -> None:
    import dataclasses

    for data in (b"", b"garbage", b"parma-sandbox boot cache v1\ncpython-39 0x30900f0\n" + b"\x00" * 8):
        path = tmp_path / "cache"
        path.write_bytes(data)
        assert boot_cache.install(str(path)) is None
        assert "exec" not in vars(dataclasses)
    assert boot_cache.install(str(tmp_path / "absent")) is None


def test_a_miss_compiles_as_the_builtin_would(tmp_path: Path) -> None:
    import dataclasses

    path = tmp_path / "cache"
    path.write_bytes(boot_cache.Recorded({"m": ["x = 1\n"]}, {}, {}).dumps())
    installed = boot_cache.install(str(path))
    assert installed is not None
    cached = installed.exec
    try:
        namespace: dict[str, object] = {"__name__": "m"}
        cached("x = 1\n", namespace)
        cached("y = 2\n", namespace)
        cached("z = 3\n", {"__name__": "elsewhere"})
        assert (namespace["x"], namespace["y"]) == (1, 2)
        assert (cached.hits, cached.misses) == (1, 2)
        assert list(cached.codes) == ["m"]   # unpacked on first use; no part for "elsewhere"

        @dataclasses.dataclass(frozen=True)
        class Fresh:
            a: int

        assert Fresh(1) == Fresh(1) and cached.misses > 1
        assert Fresh.__doc__ == "Fresh(a: 'int')" and installed.signatures.misses == 1
    finally:
        boot_cache.uninstall()
    assert "exec" not in vars(dataclasses)
    import inspect
    assert dataclasses.inspect is inspect


def _agent_cache(tmp_path: Path) -> Path:
    """The cache the image build makes, here from the source tree with this interpreter."""
    from sandbox.uvm.overlay import agent_files, agent_modules

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}
    entry = "import sys\nfrom sandbox.guest.boot_cache import main\nmain(sys.argv[1:])\n"
    recorded = subprocess.run([sys.executable, "-S", "-c", entry, "record"], capture_output=True, text=True,
                              check=True, env=env, input=json.dumps(agent_modules(agent_files()))).stdout
    subprocess.run([sys.executable, "-S", "-c", entry, "dump", str(tmp_path)], input=recorded, capture_output=True,
                   text=True, check=True, env=env)
    return tmp_path / boot_cache.CACHE_NAME


AGENT_PROBE = """
import sys
from sandbox.guest import boot_cache
installed = boot_cache.install(sys.argv[1]) if sys.argv[1] != "-" else None
from sandbox.guest import procs, sysapi, sysinit
from sandbox.guest.server import serve_ports
from sandbox.guest.service import AgentService
at_ready = sorted(m for m in ("inspect", "ast", "dis", "tokenize", "linecache") if m in sys.modules)
import dataclasses, importlib, json
names = json.loads(sys.argv[2])
classes = {}
for name in names:
    module = importlib.import_module(name)
    for obj in vars(module).values():
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == name:
            classes[f"{name}.{obj.__qualname__}"] = {
                "doc": obj.__doc__,
                "code": {m: getattr(obj, m).__code__.co_code.hex() for m in
                         ("__init__", "__repr__", "__eq__", "__setattr__", "__delattr__", "__hash__")
                         if hasattr(getattr(obj, m, None), "__code__")}}
same_regexes = None
if installed:
    programs = installed.regexes.programs
    same_regexes = [len(programs), all(installed.regexes(p, f) == installed.regexes.original(p, f)
                                       for p, f in programs)]
print(json.dumps({"at_ready": at_ready, "classes": classes, "regexes": same_regexes,
                  "misses": [installed.exec.misses, installed.signatures.misses] if installed else None}))
"""


def test_the_agents_classes_are_the_same_with_the_cache_and_inspect_stays_unloaded(tmp_path: Path) -> None:
    from sandbox.uvm.overlay import agent_files, agent_modules

    cache = _agent_cache(tmp_path)
    names = json.dumps(agent_modules(agent_files()))

    def probe(path: str) -> dict:
        return json.loads(_python_args(AGENT_PROBE, path, names))

    with_cache, without = probe(str(cache)), probe("-")
    assert with_cache["at_ready"] == [] and "inspect" in without["at_ready"]
    assert with_cache["misses"] == [0, 0]
    count, same = with_cache["regexes"]
    assert count > 10 and same     # Pattern == compares flags, pattern and the compiled program
    assert len(with_cache["classes"]) > 100
    assert with_cache["classes"] == without["classes"]


def _python_args(code: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(code), *args], cwd=REPO, check=True,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout


def test_mount_basics_reads_the_mount_table_before_and_after_proc(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """The kernel mounted /dev already (visible once /proc is): everything else is mounted, /dev is not."""
    from sandbox.guest import sysapi, sysinit

    mounted: list[str] = []
    reads = []

    def mount_points() -> set[str]:
        reads.append(1)
        return {"/", "/dev", *mounted} if "/proc" in mounted else set()

    monkeypatch.setattr(sysapi, "mount_points", mount_points)
    monkeypatch.setattr(sysapi, "mount", lambda source, target, *a, **k: mounted.append(str(target)))
    made: list[str] = []
    monkeypatch.setattr(sysinit.os, "makedirs", lambda path, exist_ok=False: made.append(path))
    sysinit.mount_basics([])
    assert len(reads) == 2
    assert mounted == made == [t for _, t, *_ in sysinit.BASE_MOUNTS if t != "/dev"]
