"""core.publishing: which endpoints a host publishes for the MACs behind its TAPs, and which
keys a resumed lease still holds that the agent does not. Pure: no etcd, no root."""

from __future__ import annotations

import ipaddress

from overlay.core.publishing import LeaseSweep, LocalEndpoints
from overlay.core.registry import (
    AddressKey,
    Allocation,
    Endpoint,
    EndpointKey,
    Host,
    HostKey,
    Member,
    MemberKey,
    Network,
    NetworkKey,
    Registry,
    Schema,
)

TAP = 0x020000000001
OTHER = 0x02AABBCCDD01


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def never(vni: int, mac: int) -> bool:
    return False


def test_each_tap_is_an_endpoint_of_this_host_with_the_host_address_from_the_start() -> None:
    local = LocalEndpoints("h1", {42: TAP, 43: TAP + 1}, ipaddress.IPv4Address("198.19.42.1"))
    assert local.initial() == [
        (EndpointKey(42, TAP), Endpoint("h1", ["198.19.42.1"])),
        (EndpointKey(43, TAP + 1), Endpoint("h1", ["198.19.42.1"])),
    ]


def test_a_host_without_an_address_publishes_its_taps_without_addresses() -> None:
    assert LocalEndpoints("h1", {42: TAP}, None).initial() == [(EndpointKey(42, TAP), Endpoint("h1", []))]


def test_a_new_mac_behind_the_tap_is_published_with_the_addresses_it_sent_from_sorted() -> None:
    local = LocalEndpoints("h1", {42: TAP}, None)
    assert local.seen([(42, OTHER, None)], never) == [(EndpointKey(42, OTHER), Endpoint("h1", []))]
    assert local.seen([(42, OTHER, ip("198.19.42.9"))], never) == [
        (EndpointKey(42, OTHER), Endpoint("h1", ["198.19.42.9"]))
    ]
    assert local.seen([(42, OTHER, ip("198.19.42.3"))], never) == [
        (EndpointKey(42, OTHER), Endpoint("h1", ["198.19.42.3", "198.19.42.9"]))
    ]


def test_the_same_mac_on_two_networks_is_two_endpoints() -> None:
    local = LocalEndpoints("h1", {}, None)
    out = local.seen([(42, OTHER, ip("198.19.42.9")), (43, OTHER, ip("198.19.43.9"))], never)
    assert out == [
        (EndpointKey(42, OTHER), Endpoint("h1", ["198.19.42.9"])),
        (EndpointKey(43, OTHER), Endpoint("h1", ["198.19.43.9"])),
    ]


def test_the_tap_keeps_the_host_address_when_it_is_seen_with_another() -> None:
    local = LocalEndpoints("h1", {42: TAP}, ipaddress.IPv4Address("198.19.42.1"))
    assert local.seen([(42, TAP, ip("198.19.42.200"))], never) == [
        (EndpointKey(42, TAP), Endpoint("h1", ["198.19.42.1", "198.19.42.200"]))
    ]


def test_a_container_mac_is_never_published_from_here() -> None:
    local = LocalEndpoints("h1", {42: TAP}, None)
    owned = {(42, OTHER)}
    assert local.seen([(42, OTHER, ip("198.19.42.9")), (43, OTHER, None)], lambda v, m: (v, m) in owned) == [
        (EndpointKey(43, OTHER), Endpoint("h1", []))
    ]
    assert (42, OTHER) not in local.addresses  # nothing remembered for it either


def registry(*items: tuple[object, object], revision: int = 10) -> Registry:
    reg = Registry(Schema())
    kvs = []
    for n, (key, value) in enumerate(items, start=1):
        kvs.append((reg.schema.key(key), reg.schema.encode(value), n))  # type: ignore[arg-type]
    reg.snapshot(kvs, revision)
    return reg


def test_a_resumed_lease_sweeps_only_this_hosts_keys_that_are_not_held() -> None:
    reg = registry(
        (HostKey("h1"), Host("198.18.0.1", 4789)),
        (NetworkKey(42), Network(42, "blue")),
        (MemberKey(42, "h1"), Member()),  # held: stays
        (MemberKey(43, "h1"), Member()),  # a network no longer joined: swept
        (MemberKey(43, "h2"), Member()),  # another host's: stays
        (EndpointKey(42, TAP), Endpoint("h1", ["198.19.42.1"])),  # held
        (EndpointKey(42, OTHER), Endpoint("h1", ["198.19.42.9"])),  # a learned MAC of the old agent: swept
        (EndpointKey(42, OTHER + 1), Endpoint("h2", [])),  # another host's
        (AddressKey(42, ipaddress.IPv4Address("198.19.42.9")), Allocation("h1", "02:aa:bb:cc:dd:01", "x")),  # swept
        (AddressKey(42, ipaddress.IPv4Address("198.19.42.8")), Allocation("h2", "02:aa:bb:cc:dd:02", "y")),
    )
    held = {HostKey("h1"), MemberKey(42, "h1"), EndpointKey(42, TAP)}
    assert LeaseSweep("h1").leftovers(reg, held) == [
        (MemberKey(43, "h1"), 4),
        (EndpointKey(42, OTHER), 7),
        (AddressKey(42, ipaddress.IPv4Address("198.19.42.9")), 9),
    ]


def test_nothing_to_sweep_when_everything_of_this_host_is_held() -> None:
    reg = registry((HostKey("h1"), Host("198.18.0.1", 4789)), (MemberKey(42, "h1"), Member()))
    assert LeaseSweep("h1").leftovers(reg, {HostKey("h1"), MemberKey(42, "h1")}) == []


def test_a_mac_seen_with_ipv6_publishes_it_beside_its_ipv4() -> None:
    local = LocalEndpoints("h1", {42: TAP}, None)
    local.seen([(42, OTHER, ip("198.19.42.9"))], never)
    assert local.seen([(42, OTHER, ip("2001:2:0:42::9"))], never) == [
        (EndpointKey(42, OTHER), Endpoint("h1", ["198.19.42.9"], ["2001:2:0:42::9"]))
    ]
