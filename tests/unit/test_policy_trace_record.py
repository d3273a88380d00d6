"""Recorded traces (docs/policy-trace.md): the agent reports what it asked its policy with each reply, the
host writes it as `policy check` lines, and a replay reaches the same decisions. Also: what a trace input
may leave out of an exec, hex device hashes, and the agent's own rules in `policy check`."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from clirun import run_cli

from sandbox.guest.gate import Gate
from sandbox.guest.hostdata import HostData
from sandbox.guest.server import respond, serve_fd
from sandbox.guest.service import AgentService
from sandbox.launch import lifecycle
from sandbox.launch.agent_client import AgentClient, AgentDenied, AgentError
from sandbox.launch.pipeline import _secure_env, agent_sockets
from sandbox.launch.trace_record import TraceRecorder
from sandbox.policy.trace import read_trace, replay
from sandbox.shared import messages as M
from sandbox.shared import protocol as P
from sandbox.shared.errors import InputError, StateError
from sandbox.shared.policy import PolicyEngine, canonical_bytes
from sandbox.shared.policy.inputs import ScratchMountInput, parse_input
from sandbox.shared.policy.points import EnforcementPoint
from sandbox.state import SandboxRecord, SandboxStatus, StateStore

L0 = "1a" * 32
PATH = "PATH=/usr/bin:/bin"


def policy_doc(**flags: object) -> dict:
    doc = {"api_version": "0.12.0", "framework_version": "0.5.0", "containers": [{
        "name": "web", "layers": [L0], "command": ["/bin/httpd", "-f"],
        "env_rules": [{"pattern": PATH, "strategy": "string", "required": True},
                      {"pattern": "TOKEN=(?s:.*)", "strategy": "re2", "required": True}],
        "working_dir": "/srv", "mounts": [], "exec_processes": [{"command": ["/bin/ls"], "signals": []}],
        "signals": [15], "user": {"user_idname": {"pattern": "", "strategy": "any"},
                                  "group_idnames": [{"pattern": "", "strategy": "any"}], "umask": "0022"},
        "capabilities": None, "seccomp_profile_sha256": "", "allow_elevated": False,
        "allow_stdio_access": True, "no_new_privileges": False}], "external_processes": []}
    doc.update(flags)
    return doc


SETUP = [
    ("mount_device", {"target": "/run/parma/layers/l0", "device_hash": L0}),
    ("scratch_mount", {"target": "/run/parma/containers/web/scratch", "encrypted": True}),
    ("mount_overlay", {"container_id": "web", "layer_paths": ["/run/parma/layers/l0"],
                       "target": "/run/parma/containers/web/rootfs"}),
    ("create_container", {"container_id": "web", "argv": ["/bin/httpd", "-f"], "env": [PATH, "TOKEN=s3cret"],
                          "working_dir": "/srv"}),
]


def engine_after_setup(**flags: object) -> PolicyEngine:
    engine = PolicyEngine.from_bytes(canonical_bytes(policy_doc(**flags)))
    for ep, raw in SETUP:
        assert engine.enforce_json(ep, raw).allowed, ep
    return engine


# -- what an exec leaves out ------------------------------------------------------------------------------


def test_an_exec_without_env_or_working_dir_runs_with_the_containers_own() -> None:
    engine = engine_after_setup()
    d = engine.enforce_json("exec_in_container", {"container_id": "web", "argv": ["/bin/ls"]})
    assert d.allowed, d.reason
    assert d.env_list == (PATH, "TOKEN=s3cret")
    assert engine.snapshot()["processes"]["web"]["working_dir"] == "/srv"


def test_an_explicit_empty_env_is_checked_as_empty() -> None:
    """As in ACI's framework: the env an exec names is all it gets, and required rules still apply."""
    engine = engine_after_setup()
    d = engine.enforce_json("exec_in_container", {"container_id": "web", "argv": ["/bin/ls"], "env": []})
    assert not d.allowed and "required env_rule" in d.reason
    d = engine.enforce_json("exec_in_container", {"container_id": "web", "argv": ["/bin/ls"], "working_dir": "/"})
    assert not d.allowed and "working_dir '/' does not match '/srv'" in d.reason


