"""What this host publishes in the registry on its own account. Pure: decisions as data; the
agent writes them (``EtcdClient.hold`` / ``delete_if_unchanged``) and schedules the writes.

``LocalEndpoints``, publishing the MACs that send from this host's TAPs:
- every TAP's own MAC is an endpoint of this host from the start, with the host's overlay
  address (``--address``) if it has one;
- a MAC the fast path reports as newly seen behind a TAP (``ForwardingCore.take_local``: the
  MAC, and the address it sent from, None if none yet: its first IPv4 and its first global
  IPv6 address) becomes an endpoint of this host on that VNI, with every address it was
  reported with, sorted, in ``ipv4`` and ``ipv6``;
- a MAC that an attached container owns is not published from here: attach publishes it with
  its assigned address, which is authoritative (and a frame it sent before a detach, read after
  it, must not publish it again: the ``owned`` predicate says so);
- each report yields the endpoint to write now; writing the same value again is harmless.

``LeaseSweep``, after resuming the previous agent's lease (a restart within the TTL): the keys
that lease still holds but this agent does not (member keys of networks no longer joined, the
endpoints and addresses of containers not adopted, MACs the old agent had learned) must be
deleted, or they would live as long as the lease, which is now forever. Each is deleted only if
unchanged since it was read (its mod_revision), so nothing written meanwhile is lost.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Iterable, Mapping

from overlay.core.addresses import IPAddress
from overlay.core.registry import AddressKey, Endpoint, EndpointKey, Key, MemberKey, Registry


class LocalEndpoints:
    """The endpoints of MACs behind this host's TAPs; see the module docstring for the rules."""

    def __init__(self, host_id: str, taps: Mapping[int, int], address: ipaddress.IPv4Address | None) -> None:
        self.host_id = host_id
        own = {str(address)} if address is not None else set()
        self.addresses: dict[tuple[int, int], set[str]] = {(vni, mac): set(own) for vni, mac in taps.items()}

    def add(self, vni: int, mac: int, address: ipaddress.IPv4Address | None = None) -> tuple[EndpointKey, Endpoint]:
        """A TAP joined at run time (network ``vni``, its bridge's ``mac``): its endpoint, to hold."""
        self.addresses[vni, mac] = {str(address)} if address is not None else set()
        return self.endpoint(vni, mac)

    def remove(self, vni: int) -> list[EndpointKey]:
        """Network ``vni`` was left: the endpoints of MACs seen behind its TAP, to release."""
        gone = [k for k in self.addresses if k[0] == vni]
        for k in gone:
            del self.addresses[k]
        return [EndpointKey(vni, mac) for _, mac in gone]

    def initial(self) -> list[tuple[EndpointKey, Endpoint]]:
        """The TAPs' own endpoints, to hold from the start."""
        return [self.endpoint(vni, mac) for vni, mac in self.addresses]

    def endpoint(self, vni: int, mac: int) -> tuple[EndpointKey, Endpoint]:
        known = sorted(self.addresses.get((vni, mac), ()))
        return EndpointKey(vni, mac), Endpoint(
            self.host_id, [a for a in known if ":" not in a], [a for a in known if ":" in a]
        )

    def seen(
        self, local: Iterable[tuple[int, int, IPAddress | None]], owned: Callable[[int, int], bool]
    ) -> list[tuple[EndpointKey, Endpoint]]:
        """MACs newly seen sending from a TAP, as (vni, mac, address or None): the endpoints to
        write now, one per report (a container's MAC excepted)."""
        out = []
        for vni, mac, ip in local:
            if owned(vni, mac):
                continue
            known = self.addresses.setdefault((vni, mac), set())
            if ip is not None:
                known.add(str(ip))
            out.append(self.endpoint(vni, mac))
        return out


class LeaseSweep:
    """The keys a resumed lease holds that this agent does not; see the module docstring."""

    def __init__(self, host_id: str) -> None:
        self.host_id = host_id

    def leftovers(self, registry: Registry, held: Collection[Key]) -> list[tuple[Key, int]]:
        """(key, mod_revision to delete it at) for every key of this host that is not held."""
        out: list[tuple[Key, int]] = []
        for key, entry in registry.entries.items():
            if key in held:
                continue
            if isinstance(key, MemberKey):
                mine = key.host == self.host_id
            elif isinstance(key, (EndpointKey, AddressKey)):
                mine = getattr(entry.value, "host", None) == self.host_id
            else:
                mine = False
            if mine:
                out.append((key, entry.mod_revision))
        return sorted(out, key=lambda kr: kr[1])  # in the order they were written
