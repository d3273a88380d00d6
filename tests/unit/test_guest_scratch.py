"""The scratch disk's device-mapper tables, and that the key leaves no copy in the agent's buffers."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from sandbox.guest import devmapper, scratch


def test_tables() -> None:
    t = scratch.integrity_target(Path("/dev/vdb"), 2_580_000)
    assert (t.start, t.length, t.type) == (0, 2_580_000, "integrity")
    assert t.params == "/dev/vdb 0 32 D 3 block_size:4096 fix_padding journal_sectors:1"
    key = bytearray(range(96))
    c = scratch.crypt_target(Path("/dev/dm-0"), 2_580_000, key)
    assert isinstance(c.params, bytearray)
    words = bytes(c.params).decode().split()
    assert words[0] == "capi:authenc(hmac(sha256),xts(aes))-plain64"
    assert words[1] == bytes(range(96)).hex()
    assert words[2:] == ["0", "/dev/dm-0", "0", "2", "integrity:32:aead", "sector_size:4096"]
    with pytest.raises(ValueError):
        scratch.crypt_target(Path("/dev/dm-0"), 8, bytearray(64))


def test_provided_sectors() -> None:
    assert scratch.provided_sectors("0 2580480 -") == 2580480
    with pytest.raises(scratch.ScratchError):
        scratch.provided_sectors("garbage")


def test_random_keys_differ() -> None:
    a, b = scratch.random_key(), scratch.random_key()
    assert len(a) == 96 and a != b and any(a)


def test_a_secret_table_load_is_flagged_and_wiped(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, bytes, int]] = []
    buffers: list[bytearray] = []

    def fake_call(cmd: int, buf: bytearray, what: str) -> bytearray:
        flags = struct.unpack_from(devmapper.DM_IOCTL_FMT, buf)[7]
        seen.append((cmd, bytes(buf), flags))
        buffers.append(buf)
        if cmd == devmapper.DM_DEV_CREATE_CMD:
            struct.pack_into("=Q", buf, 40, (253 << 8) | 4)   # dev: 253:4
        return buf

    monkeypatch.setattr(devmapper, "_call", fake_call)
    monkeypatch.setattr(devmapper, "_ensure_node", lambda device: None)
    key = bytearray(b"\xab" * 96)
    target = scratch.crypt_target(Path("/dev/dm-3"), 16, key)
    dev = devmapper.create("parma-scratch", (target,), readonly=False, secret=True)
    assert (dev.major, dev.minor) == (253, 4)
    load = [(raw, flags) for cmd, raw, flags in seen if cmd == devmapper.DM_TABLE_LOAD_CMD]
    assert len(load) == 1
    raw, flags = load[0]
    assert flags & devmapper.DM_SECURE_DATA_FLAG and not flags & devmapper.DM_READONLY_FLAG
    assert ("ab" * 96).encode() in raw                          # the kernel got the key...
    assert len(raw) > 1024                                     # ...in a buffer fcntl passes without a copy
    table_buf = buffers[[c for c, _, _ in seen].index(devmapper.DM_TABLE_LOAD_CMD)]
    assert not any(table_buf)                                  # which is wiped now,
    assert not any(target.params)                              # as are the target's parameters
    devmapper.wipe(key)
    assert not any(key)