def test_the_container_env_an_exec_inherits_is_the_one_after_dropping() -> None:
    engine = engine_after_setup(allow_environment_variable_dropping=True)
    engine2 = PolicyEngine.from_bytes(canonical_bytes(policy_doc(allow_environment_variable_dropping=True)))
    for ep, raw in SETUP[:-1]:
        engine2.enforce_json(ep, raw)
    create = {**SETUP[-1][1], "env": [PATH, "TOKEN=x", "EXTRA=dropped"]}
    assert engine2.enforce_json("create_container", create).env_list == (PATH, "TOKEN=x")
    d = engine2.enforce_json("exec_in_container", {"container_id": "web", "argv": ["/bin/ls"]})
    assert d.allowed and d.env_list == (PATH, "TOKEN=x")
    assert engine.enforce_json("exec_in_container", {"container_id": "web", "argv": ["/bin/ls"]}).allowed


def test_the_wire_exec_leaves_env_out_to_inherit() -> None:
    r = M.ExecProcessRequest.from_json({"container_id": "web", "argv": ["/bin/ls"]})
    assert r.env is None and "env" not in r.to_json()
    assert M.ExecProcessRequest.from_json({"container_id": "web", "argv": ["/bin/ls"], "env": []}).env == ()


# -- device hashes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["1a2b...64 hex", "AB" * 32, "ab" * 31, "sha256:" + "ab" * 32])
def test_a_device_hash_must_be_64_lowercase_hex_digits(bad: str, tmp_path: Path, capsys) -> None:
    policy = tmp_path / "p.json"
    policy.write_bytes(canonical_bytes(policy_doc()))
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"ep": "mount_device", "input": {"target": "/run/parma/layers/l0",
                                                                 "device_hash": bad}}) + "\n")
    code, out, err = run_cli(["policy", "check", str(policy), str(trace)], capsys)
    assert code == 2 and out == ""
    assert "t.jsonl:1: mount_device: input.device_hash:" in err and "64 lowercase hex digits" in err


# -- the agent's own rules in `policy check` --------------------------------------------------------------


def write_trace(path: Path, requests: list[tuple[str, dict]]) -> Path:
    path.write_text("".join(json.dumps({"ep": ep, "input": raw}) + "\n" for ep, raw in requests))
    return path


@pytest.mark.parametrize(("request_", "refusal"), [
    (("mount_device", {"target": "/etc", "device_hash": L0}), "mount target '/etc' must be /run/parma/layers/"),
    (("mount_overlay", {"container_id": "web", "layer_paths": ["/run/parma/layers/l0"], "target": "/srv/root"}),
     "the rootfs of web must be mounted at /run/parma/containers/web/rootfs"),
    (("mount_overlay", {"container_id": "web", "layer_paths": ["/run/parma/layers/l9"],
                        "target": "/run/parma/containers/web/rootfs"}), "/run/parma/layers/l9 is not a mounted layer"),
])
def test_check_reports_what_the_agent_refuses_before_the_policy(request_, refusal, tmp_path: Path, capsys) -> None:
    """The engine would allow an overlay at any target; the agent refuses it, and so does the replay."""
    policy = tmp_path / "p.json"
    policy.write_bytes(canonical_bytes(policy_doc()))
    trace = write_trace(tmp_path / "t.jsonl", [*SETUP[:2], request_])
    code, out, err = run_cli(["policy", "check", "--format", "json", str(policy), str(trace)], capsys)
    last = json.loads(out.splitlines()[-1])
    assert code == 1 and last["refused_by_agent"] and not last["allowed"] and refusal in last["reason"]
    assert "1 refused by the agent" in err
    code, out, _ = run_cli(["policy", "check", "--engine-only", str(policy), str(trace)], capsys)
    assert "REFUSED" not in out


def test_check_refuses_an_overlay_before_its_scratch_and_a_create_before_its_overlay(tmp_path: Path, capsys) -> None:
    policy = tmp_path / "p.json"
    policy.write_bytes(canonical_bytes(policy_doc()))
    trace = write_trace(tmp_path / "t.jsonl", [SETUP[0], SETUP[2], SETUP[3]])
    code, out, _ = run_cli(["policy", "check", str(policy), str(trace)], capsys)
    lines = out.splitlines()
    assert code == 1 and "REFUSED" in lines[1] and "mount_scratch for web first" in lines[1]
    assert "REFUSED" in lines[2] and "mount_overlay for web first" in lines[2]


# -- the agent reports its checks, the host records them --------------------------------------------------


class Agent:
    """The real agent service behind the real frame loop, on a unix socket as the launcher sees it."""

    def __init__(self, tmp: Path, policy: bytes) -> None:
        self.policy = policy
        self.service = AgentService(host_data=lambda: HostData(hashlib.sha256(policy).digest(), "test"))
        self.socket = tmp / "agent-0.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.socket))
        self.listener.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                serve_fd(conn.fileno(), self.service.answer, reconnecting=False)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path, canonical_bytes(policy_doc(allow_properties_access=True, allow_unencrypted_scratch=False)))
    yield a
    a.listener.close()


