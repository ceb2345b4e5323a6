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
from typing import Iterator, NamedTuple, Protocol, Sequence

from overlay.core.wire import DEFAULT_PORT, check_vni, is_multicast_mac

DEFAULT_AGEING = 300.0
DEFAULT_MAX_PER_VNI = 65536


class Vtep(NamedTuple):
    """A VXLAN tunnel endpoint: an underlay IPv4 address and UDP port."""

    ip: ipaddress.IPv4Address
    port: int = DEFAULT_PORT

    @classmethod
    def parse(cls, ip: str, port: int = DEFAULT_PORT) -> Vtep:
        return cls(ipaddress.IPv4Address(ip), port)

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


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


class TableSink(Protocol):
    """Where the table pushes its changes (the fast path's C table in the agent)."""

    def fdb_set(self, vni: int, mac: int, vtep: Vtep) -> None: ...
    def fdb_delete(self, vni: int, mac: int) -> None: ...
    def flood_set(self, vni: int, vteps: Sequence[Vtep]) -> None: ...
    def vni_add(self, vni: int) -> None: ...
    def vni_remove(self, vni: int) -> None: ...
    def neigh_set(self, vni: int, ip: ipaddress.IPv4Address, mac: int) -> None: ...
    def neigh_delete(self, vni: int, ip: ipaddress.IPv4Address) -> None: ...


class NullSink:
    """A sink that drops every change: for a table used on its own."""

    def fdb_set(self, vni: int, mac: int, vtep: Vtep) -> None: ...
    def fdb_delete(self, vni: int, mac: int) -> None: ...
    def flood_set(self, vni: int, vteps: Sequence[Vtep]) -> None: ...
    def vni_add(self, vni: int) -> None: ...
    def vni_remove(self, vni: int) -> None: ...
    def neigh_set(self, vni: int, ip: ipaddress.IPv4Address, mac: int) -> None: ...
    def neigh_delete(self, vni: int, ip: ipaddress.IPv4Address) -> None: ...


@dataclass(frozen=True, slots=True)
class Entry:
    """The entry in force for one (VNI, MAC), as shown by ``overlay fdb``."""

    vni: int
    mac: int
    vtep: Vtep
    source: Source
    seen: float | None  # learned entries only: when last seen


@dataclass
class _Slot:
    """All claims on one (VNI, MAC). At most one learned claim, and only when alone."""

    claims: dict[Source, Vtep] = field(default_factory=dict)

    def best(self) -> tuple[Source, Vtep] | None:
        if not self.claims:
            return None
        source = max(self.claims)
        return source, self.claims[source]


@dataclass
class _Network:
    slots: dict[int, _Slot] = field(default_factory=dict)
    learned: OrderedDict[int, float] = field(default_factory=OrderedDict)  # mac -> seen, oldest first
    flood: tuple[Vtep, ...] = ()
    neighbours: dict[ipaddress.IPv4Address, int] = field(default_factory=dict)  # ARP suppression


