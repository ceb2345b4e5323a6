"""Address management for attached containers: which address of a network's subnet to take.
Pure: the registry says what is taken, the caller claims the pick in etcd with a transaction
(create only if absent), and on losing a race asks again with the loser's address added.

Never handed out: the subnet's network and broadcast addresses, the network's gateway, any
address already claimed (``networks/<vni>/ipam/<addr>``) and any address an endpoint already
announces (a host's own bridge address, an operator-written endpoint).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from overlay.core.registry import Network, Registry


class IpamError(ValueError):
    """No address can be given; the message says why and what to do. ``kind`` is "address"
    (taken, outside the subnet, none left) or "network" (the network has no subnet)."""

    def __init__(self, message: str, kind: str = "address") -> None:
        super().__init__(message)
        self.kind = kind


def subnet_of(network: Network) -> ipaddress.IPv4Network:
    if network.subnet is None:
        raise IpamError(
            f"network {network.name or network.vni} has no subnet to allocate from: give --ip, or set one "
            f"with 'overlay net create {network.name or network.vni} --vni {network.vni} --subnet A.B.C.D/len'",
            kind="network",
        )
    return ipaddress.IPv4Network(network.subnet)


def taken(registry: Registry, vni: int) -> set[ipaddress.IPv4Address]:
    """Every address of ``vni`` that is in use: claimed, or announced by an endpoint."""
    used = set(registry.allocations(vni))
    for endpoint in registry.endpoints(vni).values():
        used.update(ipaddress.IPv4Address(a) for a in endpoint.ipv4)
    return used


def reserved(network: Network) -> set[ipaddress.IPv4Address]:
    subnet = subnet_of(network)
    out = {subnet.network_address, subnet.broadcast_address}
    if network.gateway is not None:
        out.add(ipaddress.IPv4Address(network.gateway))
    return out


def check(network: Network, wanted: ipaddress.IPv4Interface, used: Iterable[ipaddress.IPv4Address]) -> None:
    """Raise IpamError unless ``wanted`` (an explicit --ip) fits the network and is free."""
    subnet = subnet_of(network)
    if wanted.ip in subnet and wanted.network != subnet:
        raise IpamError(
            f"address {wanted}: network {network.name or network.vni}'s subnet is {subnet}, so the "
            f"prefix length must be /{subnet.prefixlen}"
        )
    if wanted.network != subnet:
        raise IpamError(
            f"address {wanted} is outside network {network.name or network.vni}'s subnet {subnet}: "
            f"pick one in {subnet}, or leave out --ip to get one"
        )
    if wanted.ip in reserved(network):
        raise IpamError(f"address {wanted.ip} is reserved in {subnet} (network, broadcast or gateway address)")
    if wanted.ip in set(used):
        raise IpamError(
            f"address {wanted.ip} is in use on network {network.name or network.vni}: "
            f"pick another, or leave out --ip to get a free one"
        )


def pick(network: Network, used: Iterable[ipaddress.IPv4Address]) -> ipaddress.IPv4Interface:
    """The lowest free address of the network's subnet, with the subnet's prefix length.

    Lowest first, as operators expect from Docker; two hosts allocating at once then choose the
    same address, the etcd transaction lets one have it, and the other asks again."""
    subnet = subnet_of(network)
    skip = reserved(network) | set(used)
    for address in subnet:
        if address not in skip:
            return ipaddress.IPv4Interface(f"{address}/{subnet.prefixlen}")
    raise IpamError(
        f"network {network.name or network.vni}'s subnet {subnet} has no free address left: "
        f"detach containers or give the network a larger subnet"
    )
