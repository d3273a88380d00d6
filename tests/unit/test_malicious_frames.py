"""The host is the attacker: hostile frames against the real parser, dispatcher and server loop.

Each test drives the agent's real frame loop (sandbox.guest.server.serve_fd) and service over a socket
pair. Whatever a frame holds, it gets exactly one reply and the port keeps serving: frames are sent
in one write followed by a ping, and the replies must come back one per frame, in order, ending with
the ping's.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.guest import server as server_mod
from sandbox.guest.hostdata import HostData
from sandbox.guest.server import PortWatcher, respond, serve_fd
from sandbox.guest.service import AgentService
from sandbox.shared import protocol as P
from sandbox.shared.messages import PingResult
from sandbox.shared.policy.model import canonical_bytes

POLICY = canonical_bytes({"api_version": "0.12.0", "framework_version": "0.5.0", "containers": []})


class Host:
    """The host end of one agent port."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            assert chunk, "the agent closed the port"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def exchange(self, *frames: bytes) -> list[dict[str, Any]]:
        """Send frames (each without its newline) in one write, then a ping; return one reply per frame
        and check that the ping's comes last: every frame answered once, and the port still serves."""
        self.send(b"".join(f + b"\n" for f in frames) + b'{"v":1,"id":"last-ping","op":"ping"}\n')
        replies = [self.reply() for _ in frames]
        last = self.reply()
        assert last["id"] == "last-ping" and last["ok"], (replies, last)
        return replies

    def one(self, frame: bytes) -> dict[str, Any]:
        return self.exchange(frame)[0]


def agent(policy: bytes = POLICY) -> AgentService:
    return AgentService(host_data=lambda: HostData(hashlib.sha256(policy).digest(), "test"))


def _serve(service: AgentService) -> Iterator[Host]:
    host, guest = socket.socketpair()
    t = threading.Thread(target=serve_fd, args=(guest.fileno(), service.handle), kwargs={"reconnecting": False},
                         daemon=True)
    t.start()
    host.settimeout(20)
    yield Host(host)
    host.close()
    t.join(5)
    guest.close()
    assert not t.is_alive()


@pytest.fixture
def fresh() -> Iterator[Host]:
    """An agent before set_policy (deny-all)."""
    yield from _serve(agent())


@pytest.fixture
def enforcing() -> Iterator[Host]:
    """An agent with an (empty) policy set: requests reach the service's handlers."""
    service = agent()
    service.handle(P.REQUEST_TYPES[P.Op.set_policy].from_json({"policy": P.b64encode(POLICY)}))
    yield from _serve(service)


def frame(**fields: Any) -> bytes:
    return json.dumps({"v": 1, **fields}).encode()


# ---------------------------------------------------------------------------------------------------------
# Strings that cannot round-trip (issue 13, 1)


@pytest.mark.parametrize("raw", [
    rb'{"v":1,"id":"\ud800","op":"ping"}',                               # the id itself
    rb'{"v":1,"id":"\uDFFF","op":"ping"}',                               # a lone low surrogate, upper case
    rb'{"v":1,"id":"a\ud83d","op":"ping"}',                              # a high surrogate at the end
    rb'{"v":1,"id":1,"op":"\ud800"}',                                    # the op
    rb'{"v":1,"id":1,"op":"ping","\ud800":1}',                           # a top-level key
    rb'{"v":1,"id":1,"op":"ping","payload":{"\udc00x":1}}',              # a payload key
    rb'{"v":1,"id":1,"op":"mount_device","payload":{"device":"L0","target":"/\ud800"}}',   # a value
    rb'{"v":1,"id":1,"op":"ping","payload":{"deep":[[{"x":"\ude00\ud800"}]]}}',             # reversed pair
])
def test_strings_that_cannot_round_trip_are_malformed_with_a_null_id(fresh: Host, raw: bytes) -> None:
    r = fresh.one(raw)
    assert r["ok"] is False and r["id"] is None
    assert r["error"]["code"] == "malformed_frame" and "not valid Unicode" in r["error"]["message"]


