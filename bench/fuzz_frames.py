"""Frame fuzzer: random and mutated frames against the agent's real frame loop, parser and dispatcher.

The target is the offline agent (tests/offline_agent.py): the real serve_fd loop, frame parser, typed
requests, AgentService with its real gate and policy engine, process handles and mounts, running in
private pid and mount namespaces. Stand-ins there: layer devices (a directory bind-mounted read-only,
with a declared root hash) and crun (tests/offline_crun.py); HOST_DATA is the policy's hash; the
poweroff hook only logs. Before fuzzing, the world is set up as `up` would: policy, layer device,
scratch, overlay, a created and started container "app" (real processes).

Frames come from valid seeds for every op, then: byte mutations (interesting tokens: lone surrogates,
1e400, 99999999999999999999, NaN, NUL, bad UTF-8, quotes, brackets), leaf replacements in the JSON
tree (huge and negative numbers, booleans, nulls, long strings, lone surrogates, deep nesting),
duplicate and unknown keys, missing fields, odd versions and ids, interleaved ids (the same id on
consecutive frames, ids of every JSON type), deeply nested frames (up to 200,000 levels), random
garbage, and rarely an oversized frame (over 1 MiB). Waits that the host may legitimately ask for
(wait_process timeout, read_output wait, shutdown_container timeout) are capped at 0.5 s in still-valid
frames so that a slow reply means a hang, not an honest wait.

Checks: every frame gets exactly one reply, in order (a ping with a fresh id after every batch must
come back in its place), each reply is a well-formed response, no reply is an `internal` error (a
crash of the agent's own code), no gap between replies exceeds 1 s (a hang), the port never closes
and the agent process lives to the end with no traceback in its log.

Usage: python bench/fuzz_frames.py [--frames N] [--seed S] [--batch B]   (prints one JSON document)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.shared import protocol as P
from sandbox.shared.policy.model import canonical_bytes
from tests.offline_agent import OfflineAgent, available, busybox_layer

LAYER = "3" * 64
INIT = ["/bin/sleep", "100000"]
ALLOWED_EXEC = ["/bin/true"]
HANG_S = 1.0
MAX_WAIT_S = 0.5
ERROR_CODES = frozenset(code.value for code in P.ErrorCode)

POLICY = canonical_bytes({
    "api_version": "0.12.0", "framework_version": "0.5.0", "allow_unencrypted_scratch": True,
    "allow_properties_access": True, "allow_dump_stacks": True,
    "volumes": [{"name": "cache", "target": "/run/parma/volumes/cache", "kind": "emptyDir"},
                {"name": "cfg", "target": "/run/parma/volumes/cfg", "kind": "secret"}],
    "containers": [{
        "name": "app", "layers": [LAYER], "command": INIT,
        "env_rules": [{"pattern": "PATH=.*", "strategy": "re2", "required": False}],
        "working_dir": "/", "mounts": [],
        "exec_processes": [{"command": ALLOWED_EXEC, "signals": [9]}, {"command": INIT, "signals": [9, 15]}],
        "signals": [15], "allow_elevated": False, "allow_stdio_access": True, "no_new_privileges": False,
        "user": {"user_idname": {"pattern": "", "strategy": "any"},
                 "group_idnames": [{"pattern": "", "strategy": "any"}], "umask": "0022"},
        "capabilities": None, "seccomp_profile_sha256": ""}]})

# One valid payload per op. Most would change nothing once the world is set up (denied, conflict, not
# found), so the fuzzer's frames stay cheap; `RARE` ones really act (a crun call) and are sent rarely.
SEEDS: dict[str, dict[str, Any]] = {
    "ping": {}, "get_properties": {}, "dump_stacks": {}, "list_containers": {}, "poweroff": {},
    "set_policy": {"policy": base64.b64encode(POLICY).decode()},
    "get_report": {"nonce": "00" * 32},
    "mount_device": {"device": "L0", "target": "/run/parma/layers/l0"},
    "unmount_device": {"target": "/run/parma/layers/l0"},
    "mount_scratch": {"container_id": "app"},
    "unmount_scratch": {"container_id": "app"},
    "mount_overlay": {"container_id": "app", "layer_paths": ["/run/parma/layers/l0"],
                      "target": "/run/parma/containers/app/rootfs"},
    "unmount_overlay": {"target": "/run/parma/containers/app/rootfs"},
    "create_volume": {"name": "cache", "kind": "secret", "items": {"x": "eA=="}},
    "create_container": {"container_id": "app", "argv": INIT, "env": ["PATH=/bin"], "working_dir": "/",
                         "user": "0:0", "mounts": [{"destination": "/c", "source": "/run/parma/volumes/cache",
                                                    "type": "bind", "options": ["rbind", "rw"]}],
                         "capabilities": {"bounding": ["CAP_KILL"]}, "privileged": False,
                         "no_new_privileges": False, "umask": "0022",
                         "seccomp_profile": base64.b64encode(b'{"defaultAction":"SCMP_ACT_ALLOW"}').decode()},
    "start_container": {"container_id": "app"},
    "exec_process": {"container_id": "app", "argv": ["/bin/cat", "/etc/shadow"], "env": ["PATH=/bin"],
                     "working_dir": "/"},
    "signal_process": {"container_id": "app", "signal": 10},
    "wait_process": {"container_id": "app", "exec_id": "e1", "timeout": 0},
    "read_output": {"container_id": "app", "exec_id": "e1", "offset": 0, "max_bytes": 4096, "wait": 0},
    "shutdown_container": {"container_id": "nope", "timeout": 0.1},
}
RARE: dict[str, dict[str, Any]] = {
    "exec_process": {"container_id": "app", "argv": ALLOWED_EXEC, "env": ["PATH=/bin"], "working_dir": "/"},
}
WAIT_FIELDS = {"wait_process": "timeout", "read_output": "wait", "shutdown_container": "timeout"}

TOKENS = [rb"\ud800", rb"\udfff", rb"\ud83d", rb"\u0000", b"1e400", b"-1e400", b"99999999999999999999",
          b"-9223372036854775809", b"NaN", b"Infinity", b"-0", b"0.0", b"1.5", b"true", b"null", b'"', b"\\",
          b"[[[[[[", b"]]]]", b"{", b"}", b",", b":", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf",
          b"\x00", b"\t", b'"v":', b'"id":', b'"op":', b'"payload":', b"\\u", b'""', b"{}", b"[]"]
ALPHABET = b'{}[]",:0123456789.eE+-\\u abcdefnrtlsNIaFTy\x00\xff'


def _leaves(value: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))


def _replace(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    head, *rest = path
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], tuple(rest), new)}
    out = list(value)
    out[head] = _replace(out[head], tuple(rest), new)
    return out


class _Raw:
    """A JSON fragment spliced into a frame as is (what json.dumps cannot write: lone surrogates, NaN,
    numbers beyond a double, deep nesting)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _dumps(value: Any) -> str:
    if isinstance(value, _Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dumps(v) for v in value) + "]"
    return json.dumps(value)


