"""The /etc files the guest writes for containers: exact content, and no way for a host-supplied value to
add a line of its own."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sandbox.guest.etcfiles import (
    DnsConfig,
    EtcFilesError,
    NameFiles,
    render_hosts,
    render_resolv_conf,
    write_files,
)
from sandbox.shared.policy.defaults import etc_file_mounts


def test_default_files_use_slirps_resolver() -> None:
    files = NameFiles("hello", ("web", "sidecar"))
    assert render_hosts(files) == (b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                                   b"127.0.0.1\thello web sidecar\n")
    assert render_resolv_conf(files) == b"nameserver 10.0.2.3\n"


def test_a_groups_dns_config() -> None:
    dns = DnsConfig(("192.0.2.53", "2001:db8::53"), ("corp.example", "example."), ("ndots:2", "edns0"))
    assert render_resolv_conf(NameFiles("g", dns=dns)) == (
        b"nameserver 192.0.2.53\nnameserver 2001:db8::53\nsearch corp.example example.\noptions ndots:2 edns0\n")


def test_names_are_listed_once_and_localhost_is_not_remapped() -> None:
    files = NameFiles("app", ("app", "localhost", "db", "db"))
    assert render_hosts(files).splitlines()[-1] == b"127.0.0.1\tapp db"


@pytest.mark.parametrize("make", [
    lambda: DnsConfig(("8.8.8.8 1.1.1.1",)),
    lambda: DnsConfig(("8.8.8.8\nnameserver 6.6.6.6",)),
    lambda: DnsConfig(("ns.example",)),
    lambda: DnsConfig(()),
    lambda: DnsConfig(("1.1.1.1", "1.0.0.1", "8.8.8.8", "8.8.4.4")),
    lambda: DnsConfig(search=("corp.example\nnameserver 6.6.6.6",)),
    lambda: DnsConfig(search=("bad_domain.example",)),
    lambda: DnsConfig(search=tuple(f"d{i}.example" for i in range(7))),
    lambda: DnsConfig(options=("ndots:2\nnameserver 6.6.6.6",)),
    lambda: DnsConfig(options=("unknown-option",)),
    lambda: NameFiles("two words"),
    lambda: NameFiles(""),
    lambda: NameFiles("h" * 64),
    lambda: NameFiles("ok", ("evil\n6.6.6.6 bank.example",)),
])
def test_host_supplied_values_cannot_add_lines(make) -> None:
    with pytest.raises(EtcFilesError):
        make()


def test_write_files_and_their_mounts(tmp_path: Path) -> None:
    d = tmp_path / "c1" / "etc"
    write_files(d, NameFiles("grp", ("a", "b")))
    assert sorted(os.listdir(d)) == ["hostname", "hosts", "resolv.conf"]
    for name in ("hostname", "hosts", "resolv.conf"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o644
    assert (d / "hostname").read_bytes() == b"grp\n"
    assert [dict(m) for m in etc_file_mounts("c1")] == [
        {"destination": f"/etc/{n}", "type": "bind", "source": f"/run/parma/containers/c1/etc/{n}",
         "options": ("rbind", "rprivate", "rw")} for n in ("hostname", "hosts", "resolv.conf")]
    write_files(d, NameFiles("grp2"))            # rewritten in place, nothing left aside
    assert (d / "hostname").read_bytes() == b"grp2\n"
    assert sorted(os.listdir(d)) == ["hostname", "hosts", "resolv.conf"]
