"""The exit-code table of docs/cli.md is the contract, and every row of it runs here against the CLI.

Each (command, code) of the table has a scenario below that makes the CLI exit with that code,
in-process: real files, a local OCI layout, a key broker store, the real agent service for `attest
report`, and for the lifecycle verbs a stand-in agent on the sandbox's own sockets (tests/fakeagent.py)
behind the real host side. The few codes that need a UVM or a registry are checked by the vm or tools
test named in OTHER_TIERS, and this test checks that the test is there.
"""

from __future__ import annotations

import ast
import base64
import json
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import pytest
from clirun import run_cli

from sandbox.cli.main import cli
from sandbox.state import ContainerRun, RunStatus, StateStore
from tests.fakeagent import fake_sandbox, kill_later
from tests.imagefixtures import oci_image
from tests.layertars import Layer
from tests.unit.test_attest_report_cli import running_sandbox  # noqa: F401 - a fixture (attest report)

REPO = Path(__file__).resolve().parents[2]
CLI_MD = REPO / "docs" / "cli.md"
ROW = re.compile(r"\| `([a-z][a-z0-9 -]*)` \| (.+) \|")
CODE = re.compile(r"\*\*(\d+|N)\*\*")


def exit_code_table(text: str | None = None) -> dict[str, set[str]]:
    """docs/cli.md's "Exit codes" table: command -> the codes its row names ("N": the program's own)."""
    text = CLI_MD.read_text() if text is None else text
    section = text.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        if (m := ROW.fullmatch(line)) is not None:
            assert m[1] not in table, f"{m[1]} has two rows"
            table[m[1]] = set(CODE.findall(m[2]))
    return table


def leaf_commands() -> set[str]:
    out = set()

    def walk(command: click.Command, ctx: click.Context, path: tuple[str, ...]) -> None:
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                walk(sub, click.Context(sub, parent=ctx, info_name=name), (*path, name))
        else:
            out.add(" ".join(path))
    walk(cli, click.Context(cli, info_name="parma-sandbox"), ())
    return out


# --- the world the scenarios run in ----------------------------------------------------------------------


