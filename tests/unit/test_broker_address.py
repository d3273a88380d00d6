"""The agent refuses host-chosen broker locations that point back into the guest (issue: trust chain, item 8)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from sandbox.guest import broker_address as ba
from sandbox.shared.errors import NetworkError

GUEST = ipaddress.ip_address("10.0.2.15")
OWN = {GUEST, ipaddress.ip_address("fec0::5054:ff:fe12:3456")}


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("0.1.2.3", "not a unicast host address"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("255.255.255.255", "reserved"), ("240.0.0.1", "reserved"), ("10.0.2.15", "the guest's own"),
    ("::ffff:10.0.2.15", "the guest's own"), ("fec0::5054:ff:fe12:3456", "the guest's own"),
])
def test_refused_addresses(address: str, reason: str) -> None:
    why = ba.refusal(ipaddress.ip_address(address), OWN)
    assert why is not None and reason in why


@pytest.mark.parametrize("address", ["10.0.2.2", "192.168.1.20", "203.0.113.7", "2001:db8::7", "172.17.0.1"])
def test_allowed_addresses(address: str) -> None:
    assert ba.refusal(ipaddress.ip_address(address), OWN) is None


def _resolver(table: dict[str, list[str]]) -> ba.AddressLookup:
    return lambda host, port: [ipaddress.ip_address(a) for a in table[host]]


def test_every_resolved_address_must_pass() -> None:
    resolver = _resolver({"kbs.example": ["203.0.113.7"], "sneaky.example": ["203.0.113.7", "127.0.0.1"],
                          "empty.example": []})
    assert ba.checked_addresses("kbs.example", 80, resolver=resolver, own=lambda: OWN) == \
        [ipaddress.ip_address("203.0.113.7")]
    with pytest.raises(ba.BrokerAddressRefused) as exc:
        ba.checked_addresses("sneaky.example", 80, resolver=resolver, own=lambda: OWN)
    assert exc.value.message.startswith("key broker location sneaky.example (127.0.0.1) refused: 127.0.0.1 is a "
                                        "loopback address; the host chose this address")
    assert "up --kbs URL" in (exc.value.hint or "")
    with pytest.raises(NetworkError, match="resolves to no address"):
        ba.checked_addresses("empty.example", 80, resolver=resolver, own=lambda: OWN)


def test_names_that_do_not_resolve_are_network_errors() -> None:
    with pytest.raises(NetworkError, match="does not resolve"):
        ba.resolve("no-such-host.invalid", 80)


class _FakeSocket:
    """Records where a connection would go; never touches the network."""

    targets: list[tuple[str, int]] = []

    def __init__(self, family: int, kind: int) -> None:
        self.peer = ("", 0)

    def settimeout(self, timeout: float | None) -> None:
        pass

    def connect(self, target: tuple[str, int]) -> None:
        self.targets.append(target)
        self.peer = target

    def getpeername(self) -> tuple[str, int]:
        return self.peer

    def getsockname(self) -> tuple[str, int]:
        return ("10.0.2.15", 40000)

    def close(self) -> None:
        pass


def test_the_connection_goes_to_the_checked_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name resolves to a good address for the check, then to loopback. The connection
    never resolves again: it goes to the address that passed."""
    answers = iter([["203.0.113.7"], ["127.0.0.1"]])
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[ba.IpAddress]:
        calls.append(host)
        return [ipaddress.ip_address(a) for a in next(answers)]

    _FakeSocket.targets = []
    monkeypatch.setattr(ba.socket, "socket", _FakeSocket)
    conn = ba.CheckedConnection("rebind.example", 8300, timeout=5, resolver=resolver, own=lambda: OWN)
    conn.connect()
    assert calls == ["rebind.example"] and _FakeSocket.targets == [("203.0.113.7", 8300)]


def test_the_connected_peer_is_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        # Pretend 127.0.0.1 had passed the check (an address the guest gained after it, say).
        monkeypatch.setattr(ba, "checked_addresses", lambda *a, **k: [ipaddress.ip_address("127.0.0.1")])
        conn = ba.CheckedConnection("broker.example", port, timeout=5, own=lambda: OWN)
        with pytest.raises(ba.BrokerAddressRefused, match="at connect time: the peer 127.0.0.1 is a loopback"):
            conn.connect()
        assert conn.sock is None


def test_a_connection_to_our_own_address_is_caught_by_its_source_address() -> None:
    """Connecting to a local address makes the kernel pick that address as the source: peer == local."""
    peer = ipaddress.ip_address("192.0.2.44")  # an address the interface listing did not show
    assert ba.refusal(peer, {peer}) == "one of the guest's own addresses"


def test_own_addresses_include_loopback_interfaces() -> None:
    own = ba.own_addresses()
    assert ipaddress.ip_address("127.0.0.1") in own