def test_replies_carry_the_checks_and_the_recorder_writes_a_replayable_trace(agent: Agent, tmp_path: Path) -> None:
    recorder = TraceRecorder()
    with AgentClient.connect([agent.socket], recorder=recorder) as client:
        client.call(M.SetPolicyRequest(agent.policy))
        assert client.request(M.PingRequest()).policy == ()
        props = client.request(M.GetPropertiesRequest())
        assert props.ok and [c.to_json() for c in props.policy] == [
            {"ep": "get_properties", "input": {}, "allowed": True}]
        with pytest.raises(AgentDenied, match="requires encrypted scratch"):
            client.call(M.MountScratchRequest("web"))
        with pytest.raises(AgentDenied, match="allow_dump_stacks"):
            client.call(M.DumpStacksRequest())
        with pytest.raises(AgentError, match="must be mounted at /run/parma/containers/web/rootfs"):
            client.call(M.MountOverlayRequest("web", ("/run/parma/layers/l0",), "/srv/root"))
    lines = recorder.lines()
    assert lines[0].startswith(f"# set_policy: policy sha256 {hashlib.sha256(agent.policy).hexdigest()} installed")
    requests = [json.loads(x) for x in lines if not x.startswith("#")]
    assert requests == [
        {"ep": "get_properties", "input": {}},
        {"ep": "scratch_mount", "input": {"target": "/run/parma/containers/web/scratch", "encrypted": False}},
        {"ep": "dump_stacks", "input": {}},
    ]
    assert any(x.startswith("# ^ denied: scratch_mount denied for target") for x in lines)
    assert lines[-1].startswith("# mount_overlay web: refused by the agent before any policy check "
                                "(invalid_request): the rootfs of web must be mounted at")
    # The same decisions offline, from the file the launcher would write.
    recorder.write(tmp_path / "run.trace")
    engine = PolicyEngine.from_bytes(agent.policy)
    outcomes = list(replay(engine, read_trace(tmp_path / "run.trace")))
    assert [o.decision.allowed for o in outcomes] == [True, False, False]


def test_the_gate_reports_an_allowed_request_whose_action_failed() -> None:
    policy = canonical_bytes(policy_doc())
    gate = Gate(lambda: HostData(hashlib.sha256(policy).digest(), "test"))
    gate.install(policy)
    scratch = ScratchMountInput("/run/parma/containers/web/scratch", encrypted=True)

    def failing(_decision: object) -> None:
        raise P.ProtocolError(P.ErrorCode.failed, "no space")

    with gate.recording() as checks, pytest.raises(P.ProtocolError):
        gate.enforce(scratch, failing)
    assert [c.to_json() for c in checks] == [{"ep": "scratch_mount", "allowed": True, "action": "fail",
                                              "input": {"target": scratch.target, "encrypted": True}}]
    with gate.recording() as checks:
        gate.enforce(scratch, lambda _d: None)   # nothing was committed: the same mount is allowed again
    assert checks[0].allowed and not checks[0].action_failed
    other = ScratchMountInput("/run/parma/containers/db/scratch", encrypted=True)
    gate.enforce(other, lambda _d: None)         # not recording: nothing noted anywhere
    assert len(checks) == 1


