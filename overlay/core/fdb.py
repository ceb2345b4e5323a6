"""Forwarding table semantics: which VTEP a (VNI, MAC) lives behind, and who floods where.

Pure: no IO, no clock (every call that needs time takes ``now``, a monotonic clock reading in
seconds that never goes back), no import of the fast path.
The fast path looks entries up in a C table without calling Python per packet; this module
decides what that table holds and pushes each change into it through a ``TableSink`` (the C
table in the agent, a plain recorder in tests), so the two are always in step.

Rules:
- Three sources, by precedence: STATIC (operator flags/config) > REGISTRY (etcd) > LEARNED
  (inner source MAC seen from an outer source VTEP). A (VNI, MAC) may hold a static and a
  registry claim at once; the higher one is in force, and removing it reinstates the lower.
  A learned claim never overrides a static or registry one (and is not kept beside them).
- Learned entries age out ``ageing`` seconds (default 300, as Linux) after they were last seen.
- Each VNI holds at most ``max_per_vni`` MACs. At the cap a new learned MAC is refused and
  counted (MAC-flooding defence); a new static or registry MAC evicts the least recently seen
  learned MAC of that VNI, and is refused and counted only if there is none.
- A MAC seen behind another VTEP moves there (counted), within its source's precedence.
- Each VNI has a flood list: the VTEPs that get broadcast, multicast and unknown unicast.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Protocol, Sequence, Union

from overlay.core.addresses import IPAddress, format_address
from overlay.core.gateway import is_gateway_mac
from overlay.core.wire import DEFAULT_PORT, check_vni, is_multicast_mac

DEFAULT_AGEING = 300.0
DEFAULT_MAX_PER_VNI = 65536


class Vtep(NamedTuple):
    """A VXLAN tunnel endpoint: an underlay address (IPv4 or IPv6) and UDP port."""

    ip: IPAddress
    port: int = DEFAULT_PORT

    @classmethod
    def parse(cls, ip: str, port: int = DEFAULT_PORT) -> Vtep:
        return cls(ipaddress.ip_address(ip), port)

    def __str__(self) -> str:
        return format_address(str(self.ip), self.port)

    def order(self) -> tuple[int, IPAddress, int]:
        """A sort key across families (addresses of two families do not compare)."""
        return (self.ip.version, self.ip, self.port)


class Source(enum.IntEnum):
    """Where an entry came from; a higher value takes precedence."""

    LEARNED = 0
    REGISTRY = 1
    STATIC = 2


class Outcome(enum.Enum):
    """What a call to ``ForwardingTable.put`` did; the agent counts these."""

    ADDED = "added"
    MOVED = "moved"
    REFRESHED = "refreshed"  # same VTEP, nothing for the fast path to do
    SHADOWED = "shadowed"  # a higher-precedence claim is in force; this one changes nothing now
    REFUSED_CAP = "refused_cap"
    REFUSED_UNKNOWN_VNI = "refused_unknown_vni"
    REFUSED_MULTICAST = "refused_multicast"  # a group MAC is never a unicast destination
    REFUSED_GATEWAY = "refused_gateway"  # a gateway's MAC is on every host: never learned (core/gateway.py)


class TableSink(Protocol):
    """Where the table pushes its changes (the fast path's C table in the agent)."""

    def fdb_set(self, vni: int, mac: int, vtep: Vtep) -> None: ...
    def fdb_delete(self, vni: int, mac: int) -> None: ...
    def flood_set(self, vni: int, vteps: Sequence[Vtep]) -> None: ...
    def vni_add(self, vni: int) -> None: ...
    def vni_remove(self, vni: int) -> None: ...
    def neigh_set(self, vni: int, ip: IPAddress, mac: int) -> None: ...
    def neigh_delete(self, vni: int, ip: IPAddress) -> None: ...


class NullSink:
    """A sink that drops every change: for a table used on its own."""

    def fdb_set(self, vni: int, mac: int, vtep: Vtep) -> None: ...
    def fdb_delete(self, vni: int, mac: int) -> None: ...
    def flood_set(self, vni: int, vteps: Sequence[Vtep]) -> None: ...
    def vni_add(self, vni: int) -> None: ...
    def vni_remove(self, vni: int) -> None: ...
    def neigh_set(self, vni: int, ip: IPAddress, mac: int) -> None: ...
    def neigh_delete(self, vni: int, ip: IPAddress) -> None: ...


@dataclass(frozen=True, slots=True)
class Entry:
    """The entry in force for one (VNI, MAC), as shown by ``overlay fdb``."""

    vni: int
    mac: int
    vtep: Vtep
    source: Source
    seen: float | None  # learned entries only: when last seen


Claim = tuple[Source, Vtep]
Claims = Union[Claim, dict[Source, Vtep]]  # one claim (shared tuple: most MACs), or several
_CLAIM_CACHE_MAX = 65536


def _best(claims: Claims) -> Claim:
    if isinstance(claims, tuple):
        return claims
    source = max(claims)
    return source, claims[source]


def _as_dict(claims: Claims) -> dict[Source, Vtep]:
    return {claims[0]: claims[1]} if isinstance(claims, tuple) else dict(claims)


@dataclass
class _Network:
    slots: dict[int, Claims] = field(default_factory=dict)  # mac -> its claims (at most one learned, alone)
    learned: OrderedDict[int, float] = field(default_factory=OrderedDict)  # mac -> seen, oldest first
    flood: tuple[Vtep, ...] = ()
    neighbours: dict[IPAddress, int] = field(default_factory=dict)  # ARP and NS suppression


@dataclass
class Counters:
    refused_cap: int = 0
    refused_unknown_vni: int = 0
    moves: int = 0
    expired: int = 0
    evicted: int = 0
    refused_table_full: int = 0  # the fast path's table could not take it (out of VTEP ids)
    refused_gateway: int = 0  # frames from another host with a gateway's MAC as their source


class ForwardingTable:
    """The forwarding table of one agent, across all its VNIs. See the module docstring."""

    def __init__(
        self,
        sink: TableSink | None = None,
        ageing: float = DEFAULT_AGEING,
        max_per_vni: int = DEFAULT_MAX_PER_VNI,
    ) -> None:
        if ageing <= 0:
            raise ValueError(f"ageing must be a positive number of seconds, got {ageing}")
        if max_per_vni < 1:
            raise ValueError(f"max_per_vni must be at least 1, got {max_per_vni}")
        self.sink: TableSink = sink if sink is not None else NullSink()
        self.ageing = ageing
        self.max_per_vni = max_per_vni
        self.counters = Counters()
        self._nets: dict[int, _Network] = {}
        self._shared: dict[Claim, Claim] = {}
        self._in_force = {s: 0 for s in Source}  # entries in force, by source

    # --- networks and flood lists ---------------------------------------------------------

    def add_vni(self, vni: int) -> None:
        """Serve ``vni``; idempotent."""
        if check_vni(vni) not in self._nets:
            self._nets[vni] = _Network()
            self.sink.vni_add(vni)

    def remove_vni(self, vni: int) -> None:
        """Stop serving ``vni`` and forget all its entries; idempotent."""
        net = self._nets.pop(vni, None)
        if net is None:
            return
        for mac, held in net.slots.items():
            self.sink.fdb_delete(vni, mac)
            self._in_force[_best(held)[0]] -= 1
        for ip in net.neighbours:
            self.sink.neigh_delete(vni, ip)
        self.sink.vni_remove(vni)

    def vnis(self) -> list[int]:
        return sorted(self._nets)

    def set_flood(self, vni: int, vteps: Sequence[Vtep]) -> None:
        """Replace the flood list of ``vni`` (order-insensitive, duplicates removed)."""
        net = self._net(vni)
        flood = tuple(sorted(set(vteps), key=Vtep.order))
        if flood != net.flood:
            net.flood = flood
            self.sink.flood_set(vni, flood)

    def add_flood(self, vni: int, vtep: Vtep) -> None:
        self.set_flood(vni, (*self._net(vni).flood, vtep))

    def remove_flood(self, vni: int, vtep: Vtep) -> None:
        self.set_flood(vni, [v for v in self._net(vni).flood if v != vtep])

    def flood(self, vni: int) -> tuple[Vtep, ...]:
        return self._net(vni).flood

    def set_neighbours(self, vni: int, neighbours: dict[IPAddress, int]) -> None:
        """Replace the IPv4 -> MAC map whose ARP requests the agent answers itself on ``vni``."""
        net = self._net(vni)
        for ip in [ip for ip in net.neighbours if ip not in neighbours]:
            del net.neighbours[ip]
            self.sink.neigh_delete(vni, ip)
        for ip, mac in neighbours.items():
            if net.neighbours.get(ip) != mac:
                net.neighbours[ip] = mac
                self.sink.neigh_set(vni, ip, mac)

    def neighbours(self, vni: int) -> dict[IPAddress, int]:
        return dict(self._net(vni).neighbours)

    def neighbour(self, vni: int, ip: IPAddress) -> int | None:
        """The MAC whose ARP requests for ``ip`` the agent answers on ``vni``, if any."""
        return self._net(vni).neighbours.get(ip)

    def set_neighbour(self, vni: int, ip: IPAddress, mac: int) -> None:
        """Answer ARP requests for ``ip`` on ``vni`` with ``mac`` (one entry of the map)."""
        net = self._net(vni)
        if net.neighbours.get(ip) != mac:
            net.neighbours[ip] = mac
            self.sink.neigh_set(vni, ip, mac)

    def remove_neighbour(self, vni: int, ip: IPAddress) -> None:
        net = self._net(vni)
        if net.neighbours.pop(ip, None) is not None:
            self.sink.neigh_delete(vni, ip)

    # --- entries --------------------------------------------------------------------------

    def put(self, vni: int, mac: int, vtep: Vtep, source: Source, now: float) -> Outcome:
        """Claim that ``mac`` on ``vni`` lives behind ``vtep``, from ``source``."""
        net = self._nets.get(vni)
        if net is None:
            self.counters.refused_unknown_vni += 1
            return Outcome.REFUSED_UNKNOWN_VNI
        if is_multicast_mac(mac):
            return Outcome.REFUSED_MULTICAST
        held = net.slots.get(mac)
        if held is None:
            if len(net.slots) >= self.max_per_vni and not self._make_room(vni, net, source):
                self.counters.refused_cap += 1
                return Outcome.REFUSED_CAP
            before = None
            claims: dict[Source, Vtep] = {}
        else:
            before = _best(held)
            if source is Source.LEARNED and before[0] > Source.LEARNED:
                return Outcome.SHADOWED
            claims = _as_dict(held)
        saved_seen = net.learned.get(mac)
        if source is Source.LEARNED:
            net.learned[mac] = now
            net.learned.move_to_end(mac)
        elif Source.LEARNED in claims:
            del claims[Source.LEARNED]  # authoritative data replaces what was learned
            net.learned.pop(mac, None)
        claims[source] = vtep
        packed = net.slots[mac] = self._pack(claims)
        after = _best(packed)
        try:
            outcome = self._publish(vni, mac, before, after)
        except Exception:  # the sink refused (C table full): stay as the sink is
            net.learned.pop(mac, None)
            if saved_seen is not None:
                net.learned[mac] = saved_seen
            if held is None:
                del net.slots[mac]
            else:
                net.slots[mac] = held
            raise
        return Outcome.SHADOWED if after[0] > source else outcome

    def learn(self, vni: int, mac: int, vtep: Vtep, now: float) -> Outcome:
        """Frames from ``mac`` arrived from ``vtep``: learn or refresh it (never a gateway's
        MAC: every host has that one on its own bridge)."""
        if is_gateway_mac(mac):
            self.counters.refused_gateway += 1
            return Outcome.REFUSED_GATEWAY
        return self.put(vni, mac, vtep, Source.LEARNED, now)

    def touch(self, vni: int, mac: int, now: float) -> None:
        """A learned ``mac`` was seen again from the VTEP it is known at (keeps it from ageing)."""
        net = self._nets.get(vni)
        if net is not None and mac in net.learned:
            net.learned[mac] = now
            net.learned.move_to_end(mac)

    def remove(self, vni: int, mac: int, source: Source) -> bool:
        """Withdraw ``source``'s claim; the next claim (if any) takes over. True if there was one."""
        net = self._nets.get(vni)
        held = net.slots.get(mac) if net else None
        if net is None or held is None:
            return False
        claims = _as_dict(held)
        if source not in claims:
            return False
        before = _best(held)
        del claims[source]
        if source is Source.LEARNED:
            del net.learned[mac]
        after: Claim | None = None
        if claims:
            packed = net.slots[mac] = self._pack(claims)
            after = _best(packed)
        else:
            del net.slots[mac]
        self._publish(vni, mac, before, after)
        return True

    def expire(self, now: float) -> list[Entry]:
        """Remove learned entries not seen for ``ageing`` seconds; return what was removed."""
        gone: list[Entry] = []
        for vni, net in self._nets.items():
            while net.learned:
                mac, seen = next(iter(net.learned.items()))
                if now - seen < self.ageing:
                    break
                vtep = _as_dict(net.slots[mac])[Source.LEARNED]
                self.remove(vni, mac, Source.LEARNED)
                gone.append(Entry(vni, mac, vtep, Source.LEARNED, seen))
        self.counters.expired += len(gone)
        return gone

    def claim(self, vni: int, mac: int, source: Source) -> Vtep | None:
        """``source``'s claim on (vni, mac), in force or not."""
        net = self._nets.get(vni)
        held = net.slots.get(mac) if net else None
        if held is None:
            return None
        if isinstance(held, tuple):
            return held[1] if held[0] == source else None
        return held.get(source)

    def lookup(self, vni: int, mac: int) -> Entry | None:
        """The entry in force for (vni, mac), or None (the frame would be flooded)."""
        net = self._nets.get(vni)
        held = net.slots.get(mac) if net else None
        if net is None or held is None:
            return None
        source, vtep = _best(held)
        return Entry(vni, mac, vtep, source, net.learned.get(mac))

    def entries(self) -> Iterator[Entry]:
        for vni in sorted(self._nets):
            for mac in sorted(self._nets[vni].slots):
                entry = self.lookup(vni, mac)
                assert entry is not None
                yield entry

    def count(self, vni: int | None = None) -> dict[Source, int]:
        """Entries in force by source, for one VNI (a walk of it) or all (kept: O(1), for the
        status and every metrics scrape)."""
        if vni is None:
            return dict(self._in_force)
        counts = {s: 0 for s in Source}
        nets = [self._nets[vni]] if vni is not None else self._nets.values()
        for net in nets:
            for held in net.slots.values():
                counts[_best(held)[0]] += 1
        return counts

    def __len__(self) -> int:
        return sum(len(net.slots) for net in self._nets.values())

    # --- internals ------------------------------------------------------------------------

    def _pack(self, claims: dict[Source, Vtep]) -> Claims:
        """One claim as a tuple shared by every MAC behind the same VTEP (memory: a MAC costs
        its dict slot), several as the dict."""
        if len(claims) != 1:
            return claims
        claim = next(iter(claims.items()))
        shared = self._shared.get(claim)
        if shared is None:
            if len(self._shared) >= _CLAIM_CACHE_MAX:
                self._shared.clear()  # learned VTEPs come and go: keep the cache bounded
            shared = self._shared[claim] = claim
        return shared

    def _net(self, vni: int) -> _Network:
        try:
            return self._nets[vni]
        except KeyError:
            raise KeyError(f"VNI {vni} is not served by this agent") from None

    def _make_room(self, vni: int, net: _Network, source: Source) -> bool:
        """At the cap: evict the least recently seen learned MAC for an authoritative entry."""
        if source is Source.LEARNED or not net.learned:
            return False
        oldest = next(iter(net.learned))
        self.remove(vni, oldest, Source.LEARNED)
        self.counters.evicted += 1
        return True

    def _publish(
        self,
        vni: int,
        mac: int,
        before: tuple[Source, Vtep] | None,
        after: tuple[Source, Vtep] | None,
    ) -> Outcome:
        """Tell the sink what changed for the fast path (only the VTEP matters there)."""
        if after is None:
            if before is not None:
                self.sink.fdb_delete(vni, mac)
                self._in_force[before[0]] -= 1
            return Outcome.REFRESHED
        if before is None:
            self.sink.fdb_set(vni, mac, after[1])
            self._in_force[after[0]] += 1
            return Outcome.ADDED
        outcome = Outcome.REFRESHED
        if before[1] != after[1]:
            self.sink.fdb_set(vni, mac, after[1])
            self.counters.moves += 1
            outcome = Outcome.MOVED
        if before[0] != after[0]:
            self._in_force[before[0]] -= 1
            self._in_force[after[0]] += 1
        return outcome
