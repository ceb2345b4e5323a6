"""What this host's forwarding table holds, given the registry. Pure.

For every VNI this host serves:
- the flood list is every other member host of the VNI whose host record is known and that
  shares an underlay family with this host (address and port from ``hosts/<id>``, the family
  chosen by ``core.underlay``; a host it cannot reach is left out, as if unknown);
- every endpoint owned by another known host is a REGISTRY entry (MAC -> that host's VTEP);
- endpoints of this host, of unknown hosts, or on VNIs not served are not forwarded to;
- the IPv4 and IPv6 addresses of other hosts' endpoints are the neighbours whose ARP requests
  and neighbour solicitations the agent answers itself (ARP and NS suppression): a request for
  one never leaves the host. An address
  claimed by two endpoints (a container restarted with a new MAC) goes to the most recently
  written one (highest mod_revision, then highest MAC).
``desired`` computes this from scratch. ``Topology`` keeps the table equal to it by applying the
difference each event makes, at a cost that does not grow with the registry: an endpoint event
touches that MAC and its addresses; a host's address change touches that host's endpoints (the
registry's index by host) and the flood lists it is in; a member event, one flood list.
Learned and static entries are the table's business; registry entries simply take precedence
over learned ones.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable

from overlay.core.addresses import IPAddress, ipv4, is_ipv4
from overlay.core.fdb import ForwardingTable, Outcome, Source, Vtep
from overlay.core.registry import Deleted, Endpoint, EndpointKey, Event, HostKey, MemberKey, Registry
from overlay.core.underlay import Underlay

_REFUSED = (Outcome.REFUSED_CAP, Outcome.REFUSED_UNKNOWN_VNI, Outcome.REFUSED_MULTICAST)


def _ip(text: str) -> IPAddress:
    """An endpoint's address (checked when decoded): IPv4 by the fast parser."""
    return ipv4(text) if is_ipv4(text) else ipaddress.IPv6Address(text)


def _addresses(ep: Endpoint) -> set[str]:
    return set(ep.ipv4).union(ep.ipv6) if ep.ipv6 else set(ep.ipv4)


def reachable_vteps(registry: Registry, host_id: str, underlay: Underlay) -> dict[str, Vtep]:
    """The VTEP of every other host this one can reach."""
    out = {}
    for h, v in registry.hosts().items():
        if h != host_id and (vtep := underlay.vtep(v)) is not None:
            out[h] = vtep
    return out


@dataclass
class Desired:
    """What one VNI's forwarding state should be: REGISTRY entries, flood list, neighbours."""

    fdb: dict[int, Vtep]
    flood: set[Vtep]
    neighbours: dict[IPAddress, int]


def desired(registry: Registry, host_id: str, vni: int, underlay: Underlay | None = None) -> Desired:
    """The forwarding state of ``vni`` computed from the whole registry (the reference the
    incremental ``Topology`` is tested against; it walks the VNI)."""
    vteps = reachable_vteps(registry, host_id, underlay or Underlay.any())
    flood = {vteps[m] for m in registry.members(vni) if m in vteps}
    fdb: dict[int, Vtep] = {}
    best: dict[IPAddress, tuple[int, int]] = {}
    for mac, ep, rev in registry.endpoint_entries(vni):
        if ep.host in vteps:
            fdb[mac] = vteps[ep.host]
            for a in _addresses(ep):
                ip = _ip(a)
                if ip not in best or best[ip] < (rev, mac):
                    best[ip] = (rev, mac)
    return Desired(fdb, flood, {ip: mac for ip, (_, mac) in best.items()})


class _Served:
    """What Topology keeps of one served VNI beside the table."""

    __slots__ = ("flood", "contested", "refused")

    def __init__(self) -> None:
        self.flood: dict[str, Vtep] = {}  # member host -> its VTEP
        self.contested: dict[IPAddress, dict[int, tuple[int, int]]] = {}  # ip -> claimant MAC -> (rev, mac)
        self.refused: set[int] = set()  # MACs the table refused (at its cap): tried again when room is made