def test_a_surrogate_pair_and_an_escaped_backslash_are_fine(fresh: Host) -> None:
    r = fresh.one(rb'{"v":1,"id":"\ud83d\ude00","op":"ping"}')
    assert r["ok"] and r["id"] == "\U0001F600"
    r = fresh.one(rb'{"v":1,"id":"\\ud800","op":"ping"}')        # the text backslash-u-d-8-0-0
    assert r["ok"] and r["id"] == "\\ud800"


# ---------------------------------------------------------------------------------------------------------
# Versions


@pytest.mark.parametrize("v", ["true", "1.0", '"1"', "[1]", "null", "2", "0", "-1", "{}"])
def test_only_the_integer_one_is_version_one(fresh: Host, v: str) -> None:
    r = fresh.one(b'{"v":' + v.encode() + b',"id":7,"op":"ping"}')
    assert r["id"] == 7 and r["error"]["code"] == "unsupported_version"
    assert fresh.one(b'{"id":8,"op":"ping"}')["error"]["code"] == "unsupported_version"


# ---------------------------------------------------------------------------------------------------------
# Numbers (issue 13, 9): overflow anywhere is malformed, never an internal error


HUGE = str(10**400).encode()


@pytest.mark.parametrize("raw", [
    b'{"v":1,"id":' + HUGE + b',"op":"ping"}',
    b'{"v":' + HUGE + b',"id":3,"op":"ping"}',
    b'{"v":1,"id":3,"op":"wait_process","payload":{"container_id":"w","timeout":' + HUGE + b'}}',
    b'{"v":1,"id":3,"op":"wait_process","payload":{"container_id":"w","timeout":1e400}}',
    b'{"v":1,"id":3,"op":"wait_process","payload":{"container_id":"w","timeout":-1e400}}',
    b'{"v":1,"id":3,"op":"wait_process","payload":{"container_id":"w","timeout":NaN}}',
    b'{"v":1,"id":3,"op":"wait_process","payload":{"container_id":"w","timeout":Infinity}}',
    b'{"v":1,"id":3,"op":"wait_process","payload":{"container_id":"w","timeout":-Infinity}}',
    b'{"v":1,"id":3,"op":"read_output","payload":{"container_id":"w","offset":9223372036854775808}}',
    b'{"v":1,"id":3,"op":"read_output","payload":{"container_id":"w","offset":-9223372036854775809}}',
    b'{"v":1,"id":3,"op":"signal_process","payload":{"container_id":"w","signal":' + HUGE + b'}}',
    b'{"v":1,"id":3,"op":"ping","payload":{"unknown":[1,2,' + HUGE + b']}}',
    b'{"v":1,"id":3,"op":"ping","extra":' + b"9" * 5000 + b"}",          # beyond int()'s digit limit
])
def test_numbers_that_overflow_are_malformed(fresh: Host, raw: bytes) -> None:
    r = fresh.one(raw)
    assert r["error"]["code"] == "malformed_frame", r
    assert r["id"] in (3, None)
    assert len(r["error"]["message"]) < 300


def test_a_huge_integer_id_is_not_guessed_from_its_first_digits(fresh: Host) -> None:
    r = fresh.one(b'{"v":1,"id":' + HUGE + b',"op":"ping"}')
    assert r["id"] is None


@pytest.mark.parametrize(("payload", "code"), [
    ({"container_id": "w", "timeout": 1e308}, "not_found"),               # finite and huge: clamped
    ({"container_id": "w", "timeout": -1e308}, "not_found"),
    ({"container_id": "w", "timeout": 5e-324}, "not_found"),
    ({"container_id": "w", "exec_id": "e1", "timeout": 2**63 - 1}, "not_found"),
])
def test_extreme_but_representable_numbers_reach_the_handler(enforcing: Host, payload: dict, code: str) -> None:
    r = enforcing.one(frame(id=4, op="wait_process", payload=payload))
    assert r["id"] == 4 and r["error"]["code"] == code


