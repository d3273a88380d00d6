"""What a valid hostname, name server, search domain and resolver option are: the group spec checks a
group's `dnsConfig` with these rules on the host, and the agent checks the values it writes into a
container's /etc/hosts and /etc/resolv.conf with the same ones (resolv.conf(5), RFC 1123)."""

from __future__ import annotations

import re

SLIRP_NAMESERVER = "10.0.2.3"     # QEMU user networking's DNS forwarder
MAX_NAMESERVERS = 3               # resolv.conf(5): MAXNS, the resolver ignores more
MAX_SEARCH_DOMAINS = 6            # resolv.conf(5) before glibc 2.26, and hcsshim's limit
MAX_SEARCH_CHARS = 256
HOST_NAME_MAX = 64                # the kernel's limit for the UTS hostname (HOST_NAME_MAX + 1 with the NUL)
MAX_DOMAIN = 253

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
# resolv.conf(5) options; the numeric ones take a small value.
OPTION_RE = re.compile(r"(?:ndots|timeout|attempts):[0-9]{1,2}|rotate|edns0|single-request|single-request-reopen|"
                       r"no-tld-query|use-vc|no-reload|trust-ad|inet6|no-aaaa|debug")


def hostname_problem(name: str) -> str | None:
    if not name or len(name) >= HOST_NAME_MAX or not HOSTNAME_RE.fullmatch(name):
        return (f"{name!r} is not a valid hostname (letters, digits, '-' and '.', under {HOST_NAME_MAX} "
                "characters)")
    return None


def host_name_problem(name: str) -> str | None:
    """A name for /etc/hosts (longer than a UTS hostname may be)."""
    if not name or len(name) > MAX_DOMAIN or not HOSTNAME_RE.fullmatch(name):
        return f"{name!r} is not a host name"
    return None


def nameservers_problem(servers: tuple[str, ...] | list[str]) -> str | None:
    import ipaddress  # here: the agent imports this module at boot and checks name servers later

    if not 1 <= len(servers) <= MAX_NAMESERVERS:
        return f"needs between 1 and {MAX_NAMESERVERS} name servers, got {len(servers)}"
    for ns in servers:
        try:
            ipaddress.ip_address(ns)
        except ValueError:
            return f"name server {ns!r} is not an IP address"
    return None


def search_domains_problem(domains: tuple[str, ...] | list[str]) -> str | None:
    if len(domains) > MAX_SEARCH_DOMAINS or len(" ".join(domains)) > MAX_SEARCH_CHARS:
        return f"at most {MAX_SEARCH_DOMAINS} search domains of {MAX_SEARCH_CHARS} characters in all"
    for domain in domains:
        if len(domain) > MAX_DOMAIN or not DOMAIN_RE.fullmatch(domain):
            return f"search domain {domain!r} is not a domain name"
    return None


def resolver_options_problem(options: tuple[str, ...] | list[str]) -> str | None:
    for option in options:
        if not OPTION_RE.fullmatch(option):
            return f"resolver option {option!r} is not one resolv.conf(5) knows"
    return None
