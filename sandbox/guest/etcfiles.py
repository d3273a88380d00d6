"""/etc/hostname, /etc/hosts and /etc/resolv.conf for each container, written by the guest.

As hcsshim's guest does for ACI (it writes hostname, hosts and resolv.conf in the sandbox's directory and
bind-mounts them over the container's /etc files unless the spec already mounts them there), the agent
renders the three files itself from checked values and binds them in. A container gets its own copies in
its directory (CONTAINERS_DIR/<id>/etc), so what one container writes to its /etc/hosts no other sees.

The group shares one network namespace, so every container of the group answers on 127.0.0.1: /etc/hosts
maps the hostname and the names of the group's containers to it (ACI's containers reach each other on
localhost too). resolv.conf lists the group's DNS configuration, or QEMU user networking's resolver
(10.0.2.3, which forwards to the host's) when the group has none.

None of this is trusted for confidentiality: name resolution is the host's to answer anyway (it carries
every packet), so TLS, not DNS, authenticates peers. What the guest does enforce is the shape: values are
validated so that nothing the host supplies can add a line, an option or a directive of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sandbox.shared import names
from sandbox.shared.errors import GuestOperationFailed
from sandbox.shared.names import SLIRP_NAMESERVER
from sandbox.shared.policy.defaults import ETC_FILES

if TYPE_CHECKING:
    from pathlib import Path  # annotations only: pathlib is not loaded at boot (agent.py)


class EtcFilesError(GuestOperationFailed):
    pass


def _check(problem: str | None) -> None:
    if problem is not None:
        raise EtcFilesError(problem)


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = (SLIRP_NAMESERVER,)
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.nameservers != (SLIRP_NAMESERVER,):     # ours needs no check (which loads ipaddress at boot)
            _check(names.nameservers_problem(self.nameservers))
        _check(names.search_domains_problem(self.search))
        _check(names.resolver_options_problem(self.options))


@dataclass(frozen=True)
class NameFiles:
    """What the three files say for one container."""

    hostname: str
    group_names: tuple[str, ...] = ()          # the group's container names, all on 127.0.0.1
    dns: DnsConfig = field(default_factory=DnsConfig)

    def __post_init__(self) -> None:
        _check(names.hostname_problem(self.hostname))
        for name in self.group_names:
            _check(names.host_name_problem(name))


def render_hostname(files: NameFiles) -> bytes:
    return f"{files.hostname}\n".encode()


def render_hosts(files: NameFiles) -> bytes:
    names = [files.hostname] + [n for n in files.group_names if n not in (files.hostname, "localhost")]
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return ("127.0.0.1\tlocalhost\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"127.0.0.1\t{' '.join(seen)}\n").encode()


def render_resolv_conf(files: NameFiles) -> bytes:
    dns = files.dns
    lines = [f"nameserver {ns}" for ns in dns.nameservers]
    if dns.search:
        lines.append("search " + " ".join(dns.search))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return ("\n".join(lines) + "\n").encode()


RENDERERS = {"hostname": render_hostname, "hosts": render_hosts, "resolv.conf": render_resolv_conf}


def write_files(directory: Path, files: NameFiles) -> None:
    """Write the three files into `directory` (each complete or not there: written aside, then renamed),
    mode 0644. The agent binds them in with the policy's default mounts (defaults.etc_file_mounts)."""
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    for name in ETC_FILES:
        tmp = directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, RENDERERS[name](files))
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        os.replace(tmp, directory / name)