class Topology:
    def __init__(
        self, registry: Registry, table: ForwardingTable, host_id: str, underlay: Underlay | None = None
    ) -> None:
        self.registry, self.table, self.host_id = registry, table, host_id
        self.underlay = underlay or Underlay.any()
        self._vteps: dict[str, Vtep] = reachable_vteps(registry, host_id, self.underlay)
        self._served: dict[int, _Served] = {}
        self._dirty: set[int] = set()
        self.now = 0.0

    def serve(self, vni: int, now: float) -> None:
        """Start serving ``vni``: table and flood list from what the registry holds (a walk of
        that VNI, once)."""
        self.now = now
        self.table.add_vni(vni)
        if vni in self._served:
            return
        s = self._served[vni] = _Served()
        for host in self.registry.members(vni):
            if host in self._vteps:
                s.flood[host] = self._vteps[host]
        self.table.set_flood(vni, list(s.flood.values()))
        for mac, ep, _ in list(self.registry.endpoint_entries(vni)):
            self._endpoint(vni, s, mac, None, ep)

    def unserve(self, vni: int) -> None:
        """Stop serving ``vni``: its entries, flood list and neighbours leave the table."""
        if self._served.pop(vni, None) is not None:
            self.table.remove_vni(vni)

    def apply(self, events: Iterable[Event], now: float) -> None:
        self.now = now
        self._dirty = set()  # VNIs whose flood list changed: pushed once, at the end
        for ev in events:
            k = ev.key
            if isinstance(k, EndpointKey):
                s = self._served.get(k.vni)
                if s is None:
                    continue
                if isinstance(ev, Deleted):
                    self._endpoint(k.vni, s, k.mac, ev.value, None)  # type: ignore[arg-type]
                else:
                    self._endpoint(k.vni, s, k.mac, ev.old, ev.value)  # type: ignore[arg-type]
            elif isinstance(k, HostKey):
                if k.host != self.host_id:
                    self._host(k.host, None if isinstance(ev, Deleted) else self.underlay.vtep(ev.value))  # type: ignore[arg-type]
            elif isinstance(k, MemberKey):
                s = self._served.get(k.vni)
                if s is None or k.host == self.host_id:
                    continue
                vtep = self._vteps.get(k.host)
                if isinstance(ev, Deleted) or vtep is None:
                    if s.flood.pop(k.host, None) is None:
                        continue
                else:
                    s.flood[k.host] = vtep
                self._dirty.add(k.vni)
        for vni in self._dirty:
            if (s := self._served.get(vni)) is not None:
                self.table.set_flood(vni, list(s.flood.values()))
        self._dirty = set()

    # --- internals ------------------------------------------------------------------------------

    def _host(self, host: str, vtep: Vtep | None) -> None:
        """A host's record appeared, changed or went: its endpoints and flood entries follow."""
        before = self._vteps.get(host)
        if before == vtep:
            return
        if before is not None and vtep is not None:  # a new address: its entries move, their addresses stay
            self._vteps[host] = vtep
            for vni, s in self._served.items():
                for mac in self.registry.endpoints_of(host, vni):
                    if mac not in s.refused:
                        self.table.put(vni, mac, vtep, Source.REGISTRY, self.now)
                if host in s.flood:
                    s.flood[host] = vtep
                    self._dirty.add(vni)
            return
        for vni, s in self._served.items():
            macs = self.registry.endpoints_of(host, vni)
            if before is not None:  # placed at the old VTEP: take them (and their addresses) back
                for mac in macs:
                    ep = self.registry.endpoint(vni, mac)
                    if ep is not None:
                        self._endpoint(vni, s, mac, ep, None)
        if vtep is None:
            self._vteps.pop(host, None)
        else:
            self._vteps[host] = vtep
        for vni, s in self._served.items():
            for mac in self.registry.endpoints_of(host, vni):
                ep = self.registry.endpoint(vni, mac)
                if ep is not None:
                    self._endpoint(vni, s, mac, None, ep)
            if self.registry.is_member(vni, host) or host in s.flood:
                if vtep is None:
                    s.flood.pop(host, None)
                else:
                    s.flood[host] = vtep
                self._dirty.add(vni)

    def _target(self, ep: Endpoint | None) -> Vtep | None:
        """Where an endpoint is forwarded to: its host's VTEP, if known and not this host."""
        if ep is None or ep.host == self.host_id:
            return None
        return self._vteps.get(ep.host)

    def _endpoint(self, vni: int, s: _Served, mac: int, old: Endpoint | None, new: Endpoint | None) -> None:
        """The endpoint at ``mac`` went from ``old`` to ``new`` (either may be None): change
        only what differs, so an address change leaves the MAC's entry alone and a rewrite of
        the same value only reorders contested addresses."""
        # What is in the table is the truth of what was placed (within a batch of a resync the
        # registry is already past the events, e.g. a host deleted before its endpoints).
        before = self.table.claim(vni, mac, Source.REGISTRY)
        placed = before is not None or mac in s.refused
        after = self._target(new)
        gone = _addresses(old) if old is not None and placed else set()
        now = _addresses(new) if new is not None and after is not None else set()
        order = (self.registry.revision_of(EndpointKey(vni, mac)), mac)
        for a in gone - now:
            self._unclaim(vni, s, _ip(a), mac)
        if after is None:
            if mac in s.refused:
                s.refused.discard(mac)
            elif before is not None and self.table.remove(vni, mac, Source.REGISTRY):
                self._retry_refused(vni, s)
        elif after != before or mac in s.refused:
            if self.table.put(vni, mac, after, Source.REGISTRY, self.now) in _REFUSED:
                s.refused.add(mac)
            else:
                s.refused.discard(mac)
        for a in now:
            self._claim(vni, s, _ip(a), mac, order)

    def unreachable(self) -> list[str]:
        """Other hosts in the registry that share no underlay family with this one."""
        return sorted(h for h in self.registry.hosts() if h != self.host_id and h not in self._vteps)

    def _claim(self, vni: int, s: _Served, ip: IPAddress, mac: int, order: tuple[int, int]) -> None:
        """``mac`` (written at ``order``) claims ``ip``; again, if it held it: a newer order."""
        claimants = s.contested.get(ip)
        if claimants is None:
            current = self.table.neighbour(vni, ip)
            if current is None or current == mac:
                self.table.set_neighbour(vni, ip, mac)
                return
            claimants = s.contested[ip] = {current: (self.registry.revision_of(EndpointKey(vni, current)), current)}
        claimants[mac] = order
        self.table.set_neighbour(vni, ip, max(claimants.values())[1])

    def _unclaim(self, vni: int, s: _Served, ip: IPAddress, mac: int) -> None:
        claimants = s.contested.get(ip)
        if claimants is None:
            if self.table.neighbour(vni, ip) == mac:
                self.table.remove_neighbour(vni, ip)
            return
        if claimants.pop(mac, None) is None:
            return  # not a claimant (never placed)
        if len(claimants) <= 1:
            del s.contested[ip]
        if claimants:
            self.table.set_neighbour(vni, ip, max(claimants.values())[1])
        else:
            self.table.remove_neighbour(vni, ip)

    def _retry_refused(self, vni: int, s: _Served) -> None:
        """A REGISTRY entry left the table: one it refused at its cap may fit now."""
        while s.refused:
            mac = next(iter(s.refused))
            ep = self.registry.endpoint(vni, mac)
            vtep = self._vteps.get(ep.host) if ep is not None and ep.host != self.host_id else None
            if vtep is None:
                s.refused.discard(mac)
                continue
            if self.table.put(vni, mac, vtep, Source.REGISTRY, self.now) in _REFUSED:
                return
            s.refused.discard(mac)
            return
