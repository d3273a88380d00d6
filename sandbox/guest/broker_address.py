"""Where the agent may send its key broker requests: never back into the guest.

The broker's URL comes from the host (fw_cfg opt/parma/kbs_url) and is not trusted. The exchange is
authenticated end to end (the policy pins the broker's key), so a wrong address can only make a
release fail, *unless* it points the agent's POSTs at something inside the guest: a container's
server on 127.0.0.1 or on the guest's own address would receive requests that come from the agent
itself. So the address is refused when it is loopback, link-local, unspecified, multicast, reserved,
or one of the guest's own addresses. A name is resolved first and every address it resolves to must
pass; the connection then goes to the address that was checked (never resolved again, so a DNS
answer that changes between check and use cannot slip through), and the connected peer is checked
once more.
"""

from __future__ import annotations

import fcntl
import http.client
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from sandbox.shared.errors import NetworkError, SandboxError

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SIOCGIFADDR = 0x8915  # include/uapi/linux/sockios.h
IF_INET6 = Path("/proc/net/if_inet6")
THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # RFC 1122 "this host on this network"


class BrokerAddressRefused(SandboxError):
    """The host-chosen broker location points into the guest (or nowhere routable)."""


def own_addresses(if_inet6: Path = IF_INET6) -> set[IpAddress]:
    """The guest's interface addresses: IPv4 by SIOCGIFADDR per interface, IPv6 from /proc."""
    found: set[IpAddress] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                ifreq = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            found.add(ipaddress.IPv4Address(ifreq[20:24]))  # struct ifreq: name[16], sockaddr_in at 16
    try:
        for line in if_inet6.read_text().splitlines():
            found.add(ipaddress.IPv6Address(int(line.split()[0], 16)))
    except (OSError, ValueError, IndexError):
        pass  # no IPv6 in this kernel
    return found


def refusal(address: IpAddress, own: Iterable[IpAddress]) -> str | None:
    """Why `address` may not be a broker location, or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for test, what in ((address.is_loopback, "a loopback address"), (address.is_unspecified, "the unspecified address"),
                       (address.is_link_local, "a link-local address"), (address.is_multicast, "a multicast address"),
                       (address.is_reserved, "a reserved address")):
        if test:
            return what
    if isinstance(address, ipaddress.IPv4Address) and address in THIS_NETWORK:
        return "not a unicast host address"
    if address in set(own):
        return "one of the guest's own addresses"
    return None


AddressLookup = Callable[[str, int], list[IpAddress]]


def resolve(host: str, port: int) -> list[IpAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise NetworkError(f"key broker host {host!r} does not resolve: {e}") from None
    out: list[IpAddress] = []
    for _, _, _, _, sockaddr in infos:
        if not isinstance(sockaddr[0], str):
            continue    # not an IP family (getaddrinfo of a host name gives only AF_INET and AF_INET6)
        address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if address not in out:
            out.append(address)
    return out


def checked_addresses(host: str, port: int, *, resolver: AddressLookup = resolve,
                      own: Callable[[], set[IpAddress]] = own_addresses) -> list[IpAddress]:
    """Every address `host` stands for, once all of them have passed; BrokerAddressRefused otherwise."""
    addresses = resolver(host, port)
    if not addresses:
        raise NetworkError(f"key broker host {host!r} resolves to no address")
    mine = own()
    for address in addresses:
        if (why := refusal(address, mine)) is not None:
            shown = host if host == str(address) else f"{host} ({address})"
            raise BrokerAddressRefused(
                f"key broker location {shown} refused: {address} is {why}; the host chose this address "
                "(fw_cfg opt/parma/kbs_url) and it may not point into the guest",
                hint="start the sandbox with 'up --kbs URL' where URL reaches the broker from the guest "
                     "(a loopback URL on the host is passed on as 10.0.2.2)")
    return addresses


class CheckedConnection(http.client.HTTPConnection):
    """An HTTP connection to a broker host whose addresses were checked, connecting only to those."""

    def __init__(self, host: str, port: int, *, timeout: float, resolver: AddressLookup = resolve,
                 own: Callable[[], set[IpAddress]] = own_addresses) -> None:
        super().__init__(host, port, timeout=timeout)
        self._resolver = resolver
        self._own = own

    def connect(self) -> None:
        addresses = checked_addresses(self.host, self.port, resolver=self._resolver, own=self._own)
        last: OSError | None = None
        for address in addresses:
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect((str(address), self.port))
            except OSError as e:
                sock.close()
                last = e
                continue
            peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
            local = ipaddress.ip_address(sock.getsockname()[0].split("%", 1)[0])
            # Connected to ourselves (an address added since the check, or one SIOCGIFADDR cannot see):
            # the kernel then picks the destination itself as the source address.
            why = refusal(peer, {local} | self._own())
            if why is not None:
                sock.close()
                raise BrokerAddressRefused(f"key broker location {self.host} refused at connect time: "
                                           f"the peer {peer} is {why}")
            self.sock = sock
            return
        raise last or OSError(f"cannot connect to {self.host}")
