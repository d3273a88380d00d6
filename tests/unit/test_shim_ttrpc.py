"""ttrpc framing and our protobuf definitions, against byte vectors derived by hand from the specs.

Provenance of the vectors: the frame header layout is ttrpc's PROTOCOL.md ("Message Frame": uint32 BE
length, uint32 BE stream id, uint8 type, uint8 flags); message bytes follow the protobuf encoding rules
(tag = field number << 3 | wire type; 0 varint, 2 length-delimited; proto3 omits default values) with
the field numbers of ttrpc request.proto, google/rpc/status.proto and containerd 1.6's shim.proto.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.shim import messages as M
from sandbox.shim import ttrpc as T

CONNECT_PAYLOAD = bytes.fromhex("0a026331")       # ConnectRequest{id: "c1"}: field 1, wire 2, len 2, "c1"
# ttrpc.Request{service: "containerd.task.v2.Task", method: "Connect", payload: CONNECT_PAYLOAD}
CONNECT_REQUEST = (b"\x0a\x17containerd.task.v2.Task" + b"\x12\x07Connect" + b"\x1a\x04" + CONNECT_PAYLOAD)


def test_header_layout_is_big_endian_length_stream_type_flags() -> None:
    assert T.HEADER_LEN == 10
    assert T.Header(5, 1, T.TYPE_REQUEST, 0).pack() == bytes.fromhex("00000005" "00000001" "01" "00")
    assert T.Header(4 << 20, 0xFFFFFFFD, T.TYPE_DATA, T.FLAG_REMOTE_CLOSED | T.FLAG_NO_DATA).pack() == \
        bytes.fromhex("00400000" "fffffffd" "03" "05")
    assert T.Header.unpack(bytes.fromhex("0000002800000003" "0200")) == T.Header(40, 3, T.TYPE_RESPONSE, 0)


def test_request_frame_bytes() -> None:
    req = M.TtrpcRequest(service="containerd.task.v2.Task", method="Connect",
                         payload=M.ConnectRequest(id="c1").SerializeToString())
    data = req.SerializeToString()
    assert data == CONNECT_REQUEST and len(data) == 0x28
    assert T.encode_frame(1, T.TYPE_REQUEST, data) == bytes.fromhex("00000028" "00000001" "0100") + CONNECT_REQUEST


def test_status_response_bytes() -> None:
    # Response{status: Status{code: 12, message: "x"}}: 0a 05 | 08 0c | 12 01 78
    assert T.status_response(T.Code.UNIMPLEMENTED, "x") == bytes.fromhex("0a05" "080c" "120178")
    ok = M.TtrpcResponse(status=M.Status(code=0), payload=b"\x08\x01").SerializeToString()
    assert ok == bytes.fromhex("0a00" "12020801")   # an OK status is an empty message, still present


def test_task_api_field_numbers() -> None:
    create = M.CreateTaskRequest(id="t", bundle="/b", stdout="/o",
                                 rootfs=[M.Mount(type="overlay", options=["ro"])])
    # id=1 "t" | bundle=2 "/b" | rootfs=3 Mount{type=1 "overlay", options=4 "ro"} | stdout=6 "/o"
    assert create.SerializeToString() == bytes.fromhex("0a0174" "12022f62" "1a0d" "0a076f7665726c6179" "2202726f"
                                                       "32022f6f")
    # WaitResponse{exit_status=1: 137 (varint 89 01), exited_at=2: Timestamp{seconds=1: 1}}
    wait = M.WaitResponse(exit_status=137, exited_at=M.Timestamp(seconds=1))
    assert wait.SerializeToString() == bytes.fromhex("088901" "12020801")
    # StateResponse.status=4 is the enum containerd.v1.types.Status; RUNNING = 2
    assert M.StateResponse(status=M.TASK_STATUS["RUNNING"]).SerializeToString() == bytes.fromhex("2002")
    # KillRequest{id=1 "t", signal=3: 9, all=4: true}
    assert M.parse(M.KillRequest, bytes.fromhex("0a0174" "1809" "2001")).signal == 9
    # DeleteResponse{pid=1: 7, exit_status=2: 137}
    assert M.DeleteResponse(pid=7, exit_status=137).SerializeToString() == bytes.fromhex("0807" "108901")


def test_unknown_fields_are_ignored_and_garbage_is_an_error() -> None:
    # StartRequest{id: "t", field 99 (varint) = 1} still parses
    assert M.parse(M.StartRequest, bytes.fromhex("0a0174" "980601")).id == "t"
    with pytest.raises(ValueError, match="malformed"):
        M.parse(M.StartRequest, b"\x0a\x05ab")


def test_events_are_packed_as_containerd_names_them() -> None:
    from sandbox.shim.events import envelope
    exit_event = M.event("TaskExit", container_id="c", id="c", exit_status=3)
    fwd = envelope("k8s.io", exit_event, at=10.5)
    assert fwd.envelope.topic == "/tasks/exit"
    assert fwd.envelope.namespace == "k8s.io"
    assert fwd.envelope.timestamp.seconds == 10 and fwd.envelope.timestamp.nanos == 500_000_000
    assert fwd.envelope.event.type_url == "containerd.events.TaskExit"
    assert M.parse(M.message_class("containerd.events.TaskExit"), fwd.envelope.event.value).exit_status == 3


def test_oci_process_spec_of_an_exec() -> None:
    spec = M.AnyMessage(type_url=M.OCI_PROCESS_TYPE_URL, value=b'{"args":["/bin/cat","/x"],"cwd":"/"}')
    assert M.unpack_oci_process(spec)["args"] == ["/bin/cat", "/x"]
    with pytest.raises(ValueError, match="expected an OCI"):
        M.unpack_oci_process(M.AnyMessage(type_url="containerd.events.TaskExit", value=b""))
    with pytest.raises(ValueError, match="not valid JSON"):
        M.unpack_oci_process(M.AnyMessage(type_url=M.OCI_PROCESS_TYPE_URL, value=b"{"))


def test_runtime_options_carry_the_config_path() -> None:
    # runtimeoptions.v1.Options{type_url=1, config_path=2: "/etc/x.toml"}
    opts = M.parse(M.RuntimeOptions, b"\x12\x0b/etc/x.toml")
    assert opts.config_path == "/etc/x.toml"


# -- a real server on a unix socket -------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    def echo(payload: bytes) -> bytes:
        return payload

    def missing(payload: bytes) -> bytes:
        raise T.RpcError(T.Code.NOT_FOUND, "no such task")

    srv = T.Server({("test.Svc", "Echo"): echo, ("test.Svc", "Missing"): missing})
    path = str(tmp_path / "s.sock")
    listener = T.listen(path)
    thread = threading.Thread(target=srv.serve, args=(listener,), daemon=True)
    thread.start()
    yield path
    srv.close()
    thread.join(5)
    listener.close()


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def _request(service: str, method: str, payload: bytes = b"") -> bytes:
    return M.TtrpcRequest(service=service, method=method, payload=payload).SerializeToString()


def _status(sock: socket.socket) -> tuple[int, int, str, bytes]:
    header, data = T.read_frame(sock)
    assert header.type == T.TYPE_RESPONSE and data is not None
    resp = M.parse(M.TtrpcResponse, data)
    return header.stream_id, resp.status.code, resp.status.message, resp.payload


def test_server_answers_each_stream_and_reports_errors_by_code(server: str) -> None:
    with _raw(server) as s:
        s.sendall(T.encode_frame(1, T.TYPE_REQUEST, _request("test.Svc", "Echo", b"\x08\x2a")))
        assert _status(s) == (1, 0, "", b"\x08\x2a")
        s.sendall(T.encode_frame(3, T.TYPE_REQUEST, _request("test.Svc", "Missing")))
        assert _status(s)[:3] == (3, T.Code.NOT_FOUND, "no such task")
        s.sendall(T.encode_frame(5, T.TYPE_REQUEST, _request("test.Svc", "Nope")))
        assert _status(s)[:3] == (5, T.Code.UNIMPLEMENTED, "method Nope")
        s.sendall(T.encode_frame(7, T.TYPE_REQUEST, _request("other.Svc", "Echo")))
        assert _status(s)[:3] == (7, T.Code.UNIMPLEMENTED, "service other.Svc")
        s.sendall(T.encode_frame(8, T.TYPE_REQUEST, _request("test.Svc", "Echo")))
        sid, code, msg, _ = _status(s)
        assert (sid, code) == (8, T.Code.INVALID_ARGUMENT) and "odd" in msg
        s.sendall(T.encode_frame(3, T.TYPE_REQUEST, _request("test.Svc", "Echo")))
        sid, code, msg, _ = _status(s)
        assert (sid, code) == (3, T.Code.INVALID_ARGUMENT) and "re-used" in msg
        s.sendall(T.encode_frame(9, T.TYPE_REQUEST, b"\x0a\x05ab"))       # truncated protobuf
        assert _status(s)[:2] == (9, T.Code.INVALID_ARGUMENT)
        s.sendall(T.encode_frame(11, T.TYPE_REQUEST, _request("test.Svc", "Echo"), T.FLAG_REMOTE_OPEN))
        assert _status(s)[:2] == (11, T.Code.UNIMPLEMENTED)


def test_oversized_message_is_refused_and_the_stream_stays_in_step(server: str) -> None:
    with _raw(server) as s:
        size = T.MAX_DATA + 1
        s.sendall(struct.pack(">IIBB", size, 1, T.TYPE_REQUEST, 0) + bytes(size))
        sid, code, msg, _ = _status(s)
        assert (sid, code) == (1, T.Code.RESOURCE_EXHAUSTED) and "exceeds maximum message size" in msg
        s.sendall(T.encode_frame(3, T.TYPE_REQUEST, _request("test.Svc", "Echo", b"ok")))
        assert _status(s) == (3, 0, "", b"ok")


def test_client_round_trip_and_error(server: str) -> None:
    client = T.Client(server, timeout=5)
    try:
        assert client.call("test.Svc", "Echo", b"\x08\x01") == b"\x08\x01"
        assert client.call("test.Svc", "Echo", b"") == b""
        with pytest.raises(T.RpcError) as e:
            client.call("test.Svc", "Missing", b"")
        assert e.value.code == T.Code.NOT_FOUND and e.value.message == "no such task"
    finally:
        client.close()


def test_a_close_inside_a_frame_is_a_framing_error(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(T.Header(10, 1, T.TYPE_REQUEST, 0).pack() + b"abc")
        a.close()
        with pytest.raises(T.FramingError):
            T.read_frame(b)


def test_unix_addresses() -> None:
    assert T.unix_path("unix:///run/containerd/s/ab") == "/run/containerd/s/ab"
    assert T.unix_path("/tmp/x.sock") == "/tmp/x.sock"
    assert T.unix_path("abstract-name") == "\0abstract-name"