@dataclass
class Generator:
    rng: random.Random
    next_id: int = 0

    def interesting(self) -> Any:
        r = self.rng
        return r.choice([
            0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63), 2**64, 10**30, 1e308, -1e308, 5e-324, 0.5, True, False,
            None, "", "x" * r.choice([1, 64, 65, 256, 4097, 70000]), "/", "/..", "../../etc/passwd", "/proc/1/root",
            "\x00", "a\x00b", "é", "\U0001F600", "\u2028", [], {}, [None], {"": ""}, ["x"] * 300,
            _Raw('"\\ud800"'), _Raw('"a\\udfffb"'), _Raw("1e400"), _Raw("-1e400"), _Raw("NaN"), _Raw("Infinity"),
            _Raw("9" * 5000), _Raw("[" * 1000 + "]" * 1000), _Raw('{"a":' * 600 + "1" + "}" * 600),
            _Raw("-0"), _Raw("1E+2"), _Raw("0.0000000000000000000001")])

    def fresh_id(self) -> Any:
        self.next_id += 1
        return self.next_id

    def seed(self) -> tuple[dict[str, Any], bool]:
        """A valid frame (op, payload) and whether it is one that really acts."""
        r = self.rng
        if r.random() < 0.00005:
            op = r.choice(list(RARE))
            return {"v": 1, "id": self.fresh_id(), "op": op, "payload": RARE[op]}, True
        op = r.choice(list(SEEDS))
        return {"v": 1, "id": self.fresh_id(), "op": op, "payload": SEEDS[op]}, False

    def frame(self) -> tuple[bytes, Any]:
        """One frame (no newline) and the reply id it must get (None: unknown, do not check)."""
        r = self.rng
        doc, _ = self.seed()
        kind = r.random()
        if kind < 0.20:
            return _cap_waits(doc), doc["id"]
        if kind < 0.65:
            return self._tree_mutation(doc), None
        if kind < 0.89:
            return self._byte_mutation(_cap_waits(doc)), None
        if kind < 0.95:
            return self._ids(doc), None
        if kind < 0.99:
            depth = r.choice([50, 500, 5000, 50000, 200000])
            opener, closer = r.choice([(b"[", b"]"), (b'{"a":', b"}")])
            inner = opener * depth + b"0" + closer * depth if opener != b"[" else opener * depth + closer * depth
            where = r.choice(["payload", "id", "op", "extra"])
            head = b'{"v":1,"id":7,"op":"ping"' if where != "op" else b'{"v":1,"id":7,"op":'
            if where == "op":
                return head + inner + b"}", None
            return head + b',"' + where.encode() + b'":' + inner + b"}", None
        if kind < 0.9999:
            return bytes(r.randrange(256) for _ in range(r.randint(1, 64))), None
        big = b'{"v":1,"id":9,"op":"set_policy","payload":{"policy":"' + b"QUFB" * (P.MAX_FRAME_BYTES // 4 + 8) + b'"}}'
        return big, None

    def _tree_mutation(self, doc: dict[str, Any]) -> bytes:
        r = self.rng
        value: Any = doc
        for _ in range(r.randint(1, 3)):
            choice = r.random()
            paths = list(_leaves(value))
            if choice < 0.6 and len(paths) > 1:
                value = _replace(value, r.choice(paths[1:]), self.interesting())
            elif choice < 0.75:
                target = r.choice([p for p in paths if isinstance(_get(value, p), dict)] or [()])
                sub = _get(value, target)
                key = r.choice(["x", "payload", "op", "id", "v", "container_id", "kind", "\u0000", "é" * 3,
                                *(list(sub) if sub else [])])
                value = _replace(value, target, {**sub, key: self.interesting()})
            elif choice < 0.9:
                target = r.choice([p for p in paths if isinstance(_get(value, p), dict) and _get(value, p)] or [()])
                sub = dict(_get(value, target))
                if sub:
                    del sub[r.choice(list(sub))]
                value = _replace(value, target, sub)
            else:
                # A duplicate key: json.dumps cannot write one, so splice it in.
                text = _dumps(value)
                key = r.choice(['"v":1', '"id":3', '"op":"ping"', '"payload":{}'])
                return _sanitize(text[:-1] + ("," if len(text) > 2 else "") + key + "}").encode()
        return _sanitize(_dumps(value)).encode("utf-8", "surrogatepass")

    def _byte_mutation(self, data: bytes) -> bytes:
        r = self.rng
        f = bytearray(data)
        for _ in range(r.randint(1, 5)):
            if not f:
                f += b"{"
            pos = r.randrange(len(f))
            action = r.random()
            if action < 0.3:
                f[pos] = r.choice(ALPHABET)
            elif action < 0.5:
                del f[pos:pos + r.randint(1, 8)]
            elif action < 0.9:
                f[pos:pos] = r.choice(TOKENS)
            else:
                f[pos:pos] = f[r.randrange(len(f)):][:r.randint(1, 32)]
        return bytes(f)

    def _ids(self, doc: dict[str, Any]) -> bytes:
        r = self.rng
        same = r.choice([self.next_id, self.next_id - 1, 1, 0])
        ident = r.choice([same, same, str(same), -same, _Raw('"\\ud800"'), _Raw("1.0"), None, [], {}, True,
                          _Raw("12345678901234567890123"), "", "x" * 300, "é"])
        version = r.choice([1, 1, 1, True, _Raw("1.0"), "1", 2, 0, None])
        return _sanitize(_dumps({**doc, "id": ident, "v": version})).encode("utf-8", "surrogatepass")


def _get(value: Any, path: tuple) -> Any:
    for p in path:
        value = value[p]
    return value


def _sanitize(text: str) -> str:
    return text.replace("\n", " ")


def _cap_waits(doc: dict[str, Any]) -> bytes:
    """The frame, with a host wait capped at MAX_WAIT_S (a long honest wait is not a hang)."""
    op = doc.get("op")
    key = WAIT_FIELDS.get(op) if isinstance(op, str) else None
    payload = doc.get("payload")
    if key and isinstance(payload, dict) and isinstance(payload.get(key), int | float):
        doc = {**doc, "payload": {**payload, key: min(payload[key], MAX_WAIT_S)}}
    return json.dumps(doc).encode()


def _capped(frame: bytes) -> bytes:
    """A mutated frame that still parses as a request with a long wait: cap it (see _cap_waits)."""
    if b"wait" not in frame and b"timeout" not in frame:
        return frame
    try:
        doc = json.loads(frame)
    except (ValueError, RecursionError):
        return frame
    if (not isinstance(doc, dict) or not isinstance(doc.get("op"), str) or doc["op"] not in WAIT_FIELDS
            or not isinstance(doc.get("payload"), dict)):
        return frame
    value = doc["payload"].get(WAIT_FIELDS[doc["op"]])
    if isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_WAIT_S:
        return _cap_waits(doc)
    return frame


@dataclass
class Report:
    frames: int = 0
    replies: int = 0
    crashes: list[dict[str, Any]] = field(default_factory=list)
    hangs: list[dict[str, Any]] = field(default_factory=list)
    misordered: list[dict[str, Any]] = field(default_factory=list)
    malformed_replies: list[str] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)
    max_gap_s: float = 0.0
    seconds: float = 0.0
    port_closed: bool = False
    agent_alive: bool = True
    tracebacks: int = 0

    @property
    def ok(self) -> bool:
        return not (self.crashes or self.hangs or self.misordered or self.malformed_replies or self.port_closed
                    or not self.agent_alive or self.tracebacks or self.replies != self.frames)

    def to_json(self) -> dict[str, Any]:
        return {"frames": self.frames, "replies": self.replies, "seconds": round(self.seconds, 2),
                "frames_per_s": round(self.frames / self.seconds) if self.seconds else 0,
                "crashes": len(self.crashes), "hangs": len(self.hangs), "misordered": len(self.misordered),
                "malformed_replies": len(self.malformed_replies), "max_gap_s": round(self.max_gap_s, 3),
                "port_closed": self.port_closed, "agent_alive": self.agent_alive,
                "tracebacks_in_agent_log": self.tracebacks, "reply_codes": dict(sorted(self.codes.items())),
                "examples": {"crashes": self.crashes[:3], "hangs": self.hangs[:3], "misordered": self.misordered[:3],
                             "malformed_replies": self.malformed_replies[:3]},
                "ok": self.ok}


