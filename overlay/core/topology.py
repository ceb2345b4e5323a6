"""What this host's forwarding table holds, given the registry. Pure.

For every VNI this host serves:
- the flood list is every other member host of the VNI whose host record is known
  (address and port from ``hosts/<id>``);
- every endpoint owned by another known host is a REGISTRY entry (MAC -> that host's VTEP);
- endpoints of this host, of unknown hosts, or on VNIs not served are not forwarded to;
- the IPv4 addresses of other hosts' endpoints are the neighbours whose ARP requests the
  agent answers itself (ARP suppression): a request for one never leaves the host.
After each batch of registry events the VNIs they touch are recomputed and the difference is
applied to the ForwardingTable (which keeps the fast path in step). Learned and static entries
are the table's business; registry entries simply take precedence over learned ones.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from overlay.core.fdb import ForwardingTable, Outcome, Source, Vtep
from overlay.core.registry import EndpointKey, Event, HostKey, MemberKey, NetworkKey, Registry


class Topology:
    def __init__(self, registry: Registry, table: ForwardingTable, host_id: str) -> None:
        self.registry, self.table, self.host_id = registry, table, host_id
        self._applied: dict[int, dict[int, Vtep]] = {}  # vni -> mac -> VTEP we put as REGISTRY

    def serve(self, vni: int, now: float) -> None:
        """Start serving ``vni``: table and flood list from what the registry holds."""
        self.table.add_vni(vni)
        self._applied.setdefault(vni, {})
        self._recompute(vni, now)

    def apply(self, events: Iterable[Event], now: float) -> None:
        touched: set[int] = set()
        for ev in events:
            k = ev.key
            if isinstance(k, HostKey):
                touched.update(self._applied)  # an address change moves its endpoints everywhere
            elif isinstance(k, (MemberKey, EndpointKey, NetworkKey)) and k.vni in self._applied:
                touched.add(k.vni)
        for vni in sorted(touched):
            self._recompute(vni, now)

    def _recompute(self, vni: int, now: float) -> None:
        vteps = {
            host: Vtep(ipaddress.IPv4Address(h.address), h.port)
            for host, h in self.registry.hosts().items()
            if host != self.host_id
        }
        self.table.set_flood(vni, [vteps[m] for m in self.registry.members(vni) if m in vteps])
        endpoints = self.registry.endpoints(vni)
        want = {key.mac: vteps[ep.host] for key, ep in endpoints.items() if ep.host in vteps}
        # An address claimed by two endpoints (a container restarted with a new MAC) goes to the
        # most recently written one.
        newest_last = sorted(endpoints.items(), key=lambda kv: self.registry.revision_of(kv[0]))
        self.table.set_neighbours(
            vni, {ipaddress.IPv4Address(a): key.mac for key, ep in newest_last if key.mac in want for a in ep.ipv4}
        )
        have = self._applied[vni]
        for mac in [m for m in have if m not in want]:
            self.table.remove(vni, mac, Source.REGISTRY)
            del have[mac]
        for mac, vtep in want.items():
            if have.get(mac) != vtep:
                outcome = self.table.put(vni, mac, vtep, Source.REGISTRY, now)
                if outcome not in (Outcome.REFUSED_CAP, Outcome.REFUSED_UNKNOWN_VNI, Outcome.REFUSED_MULTICAST):
                    have[mac] = vtep  # a refused one is tried again at the next recompute