@dataclass
class Counters:
    refused_cap: int = 0
    refused_unknown_vni: int = 0
    moves: int = 0
    expired: int = 0
    evicted: int = 0
    refused_table_full: int = 0  # the fast path's table could not take it (out of VTEP ids)


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
        for mac in net.slots:
            self.sink.fdb_delete(vni, mac)
        for ip in net.neighbours:
            self.sink.neigh_delete(vni, ip)
        self.sink.vni_remove(vni)

    def vnis(self) -> list[int]:
        return sorted(self._nets)

    def set_flood(self, vni: int, vteps: Sequence[Vtep]) -> None:
        """Replace the flood list of ``vni`` (order-insensitive, duplicates removed)."""
        net = self._net(vni)
        flood = tuple(sorted(set(vteps)))
        if flood != net.flood:
            net.flood = flood
            self.sink.flood_set(vni, flood)

    def add_flood(self, vni: int, vtep: Vtep) -> None:
        self.set_flood(vni, (*self._net(vni).flood, vtep))

    def remove_flood(self, vni: int, vtep: Vtep) -> None:
        self.set_flood(vni, [v for v in self._net(vni).flood if v != vtep])

    def flood(self, vni: int) -> tuple[Vtep, ...]:
        return self._net(vni).flood

    def set_neighbours(self, vni: int, neighbours: dict[ipaddress.IPv4Address, int]) -> None:
        """Replace the IPv4 -> MAC map whose ARP requests the agent answers itself on ``vni``."""
        net = self._net(vni)
        for ip in [ip for ip in net.neighbours if ip not in neighbours]:
            del net.neighbours[ip]
            self.sink.neigh_delete(vni, ip)
        for ip, mac in neighbours.items():
            if net.neighbours.get(ip) != mac:
                net.neighbours[ip] = mac
                self.sink.neigh_set(vni, ip, mac)

    def neighbours(self, vni: int) -> dict[ipaddress.IPv4Address, int]:
        return dict(self._net(vni).neighbours)

    # --- entries --------------------------------------------------------------------------

    def put(self, vni: int, mac: int, vtep: Vtep, source: Source, now: float) -> Outcome:
        """Claim that ``mac`` on ``vni`` lives behind ``vtep``, from ``source``."""
        net = self._nets.get(vni)
        if net is None:
            self.counters.refused_unknown_vni += 1
            return Outcome.REFUSED_UNKNOWN_VNI
        if is_multicast_mac(mac):
            return Outcome.REFUSED_MULTICAST
        slot = net.slots.get(mac)
        is_new = slot is None
        if slot is None:
            if len(net.slots) >= self.max_per_vni and not self._make_room(vni, net, source):
                self.counters.refused_cap += 1
                return Outcome.REFUSED_CAP
            slot = net.slots[mac] = _Slot()
        before = slot.best()
        if source is Source.LEARNED and before is not None and before[0] > Source.LEARNED:
            return Outcome.SHADOWED
        saved_claims, saved_seen = dict(slot.claims), net.learned.get(mac)
        if source is Source.LEARNED:
            net.learned[mac] = now
            net.learned.move_to_end(mac)
        elif Source.LEARNED in slot.claims:
            del slot.claims[Source.LEARNED]  # authoritative data replaces what was learned
            net.learned.pop(mac, None)
        slot.claims[source] = vtep
        after = slot.best()
        try:
            outcome = self._publish(vni, mac, before, after)
        except Exception:  # the sink refused (C table full): stay as the sink is
            slot.claims = saved_claims
            net.learned.pop(mac, None)
            if saved_seen is not None:
                net.learned[mac] = saved_seen
            if is_new:
                del net.slots[mac]
            raise
        return Outcome.SHADOWED if after is not None and after[0] > source else outcome

    def learn(self, vni: int, mac: int, vtep: Vtep, now: float) -> Outcome:
        """Frames from ``mac`` arrived from ``vtep``: learn or refresh it."""
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
        slot = net.slots.get(mac) if net else None
        if net is None or slot is None or source not in slot.claims:
            return False
        before = slot.best()
        del slot.claims[source]
        if source is Source.LEARNED:
            del net.learned[mac]
        after = slot.best()
        if after is None:
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
                vtep = net.slots[mac].claims[Source.LEARNED]
                self.remove(vni, mac, Source.LEARNED)
                gone.append(Entry(vni, mac, vtep, Source.LEARNED, seen))
        self.counters.expired += len(gone)
        return gone

    def lookup(self, vni: int, mac: int) -> Entry | None:
        """The entry in force for (vni, mac), or None (the frame would be flooded)."""
        net = self._nets.get(vni)
        slot = net.slots.get(mac) if net else None
        best = slot.best() if slot else None
        if net is None or best is None:
            return None
        return Entry(vni, mac, best[1], best[0], net.learned.get(mac))

    def entries(self) -> Iterator[Entry]:
        for vni in sorted(self._nets):
            for mac in sorted(self._nets[vni].slots):
                entry = self.lookup(vni, mac)
                assert entry is not None
                yield entry

    def count(self, vni: int | None = None) -> dict[Source, int]:
        """Entries in force by source, for one VNI or all."""
        counts = {s: 0 for s in Source}
        nets = [self._nets[vni]] if vni is not None else self._nets.values()
        for net in nets:
            for slot in net.slots.values():
                best = slot.best()
                if best:
                    counts[best[0]] += 1
        return counts

    def __len__(self) -> int:
        return sum(len(net.slots) for net in self._nets.values())

    # --- internals ------------------------------------------------------------------------

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
            return Outcome.REFRESHED
        if before is None:
            self.sink.fdb_set(vni, mac, after[1])
            return Outcome.ADDED
        if before[1] != after[1]:
            self.sink.fdb_set(vni, mac, after[1])
            self.counters.moves += 1
            return Outcome.MOVED
        return Outcome.REFRESHED
