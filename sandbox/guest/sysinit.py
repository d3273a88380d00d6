"""Bring the UVM's basic filesystems and network up. Idempotent: whatever the init already did stays.

The rootfs is read-only (dm-verity); everything writable lives on tmpfs in guest memory, which
SEV-SNP encrypts. Containers share the UVM's network namespace: QEMU user networking forwards the
group's ports to 10.0.2.15 (QEMU's default guest address), so eth0 gets that address. Plain os calls,
not pathlib: this runs before the agent is ready, and pathlib brings urllib.parse and ipaddress.
"""

from __future__ import annotations

import fcntl
import os
import struct
from typing import TYPE_CHECKING

from sandbox.guest import sysapi
from sandbox.guest.sysapi import MS_NODEV, MS_NOEXEC, MS_NOSUID

if TYPE_CHECKING:
    import socket

# (source, target, fstype, flags, data)
BASE_MOUNTS = (
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("configfs", "/sys/kernel/config", "configfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
)
OPTIONAL_MOUNTS = {"/sys/kernel/config"}  # configfs (for configfs-tsm) may be absent from the kernel

GUEST_ADDR = "10.0.2.15"
GUEST_NETMASK = "255.255.255.0"
GUEST_GATEWAY = "10.0.2.2"

# ioctl numbers from include/uapi/linux/sockios.h; flags from include/uapi/linux/if.h, route.h.
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCADDRT = 0x890B
IFF_UP = 0x1
RTF_UP = 0x1
RTF_GATEWAY = 0x2


def mount_basics(log: list[str]) -> None:
    # What is mounted already (the kernel mounts /dev, an init may have mounted more) shows once /proc
    # is: read it before and again right after mounting /proc, not once per mount (each read costs
    # milliseconds under emulation, on the boot path).
    points = sysapi.mount_points()
    for source, target, fstype, flags, data in BASE_MOUNTS:
        if target in points:
            continue
        try:
            os.makedirs(target, exist_ok=True)
            sysapi.mount(source, target, fstype, flags, data)
        except OSError as e:
            if target in OPTIONAL_MOUNTS:
                log.append(f"optional mount {target} unavailable: {e}")
                continue
            raise
        points = sysapi.mount_points() if target == "/proc" else points | {target}
        if target == "/dev/pts" and not os.path.exists("/dev/ptmx"):
            os.symlink("pts/ptmx", "/dev/ptmx")


def enable_cgroup_controllers(log: list[str]) -> None:
    """Delegate every available controller to child cgroups so crun can place containers (the agent does
    it just after "ready": no container starts before the network, which comes after it)."""
    root = "/sys/fs/cgroup"
    try:
        with open(f"{root}/cgroup.controllers") as f:
            available = f.read().split()
        with open(f"{root}/cgroup.subtree_control", "w") as f:
            f.write(" ".join(f"+{c}" for c in available))
    except OSError as e:
        log.append(f"cgroup controllers not delegated: {e}")


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    # struct ifreq: char ifr_name[IFNAMSIZ=16] followed by a 24-byte union.
    return struct.pack("16s24s", name.encode(), payload)


def _sockaddr_in(addr: str) -> bytes:
    # struct sockaddr_in: sa_family (host order), port (network order), in_addr, 8 bytes of zero.
    import socket

    return struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(addr))


def _set_up(sock: socket.socket, name: str) -> None:
    res = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, _ifreq(name))
    flags = struct.unpack_from("=H", res, 16)[0]
    fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, _ifreq(name, struct.pack("=H", flags | IFF_UP)))


def _add_default_route(sock: socket.socket, gateway: str) -> None:
    # struct rtentry on LP64: rt_pad1 (8), rt_dst, rt_gateway, rt_genmask (16 each), rt_flags (2),
    # rt_pad2 (2), pad (4), rt_pad3 (8), rt_pad4 (8), rt_metric (2), pad (6), rt_dev (8),
    # rt_mtu (8), rt_window (8), rt_irtt (2), pad (6): 120 bytes.
    entry = struct.pack("=Q16s16s16sHh4xQQh6xQQQH6x", 0, _sockaddr_in("0.0.0.0"), _sockaddr_in(gateway),
                        _sockaddr_in("0.0.0.0"), RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, 0, 0, 0, 0)
    fcntl.ioctl(sock.fileno(), SIOCADDRT, entry)


ARPHRD_ETHER = 1   # include/uapi/linux/if_arp.h; /sys/class/net/<if>/type


def network_interfaces(sys_net: str | os.PathLike[str] = "/sys/class/net") -> list[str]:
    """Ethernet interfaces, sorted: not loopback, and not tunnels (sit0 and the like) the kernel may add."""
    try:
        names = sorted(os.listdir(sys_net))
    except OSError:
        return []
    out = []
    for name in names:
        try:
            with open(os.path.join(sys_net, name, "type")) as f:
                if int(f.read()) == ARPHRD_ETHER:
                    out.append(name)
        except (OSError, ValueError):
            continue
    return out


def configure_network(log: list[str]) -> str | None:
    """lo up; the first Ethernet interface gets QEMU's user-network address. Returns its name, if any."""
    import socket  # the agent configures the network after "ready" (agent.py): socket is off its boot path

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            _set_up(sock, "lo")
        except OSError as e:
            log.append(f"loopback not configured: {e}")
        nics = network_interfaces()
        if not nics:
            return None
        nic = nics[0]
        try:
            fcntl.ioctl(sock.fileno(), SIOCSIFADDR, _ifreq(nic, _sockaddr_in(GUEST_ADDR)))
            fcntl.ioctl(sock.fileno(), SIOCSIFNETMASK, _ifreq(nic, _sockaddr_in(GUEST_NETMASK)))
            _set_up(sock, nic)
        except OSError as e:
            log.append(f"{nic} not configured: {e}")
            return None
        try:
            _add_default_route(sock, GUEST_GATEWAY)
        except OSError as e:
            log.append(f"default route not added: {e}")
    return nic


def set_hostname(name: str) -> None:
    try:
        with open("/proc/sys/kernel/hostname", "w") as f:
            f.write(name)
    except OSError:
        pass