def set_up_world(agent: OfflineAgent) -> None:
    """What `up` does, so that fuzzed frames meet a running container."""
    agent.set_policy()
    agent.ok("mount_device", {"device": "L0", "target": "/run/parma/layers/l0"})
    agent.ok("mount_scratch", {"container_id": "app"})
    agent.ok("mount_overlay", {"container_id": "app", "layer_paths": ["/run/parma/layers/l0"],
                               "target": "/run/parma/containers/app/rootfs"})
    agent.ok("create_container", {"container_id": "app", "argv": INIT, "env": ["PATH=/bin"]})
    agent.ok("start_container", {"container_id": "app"})
    agent.ok("exec_process", {"container_id": "app", "argv": ALLOWED_EXEC, "env": ["PATH=/bin"]})


def fuzz(agent: OfflineAgent, frames: int, seed: int, batch: int = 256, progress: bool = False) -> Report:
    """Send `frames` fuzzed frames (plus one checked ping per batch) and check every reply."""
    gen = Generator(random.Random(seed))
    report = Report()
    expected: list[tuple[Any, bytes | None]] = []     # per frame sent: (reply id to check, the frame)
    lock = threading.Condition()
    done = threading.Event()
    sock = agent.sock
    sock.settimeout(None)

    def reader() -> None:
        buf = b""
        last = time.monotonic()
        index = 0
        while not done.is_set() or index < len(expected):
            try:
                chunk = sock.recv(1 << 20)
            except OSError:
                chunk = b""
            now = time.monotonic()
            if not chunk:
                report.port_closed = True
                with lock:
                    lock.notify_all()
                return
            buf += chunk
            lines = buf.split(b"\n")
            buf = lines.pop()
            for line in lines:
                with lock:
                    if index >= len(expected):      # a reply no frame asked for: answered twice
                        report.malformed_replies.append("extra reply: " + _show(line))
                        continue
                    want, sent = expected[index]
                    outstanding_since = sent_at[index]
                gap = now - max(last, outstanding_since)
                report.max_gap_s = max(report.max_gap_s, gap)
                if gap > HANG_S:
                    report.hangs.append({"gap_s": round(gap, 3), "frame": _show(sent)})
                last = now
                _check(report, line, want, sent)
                index += 1
                with lock:
                    report.replies = index
                    lock.notify_all()

    sent_at: list[float] = []
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    started = time.monotonic()
    sent = 0
    window = batch * 4
    while sent < frames:
        chunk: list[bytes] = []
        now = time.monotonic()
        with lock:
            for _ in range(min(batch, frames - sent)):
                data, want = gen.frame()
                # One frame per line: a newline inside would make two frames (tested on its own in
                # tests/unit/test_malicious_frames.py), and whitespace alone is no frame at all.
                data = _capped(data).replace(b"\n", b" ")
                if not data.strip():
                    data = b"x"
                expected.append((want, data))
                sent_at.append(now)
                chunk.append(data)
                sent += 1
            ping_id = f"check-{sent}"
            expected.append((ping_id, None))
            sent_at.append(now)
        payload = b"\n".join(chunk) + b"\n" + json.dumps({"v": 1, "id": ping_id, "op": "ping"}).encode() + b"\n"
        try:
            sock.sendall(payload)
        except OSError:
            report.port_closed = True
            break
        report.frames = sent
        with lock:
            while len(expected) - report.replies > window and not report.port_closed:
                if not lock.wait(HANG_S * 5):
                    break
        if progress and sent % (batch * 200) < batch:
            rate = sent / max(1e-6, time.monotonic() - started)
            print(f"fuzz: {sent} frames, {rate:.0f}/s, crashes {len(report.crashes)}, hangs {len(report.hangs)}",
                  file=sys.stderr, flush=True)
    done.set()
    deadline = time.monotonic() + 30
    with lock:
        while report.replies < len(expected) and not report.port_closed and time.monotonic() < deadline:
            lock.wait(1)
    report.seconds = time.monotonic() - started
    report.frames = sent
    report.replies -= len(expected) - sent   # the checking pings are not fuzzed frames
    return report