@pytest.mark.parametrize(("op", "payload", "needle"), [
    ("signal_process", {"container_id": "w", "signal": 2**62}, "payload.signal: must be between 1 and 64"),
    ("signal_process", {"container_id": "w", "signal": 0}, "payload.signal: must be between 1 and 64"),
    ("create_volume", {"name": "v", "kind": "tmpfs", "size_mib": 2**62}, "payload.size_mib: must be between"),
    ("read_output", {"container_id": "w", "offset": 1.5}, "payload.offset: expected an integer"),
    ("read_output", {"container_id": "w", "max_bytes": True}, "payload.max_bytes: expected an integer"),
    ("wait_process", {"container_id": "w", "timeout": "600"}, "payload.timeout: expected a number"),
])
def test_out_of_range_numbers_are_invalid_requests(enforcing: Host, op: str, payload: dict, needle: str) -> None:
    r = enforcing.one(frame(id=5, op=op, payload=payload))
    assert r["id"] == 5 and r["error"]["code"] == "invalid_request" and needle in r["error"]["message"]


def test_extreme_read_output_values_are_clamped_not_fatal(enforcing: Host) -> None:
    r = enforcing.one(frame(id=6, op="read_output", payload={"container_id": "w", "offset": 2**63 - 1,
                                                              "max_bytes": -(2**63), "wait": 1e308}))
    assert r["error"]["code"] == "not_found"


# ---------------------------------------------------------------------------------------------------------
# Nesting (issue 13, 9): a refusal, not a RecursionError


@pytest.mark.parametrize("depth", [1_000, 100_000, 400_000])
def test_deep_nesting_is_refused(fresh: Host, depth: int) -> None:
    r = fresh.one(b'{"v":1,"id":9,"op":"ping","payload":{"x":' + b"[" * depth + b"]" * depth + b"}}")
    assert r["id"] == 9 and r["error"]["code"] == "malformed_frame"
    assert "nested too deeply" in r["error"]["message"]
    depth = min(depth, 150_000)     # 5 bytes a level: stay under the frame limit
    r = fresh.one(b'{"v":1,"op":"ping","id":' + b"{\"a\":" * depth + b"1" + b"}" * depth + b"}")
    assert r["error"]["code"] == "malformed_frame" and r["id"] is None


def test_moderate_nesting_in_an_op_or_an_unknown_field_is_answered(fresh: Host) -> None:
    nested = b"[" * 200 + b"]" * 200
    assert fresh.one(b'{"v":1,"id":10,"op":' + nested + b"}")["error"]["code"] == "unknown_op"
    assert fresh.one(b'{"v":1,"id":11,"op":"ping","payload":{"x":' + nested + b"}}")["error"]["code"] == \
        "invalid_request"


# ---------------------------------------------------------------------------------------------------------
# Keys, sizes and shapes


def test_huge_and_many_unknown_keys_get_short_replies(fresh: Host) -> None:
    r = fresh.one(frame(id=12, op="ping", payload={"k" * 500_000: 1}))
    assert r["id"] == 12 and r["error"]["code"] == "invalid_request" and len(r["error"]["message"]) < 300
    many = {f"k{i}": i for i in range(50_000)}
    r = fresh.one(json.dumps({"v": 1, "id": 13, "op": "ping", **many}).encode())
    assert r["id"] == 13 and r["error"]["code"] == "malformed_frame" and "(and 49999 more)" in r["error"]["message"]
    r = fresh.one(frame(id=14, op="x" * 500_000))
    assert r["id"] == 14 and r["error"]["code"] == "unknown_op" and len(r["error"]["message"]) < 300


@pytest.mark.parametrize(("raw", "code"), [
    (b"{}", "malformed_frame"),
    (b"null", "malformed_frame"),
    (b'"ping"', "malformed_frame"),
    (b'{"v":1,"id":1,"op":"ping"} x', "malformed_frame"),
    (b'{"v":1,"id":1,"op":"ping","payload":null}', "invalid_request"),
    (b'{"v":1,"id":1,"op":"ping","payload":"{}"}', "invalid_request"),
    (b'{"v":1,"id":1.0,"op":"ping"}', "malformed_frame"),
    (b'{"v":1,"id":-9007199254740992,"op":"ping"}', "malformed_frame"),
    (b'{"v":1,"id":"","op":"ping"}', "malformed_frame"),
    (b'{"v":1,"id":{},"op":"ping"}', "malformed_frame"),
    (b'{"v":1,"id":1,"id":2,"op":"ping"}', "malformed_frame"),
    (b'\xef\xbb\xbf{"v":1,"id":1,"op":"ping"}', "malformed_frame"),              # a BOM
    (b'{"v":1,"id":1,"op":"\xc3"}', "malformed_frame"),                         # bad UTF-8
    (b'{"v":1,"id":1,"op":"create_container","payload":{"container_id":"w","argv":["/bin/sh\\u0000"],'
     b'"env":[]}}', "invalid_request"),                                          # NUL reaches no C program
    (b'{"v":1,"id":1,"op":"exec_process","payload":{"container_id":"w","argv":["x"],"env":["A=1\\u0000B"]}}',
     "invalid_request"),
])
def test_odd_shapes_get_one_typed_error(fresh: Host, raw: bytes, code: str) -> None:
    assert fresh.one(raw)["error"]["code"] == code


