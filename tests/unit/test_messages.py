"""The typed payloads of the protocol (sandbox/shared/messages.py) and the codec that checks them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sandbox.shared.codec import FieldError, Message, decode
from sandbox.shared.messages import (
    REQUEST_TYPES,
    Capabilities,
    CloseStdinRequest,
    ContainerInfo,
    ContainerMount,
    CreateContainerRequest,
    CreateContainerResult,
    CreateVolumeRequest,
    CreateVolumeResult,
    DnsSettings,
    DumpStacksRequest,
    DumpStacksResult,
    EmptyResult,
    ExecProcessRequest,
    ExecProcessResult,
    GetPropertiesRequest,
    GetReportRequest,
    ListContainersRequest,
    ListContainersResult,
    LoadFragmentRequest,
    LoadFragmentResult,
    MemoryVolumeKind,
    MountDeviceRequest,
    MountDeviceResult,
    MountOverlayRequest,
    MountOverlayResult,
    MountScratchRequest,
    MountScratchResult,
    Op,
    OutputChunk,
    OutputStream,
    PingRequest,
    PingResult,
    PoweroffRequest,
    ProcessExit,
    ReadOutputRequest,
    ReadOutputResult,
    ResizeTerminalRequest,
    SetGroupNetworkRequest,
    SetPolicyRequest,
    SetPolicyResult,
    SetupScratchRequest,
    SetupScratchResult,
    ShutdownContainerRequest,
    ShutdownResult,
    SignalProcessRequest,
    StartContainerRequest,
    StartContainerResult,
    UnmountDeviceRequest,
    UnmountOverlayRequest,
    UnmountScratchRequest,
    WaitProcessRequest,
    WatchContainersRequest,
    WatchContainersResult,
    WriteStdinRequest,
    WriteStdinResult,
)
from sandbox.shared.policy.inputs import (
    INHERIT,
    INPUT_TYPES,
    ExecInContainerInput,
    NamedId,
    PolicyInputError,
    SignalContainerProcessInput,
    parse_input,
    point_of,
)
from sandbox.shared.policy.points import EnforcementPoint

CAPS = Capabilities(bounding=("CAP_CHOWN", "CAP_KILL"), effective=("CAP_KILL",))

# One request of every op, with every field away from its default where it has one.
EXAMPLES: dict[Op, Message] = {
    Op.ping: PingRequest(),
    Op.set_policy: SetPolicyRequest(b'{"a": 1}\n\x00\xff'),
    Op.load_fragment: LoadFragmentRequest(b"\xd2\x84\x58"),
    Op.get_properties: GetPropertiesRequest(),
    Op.dump_stacks: DumpStacksRequest(),
    Op.get_report: GetReportRequest(bytes(range(32))),
    Op.mount_device: MountDeviceRequest("L0", "/run/parma/layers/l0"),
    Op.unmount_device: UnmountDeviceRequest("/run/parma/layers/l0"),
    Op.setup_scratch: SetupScratchRequest("parma-scratch"),
    Op.mount_scratch: MountScratchRequest("web", encrypted=True),
    Op.unmount_scratch: UnmountScratchRequest("web"),
    Op.mount_overlay: MountOverlayRequest("web", ("/run/parma/layers/l1", "/run/parma/layers/l0"),
                                          "/run/parma/containers/web/rootfs"),
    Op.unmount_overlay: UnmountOverlayRequest("/run/parma/containers/web/rootfs"),
    Op.create_volume: CreateVolumeRequest("cfg", MemoryVolumeKind.secret, size_mib=4, items={"token": b"s3cr3t"}),
    Op.create_container: CreateContainerRequest(
        "web", ("/bin/httpd", "-f"), ("PATH=/bin", "A=1"), working_dir="/srv", user="33:33",
        mounts=(ContainerMount("/www", "/run/parma/volumes/www", "bind", ("rbind", "rprivate", "ro")),),
        capabilities=CAPS, privileged=True, no_new_privileges=True, umask="027",
        seccomp_profile=b'{"defaultAction":"SCMP_ACT_ALLOW"}'),
    Op.set_group_network: SetGroupNetworkRequest("hello", ("web", "db"), DnsSettings(
        ("10.0.2.53",), ("corp.example",), ("use-vc", "ndots:2"))),
    Op.start_container: StartContainerRequest("web"),
    Op.exec_process: ExecProcessRequest("web", ("/bin/sh",), ("TERM=xterm",), "/tmp", tty=True, stdin=True,
                                        rows=40, cols=120),
    Op.write_stdin: WriteStdinRequest("web", "e1", b"ls\r\x03\x04"),
    Op.close_stdin: CloseStdinRequest("web", "e1"),
    Op.resize_terminal: ResizeTerminalRequest("web", "e1", 50, 132),
    Op.signal_process: SignalProcessRequest("web", 15, exec_id="e1"),
    Op.wait_process: WaitProcessRequest("web", "e1", 2.5),
    Op.read_output: ReadOutputRequest("web", "e1", 10, 4096, 0.5),
    Op.shutdown_container: ShutdownContainerRequest("web", 3),
    Op.list_containers: ListContainersRequest(),
    Op.watch_containers: WatchContainersRequest(7, 30),
    Op.poweroff: PoweroffRequest(),
}

RESULTS: list[Message] = [
    PingResult(1, "1", True, "ab" * 32, 1.5), PingResult(1, "1", False, None, 0.25),
    SetPolicyResult("ab" * 32, "emulated report"), DumpStacksResult("--- thread main\n"),
    LoadFragmentResult("did:x509:0:sha256:AA::eku:1", "example.com/side", "side", 2),
    MountDeviceResult("cd" * 32, 100, "/dev/dm-0", 0.001), MountScratchResult("/run/parma/containers/w/scratch"),
    MountOverlayResult(0.002), CreateVolumeResult("/run/parma/volumes/v"),
    CreateContainerResult(42, True, 0.1, 0.05, 1.5), CreateContainerResult(None, False, 0.1, 0.05, 1.5),
    StartContainerResult(42, 0.3), ExecProcessResult("e1", 43, True), ProcessExit(False, 137, 9),
    ProcessExit(True, None, None), ShutdownResult(0, None),
    ReadOutputResult((OutputChunk(OutputStream.stdout, b"hi\n"), OutputChunk(OutputStream.stderr, b"\xff")), 4, 0,
                     True),
    ListContainersResult((ContainerInfo("web", "running", 42, None, True),)), EmptyResult(),
    SetupScratchResult("/run/parma/scratch", 8 << 30, 1.25), WriteStdinResult(3),
    WatchContainersResult(8, (ContainerInfo("web", "exited", 42, 1, True),)),
]


def test_every_op_has_an_example() -> None:
    assert set(EXAMPLES) == set(Op)
    assert all(type(EXAMPLES[op]) is REQUEST_TYPES[op] for op in Op)


@pytest.mark.parametrize("message", [*EXAMPLES.values(), *RESULTS], ids=lambda m: type(m).__name__)
def test_messages_round_trip_through_json_text(message: Message) -> None:
    text = json.dumps(message.to_json())
    assert type(message).from_json(json.loads(text)) == message


def test_wire_form_of_requests() -> None:
    """The payloads as docs/protocol.md spells them (bytes as base64 or hex, tuples as arrays)."""
    assert EXAMPLES[Op.set_policy].to_json() == {"policy": "eyJhIjogMX0KAP8="}
    assert EXAMPLES[Op.get_report].to_json() == {"nonce": bytes(range(32)).hex(), "runtime_key": True}
    assert EXAMPLES[Op.create_volume].to_json() == {"name": "cfg", "kind": "secret", "size_mib": 4,
                                                   "items": {"token": "czNjcjN0"}}
    # Fields whose default is None are left out when None: the payload the launcher always sent.
    assert CreateVolumeRequest("scratch", MemoryVolumeKind.empty_dir).to_json() == {"name": "scratch",
                                                                                    "kind": "emptyDir"}
    assert WaitProcessRequest("web").to_json() == {"container_id": "web", "timeout": 0}
    create = EXAMPLES[Op.create_container].to_json()
    assert create["mounts"] == [{"destination": "/www", "source": "/run/parma/volumes/www", "type": "bind",
                                 "options": ["rbind", "rprivate", "ro"]}]
    assert create["capabilities"]["bounding"] == ["CAP_CHOWN", "CAP_KILL"]
    assert create["capabilities"]["ambient"] == []


def test_null_means_the_default_unless_the_type_allows_null() -> None:
    r = CreateContainerRequest.from_json({"container_id": "w", "argv": ["x"], "env": [], "working_dir": None,
                                          "capabilities": None, "mounts": None})
    assert r.working_dir == "/" and r.capabilities is None and r.mounts == ()
    assert ReadOutputRequest.from_json({"container_id": "w", "exec_id": None}).exec_id is None
    with pytest.raises(FieldError, match="env: expected an array of strings, got null"):
        CreateContainerRequest.from_json({"container_id": "w", "argv": ["x"], "env": None})


@pytest.mark.parametrize(("cls", "raw", "message"), [
    (PingRequest, [], "expected an object, got an array"),
    (PingRequest, {"x": 1}, "x: unknown field"),
    (MountDeviceRequest, {"device": "L0"}, "target: required field is missing"),
    (MountDeviceRequest, {"device": "L0", "target": "relative"}, "target: 'relative' is not an absolute path"),
    (MountDeviceRequest, {"device": "../x", "target": "/a"}, "device: '../x' is not a virtio-blk serial"),
    (MountDeviceRequest, {"devic": "L0", "target": "/a"}, "devic: unknown field (did you mean 'device'?)"),
    (SignalProcessRequest, {"container_id": "w", "signal": True}, "signal: expected an integer, got a boolean"),
    (SignalProcessRequest, {"container_id": "w", "signal": 65}, "signal: must be between 1 and 64, got 65"),
    (SignalProcessRequest, {"container_id": "w", "signal": 15.0}, "signal: expected an integer, got a number"),
    (WaitProcessRequest, {"container_id": "w", "timeout": "1"}, "timeout: expected a number, got a string"),
    (WaitProcessRequest, {"container_id": "w", "timeout": False}, "timeout: expected a number, got a boolean"),
    (CreateContainerRequest, {"container_id": "w", "argv": ["x", 3], "env": []}, "argv[1]: expected a string"),
    (CreateContainerRequest, {"container_id": "w", "argv": "x", "env": []}, "argv: expected an array of strings"),
    (CreateContainerRequest, {"container_id": "w", "argv": [], "env": []}, "argv: must not be empty"),
    (CreateContainerRequest, {"container_id": "w", "argv": ["x"], "env": ["A=1\x00B=2"]},
     "env[0]: must not contain NUL characters"),
    (CreateContainerRequest, {"container_id": "w", "argv": ["x"], "env": [], "mounts": [{"destination": "/d"}]},
     "mounts[0].source: required field is missing"),
    (CreateContainerRequest, {"container_id": "w", "argv": ["x"], "env": [], "mounts": [{}] * 257},
     "mounts: more than 256 items"),
    (CreateContainerRequest, {"container_id": "w", "argv": ["x"], "env": [],
                              "capabilities": {"bounding": ["CAP_KILL", "kill"]}},
     "capabilities.bounding[1]: 'kill' is not a capability name"),
    (CreateContainerRequest, {"container_id": "w", "argv": ["x"], "env": [], "capabilities": {"all": []}},
     "capabilities.all: unknown field"),
    (CreateContainerRequest, {"container_id": "w", "argv": ["x"], "env": [], "umask": "22"}, "umask: '22' is not"),
    (CreateVolumeRequest, {"name": "v", "kind": "files"}, "kind: expected one of 'emptyDir', 'tmpfs', 'secret'"),
    (CreateVolumeRequest, {"name": "v", "kind": "tmpfs", "size_mib": 0}, "size_mib: must be between 1 and"),
    (CreateVolumeRequest, {"name": "v", "kind": "secret", "items": {"a": "!"}}, "items.a: not valid base64"),
    (CreateVolumeRequest, {"name": "v", "kind": "secret", "items": []}, "items: expected an object"),
    (SetPolicyRequest, {"policy": "e30"}, "policy: not valid base64"),
    (GetReportRequest, {"nonce": "abc"}, "nonce: not a hex string"),
    (GetReportRequest, {"nonce": " ab"}, "nonce: not a hex string"),
    (GetReportRequest, {"nonce": "00" * 1025}, "nonce: more than 1024 bytes"),
    (OutputChunk, {"stream": "stdin", "data": ""}, "stream: expected one of 'stdout', 'stderr'"),
    (WriteStdinRequest, {"container_id": "w", "exec_id": "e1", "data": "A" * 87384}, "data: more than 65536 bytes"),
    (ResizeTerminalRequest, {"container_id": "w", "exec_id": "e1", "rows": 65536, "cols": 80},
     "rows: must be between 0 and 65535"),
    (ExecProcessRequest, {"container_id": "w", "argv": ["sh"], "tty": "yes"}, "tty: expected true or false, got a string"),
    (SetGroupNetworkRequest, {"hostname": "h", "dns": {"nameservers": ["1.1.1.1"] * 4}},
     "dns.nameservers: more than 3 items"),
])
def test_malformed_payloads_name_the_field(cls: type[Message], raw: Any, message: str) -> None:
    with pytest.raises(FieldError) as exc:
        cls.from_json(raw)
    assert message in str(exc.value)


def test_an_unknown_key_is_quoted_short() -> None:
    with pytest.raises(FieldError) as exc:
        PingRequest.from_json({"k" * 100_000: 1})
    assert len(str(exc.value)) < 200 and exc.value.hint == "known fields: none"


def test_results_from_a_newer_agent_may_carry_more_fields() -> None:
    raw = {**PingResult(1, "2", True, None, 1.0).to_json(), "features": ["x"]}
    assert decode(PingResult, raw, ignore_unknown=True) == PingResult(1, "2", True, None, 1.0)
    with pytest.raises(FieldError, match="unknown field"):
        PingResult.from_json(raw)


# ---------------------------------------------------------------------------------------------------------
# The engine's inputs: the same codec, with trace-friendly spellings


def test_every_enforcement_point_has_an_input_type() -> None:
    assert set(INPUT_TYPES) == set(EnforcementPoint)
    for ep, cls in INPUT_TYPES.items():
        assert point_of(parse_input(ep, {} if ep not in REQUIRED_EXAMPLE else REQUIRED_EXAMPLE[ep])) == ep
        assert cls.from_json is not None


REQUIRED_EXAMPLE = {
    EnforcementPoint.load_fragment: {"issuer": "did:x509:0:sha256:AA::eku:1", "feed": "f", "rego": "package f"},
    EnforcementPoint.mount_device: {"target": "/t", "device_hash": "ab" * 32},
    EnforcementPoint.unmount_device: {"target": "/t"},
    EnforcementPoint.mount_overlay: {"container_id": "c", "layer_paths": ["/l"], "target": "/t"},
    EnforcementPoint.unmount_overlay: {"target": "/t"},
    EnforcementPoint.scratch_mount: {"target": "/t"},
    EnforcementPoint.scratch_unmount: {"target": "/t"},
    EnforcementPoint.create_volume: {"target": "/t", "kind": "emptyDir"},
    EnforcementPoint.create_container: {"container_id": "c", "argv": ["x"]},
    EnforcementPoint.exec_in_container: {"container_id": "c", "argv": ["x"]},
    EnforcementPoint.exec_external: {"argv": ["x"]},
    EnforcementPoint.shutdown_container: {"container_id": "c"},
    EnforcementPoint.signal_container_process: {"container_id": "c", "signal": 9},
}


def test_trace_inputs_accept_aci_spellings_of_values() -> None:
    sig = parse_input(EnforcementPoint.signal_container_process, {"container_id": "c", "signal": "term"})
    assert sig == SignalContainerProcessInput("c", 15)
    ex = parse_input(EnforcementPoint.exec_in_container, {"container_id": "c", "argv": ["x"],
                                                          "user": {"id": 33, "name": "www"}})
    assert ex.user == NamedId("33", "www") and ex.groups is INHERIT and ex.capabilities is INHERIT
    # Explicit null capabilities mean the runtime defaults; absent means the container's own.
    assert parse_input(EnforcementPoint.exec_in_container, {"container_id": "c", "argv": ["x"],
                                                            "capabilities": None}).capabilities is None
    # Like the identity, the env and working dir an exec leaves out are the container's own.
    assert ex.env is INHERIT and ex.working_dir is INHERIT
    assert ex.to_json() == {"container_id": "c", "argv": ["x"], "user": {"id": "33", "name": "www"}}
    assert isinstance(ex, ExecInContainerInput)


def test_trace_input_errors_carry_aci_hints() -> None:
    with pytest.raises(PolicyInputError) as exc:
        parse_input(EnforcementPoint.create_container, {"container_id": "c", "argList": []})
    assert "create_container: input.argList: unknown field (did you mean 'argv'?)" in exc.value.message
    with pytest.raises(PolicyInputError) as exc:
        parse_input(EnforcementPoint.mount_device, {"target": "/t"})
    assert exc.value.hint == "required: target, device_hash; optional: -"
