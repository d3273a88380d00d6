"""The real agent service behind the real frame loop, over a socket pair: deny-all, policy binding, bad input."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from sandbox.guest.hostdata import HostData, HostDataUnavailable
from sandbox.guest.server import serve_fd
from sandbox.guest.service import AgentService
from sandbox.shared import protocol as P
from sandbox.shared.messages import SetPolicyRequest

POLICY = b'{"version": "test"}'


class Peer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.next_id = 0

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "agent closed the channel"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, op: str, payload: dict | None = None) -> dict:
        self.next_id += 1
        self.send_raw(json.dumps({"v": 1, "id": self.next_id, "op": op, "payload": payload or {}}).encode() + b"\n")
        resp = self.recv()
        assert resp["id"] == self.next_id
        return resp


def make_agent(host_data: bytes | None) -> AgentService:
    def source() -> HostData:
        if host_data is None:
            raise HostDataUnavailable("no fw_cfg here")
        return HostData(host_data, "test")
    return AgentService(host_data=source)


@pytest.fixture
def peer() -> Iterator[Peer]:
    host, guest = socket.socketpair()
    agent = make_agent(hashlib.sha256(POLICY).digest())
    t = threading.Thread(target=serve_fd, args=(guest.fileno(), agent.answer), kwargs={"reconnecting": False},
                         daemon=True)
    t.start()
    host.settimeout(10)
    yield Peer(host)
    host.close()
    t.join(5)
    guest.close()


def test_ping_before_policy(peer: Peer) -> None:
    r = peer.call("ping")
    assert r["ok"] and r["result"]["policy_set"] is False and r["result"]["protocol"] == 1


@pytest.mark.parametrize(("op", "payload"), [
    ("mount_device", {"device": "L0", "target": "/run/parma/layers/l0"}),
    ("create_container", {"container_id": "web", "argv": ["/bin/sh"], "env": []}),
    ("exec_process", {"container_id": "web", "argv": ["/bin/sh"]}),
    ("create_volume", {"name": "v", "kind": "emptyDir"}),
    ("get_properties", {}),
    ("list_containers", {}),
    ("read_output", {"container_id": "web"}),
])
def test_deny_all_until_a_policy_is_set(peer: Peer, op: str, payload: dict) -> None:
    r = peer.call(op, payload)
    assert not r["ok"]
    assert r["error"]["code"] == "policy_denied"
    assert "no execution policy has been set" in r["error"]["message"]


def test_policy_with_another_hash_is_rejected_and_agent_stays_deny_all(peer: Peer) -> None:
    evil = POLICY + b" "
    r = peer.call("set_policy", {"policy": base64.b64encode(evil).decode()})
    assert r["error"]["code"] == "policy_mismatch"
    assert hashlib.sha256(evil).hexdigest() in r["error"]["message"]
    assert r["error"]["details"]["host_data"] == hashlib.sha256(POLICY).hexdigest()
    assert peer.call("ping")["result"]["policy_set"] is False
    assert peer.call("mount_device", {"device": "L0", "target": "/run/parma/layers/l0"})["error"]["code"] == \
        "policy_denied"


def test_without_host_data_no_policy_is_accepted() -> None:
    agent = make_agent(None)
    with pytest.raises(P.ProtocolError) as exc:
        agent.handle(SetPolicyRequest(POLICY))
    assert exc.value.code == P.ErrorCode.unavailable
    assert not agent.gate.active


def test_malformed_frames_get_error_replies_and_agent_keeps_serving(peer: Peer) -> None:
    peer.send_raw(b"this is not json\n")
    assert peer.recv()["error"]["code"] == "malformed_frame"
    peer.send_raw(b'{"v":1,"id":5,"op":"ping","payload":{\n')
    r = peer.recv()
    assert r["error"]["code"] == "malformed_frame" and r["id"] == 5
    peer.send_raw(b"\xff\xfe\n")
    assert peer.recv()["error"]["code"] == "malformed_frame"
    peer.send_raw(b'{"v":1,"id":6,"op":"no_such_op"}\n')
    assert peer.recv()["error"]["code"] == "unknown_op"
    assert peer.call("ping")["ok"]


def test_oversized_frame_gets_an_error_and_agent_keeps_serving(peer: Peer) -> None:
    big = b'{"v":1,"id":77,"op":"set_policy","payload":{"policy":"' + b"A" * (P.MAX_FRAME_BYTES + 10) + b'"}}\n'
    sender = threading.Thread(target=peer.send_raw, args=(big,))
    sender.start()
    r = peer.recv()
    sender.join()
    assert r["error"]["code"] == "frame_too_large" and r["id"] == 77
    assert peer.call("ping")["ok"]


def test_internal_errors_are_reported_not_fatal(peer: Peer, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: AgentService) -> dict:
        raise ZeroDivisionError("oops")
    monkeypatch.setattr(AgentService, "op_ping", boom)
    r = peer.call("ping")
    assert r["error"]["code"] == "internal" and "ZeroDivisionError" in r["error"]["message"]
    monkeypatch.undo()
    assert peer.call("ping")["ok"]


def test_network_interfaces_are_ethernet_only(tmp_path) -> None:
    """The agent configures the first Ethernet NIC, never loopback or a tunnel such as sit0."""
    from sandbox.guest.sysinit import network_interfaces

    for name, kind in (("lo", "772"), ("sit0", "776"), ("eth1", "1"), ("enp0s2", "1"), ("broken", "x")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "type").write_text(kind + "\n")
    assert network_interfaces(tmp_path) == ["enp0s2", "eth1"]
    assert network_interfaces(tmp_path / "absent") == []
