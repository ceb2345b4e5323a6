"""overlay.lab.netns: the underlay of IPv4, IPv6-only and dual-stack labs (addresses, ping over
each family, no router advertisements, service hosts) and nothing left behind."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from typing import Iterator

import pytest

from overlay.lab import Lab, LabError
from tests.labkit import Labs

TAG = os.getpid() % 100000
PREFIX = f"tn{TAG}x"  # this module's labs
_made: list[int] = []

pytestmark = pytest.mark.root


def lab_name() -> str:
    _made.append(len(_made) + 1)
    return f"{PREFIX}{_made[-1]}"


def lab_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[0].startswith(PREFIX)]


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    yield
    assert lab_namespaces() == []
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10).stdout
    assert PREFIX not in links


def eth0(lab: Lab, host: int | str) -> list[str]:
    """The global addresses on eth0 in ``host``, as ``ip`` shows them (address/prefix)."""
    out = lab.run(host, ["ip", "-o", "addr", "show", "dev", "eth0", "scope", "global"], timeout=10).stdout
    return [line.split()[3] for line in out.splitlines()]


def pings(lab: Lab, src: int | str, dst: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    argv = ["ping", f"-{dst.version}", "-n", "-c", "1", "-W", "2", str(dst)]
    return lab.run(src, argv, check=False, timeout=10).returncode == 0


def test_default_lab_is_ipv4_only_as_before() -> None:
    with Lab(lab_name(), hosts=2) as lab:
        assert lab.family == "ipv4" and lab.has_ipv4 and not lab.has_ipv6
        assert lab.address(1) == ipaddress.IPv4Address("198.18.0.1")
        assert lab.interfaces(2) == [ipaddress.IPv4Interface("198.18.0.2/24")]
        assert eth0(lab, 1) == ["198.18.0.1/24"]
        with pytest.raises(LabError, match="IPv4 underlay only"):
            lab.address6(1)
        assert pings(lab, 1, lab.address(2))
        lab.add_service("etcd1", 250)
        assert lab.services["etcd1"] == lab.address("etcd1") == ipaddress.IPv4Address("198.18.0.250")
        assert pings(lab, "etcd1", lab.address(1))


def test_ipv6_only_lab_hosts_ping6_each_other_and_have_no_ipv4() -> None:
    with Lab(lab_name(), hosts=3, ipv6=True) as lab:
        assert lab.family == "ipv6" and lab.has_ipv6 and not lab.has_ipv4
        for h in (1, 2, 3):
            assert lab.address(h) == lab.address6(h) == ipaddress.IPv6Address(f"2001:2:0:1::{h}")
            assert lab.interfaces(h) == [ipaddress.IPv6Interface(f"2001:2:0:1::{h}/64")]
            assert eth0(lab, h) == [f"2001:2:0:1::{h}/64"]
            # ready at once: added without DAD, and up() waited until none is tentative
            tentative = lab.run(h, ["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global", "tentative"])
            assert tentative.stdout == ""
            assert lab.run(h, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout == ""
            sysctl = lab.run(h, ["sysctl", "-n", "net.ipv6.conf.eth0.accept_ra", "net.ipv6.conf.eth0.disable_ipv6"])
            assert sysctl.stdout.split() == ["0", "0"]
        for src in (1, 2, 3):
            for dst in (1, 2, 3):
                if src != dst:
                    assert pings(lab, src, lab.address6(dst)), (src, dst)
        assert not pings(lab, 1, ipaddress.IPv4Address("198.18.0.2"))  # no IPv4 underlay at all
        # a service host takes the mirror of its IPv4 address: .250 -> ::250
        lab.add_service("etcd1", 250)
        assert lab.services["etcd1"] == lab.address6("etcd1") == ipaddress.IPv6Address("2001:2:0:1::250")
        assert eth0(lab, "etcd1") == ["2001:2:0:1::250/64"]
        assert pings(lab, "etcd1", lab.address6(2)) and pings(lab, 3, lab.address6("etcd1"))
    assert lab.namespaces() == []


def test_dual_stack_lab_has_both_families() -> None:
    with Lab(lab_name(), hosts=2, dual_stack=True) as lab:
        assert lab.family == "dual-stack" and lab.has_ipv4 and lab.has_ipv6
        assert lab.address(1) == ipaddress.IPv4Address("198.18.0.1")  # the primary one stays IPv4
        assert lab.address6(1) == ipaddress.IPv6Address("2001:2:0:1::1")
        assert [str(i) for i in lab.interfaces(2)] == ["198.18.0.2/24", "2001:2:0:1::2/64"]
        assert sorted(eth0(lab, 2)) == ["198.18.0.2/24", "2001:2:0:1::2/64"]
        assert pings(lab, 1, lab.address(2)) and pings(lab, 1, lab.address6(2))
        lab.add_service("inet", 201)
        assert lab.services["inet"] == ipaddress.IPv4Address("198.18.0.201")
        assert [str(i) for i in lab.interfaces("inet")] == ["198.18.0.201/24", "2001:2:0:1::201/64"]
        assert pings(lab, "inet", lab.address(2)) and pings(lab, "inet", lab.address6(2))


def test_lab_checks_what_it_is_asked_for() -> None:
    with pytest.raises(LabError, match="1280"):
        Lab(lab_name(), hosts=1, ipv6=True, mtu=1200)
    lab = Lab(lab_name(), hosts=1, ipv6=True)
    with pytest.raises(LabError, match="no service 'etcd1'"):
        lab.address("etcd1")


def test_ipv6_lab_down_from_another_lab_object_removes_everything() -> None:
    name = lab_name()
    lab = Lab(name, hosts=2, ipv6=True).up()
    try:
        lab.add_service("etcd1", 250)
        lab.spawn(1, ["sleep", "600"], stdout=subprocess.DEVNULL)  # down() kills it by PID
        other = Lab(name, hosts=2, ipv6=True)  # as `overlay lab down --name ...` sees it
        assert sorted(other.namespaces()) == sorted([f"{name}-h1", f"{name}-h2", f"{name}-etcd1", lab.switch])
        other.down()
        assert lab.namespaces() == []
    finally:
        lab.down()


def test_the_labs_fixture_builds_ipv6_labs_too(labs: Labs) -> None:
    lab = labs(hosts=2, ipv6=True)
    assert lab.family == "ipv6" and pings(lab, 2, lab.address(1))
    assert labs(hosts=1, dual_stack=True).family == "dual-stack"