def test_a_burst_of_bad_and_good_frames_is_answered_in_order(fresh: Host) -> None:
    frames = [rb'{"v":1,"id":"\ud800","op":"ping"}', b"[]", frame(id=1, op="ping"),
              b"{", frame(id=2, op="nope"), frame(id=3, op="ping")] * 50
    replies = fresh.exchange(*frames)
    assert len(replies) == len(frames)
    assert [r.get("ok") for r in replies[:6]] == [False, False, True, False, False, True]
    assert [r["id"] for r in replies[:6]] == [None, None, 1, None, 2, 3]


# ---------------------------------------------------------------------------------------------------------
# Failures inside the agent: an internal error, and the port goes on


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for this one")


def _internal_twice(host: Host) -> tuple[dict, dict]:
    host.send(frame(id=20, op="ping") + b"\n" + frame(id=21, op="ping") + b"\n")
    return host.reply(), host.reply()


@pytest.mark.parametrize("failure", [ZeroDivisionError("oops"), RecursionError("deep"), SystemExit(3),
                                     MemoryError(), Unprintable()], ids=lambda e: type(e).__name__)
def test_failing_handlers_get_internal_errors(fresh: Host, monkeypatch: pytest.MonkeyPatch,
                                              failure: BaseException) -> None:
    def boom(self: AgentService) -> PingResult:
        raise failure
    monkeypatch.setattr(AgentService, "op_ping", boom)
    first, second = _internal_twice(fresh)
    assert (first["id"], second["id"]) == (20, 21)
    assert first["error"]["code"] == second["error"]["code"] == "internal"
    monkeypatch.undo()
    assert fresh.one(frame(id=22, op="ping"))["ok"]


@pytest.mark.parametrize("result", [{"x": {1, 2}}, {"x": float("nan")}, {"x": "y" * (P.MAX_FRAME_BYTES + 1)},
                                    {"x": "\ud800"}], ids=["set", "nan", "too-large", "surrogate"])
def test_a_result_that_cannot_be_encoded_is_an_internal_error_with_the_id(
        fresh: Host, monkeypatch: pytest.MonkeyPatch, result: dict) -> None:
    monkeypatch.setattr(AgentService, "op_ping", lambda self: result)
    first, _ = _internal_twice(fresh)
    assert first["id"] == 20 and first["error"]["code"] == "internal"
    assert "could not be encoded" in first["error"]["message"]


def test_an_error_too_large_to_send_keeps_its_code(fresh: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: AgentService) -> PingResult:
        raise P.ProtocolError(P.ErrorCode.failed, "x" * (2 * P.MAX_FRAME_BYTES), details={"bad": {1}})
    monkeypatch.setattr(AgentService, "op_ping", fail)
    first, _ = _internal_twice(fresh)
    assert first["id"] == 20 and first["error"]["code"] == "failed" and len(first["error"]["message"]) <= 4096


def test_respond_never_raises_even_when_the_frame_layer_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(line: bytes) -> P.Envelope:
        raise KeyError("bug")
    monkeypatch.setattr(P, "parse_request", broken)
    r = json.loads(respond(agent().handle, b'{"v":1,"id":1,"op":"ping"}'))
    assert r["error"]["code"] == "internal" and r["id"] is None