@dataclass
class World:
    tmp: Path
    capsys: pytest.CaptureFixture[str]
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest
    stack: ExitStack
    outputs: list[tuple[int, str, str]] = field(default_factory=list)

    def enter(self, context: AbstractContextManager[Any]) -> Any:
        """Keep a context (a stand-in sandbox) open until the scenario ends."""
        return self.stack.enter_context(context)

    def run(self, *args: str) -> int:
        code, out, err = run_cli([str(a) for a in args], self.capsys)
        self.outputs.append((code, out, err))
        assert "Traceback" not in err and "internal error" not in err, err
        return code

    @property
    def err(self) -> str:
        return self.outputs[-1][2]

    @property
    def out(self) -> str:
        return self.outputs[-1][1]

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    @cached_property
    def image(self) -> Path:
        oci_image(self.tmp / "img")
        return self.tmp / "img"

    @cached_property
    def tampered_image(self) -> Path:
        """The layout with one layer blob changed: it no longer hashes to its digest."""
        path = self.tmp / "tampered"
        shutil.copytree(self.image, path)
        index = json.loads((path / "index.json").read_text())
        manifest = json.loads((path / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
        blob = path / "blobs/sha256" / manifest["layers"][0]["digest"][7:]
        data = bytearray(blob.read_bytes())
        data[-5] ^= 1
        blob.write_bytes(bytes(data))
        return path

    def group(self, image: str = "oci:img:latest", **extra: Any) -> Path:
        self.image  # noqa: B018 - the layout the group names
        doc = {"name": "demo", "containers": [{"name": "web", "image": image, "command": ["/app/run.sh"]}], **extra}
        return self.file("group.json", json.dumps(doc))

    @cached_property
    def policy(self) -> Path:
        assert self.run("policy", "gen", self.group(), "-o", self.tmp / "policy.json") == 0, self.err
        return self.tmp / "policy.json"

    @cached_property
    def debug_policy(self) -> Path:
        assert self.run("policy", "gen", "--debug-mode", self.group(), "-o", self.tmp / "debug.json") == 0
        return self.tmp / "debug.json"

    def trace(self, *requests: dict[str, Any]) -> Path:
        return self.file("trace.jsonl", "".join(json.dumps(r) + "\n" for r in requests))

    @cached_property
    def issuer(self) -> Path:
        assert self.run("policy", "fragment", "issuer", self.tmp / "issuer") == 0, self.err
        return self.tmp / "issuer"

    def sign_fragment(self) -> int:
        from tests.unit.test_aci_fragments import FEED, fragment_text
        rego = self.file("fragment.rego", fragment_text())
        return self.run("policy", "fragment", "sign", rego, "--key", self.issuer / "key.pem", "--chain",
                        self.issuer / "chain.pem", "--feed", FEED, "-o", self.tmp / "fragment.cose")

    @cached_property
    def fragment(self) -> Path:
        assert self.sign_fragment() == 0, self.err
        return self.tmp / "fragment.cose"

    @cached_property
    def forged_fragment(self) -> Path:
        from sandbox.shared import cose
        from tests.unit.test_aci_fragments import fragment_text
        envelope = cose.parse_sign1(self.fragment.read_bytes())
        forged = cose.assemble_sign1(envelope.protected_bytes, fragment_text(svn='"9"'), envelope.signature)
        return self.file("forged.cose", forged)

    @cached_property
    def store(self) -> StateStore:
        return StateStore()

    def attest_report(self) -> int:
        """`attest report` from the real agent service with the emulated PSP (test_attest_report_cli)."""
        name = self.request.getfixturevalue("running_sandbox")
        return self.run("attest", "report", name, "--nonce", "5a" * 32, "-o", self.tmp / "evidence.json")

    @cached_property
    def emulated_evidence(self) -> Path:
        assert self.attest_report() == 0, self.err
        return self.tmp / "evidence.json"

    @cached_property
    def report(self) -> Path:
        doc = json.loads(self.emulated_evidence.read_text())
        return self.file("report.bin", base64.b64decode(doc["evidence"]["report"]))

    @cached_property
    def kbs_store(self) -> Path:
        return self.tmp / "kbs"

    def secret(self, name: str) -> int:
        value = self.file("value", "s3cret")
        return self.run("secret", "put", name, "--file", value, "--policy", self.policy, "--any-uvm",
                        "--allow-emulated", "--store", self.kbs_store)


@pytest.fixture
def world(tmp_path: Path, isolated_dirs: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
          request: pytest.FixtureRequest) -> Iterator[World]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PARMA_SANDBOX_KBS_STORE", str(tmp_path / "kbs"))
    with ExitStack() as stack:
        yield World(tmp_path, capsys, monkeypatch, request, stack)


# --- the scenarios, one per (command, code) of the table ----------------------------------------------------

Scenario = Callable[[World], int]
SCENARIOS: dict[tuple[str, str], Scenario] = {}


def scenario(command: str, code: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        assert (command, code) not in SCENARIOS
        SCENARIOS[(command, code)] = fn
        return fn
    return register


# Codes that need a UVM or a registry: the vm or tools test that checks each (file::function).
OTHER_TIERS = {
    ("build", "0"): "tests/vm/test_uvm_build.py::test_build_uvm_answers_from_the_cache",
    ("policy fragment fetch", "0"): "tests/tools/test_aci_fragment_registry.py::test_attached_fragment_is_found_verified_and_written",
    ("policy fragment fetch", "1"): "tests/tools/test_aci_fragment_registry.py::test_image_without_fragments",
    ("attest fetch", "0"): "tests/tools/test_kds_client.py::test_fetch_then_verify",
}


@scenario("check", "0")
def _(w: World) -> int:
    return w.run("check", "--format", "json")


@scenario("check", "2")
def _(w: World) -> int:
    return w.run("check", "--no-such-option")


@scenario("validate", "0")
def _(w: World) -> int:
    return w.run("validate", w.group())


@scenario("validate", "2")
def _(w: World) -> int:
    assert w.run("validate", w.group(image="oci:img:nope")) == 2 and "no image tagged 'nope'" in w.err
    assert w.run("validate", w.tmp / "missing.json") == 2
    return w.run("validate", w.file("bad.json", '{"name": "demo", "containers": []}'))


# up: the launch itself is a UVM's (tests/vm); its exit codes are the command's, run here with a stand-in
# for the launch that leaves a sandbox served by the stand-in agent.


def fake_launch(w: World, *, main_exit: int | None, signum: int | None = None) -> None:
    from sandbox.launch.pipeline import Launched, Timings

    def launch(spec: Any, opts: Any) -> Launched:
        sandbox = w.enter(fake_sandbox(w.store, spec.name, containers=("web",)))
        if main_exit is not None:
            out = sandbox.agent.outputs["web"]
            out.done, out.exit_code = True, main_exit
        if signum is not None:   # `up` has its handlers by now: the signal arrives while it is attached
            kill_later(signum, 0.5)
        record = w.store.require(spec.name)
        plan = SimpleNamespace(containers=[SimpleNamespace(name="web", stdio=True)])
        runs = {"web": ContainerRun("web", status=RunStatus.running, started_at=time.time())}
        return Launched(spec.name, record, None, plan, Timings(), runs)  # type: ignore[arg-type]

    w.monkeypatch.setattr("sandbox.launch.pipeline.up", launch)   # `up` imports the launcher when it runs
    # `up -d` would leave a supervisor process; the stand-in sandbox has no containers to restart.
    w.monkeypatch.setattr("sandbox.launch.supervisor_process.spawn", lambda name, store: None)


@scenario("up", "0")
def _(w: World) -> int:
    fake_launch(w, main_exit=None)
    code = w.run("up", "-d", w.group(), "--format", "json")
    assert json.loads(w.out)["status"] == "running"
    return code


@scenario("up", "N")
def _(w: World) -> int:
    fake_launch(w, main_exit=3)
    code = w.run("up", w.group())
    assert w.out == "web says hello\n" and w.store.load("demo") is None   # taken down after the main container
    return code


def attached_until(w: World, signum: int) -> int:
    fake_launch(w, main_exit=None, signum=signum)
    code = w.run("up", w.group())
    assert w.store.load("demo") is None, "the sandbox is taken down first"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "up restores the handlers it installed"
    return code


@scenario("up", "130")
def _(w: World) -> int:
    code = attached_until(w, signal.SIGINT)
    assert "error: interrupted" in w.err
    return code


@scenario("up", "143")
def _(w: World) -> int:
    code = attached_until(w, signal.SIGTERM)
    assert "error: stopped by SIGTERM" in w.err
    return code


@scenario("up", "129")
def _(w: World) -> int:
    return attached_until(w, signal.SIGHUP)


@scenario("up", "1")
def _(w: World) -> int:
    from sandbox.hostcheck import Tee, check_host
    if check_host().tee == Tee.sev_snp:
        pytest.skip("this host can launch SEV-SNP guests: `up --tee sev-snp` would launch")
    code = w.run("up", "--tee", "sev-snp", w.group())
    assert "SEV-SNP was requested" in w.err
    return code


@scenario("up", "2")
def _(w: World) -> int:
    assert w.run("up", w.group(image="oci:img:nope")) == 2
    return w.run("up", w.tmp / "missing.json")


@scenario("ps", "0")
def _(w: World) -> int:
    with fake_sandbox(w.store):
        code = w.run("ps", "--format", "json")
        assert [r["name"] for r in json.loads(w.out)] == ["demo"]
    return code


@scenario("logs", "0")
def _(w: World) -> int:
    from sandbox.launch import lifecycle
    with fake_sandbox(w.store, containers=("web", "db")) as sandbox:
        assert w.run("logs", "demo") == 0 and w.out == "web | web says hello\ndb  | db says hello\n"
        sandbox.agent.output_ends_on_shutdown = False    # only the poweroff ends the stream
        # -f follows until the sandbox is taken down; `down` from elsewhere ends it normally
        timer = SimpleNamespace(error=None)

        def down() -> None:
            try:
                lifecycle.down("demo", store=w.store, timeout=2)
            except BaseException as e:  # reported below
                timer.error = e

        import threading
        t = threading.Timer(0.5, down)
        t.start()
        code = w.run("logs", "-f", "demo", "web")
        t.join()
        assert timer.error is None and w.store.load("demo") is None
    return code


@scenario("logs", "1")
def _(w: World) -> int:
    with fake_sandbox(w.store, stdio=False):
        code = w.run("logs", "demo")
        assert "allows stdio access" in w.err
    return code


@scenario("logs", "2")
def _(w: World) -> int:
    with fake_sandbox(w.store):
        assert w.run("logs", "demo", "nosuch") == 2 and "has no container 'nosuch'" in w.err
    return w.run("logs", "nosuch")


def exec_in_fake(w: World, *argv: str) -> int:
    with fake_sandbox(w.store):
        return w.run("exec", "demo", "web", "--", *argv)


@scenario("exec", "N")
def _(w: World) -> int:
    code = exec_in_fake(w, "/bin/exit", "3")
    assert w.out == "exec output\n"
    assert exec_in_fake(w, "/bin/exit", "0") == 0 and exec_in_fake(w, "/bin/exit", "1") == 1
    return code


@scenario("exec", "77")
def _(w: World) -> int:
    code = exec_in_fake(w, "/bin/sh")
    assert "denied by policy" in w.err and "not an exec_process" in w.err
    return code


@scenario("exec", "125")
def _(w: World) -> int:
    assert w.run("exec", "nosuch", "web", "--", "/bin/true") == 125 and "no sandbox named 'nosuch'" in w.err
    assert w.run("exec", "demo") == 125                         # a usage error: no container, no command
    assert w.run("exec", "demo", "web", "--") == 125 and "no command given" in w.err
    with fake_sandbox(w.store):
        return w.run("exec", "demo", "nosuch", "--", "/bin/true")


@scenario("exec", "126")
def _(w: World) -> int:
    return exec_in_fake(w, "/etc/passwd")


@scenario("exec", "127")
def _(w: World) -> int:
    return exec_in_fake(w, "/nope")


@scenario("inspect", "0")
def _(w: World) -> int:
    with fake_sandbox(w.store):
        code = w.run("inspect", "demo", "--format", "json")
        info = json.loads(w.out)
        assert info["status"] == "running" and info["containers"][0]["status"] == "running"
    return code


@scenario("inspect", "1")
def _(w: World) -> int:
    with fake_sandbox(w.store):   # recorded by no launch (`up` records one once the sandbox runs)
        return w.run("inspect", "--trace", "demo")


@scenario("inspect", "2")
def _(w: World) -> int:
    assert w.run("inspect", "--trace", "nosuch") == 2
    return w.run("inspect", "nosuch")


@scenario("down", "0")
def _(w: World) -> int:
    with fake_sandbox(w.store) as sandbox:
        code = w.run("down", "demo")
        assert "demo: removed" in w.out and w.store.load("demo") is None and sandbox.qemu.poll() is not None
    assert w.run("down", "--all") == 0
    return code


@scenario("down", "1")
def _(w: World) -> int:
    """A VM process that `down` may not signal (libvirt runs QEMU as another user): it says so, exit 1."""
    from sandbox.launch import lifecycle
    store = w.store
    with fake_sandbox(store) as sandbox:
        store.save(replace(store.require("demo"), vm=None))    # only its recorded process

        def not_permitted(pid: int, sig: int) -> None:
            raise PermissionError(1, "Operation not permitted")

        sandbox.agent.on_poweroff.clear()     # the VM does not go away
        with w.monkeypatch.context() as patch:
            patch.setattr(lifecycle.os, "kill", not_permitted)
            code = w.run("down", "demo", "--timeout", "1")
        assert "still running" in w.err and store.load("demo") is not None
    return code


@scenario("down", "2")
def _(w: World) -> int:
    assert w.run("down") == 2 and "give a sandbox NAME or --all" in w.err
    return w.run("down", "nosuch")


@scenario("policy gen", "0")
def _(w: World) -> int:
    return w.run("policy", "gen", w.group(), "-o", w.tmp / "p.json")


@scenario("policy gen", "1")
def _(w: World) -> int:
    code = w.run("policy", "gen", w.group(image=f"oci:{w.tampered_image}:latest"))
    assert "content hashes to" in w.err
    return code


@scenario("policy gen", "2")
def _(w: World) -> int:
    assert w.run("policy", "gen", w.group(image="oci:img:nope")) == 2
    return w.run("policy", "gen", w.tmp / "missing.json")


@scenario("policy show", "0")
def _(w: World) -> int:
    return w.run("policy", "show", w.policy)


@scenario("policy show", "2")
def _(w: World) -> int:
    return w.run("policy", "show", w.file("not-a-policy.json", "{}"))


@scenario("policy hash", "0")
def _(w: World) -> int:
    return w.run("policy", "hash", w.policy)


@scenario("policy hash", "2")
def _(w: World) -> int:
    return w.run("policy", "hash", w.tmp / "missing.json")


@scenario("policy diff", "0")
def _(w: World) -> int:
    return w.run("policy", "diff", w.policy, w.policy)


@scenario("policy diff", "1")
def _(w: World) -> int:
    code = w.run("policy", "diff", w.policy, w.debug_policy)
    assert "allow_runtime_logging: false -> true" in w.out
    return code


@scenario("policy diff", "2")
def _(w: World) -> int:
    return w.run("policy", "diff", w.policy, w.file("not-a-policy.json", "[]"))


@scenario("policy check", "0")
def _(w: World) -> int:
    layer = json.loads(w.policy.read_text())["containers"][0]["layers"][0]
    return w.run("policy", "check", w.policy, w.trace({"ep": "mount_device", "input": {
        "target": "/run/parma/layers/l0", "device_hash": layer}}))


@scenario("policy check", "1")
def _(w: World) -> int:
    # refused by the agent's own rules: a layer device outside its directory
    assert w.run("policy", "check", w.policy, w.trace({"ep": "mount_device", "input": {
        "target": "/etc", "device_hash": "ab" * 32}})) == 1
    return w.run("policy", "check", w.policy, w.trace({"ep": "exec_in_container", "input": {
        "container_id": "web", "argv": ["/bin/sh"], "env": []}}))


@scenario("policy check", "2")
def _(w: World) -> int:
    assert w.run("policy", "check", w.policy, w.file("comments.jsonl", "# nothing here\n")) == 2
    return w.run("policy", "check", w.policy, w.trace({"ep": "no_such_point", "input": {}}))


@scenario("policy export", "0")
def _(w: World) -> int:
    return w.run("policy", "export", w.policy, "-o", w.tmp / "policy.rego")


@scenario("policy export", "2")
def _(w: World) -> int:
    return w.run("policy", "export", w.file("not-a-policy.json", "{}"))


@scenario("policy import", "0")
def _(w: World) -> int:
    assert w.run("policy", "export", w.policy, "-o", w.tmp / "policy.rego") == 0
    return w.run("policy", "import", w.tmp / "policy.rego", "-o", w.tmp / "imported.json")


@scenario("policy import", "2")
def _(w: World) -> int:
    return w.run("policy", "import", w.file("garbage.rego", "package nothing\nthis is not rego ((\n"))


@scenario("policy explain", "0")
def _(w: World) -> int:
    decision = {"decision": "deny", "input": {"rule": "create_container", "argList": ["/bin/sh"]},
                "reason": {"errors": ["invalid command"]}}
    return w.run("policy", "explain", base64.b64encode(json.dumps(decision).encode()).decode())


@scenario("policy explain", "2")
def _(w: World) -> int:
    return w.run("policy", "explain", "not a blob")


@scenario("policy fragment issuer", "0")
def _(w: World) -> int:
    return w.run("policy", "fragment", "issuer", w.tmp / "new-issuer")


@scenario("policy fragment issuer", "2")
def _(w: World) -> int:
    return w.run("policy", "fragment", "issuer", w.issuer)    # it holds a key already


@scenario("policy fragment sign", "0")
def _(w: World) -> int:
    return w.sign_fragment()


@scenario("policy fragment sign", "2")
def _(w: World) -> int:
    return w.run("policy", "fragment", "sign", w.file("f.rego", "package x\n"), "--key", w.tmp / "missing.pem",
                 "--chain", w.tmp / "missing.pem", "--feed", "f", "-o", w.tmp / "out.cose")


@scenario("policy fragment verify", "0")
def _(w: World) -> int:
    return w.run("policy", "fragment", "verify", w.fragment)


@scenario("policy fragment verify", "1")
def _(w: World) -> int:
    code = w.run("policy", "fragment", "verify", w.forged_fragment)
    assert "signature does not verify" in w.err
    return code


@scenario("policy fragment verify", "2")
def _(w: World) -> int:
    return w.run("policy", "fragment", "verify", w.file("bad.cose", b"\xd2\x84" + b"\x00" * 4))


@scenario("policy fragment show", "0")
def _(w: World) -> int:
    return w.run("policy", "fragment", "show", w.fragment)


@scenario("policy fragment show", "1")
def _(w: World) -> int:
    return w.run("policy", "fragment", "show", w.forged_fragment)


@scenario("policy fragment show", "2")
def _(w: World) -> int:
    return w.run("policy", "fragment", "show", w.file("bad.cose", b"\xd2\x84" + b"\x00" * 4))


@scenario("policy fragment fetch", "2")
def _(w: World) -> int:
    return w.run("policy", "fragment", "fetch", "UPPER/case", "-o", w.tmp / "fragments")


@scenario("export aci", "0")
def _(w: World) -> int:
    return w.run("export", "aci", w.group(), "--registry", "registry.example/demo", "-o", w.tmp / "azuredeploy.json")


@scenario("export aci", "2")
def _(w: World) -> int:
    return w.run("export", "aci", w.group(image="oci:img:nope"), "-o", w.tmp / "azuredeploy.json")


@scenario("export k8s", "0")
def _(w: World) -> int:
    """Pods pull from a registry: a group naming one, with a policy made for that image."""
    doc = json.loads(w.policy.read_text())
    doc["containers"][0]["id"] = "registry.example/app:1"
    policy = w.file("k8s-policy.json", json.dumps(doc))
    group = w.file("k8s-group.json", json.dumps({"name": "demo", "containers": [
        {"name": "web", "image": "registry.example/app:1", "command": ["/app/run.sh"]}]}))
    return w.run("export", "k8s", group, "--policy", policy, "-o", w.tmp / "pod.yaml")


@scenario("export k8s", "2")
def _(w: World) -> int:
    return w.run("export", "k8s", w.group(image="oci:img:nope"), "-o", w.tmp / "pod.yaml")


def _image_scenarios(verb: str) -> None:
    """`image pull` and `image layers` read an image the same way."""

    @scenario(f"image {verb}", "0")
    def _(w: World) -> int:
        return w.run("image", verb, f"oci:{w.image}")

    @scenario(f"image {verb}", "1")
    def _(w: World) -> int:
        code = w.run("image", verb, f"oci:{w.tampered_image}")
        assert "content hashes to" in w.err
        return code

    @scenario(f"image {verb}", "2")
    def _(w: World) -> int:
        assert w.run("image", verb, "UPPER/case") == 2
        assert w.run("image", verb, f"oci:{w.tmp / 'nowhere'}") == 2
        assert w.run("image", verb, f"docker-archive:{w.tmp / 'missing.tar'}") == 2
        return w.run("image", verb, f"oci:{w.image}:nope")


for _verb in ("pull", "layers"):
    _image_scenarios(_verb)


@scenario("image convert", "0")
def _(w: World) -> int:
    layer = w.file("layer.tar", Layer().add("hello.txt", data=b"hello\n").tar_bytes())
    return w.run("image", "convert", layer, "-o", w.tmp / "layer.img")


@scenario("image convert", "2")
def _(w: World) -> int:
    assert w.run("image", "convert", w.file("junk.tar", b"\x00garbage" * 100), "-o", w.tmp / "x.img") == 2
    return w.run("image", "convert", w.tmp / "missing.tar", "-o", w.tmp / "x.img")


@scenario("verity", "0")
def _(w: World) -> int:
    return w.run("verity", w.file("data.bin", bytes(8 * 4096)))


@scenario("verity", "2")
def _(w: World) -> int:
    return w.run("verity", w.tmp / "missing.bin")


@scenario("attest report", "0")
def _(w: World) -> int:
    return w.attest_report()


@scenario("attest report", "1")
def _(w: World) -> int:
    """The agent answers for another nonce: the guest's fault, not the user's input."""
    from sandbox.shared.snp.evidence import P384_SPKI_PREFIX
    with fake_sandbox(w.store) as sandbox:
        payload = {"report": base64.b64encode(bytes(1184)).decode(), "cert_table": "",
                   "runtime_public_key": base64.b64encode(P384_SPKI_PREFIX + bytes(96)).decode(),
                   "nonce": "11" * 32, "backend": "emulated"}
        handle = sandbox.agent.handle

        def answer(r: Any) -> Any:
            from sandbox.shared.messages import GetReportRequest
            return payload if isinstance(r, GetReportRequest) else handle(r)

        sandbox.agent.handle = answer  # type: ignore[method-assign]
        code = w.run("attest", "report", "demo", "--nonce", "22" * 32)
        assert "answered for another nonce" in w.err
    return code


@scenario("attest report", "2")
def _(w: World) -> int:
    assert w.run("attest", "report", "nosuch") == 2 and "no sandbox named 'nosuch'" in w.err
    with fake_sandbox(w.store):
        return w.run("attest", "report", "demo", "--nonce", "abcd")


@scenario("attest verify", "0")
def _(w: World) -> int:
    return w.run("attest", "verify", w.emulated_evidence, "--nonce", "5a" * 32, "--allow-emulated")


@scenario("attest verify", "1")
def _(w: World) -> int:
    assert w.run("attest", "verify", w.emulated_evidence, "--nonce", "77" * 32, "--allow-emulated") == 1
    assert "report.report_data" in w.err
    return w.run("attest", "verify", w.file("truncated.bin", w.report.read_bytes()[:700]))


@scenario("attest verify", "2")
def _(w: World) -> int:
    assert w.run("attest", "verify", w.tmp / "missing.bin") == 2
    return w.run("attest", "verify", w.report, "--host-data", "ab", "--policy", w.tmp / "p.json")


@scenario("attest display", "0")
def _(w: World) -> int:
    return w.run("attest", "display", w.report)


@scenario("attest display", "2")
def _(w: World) -> int:
    return w.run("attest", "display", w.file("truncated.bin", w.report.read_bytes()[:700]))


@scenario("attest fetch", "1")
def _(w: World) -> int:
    """A KDS (on loopback) that refuses the request; 429s and 5xx would be retried with backoff first."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refuse(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's naming
            self.send_error(403, "forbidden")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = w.run("attest", "fetch", "vcek", w.report, "--kds-url", f"http://127.0.0.1:{server.server_port}",
                     "--out", w.tmp / "certs")
    finally:
        server.shutdown()
        server.server_close()
    assert "refused the request" in w.err and "HTTP 403" in w.err
    return code


@scenario("attest fetch", "2")
def _(w: World) -> int:
    return w.run("attest", "fetch", "vcek", w.file("truncated.bin", b"\x00" * 700))


@scenario("kbs serve", "0")
def _(w: World) -> int:
    import os
    import threading
    import time

    def stop_once_serving() -> None:   # SIGTERM only once `kbs serve` has its handler, never before
        deadline = time.monotonic() + 30
        while signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_once_serving, daemon=True).start()
    code = w.run("kbs", "serve", "--listen", "127.0.0.1:0", "--store", w.kbs_store)
    assert "kbs: listening on http://127.0.0.1:" in w.out
    return code


@scenario("kbs serve", "2")
def _(w: World) -> int:
    return w.run("kbs", "serve", "--listen", "nohost", "--store", w.kbs_store)


@scenario("kbs key", "0")
def _(w: World) -> int:
    return w.run("kbs", "key", "--store", w.kbs_store)


@scenario("kbs key", "2")
def _(w: World) -> int:
    return w.run("kbs", "key", "--no-such-option")


@scenario("kbs audit", "0")
def _(w: World) -> int:
    assert w.secret("demo") == 0
    return w.run("kbs", "audit", "--verify", "--store", w.kbs_store)


@scenario("kbs audit", "1")
def _(w: World) -> int:
    assert w.secret("one") == 0 and w.secret("two") == 0
    log = w.kbs_store / "audit.log"
    log.write_bytes(log.read_bytes().replace(b'"one"', b'"six"'))
    return w.run("kbs", "audit", "--verify", "--store", w.kbs_store)


@scenario("kbs audit", "2")
def _(w: World) -> int:
    return w.run("kbs", "audit", "--tail", "many")


@scenario("secret put", "0")
def _(w: World) -> int:
    return w.secret("demo")


@scenario("secret put", "2")
def _(w: World) -> int:
    assert w.secret("demo") == 0 and w.secret("demo") == 2 and "already exists" in w.err
    return w.run("secret", "put", "other", "--file", w.tmp / "value", "--store", w.kbs_store)


@scenario("secret list", "0")
def _(w: World) -> int:
    return w.run("secret", "list", "--store", w.kbs_store)


@scenario("secret rm", "0")
def _(w: World) -> int:
    assert w.secret("demo") == 0
    return w.run("secret", "rm", "demo", "--store", w.kbs_store)


@scenario("secret rm", "2")
def _(w: World) -> int:
    assert w.secret("demo") == 0
    code = w.run("secret", "rm", "nosuch", "--store", w.kbs_store)
    assert "no secret named 'nosuch'" in w.err
    return code


@scenario("build", "1")
def _(w: World) -> int:
    """No mmdebstrap to build the rootfs with (an empty cache, so nothing is found there first)."""
    empty = w.tmp / "no-tools"
    empty.mkdir()
    w.monkeypatch.setenv("PATH", str(empty))
    code = w.run("build", "rootfs")
    assert "mmdebstrap" in w.err
    return code


@scenario("build", "2")
def _(w: World) -> int:
    return w.run("build", "nothing")


OVMF = Path("/usr/share/ovmf/OVMF.fd")


@scenario("measure", "0")
def _(w: World) -> int:
    if not OVMF.is_file():
        pytest.skip(f"{OVMF} is not installed")
    return w.run("measure", "--mode", "sev", "--ovmf", OVMF)


@scenario("measure", "2")
def _(w: World) -> int:
    assert w.run("measure") == 2
    return w.run("measure", "--mode", "sev", "--ovmf", w.tmp / "missing.fd")


# --- the checks --------------------------------------------------------------------------------------------

TABLE = exit_code_table()
ROWS = sorted((command, code) for command, codes in TABLE.items() for code in codes)


def test_the_table_has_a_row_for_every_command() -> None:
    assert sorted(TABLE) == sorted(leaf_commands())


def test_every_code_of_the_table_has_a_scenario_and_every_scenario_a_row() -> None:
    assert sorted(set(SCENARIOS) | set(OTHER_TIERS)) == ROWS
    assert not set(SCENARIOS) & set(OTHER_TIERS)


@pytest.mark.parametrize(("command", "code"), sorted(OTHER_TIERS))
def test_codes_checked_in_other_tiers_have_their_test(command: str, code: str) -> None:
    path, _, function = OTHER_TIERS[(command, code)].partition("::")
    tree = ast.parse((REPO / path).read_text())
    test = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function), None)
    assert test is not None, f"{path} has no {function}"
    asserted = {str(c.value) for n in ast.walk(test) for c in ast.walk(n)
                if isinstance(n, ast.Compare) and isinstance(c, ast.Constant) and isinstance(c.value, int)}
    assert code in asserted, f"{function} never compares an exit code with {code}"


@pytest.mark.parametrize(("command", "code"), sorted(SCENARIOS), ids=lambda v: v.replace(" ", "-"))
def test_the_cli_exits_as_the_table_says(command: str, code: str, world: World) -> None:
    got = SCENARIOS[(command, code)](world)
    if code == "N":   # the program's own code passes through (each scenario uses 3)
        assert got == 3, world.outputs[-1]
    else:
        assert got == int(code), world.outputs[-1]


def test_the_table_parser(tmp_path: Path) -> None:
    text = ("intro\n\n## Exit codes\n\n| command | exit codes |\n|---|---|\n"
            "| `exec` | **N** its code · **77** denied · **125** no sandbox |\n| `ps` | **0** the list |\n\n"
            "## Commands\n| `up` | **9** not in the section |\n")
    assert exit_code_table(text) == {"exec": {"N", "77", "125"}, "ps": {"0"}}

