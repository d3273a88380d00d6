"""Host-side helpers for talking about a key broker: its pin, and its address as the guest sees it."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

from sandbox.shared.errors import InputError, NetworkError
from sandbox.shared.kbs_protocol import IDENTITY_FORMAT, IDENTITY_PATH, PIN, key_pin

# QEMU user networking: the guest reaches the host's loopback at the gateway address; 10.0.2.15 is the guest.
QEMU_USER_HOST = "10.0.2.2"
QEMU_USER_GUEST = "10.0.2.15"
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
STARTING_BROKER_WAIT = 5.0  # seconds a refused connection is retried (a broker that is just starting)


def check_url(url: str, *, option: str = "--kbs") -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.query or parts.fragment:
        raise InputError(f"{option}: {url!r} is not an http://HOST:PORT URL",
                         hint="e.g. http://127.0.0.1:8300 (the exchange is authenticated end to end; "
                              "plain HTTP is all it needs)")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise InputError(f"{option}: {url!r} has an invalid port") from None
    return url.rstrip("/")


def guest_url(url: str) -> str:
    """The broker's address from inside the UVM: a loopback host becomes QEMU's user-net gateway.

    The agent refuses locations inside the guest (sandbox/guest/broker_address.py); an IP literal it
    would refuse is an input error here already, before anything boots."""
    parts = urllib.parse.urlsplit(check_url(url))
    if parts.hostname not in LOOPBACK_NAMES:
        try:
            address = ipaddress.ip_address(parts.hostname or "")
        except ValueError:
            return url.rstrip("/")  # a name: the guest resolves it and checks every address
        if address.is_loopback or str(address) == QEMU_USER_GUEST or address.is_link_local \
                or address.is_unspecified or address.is_multicast or address.is_reserved:
            raise InputError(f"--kbs: {url} is not reachable as a key broker from the guest (the agent refuses "
                             "loopback, link-local, unspecified, multicast and its own addresses)",
                             hint=f"a broker on this machine: http://127.0.0.1:PORT (the guest reaches it as "
                                  f"{QEMU_USER_HOST}); elsewhere: its address on the network")
        return url.rstrip("/")
    netloc = QEMU_USER_HOST + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def fetch_pin(url: str, *, timeout: float = 10.0) -> str:
    """Ask a broker for its identity and return its pin (SHA-256 of its public key).

    This trusts whoever answers at `url`, which is right for the person generating a policy for their
    own broker; the guest never does this (it only trusts the pins in its attested policy). A refused
    connection is retried for a few seconds: `kbs serve &` followed at once by `policy gen --kbs` is the
    documented way to start, and the broker may not listen yet."""
    deadline = time.monotonic() + STARTING_BROKER_WAIT
    while True:
        try:
            with urllib.request.urlopen(check_url(url) + IDENTITY_PATH, timeout=timeout) as response:
                doc = json.loads(response.read(64 * 1024))
            break
        except (urllib.error.URLError, OSError, ValueError) as e:
            refused = isinstance(getattr(e, "reason", e), ConnectionRefusedError)
            if refused and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            raise NetworkError(f"cannot get the identity of the key broker at {url}: {e}",
                               hint="is 'parma-sandbox kbs serve' running there?") from None
    try:
        if doc["format"] != IDENTITY_FORMAT:
            raise ValueError(f"format {doc['format']!r}")
        public_key = base64.b64decode(doc["public_key"], validate=True)
        pin = key_pin(public_key)
        if doc["public_key_sha256"] != pin:
            raise ValueError("public_key_sha256 does not match public_key")
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        raise NetworkError(f"{url} did not answer like a parma-sandbox key broker: {e}") from None
    return pin


def check_pins(pins: Sequence[str], *, option: str = "--kbs-key") -> list[str]:
    out = []
    for pin in pins:
        text = pin.strip().lower()
        if not PIN.fullmatch(text):
            raise InputError(f"{option}: {pin!r} is not a broker pin (64 hex digits)",
                             hint="'parma-sandbox kbs key' prints the pin of your broker")
        out.append(text)
    return out


def broker_pins(url: str | None, pins: Sequence[str]) -> list[str]:
    """The pins to put in a policy: the explicit ones, else the identity of the broker at `url`."""
    explicit = check_pins(pins)
    if explicit:
        return explicit
    return [fetch_pin(url)] if url else []