def test_the_frame_loop_survives_a_framing_bug(fresh: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    real = P.FrameReader.feed
    calls = {"n": 0}

    def flaky(self: P.FrameReader, data: bytes) -> list[bytes | P.Oversized]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise IndexError("bug")
        return real(self, data)
    monkeypatch.setattr(P.FrameReader, "feed", flaky)
    fresh.send(frame(id=30, op="ping") + b"\n")       # lost to the bug (the agent logs it)
    time.sleep(0.2)
    assert fresh.one(frame(id=31, op="ping"))["id"] == 31


def test_random_frames_each_get_one_reply(fresh: Host) -> None:
    """A small in-process fuzz: mutated valid frames, each answered exactly once, in order."""
    rng = random.Random(1313)
    seeds = [frame(id=i, op=op.value, payload=EXAMPLE_PAYLOADS.get(op.value, {})) for i, op in enumerate(P.Op)
             if op != P.Op.poweroff]
    alphabet = b'{}[]",:0123456789.eE+-\\u\x00 abcdefnrtlsNIaFTy'
    frames = []
    for _ in range(600):
        f = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(f))
            action = rng.random()
            if action < 0.4:
                f[pos] = rng.choice(alphabet)
            elif action < 0.7:
                del f[pos]
            else:
                f[pos:pos] = rng.choice([rb"\ud800", b"1e400", b"[[[[", b"NaN", b'"', b"\xff", b"99999999999999999999"])
        frames.append(bytes(f).replace(b"\n", b" "))
    replies = fresh.exchange(*frames)
    assert all(("ok" in r) for r in replies)
    assert not [r for r in replies if not r["ok"] and r["error"]["code"] == "internal"]


EXAMPLE_PAYLOADS = {
    "set_policy": {"policy": "e30="}, "get_report": {"nonce": "00" * 16},
    "mount_device": {"device": "L0", "target": "/run/parma/layers/l0"},
    "unmount_device": {"target": "/run/parma/layers/l0"}, "mount_scratch": {"container_id": "w"},
    "unmount_scratch": {"container_id": "w"},
    "mount_overlay": {"container_id": "w", "layer_paths": ["/run/parma/layers/l0"],
                      "target": "/run/parma/containers/w/rootfs"},
    "unmount_overlay": {"target": "/run/parma/containers/w/rootfs"},
    "create_volume": {"name": "v", "kind": "tmpfs", "size_mib": 1},
    "create_container": {"container_id": "w", "argv": ["/bin/sh"], "env": ["A=1"],
                         "mounts": [{"destination": "/d", "source": "/run/parma/volumes/v", "options": ["rbind"]}],
                         "capabilities": {"bounding": ["CAP_KILL"]}},
    "start_container": {"container_id": "w"}, "exec_process": {"container_id": "w", "argv": ["/bin/sh"]},
    "signal_process": {"container_id": "w", "signal": 15}, "wait_process": {"container_id": "w", "timeout": 0},
    "read_output": {"container_id": "w"}, "shutdown_container": {"container_id": "w", "timeout": 1},
}


# ---------------------------------------------------------------------------------------------------------
# The port watcher


def test_the_watcher_serves_a_port_again_after_its_thread_died() -> None:
    host, guest = socket.socketpair()
    host.settimeout(10)
    service = agent()
    logged: list[str] = []
    runs = {"n": 0}

    def serve(fd: int, handler: server_mod.RequestHandler) -> None:
        runs["n"] += 1
        if runs["n"] == 1:
            raise RuntimeError("the port thread died")
        serve_fd(fd, handler, reconnecting=False)

    watcher = PortWatcher(service.handle, log=logged.append, find=lambda: {"org.parma.agent.0": Path("/dev/vport0p1")},
                          open_port=lambda dev: guest.fileno(), serve=serve)
    watcher.scan()
    watcher.threads["org.parma.agent.0"].join(5)
    assert any("stopped: RuntimeError" in line for line in logged)
    watcher.scan()                                      # what the watch loop does every second
    assert watcher.restarts == {"org.parma.agent.0": 1}
    h = Host(host)
    assert h.one(frame(id=1, op="ping"))["ok"]
    host.close()
    watcher.threads["org.parma.agent.0"].join(5)
    guest.close()
