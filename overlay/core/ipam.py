"""Address management for attached containers: which address of a network's subnet to take, of
either family. Pure: the registry says what is taken, the caller claims the pick in etcd with a
transaction (create only if absent), and on losing a race asks again with the loser's address
added.

IPv4 addresses come from the network's ``subnet``, IPv6 ones from its ``subnet6`` (``version``
4 or 6 says which). Never handed out: the subnet's network address (for IPv6 the
subnet-router anycast address) and, for IPv4, its broadcast address (IPv6 has none); the
network's ``gateway`` (``gateway6``); any address already claimed
(``networks/<vni>/ipam/<addr>``) and any address an endpoint already announces (a host's own
bridge address, an operator-written endpoint). A pick looks at no more addresses than are
taken or reserved, plus one: a /64 is never enumerated.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Literal

from overlay.core.addresses import IPAddress
from overlay.core.registry import Network, Registry

Version = Literal[4, 6]
Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class IpamError(ValueError):
    """No address can be given; the message says why and what to do. ``kind`` is "address"
    (taken, outside the subnet, none left) or "network" (the network has no subnet)."""

    def __init__(self, message: str, kind: str = "address") -> None:
        super().__init__(message)
        self.kind = kind


def _flag(version: Version) -> str:
    return "--ip" if version == 4 else "--ip6"


def _field(version: Version) -> str:
    return "subnet" if version == 4 else "subnet6"


def subnet_of(network: Network, version: Version = 4) -> Subnet:
    """The network's ``subnet`` (``version`` 4) or ``subnet6`` (6); IpamError if it has none."""
    name = network.name or network.vni
    if version == 6:
        if network.subnet6 is None:
            raise IpamError(
                f"network {name} has no subnet6, so it gives no IPv6 addresses: leave out --ip6, or define "
                f"the network with one ('overlay net create {network.vni} --subnet6 V6/64')",
                kind="network",
            )
        return ipaddress.IPv6Network(network.subnet6)
    if network.subnet is None:
        raise IpamError(
            f"network {name} has no subnet to allocate from: give --ip, or set one "
            f"with 'overlay net create {name} --vni {network.vni} --subnet A.B.C.D/len'",
            kind="network",
        )
    return ipaddress.IPv4Network(network.subnet)


def taken(registry: Registry, vni: int) -> set[IPAddress]:
    """Every address of ``vni``, of either family, that is in use: claimed, or announced by an
    endpoint."""
    used: set[IPAddress] = set(registry.allocations(vni))
    for endpoint in registry.endpoints(vni).values():
        used.update(ipaddress.IPv4Address(a) for a in endpoint.ipv4)
        used.update(ipaddress.IPv6Address(a) for a in endpoint.ipv6)
    return used


def reserved(network: Network, version: Version = 4) -> set[IPAddress]:
    """The addresses of the subnet of ``version`` never handed out (see the module docstring)."""
    subnet = subnet_of(network, version)
    out: set[IPAddress] = {subnet.network_address}
    if isinstance(subnet, ipaddress.IPv4Network):
        out.add(subnet.broadcast_address)
        if network.gateway is not None:
            out.add(ipaddress.IPv4Address(network.gateway))
    elif network.gateway6 is not None:
        out.add(ipaddress.IPv6Address(network.gateway6))
    return out


def check(network: Network, wanted: Interface, used: Iterable[IPAddress]) -> None:
    """Raise IpamError unless ``wanted`` (an explicit --ip or --ip6, by its family) fits the
    network and is free."""
    version: Version = 4 if wanted.version == 4 else 6
    flag, name = _flag(version), network.name or network.vni
    try:
        subnet = subnet_of(network, version)
    except IpamError as e:
        if version == 6:
            raise IpamError(f"--ip6 {wanted}: {e}", kind="address") from None
        raise
    if wanted.ip in subnet and wanted.network != subnet:
        raise IpamError(
            f"address {wanted}: network {name}'s {_field(version)} is {subnet}, so the "
            f"prefix length must be /{subnet.prefixlen}"
        )
    if wanted.network != subnet:
        raise IpamError(
            f"address {wanted} is outside network {name}'s {_field(version)} {subnet}: "
            f"pick one in {subnet}, or leave out {flag} to get one"
        )
    if wanted.ip in reserved(network, version):
        what = "network, broadcast or gateway address" if version == 4 else "subnet-router anycast or gateway6 address"
        raise IpamError(f"address {wanted.ip} is reserved in {subnet} ({what})")
    if wanted.ip in set(used):
        raise IpamError(
            f"address {wanted.ip} is in use on network {name}: pick another, or leave out {flag} to get a free one"
        )


def pick(network: Network, used: Iterable[IPAddress], version: Version = 4) -> Interface:
    """The lowest free address of the network's subnet of ``version``, with its prefix length.

    Lowest first, as operators expect from Docker; two hosts allocating at once then choose the
    same address, the etcd transaction lets one have it, and the other asks again. The walk
    from the bottom stops at the first address not skipped, so it looks at no more than
    len(skipped) + 1 addresses, however large the subnet."""
    subnet = subnet_of(network, version)
    skip = reserved(network, version) | set(used)
    for address in subnet:
        if address not in skip:
            return ipaddress.ip_interface(f"{address}/{subnet.prefixlen}")
    raise IpamError(
        f"network {network.name or network.vni}'s {_field(version)} {subnet} has no free address left: "
        f"detach containers or give the network a larger {_field(version)}"
    )
