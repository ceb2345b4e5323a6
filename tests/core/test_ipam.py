"""Address picking for attached containers (overlay/core/ipam.py): pure, no etcd."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.core import ipam
from overlay.core.ipam import IpamError
from overlay.core.registry import Network, Registry

P = "/overlay/v1"
A = ipaddress.IPv4Address
I = ipaddress.IPv4Interface
NET = Network(42, "blue", "198.19.42.0/24")


def kv(key: str, value: object, mod: int) -> tuple[str, bytes, int]:
    return (P + key, json.dumps(value).encode(), mod)


def addresses(*last: int, base: str = "198.19.42.") -> set[ipaddress.IPv4Address]:
    return {A(f"{base}{n}") for n in last}


# --- pick ---------------------------------------------------------------------------------------


def test_pick_gives_the_lowest_free_address_with_the_subnets_prefix() -> None:
    assert ipam.pick(NET, set()) == I("198.19.42.1/24")
    assert ipam.pick(NET, addresses(1, 2, 4)) == I("198.19.42.3/24")


def test_pick_never_gives_the_network_broadcast_or_gateway_address() -> None:
    with_gateway = Network(42, "blue", "198.19.42.0/24", gateway="198.19.42.1")
    assert ipam.pick(with_gateway, set()) == I("198.19.42.2/24")
    assert ipam.reserved(with_gateway) == addresses(0, 1, 255)
    assert ipam.reserved(NET) == addresses(0, 255)
    assert ipam.pick(NET, addresses(*range(1, 254))) == I("198.19.42.254/24")  # .255 is next: broadcast


def test_an_exhausted_subnet_is_an_address_error_that_says_what_to_do() -> None:
    small = Network(7, "tiny", "198.19.7.0/30")  # .1 and .2 usable
    assert ipam.pick(small, addresses(1, base="198.19.7.")) == I("198.19.7.2/30")
    with pytest.raises(IpamError, match=r"network tiny's subnet 198.19.7.0/30 has no free address left: detach") as e:
        ipam.pick(small, addresses(1, 2, base="198.19.7."))
    assert e.value.kind == "address"


def test_a_network_without_a_subnet_is_a_network_error_naming_the_fix() -> None:
    bare = Network(9, "red")
    for call in (
        lambda: ipam.pick(bare, set()),
        lambda: ipam.subnet_of(bare),
        lambda: ipam.reserved(bare),
        lambda: ipam.check(bare, I("198.19.9.5/24"), set()),
    ):
        with pytest.raises(
            IpamError,
            match=r"network red has no subnet to allocate from: give --ip, or set one "
            r"with 'overlay net create red --vni 9 --subnet",
        ) as e:
            call()
        assert e.value.kind == "network"


def test_a_network_without_a_name_is_named_by_its_vni() -> None:
    with pytest.raises(IpamError, match="network 9 has no subnet"):
        ipam.pick(Network(9), set())


def test_subnet_of_is_the_networks_subnet() -> None:
    assert ipam.subnet_of(NET) == ipaddress.IPv4Network("198.19.42.0/24")


def test_a_31_and_a_32_give_no_address() -> None:
    """Both addresses of a /31 are the 'network' and 'broadcast' of ipaddress, the one of a /32
    both at once: such a subnet never has a free address (point-to-point use, RFC 3021, is not
    offered). Pinned so a change is deliberate."""
    for subnet in ("198.19.5.0/31", "198.19.5.7/32"):
        net = Network(5, "p2p", subnet)
        with pytest.raises(IpamError, match="has no free address left") as e:
            ipam.pick(net, set())
        assert e.value.kind == "address"
        with pytest.raises(IpamError, match="is reserved"):
            ipam.check(net, I(f"{ipaddress.IPv4Network(subnet)[0]}/{subnet.split('/')[1]}"), set())


# --- taken ----------------------------------------------------------------------------------------


def test_taken_counts_claims_and_addresses_announced_by_endpoints_of_that_network_only() -> None:
    r = Registry()
    r.snapshot(
        [
            kv("/networks/42", {"vni": 42, "subnet": "198.19.42.0/24"}, 2),
            kv("/networks/42/ipam/198.19.42.3", {"host": "h1", "mac": "02:00:00:00:00:03", "owner": "cni/x/eth0"}, 3),
            kv("/networks/42/endpoints/02:00:00:00:00:01", {"host": "h1", "ipv4": ["198.19.42.1"]}, 4),  # a bridge
            kv("/networks/42/endpoints/02:00:00:00:00:02", {"host": "h2", "ipv4": ["198.19.42.2", "198.19.42.9"]}, 5),
            kv("/networks/7/ipam/198.19.42.4", {"host": "h1"}, 6),  # another network: same address is free here
            kv("/networks/7/endpoints/02:00:00:00:00:05", {"host": "h1", "ipv4": ["198.19.42.5"]}, 7),
        ],
        7,
    )
    used = ipam.taken(r, 42)
    assert used == addresses(1, 2, 3, 9)
    assert ipam.pick(NET, used) == I("198.19.42.4/24")
    assert ipam.taken(r, 99) == set()


# --- check (an explicit --ip) ----------------------------------------------------------------------


def test_check_accepts_a_free_address_in_the_subnet() -> None:
    ipam.check(NET, I("198.19.42.10/24"), addresses(1, 2))


@pytest.mark.parametrize(
    ("wanted", "message"),
    [
        (
            "198.19.43.10/24",
            r"address 198.19.43.10/24 is outside network blue's subnet 198.19.42.0/24: pick one in "
            r"198.19.42.0/24, or leave out --ip",
        ),
        ("198.19.42.10/16", r"so the prefix length must be /24"),
        ("198.19.42.10/25", r"so the prefix length must be /24"),
        ("198.19.42.0/24", r"address 198.19.42.0 is reserved in 198.19.42.0/24 \(network, broadcast or gateway"),
        ("198.19.42.255/24", r"address 198.19.42.255 is reserved"),
        ("198.19.42.1/24", r"address 198.19.42.1 is reserved"),  # the gateway
        ("198.19.42.2/24", r"address 198.19.42.2 is in use on network blue: pick another, or leave out --ip"),
    ],
)
def test_check_refuses_with_a_message_saying_why(wanted: str, message: str) -> None:
    net = Network(42, "blue", "198.19.42.0/24", gateway="198.19.42.1")
    with pytest.raises(IpamError, match=message) as e:
        ipam.check(net, I(wanted), addresses(2))
    assert e.value.kind == "address"


def test_check_takes_any_iterable_of_used_addresses() -> None:
    with pytest.raises(IpamError, match="in use"):
        ipam.check(NET, I("198.19.42.2/24"), iter([A("198.19.42.2")]))


# --- property -------------------------------------------------------------------------------------


@given(prefix=st.integers(min_value=26, max_value=30), data=st.data())
def test_pick_never_gives_a_taken_or_reserved_address_and_gives_the_lowest_free(
    prefix: int, data: st.DataObject
) -> None:
    subnet = ipaddress.IPv4Network(f"198.19.42.0/{prefix}")
    hosts = list(subnet)
    gateway = data.draw(st.none() | st.sampled_from(hosts))
    used = data.draw(st.sets(st.sampled_from(hosts)))
    net = Network(42, "blue", str(subnet), gateway=str(gateway) if gateway is not None else None)
    forbidden = used | {subnet.network_address, subnet.broadcast_address} | ({gateway} if gateway else set())
    free = [a for a in hosts if a not in forbidden]
    if not free:
        with pytest.raises(IpamError) as e:
            ipam.pick(net, used)
        assert e.value.kind == "address"
        return
    got = ipam.pick(net, used)
    assert got.network == subnet
    assert got.ip not in forbidden
    assert got.ip == min(free)


# --- IPv6 -----------------------------------------------------------------------------------------

A6 = ipaddress.IPv6Address
I6 = ipaddress.IPv6Interface
DUAL = Network(42, "blue", "198.19.42.0/24", subnet6="2001:2:0:42::/64", gateway6="2001:2:0:42::1")


def test_ipv6_picks_the_lowest_free_host_of_subnet6_never_the_anycast_or_gateway6() -> None:
    assert ipam.reserved(DUAL, 6) == {A6("2001:2:0:42::"), A6("2001:2:0:42::1")}
    assert ipam.pick(DUAL, set(), 6) == I6("2001:2:0:42::2/64")
    assert ipam.pick(DUAL, {A6("2001:2:0:42::2"), A6("2001:2:0:42::4"), A("198.19.42.3")}, 6) == I6("2001:2:0:42::3/64")
    assert ipam.pick(DUAL, {A6("2001:2:0:42::2")}) == I("198.19.42.1/24")  # families never mix


def test_ipv6_pick_looks_only_at_what_is_used_not_at_the_whole_64() -> None:
    used = {A6(f"2001:2:0:42::{n:x}") for n in range(2, 5002)}
    assert ipam.pick(DUAL, used, 6) == I6("2001:2:0:42::138a/64")  # 5002 = 0x138a, found at once


def test_ipv6_has_no_broadcast_the_last_address_of_a_small_subnet6_is_given() -> None:
    small = Network(42, "blue", subnet6="2001:2:0:42::/126")  # ::0 anycast, ::1 to ::3 hosts
    assert ipam.pick(small, {A6("2001:2:0:42::1"), A6("2001:2:0:42::2")}, 6) == I6("2001:2:0:42::3/126")
    with pytest.raises(IpamError, match=r"subnet6 2001:2:0:42::/126 has no free address left") as e:
        ipam.pick(small, {A6(f"2001:2:0:42::{n}") for n in (1, 2, 3)}, 6)
    assert e.value.kind == "address"


def test_a_network_without_subnet6_is_a_network_error_for_picks_and_an_address_error_for_ip6() -> None:
    with pytest.raises(IpamError, match="network blue has no subnet6") as e:
        ipam.pick(NET, set(), 6)
    assert e.value.kind == "network"
    with pytest.raises(IpamError, match=r"--ip6 2001:2:0:42::5/64: network blue has no subnet6") as e:
        ipam.check(NET, I6("2001:2:0:42::5/64"), set())
    assert e.value.kind == "address"


@pytest.mark.parametrize(
    "wanted, said",
    [
        (
            "2001:2:0:43::5/64",
            "outside network blue's subnet6 2001:2:0:42::/64: pick one in 2001:2:0:42::/64, or leave out --ip6",
        ),
        ("2001:2:0:42::5/96", "subnet6 is 2001:2:0:42::/64, so the prefix length must be /64"),
        ("2001:2:0:42::/64", "reserved in 2001:2:0:42::/64 (subnet-router anycast or gateway6 address)"),
        ("2001:2:0:42::1/64", "reserved"),
        ("2001:2:0:42::7/64", "2001:2:0:42::7 is in use on network blue: pick another, or leave out --ip6"),
    ],
)
def test_an_explicit_ipv6_address_must_fit_subnet6_and_be_free(wanted: str, said: str) -> None:
    with pytest.raises(IpamError, match=said.replace("(", r"\(").replace(")", r"\)")):
        ipam.check(DUAL, I6(wanted), {A6("2001:2:0:42::7")})
    ipam.check(DUAL, I6("2001:2:0:42::8/64"), {A6("2001:2:0:42::7")})


def test_taken_holds_ipv6_allocations_and_endpoints_ipv6_addresses() -> None:
    r = Registry()
    r.snapshot(
        [
            kv("/networks/42/ipam/2001:2:0:42::5", {"host": "h1"}, 1),
            kv("/networks/42/ipam/198.19.42.5", {"host": "h1"}, 2),
            kv(
                "/networks/42/endpoints/02:00:00:00:00:09",
                {"host": "h2", "ipv4": ["198.19.42.9"], "ipv6": ["2001:2:0:42::9"]},
                3,
            ),
        ],
        3,
    )
    assert ipam.taken(r, 42) == {A6("2001:2:0:42::5"), A("198.19.42.5"), A("198.19.42.9"), A6("2001:2:0:42::9")}