def _check(report: Report, line: bytes, want: Any, sent: bytes | None) -> None:
    try:
        reply = json.loads(line)
        well_formed = (isinstance(reply, dict) and reply.get("v") == 1 and "id" in reply
                       and isinstance(reply.get("ok"), bool)
                       and (("result" in reply) if reply["ok"] else
                            (isinstance(reply.get("error"), dict) and reply["error"].get("code") in ERROR_CODES
                             and isinstance(reply["error"].get("message"), str))))
    except ValueError:
        well_formed = False
    if not well_formed:
        report.malformed_replies.append(_show(line))
        return
    code = "ok" if reply["ok"] else reply["error"]["code"]
    report.codes[code] = report.codes.get(code, 0) + 1
    if code == "internal":
        report.crashes.append({"frame": _show(sent), "reply": _show(line)})
    if want is not None and reply["id"] != want:
        report.misordered.append({"want": want, "got": reply["id"], "frame": _show(sent)})


def _show(data: bytes | None) -> str:
    if data is None:
        return "(checking ping)"
    text = data[:300].decode("utf-8", "backslashreplace")
    return text + (f"... ({len(data)} bytes)" if len(data) > 300 else "")


def run(frames: int, seed: int, batch: int = 256, progress: bool = False) -> dict[str, Any]:
    """Set up an offline agent and its world, fuzz it, and report (a JSON-able dict)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-frames-") as tmp:
        layer = busybox_layer(Path(tmp) / "l0", applets=("sh", "sleep", "true", "cat"))
        with OfflineAgent.start(Path(tmp), POLICY, {"L0": (LAYER, layer)}) as agent:
            set_up_world(agent)
            report = fuzz(agent, frames, seed, batch, progress)
            report.agent_alive = agent.proc.poll() is None
            if not report.port_closed:
                agent.sock.settimeout(10)
                agent.buf = b""
                try:
                    report.agent_alive = report.agent_alive and agent.ok("ping")["policy_set"] is True
                except (AssertionError, OSError):
                    report.agent_alive = False
            report.tracebacks = agent.log().count("Traceback")
    out = report.to_json()
    out.update({"seed": seed, "target": "offline agent (tests/offline_agent.py)", "python": platform.python_version(),
                "load_avg": [round(x, 2) for x in os.getloadavg()]})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    why = available()
    if why is not None:
        print(json.dumps({"skipped": why}))
        return 0
    result = run(args.frames, args.seed, args.batch, progress=sys.stderr.isatty() or True)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