def test_a_reply_too_large_with_its_echo_goes_out_without_the_inputs() -> None:
    big = {"env": ["X=" + "y" * (P.MAX_FRAME_BYTES // 2)] * 2}
    check = P.PolicyCheck("create_container", big, False)

    def handler(_request: object) -> P.CheckedResult:
        return P.CheckedResult({"ok": 1}, (check,))

    frame = respond(handler, b'{"v": 1, "id": 7, "op": "ping"}')
    response = P.parse_response(frame.rstrip(b"\n"))
    assert response.ok and response.result == {"ok": 1}
    assert response.policy == (P.PolicyCheck("create_container", None, False),)
    recorder = TraceRecorder()
    recorder.observe("create_container", {}, response)
    assert recorder.lines() == ("# create_container: its input was too large for the agent to send back; "
                                "not recorded",)


@pytest.mark.parametrize("policy", [{}, [{"ep": 1, "input": {}, "allowed": True}],
                                    [{"ep": "x", "input": [], "allowed": True}],
                                    [{"ep": "x", "input": {}, "allowed": True, "action": "maybe"}]])
def test_a_malformed_policy_field_is_a_malformed_frame(policy: object) -> None:
    frame = json.dumps({"v": 1, "id": 1, "ok": True, "result": {}, "policy": policy}).encode()
    with pytest.raises(P.ProtocolError) as e:
        P.parse_response(frame)
    assert e.value.code == P.ErrorCode.malformed_frame


# -- the recorder on its own ------------------------------------------------------------------------------


def reply(*checks: P.PolicyCheck, error: P.ProtocolError | None = None, result: dict | None = None) -> P.Response:
    if error is not None:
        error.policy = checks
        return P.Response.failure(error)
    return P.Response.success(1, result or {}, checks)


def test_the_recorder_hides_secure_values_in_inputs_and_reasons() -> None:
    secret = "TOKEN=" + "s3cret" * 40   # long: the engine quotes it cut short
    recorder = TraceRecorder(secure_env={secret})
    create = {"container_id": "web", "argv": ["/bin/httpd"], "env": [PATH, secret]}
    denial = P.ProtocolError(P.ErrorCode.policy_denied,
                             f"create_container denied for 'web': env {secret[:157]!r}... matches no env_rule")
    recorder.observe("create_container", {}, reply(P.PolicyCheck("create_container", create, False), error=denial))
    text = "\n".join(recorder.lines())
    assert "s3cret" not in text and "TOKEN=<secure>" in text
    line = json.loads(recorder.lines()[0])
    assert line["input"]["env"] == [PATH, "TOKEN=<secure>"]
    # A generated policy pins secure vars by name only: the redacted trace replays the same way.
    assert parse_input(EnforcementPoint.create_container, line["input"]).env == (PATH, "TOKEN=<secure>")


def test_the_recorder_comments_what_the_policy_never_saw() -> None:
    recorder = TraceRecorder()
    recorder.observe("read_output", {"container_id": "web"}, reply())
    recorder.observe("start_container", {"container_id": "web"}, reply(result={"pid": 7}))
    recorder.observe("create_volume", {"name": "cache"},
                     reply(error=P.ProtocolError(P.ErrorCode.conflict, "volume cache already exists")))
    recorder.observe("set_policy", {}, reply(error=P.ProtocolError(P.ErrorCode.policy_mismatch, "no match")))
    failed = P.ProtocolError(P.ErrorCode.failed, "crun create web: boom")
    recorder.observe("create_container", {}, reply(P.PolicyCheck("create_container", {"container_id": "web",
                                                                                      "argv": ["/x"]}, True, True),
                                                   error=failed))
    assert recorder.lines() == (
        "# start_container web: done (not a policy enforcement point)",
        "# create_volume cache: refused by the agent before any policy check (conflict): volume cache already exists",
        "# set_policy failed (policy_mismatch): no match",
        '{"ep": "create_container", "input": {"container_id": "web", "argv": ["/x"]}, "action": "fail"}',
        "# ^ allowed, but the guest action failed (failed): crun create web: boom",
    )


def test_secure_env_entries_come_from_the_group() -> None:
    from sandbox.group import validate_group
    spec = validate_group({"name": "g", "containers": [{"name": "a", "image": "busybox:1", "env": [
        {"name": "PLAIN", "value": "1"}, {"name": "TOKEN", "secureValue": "s3cret"}]}]}, base_dir=Path("."))
    assert _secure_env(spec) == {"TOKEN=s3cret"}


# -- inspect --trace ------------------------------------------------------------------------------------


def test_inspect_trace_prints_what_the_launch_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys) -> None:
    monkeypatch.setenv("PARMA_SANDBOX_RUNTIME", str(tmp_path / "run"))
    store = StateStore()
    lines = ["# set_policy: policy sha256 ab installed", '{"ep": "get_properties", "input": {}}']
    store.save(SandboxRecord(name="demo", status=SandboxStatus.running, trace=tuple(lines)))
    assert store.load("demo").trace == tuple(lines)   # it survives state.json
    code, out, _ = run_cli(["inspect", "--trace", "demo"], capsys)
    assert code == 0 and out == "".join(x + "\n" for x in lines)
    store.save(SandboxRecord(name="starting"))
    with pytest.raises(StateError, match="no recorded trace"):
        lifecycle.launch_trace("starting", store)
    with pytest.raises(InputError, match="no sandbox named 'nope'"):
        lifecycle.launch_trace("nope", store)
    assert agent_sockets(store.dir("demo"))   # the record lives beside the agent sockets
