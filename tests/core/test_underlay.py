"""Which family two hosts talk over (core/underlay.py), the registry's host and network
values of both families, and the agent flags that choose them. Pure."""

from __future__ import annotations

import ipaddress

import pytest

from overlay.core.config import ConfigError, build
from overlay.core.fdb import ForwardingTable, Vtep
from overlay.core.registry import Host, HostKey, Network, NetworkKey, check
from overlay.core.underlay import Underlay

V4, V6 = ipaddress.IPv4Address("198.18.0.1"), ipaddress.IPv6Address("2001:2:0:1::1")
DUAL = Host("198.18.0.2", 4789, address6="2001:2:0:1::2")
ONLY4, ONLY6 = Host("198.18.0.3"), Host("2001:2:0:1::3")


@pytest.mark.parametrize(
    ("me", "peer", "vtep"),
    [
        (Underlay(V4, V6), DUAL, "[2001:2:0:1::2]:4789"),  # both share both: IPv6
        (Underlay(V4, V6, prefer=4), DUAL, "198.18.0.2:4789"),  # unless told 4
        (Underlay(V4, V6), ONLY4, "198.18.0.3:4789"),
        (Underlay(V4, V6), ONLY6, "[2001:2:0:1::3]:4789"),
        (Underlay(V4), DUAL, "198.18.0.2:4789"),
        (Underlay(None, V6, prefer=4), DUAL, "[2001:2:0:1::2]:4789"),  # 4 preferred but not had
        (Underlay(V4, V6), Host("198.18.0.2", address6="2001:2:0:1::2", underlay_family=4), "198.18.0.2:4789"),
        (Underlay(V4, V6), Host("198.18.0.2", address6="2001:2:0:1::2", underlay_family=6), "[2001:2:0:1::2]:4789"),
        (Underlay(V4), ONLY6, None),  # nothing shared: unreachable
        (Underlay(None, V6), ONLY4, None),
    ],
)
def test_two_hosts_talk_over_a_family_they_share(me: Underlay, peer: Host, vtep: str | None) -> None:
    got = me.vtep(peer)
    assert (str(got) if got else None) == vtep


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (Host("nope"), "not an IPv4 or IPv6 address"),
        (Host("2001:2:0:1::1", address6="2001:2:0:1::2"), "address6 is for an IPv4 host"),
        (Host("198.18.0.1", address6="198.18.0.2"), "not an IPv6 address"),
        (Host("::"), "not a unicast address"),
        (Host("198.18.0.1", address6="ff02::1"), "not a unicast address"),
        (Host("198.18.0.1", underlay_family=5), "underlay_family 5 is not 4 or 6"),
    ],
)
def test_bad_host_values_say_what_is_wrong(value: Host, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check(HostKey("h1"), value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (Network(42, subnet6="2001:2::/48"), r"is a /48: use a /64 to /120"),
        (Network(42, subnet6="2001:2:0:42::/124"), "is a /124"),
        (Network(42, subnet6="198.19.42.0/24"), "not an IPv6 network"),
        (Network(42, subnet6="2001:2:0:42::/64", gateway6="2001:2:0:43::1"), "not a host address of subnet6"),
        (Network(42, subnet6="2001:2:0:42::/64", gateway6="2001:2:0:42::"), "not a host address of subnet6"),
    ],
)
def test_bad_network_values_say_what_is_wrong(value: Network, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check(NetworkKey(42), value)


def test_good_dual_stack_values_pass() -> None:
    check(HostKey("h1"), DUAL)
    check(HostKey("h1"), ONLY6)
    check(NetworkKey(42), Network(42, subnet="198.19.42.0/24", subnet6="2001:2:0:42::/64", gateway6="2001:2:0:42::1"))
    assert DUAL.addresses() == (ipaddress.IPv4Address("198.18.0.2"), ipaddress.IPv6Address("2001:2:0:1::2"))


def static(**kw: object) -> dict[str, object]:
    return {"vni": 42, "local": "198.18.0.1", **kw}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (static(peer=["2001:2:0:1::2"]), "is IPv6 but this host has no IPv6 underlay address"),
        (static(local="2001:2:0:1::1", peer=["198.18.0.2"]), "is IPv4 but this host has no IPv4 underlay address"),
        (static(local="2001:2:0:1::1", local6="2001:2:0:1::9"), "--local6 is the IPv6 address of a host whose"),
        (static(local6="198.18.0.9"), "--local6 is the IPv6 address"),
        (static(underlay_family="5"), "underlay_family: '5' is not one of auto, 6, 4"),
        (static(local="ff02::1"), "not a unicast address"),
        (static(local6="2001:2:0:1::1", peer=["2001:2:0:1::1"]), "this host's own --local address"),
    ],
)
def test_bad_underlay_flags_are_one_clear_error(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build(settings)


def test_a_dual_stack_config_reaches_peers_of_both_families() -> None:
    cfg = build(static(local6="2001:2:0:1::1", peer=["198.18.0.2", "2001:2:0:1::2"], underlay_family="4"))
    assert cfg.locals == (V4, V6)
    assert cfg.underlay == Underlay(V4, V6, prefer=4)


def test_a_flood_list_may_mix_families() -> None:
    t = ForwardingTable()
    t.add_vni(42)
    vteps = [Vtep.parse("2001:2:0:1::2"), Vtep.parse("198.18.0.2"), Vtep.parse("2001:2:0:1::1", 8472)]
    t.set_flood(42, vteps)
    assert list(t.flood(42)) == sorted(vteps, key=Vtep.order)


def test_the_family_of_a_pair_is_the_same_seen_from_either_end() -> None:
    """Whatever each end prefers, both compute one family: each receives from where the other
    sends (the source check holds both ways)."""
    a4, a6 = ipaddress.IPv4Address("198.18.0.1"), ipaddress.IPv6Address("2001:2:0:1::1")
    b4, b6 = ipaddress.IPv4Address("198.18.0.2"), ipaddress.IPv6Address("2001:2:0:1::2")
    for pa in (4, 6):
        for pb in (4, 6):
            a, b = Underlay(a4, a6, pa), Underlay(b4, b6, pb)
            host_a = Host(str(a4), address6=str(a6), underlay_family=4 if pa == 4 else None)
            host_b = Host(str(b4), address6=str(b6), underlay_family=4 if pb == 4 else None)
            to_b, to_a = a.vtep(host_b), b.vtep(host_a)
            assert to_b is not None and to_a is not None and to_b.ip.version == to_a.ip.version
            assert to_b.ip.version == (4 if 4 in (pa, pb) else 6)
