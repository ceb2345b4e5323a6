"""The incremental topology (overlay/core/topology.py) against its full recompute, ``desired``:
over random sequences of registry events, watched one by one or read again in a resync after a
gap, the forwarding table holds what ``desired`` says after every event, and the table's sink
(the fast path in the agent) sees what the table holds. Pure, no etcd."""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from typing import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from overlay.core.fdb import ForwardingTable, Source, Vtep
from overlay.core.registry import (
    EVERYTHING,
    Endpoint,
    EndpointKey,
    Event,
    Host,
    HostKey,
    Member,
    MemberKey,
    Network,
    NetworkKey,
    Registry,
    Schema,
    Scope,
    Value,
)
from overlay.core.topology import Topology, desired
from overlay.core.underlay import Underlay

IPv4 = ipaddress.IPv4Address
P = "/overlay/v1"
SCHEMA = Schema(P)
SELF = "self"
HOSTS = [SELF, "h1", "h2", "h3", "h4"]
OWNERS = [*HOSTS, "ghost"]  # "ghost" never has a host record: its endpoints are not forwarded to
UNDERLAY = [f"198.18.0.{i}" for i in range(1, 10)] + [  # IPv6-only and dual-stack hosts ("v4|v6") too
    "2001:2:0:1::1",
    "2001:2:0:1::2",
    "198.18.0.3|2001:2:0:1::3",
    "198.18.0.4|2001:2:0:1::4",
]
PORTS = [4789, 4790]
VNIS = [42, 43]  # the topology serves 42 from the start, 43 only after a serve()
MACS = [0x020000000001 + i for i in range(8)]
ADDRESSES = [f"198.19.42.{i}" for i in range(1, 6)] + ["2001:2:0:42::1", "2001:2:0:42::2"]  # few: contested
# This host's underlay: both families, IPv4 only preferring nothing else, IPv6 only, both preferring 4.
UNDERLAYS = {
    "any": Underlay.any(),
    "v4": Underlay(ipaddress.IPv4Address("198.18.0.100")),
    "v6": Underlay(None, ipaddress.IPv6Address("2001:2:0:1::100")),
    "dual4": Underlay(ipaddress.IPv4Address("198.18.0.100"), ipaddress.IPv6Address("2001:2:0:1::100"), prefer=4),
}


def host_value(address: str, port: int) -> Host:
    v4, _, v6 = address.partition("|")
    return Host(v4, port, address6=v6 or None)


def endpoint_value(owner: str, ips: Iterable[str]) -> Endpoint:
    ips = list(ips)
    return Endpoint(owner, [a for a in ips if ":" not in a], [a for a in ips if ":" in a])


BIG = 1 << 20  # max_per_vni: the cap never refuses in the property tests


def mac_key(vni: int, mac: int) -> str:
    return SCHEMA.key(EndpointKey(vni, mac))


# --- a sink that keeps what the fast path would hold --------------------------------------------


class RecordingSink:
    """A TableSink that applies every call to plain dicts (the fast path's view) and counts them."""

    def __init__(self) -> None:
        self.fdb: dict[tuple[int, int], Vtep] = {}
        self.neigh: dict[tuple[int, IPv4], int] = {}
        self.flood: dict[int, tuple[Vtep, ...]] = {}
        self.vnis: set[int] = set()
        self.calls: Counter[str] = Counter()
        self.log: list[tuple[str, int, object]] = []  # (call, vni, mac or ip)

    def fdb_set(self, vni: int, mac: int, vtep: Vtep) -> None:
        assert vni in self.vnis
        self.fdb[vni, mac] = vtep
        self._note("fdb_set", vni, mac)

    def fdb_delete(self, vni: int, mac: int) -> None:
        assert (vni, mac) in self.fdb, "fdb_delete of an entry the sink does not hold"
        del self.fdb[vni, mac]
        self._note("fdb_delete", vni, mac)

    def flood_set(self, vni: int, vteps: Sequence[Vtep]) -> None:
        assert vni in self.vnis
        self.flood[vni] = tuple(vteps)
        self._note("flood_set", vni, None)

    def vni_add(self, vni: int) -> None:
        self.vnis.add(vni)
        self._note("vni_add", vni, None)

    def vni_remove(self, vni: int) -> None:
        assert not any(v == vni for v, _ in self.fdb) and not any(v == vni for v, _ in self.neigh)
        self.vnis.discard(vni)
        self.flood.pop(vni, None)
        self._note("vni_remove", vni, None)

    def neigh_set(self, vni: int, ip: IPv4, mac: int) -> None:
        assert vni in self.vnis
        self.neigh[vni, ip] = mac
        self._note("neigh_set", vni, ip)

    def neigh_delete(self, vni: int, ip: IPv4) -> None:
        assert (vni, ip) in self.neigh, "neigh_delete of an address the sink does not hold"
        del self.neigh[vni, ip]
        self._note("neigh_delete", vni, ip)

    def _note(self, call: str, vni: int, what: object) -> None:
        self.calls[call] += 1
        self.log.append((call, vni, what))

    def reset(self) -> None:
        self.calls.clear()
        self.log.clear()

    def touched(self, *calls: str) -> list[object]:
        return [what for call, _, what in self.log if call in calls]

    def assert_mirrors(self, table: ForwardingTable) -> None:
        assert self.vnis == set(table.vnis())
        assert self.fdb == {(e.vni, e.mac): e.vtep for e in table.entries()}
        assert self.neigh == {(v, ip): mac for v in table.vnis() for ip, mac in table.neighbours(v).items()}
        assert {v: self.flood.get(v, ()) for v in self.vnis} == {v: table.flood(v) for v in table.vnis()}


# --- a model of etcd (the truth), the registry that follows it and the topology -----------------


class World:
    """etcd's keys (``truth``), a registry fed from them as raw etcd operations, and a topology
    serving 42 on host "self". ``scoped``: the registry follows hosts/ and the served networks
    only (the agent's Scope): what is outside it is not watched, a network is read when it is
    served and forgotten (``drop``) when it no longer is."""

    def __init__(self, scoped: bool = False, max_per_vni: int = BIG, underlay: str = "any") -> None:
        self.scoped = scoped
        self.underlay = UNDERLAYS[underlay]
        self.truth: dict[str, tuple[Value, int]] = {}
        self.rev = 1
        self.now = 0.0
        self.registry = Registry(SCHEMA)
        self.sink = RecordingSink()
        self.table = ForwardingTable(self.sink, max_per_vni=max_per_vni)
        self.topology = Topology(self.registry, self.table, SELF, self.underlay)  # before the first read
        self.served: set[int] = set()

    def start(self, initial: Iterable[tuple[object, ...]] = ()) -> None:
        for op in initial:
            self._write(op, deliver=False)
        self.served = {42}
        self.hand(self.registry.snapshot(self.kvs(), self.rev, self.scope()))
        self.topology.serve(42, self.now)
        self.check()

    def scope(self) -> Scope:
        return Scope(vnis=frozenset(self.served)) if self.scoped else EVERYTHING

    def kvs(self) -> list[tuple[str, bytes, int]]:
        return [(k, SCHEMA.encode(v), mod) for k, (v, mod) in sorted(self.truth.items())]

    # operations on etcd, as lists of (raw key, value or None for a delete)

    def mutations(self, op: tuple[object, ...]) -> list[tuple[str, Value | None]]:
        kind = op[0]
        if kind == "host":
            _, host, address, port = op
            return [(SCHEMA.key(HostKey(host)), host_value(address, port))]  # type: ignore[arg-type]
        if kind == "host_del":
            return [(SCHEMA.key(HostKey(op[1])), None)]  # type: ignore[arg-type]
        if kind == "member":
            return [(SCHEMA.key(MemberKey(op[1], op[2])), Member())]  # type: ignore[arg-type]
        if kind == "member_del":
            return [(SCHEMA.key(MemberKey(op[1], op[2])), None)]  # type: ignore[arg-type]
        if kind == "endpoint":
            _, vni, mac, owner, ips = op
            return [(mac_key(vni, mac), endpoint_value(owner, ips))]  # type: ignore[arg-type]
        if kind == "endpoint_del":
            return [(mac_key(op[1], op[2]), None)]  # type: ignore[arg-type]
        if kind == "network":
            return [(SCHEMA.key(NetworkKey(op[1])), Network(op[1], name=op[2]))]  # type: ignore[arg-type]
        if kind == "expire":  # a dead agent's lease: its host record, memberships and endpoints go
            host = op[1]
            gone = [SCHEMA.key(HostKey(host))] + [SCHEMA.key(MemberKey(v, host)) for v in VNIS]  # type: ignore[arg-type]
            gone += [k for k, (v, _) in self.truth.items() if isinstance(v, Endpoint) and v.host == host]
            return [(k, None) for k in gone]
        if kind == "del":  # the i-th key etcd holds
            keys = sorted(self.truth)
            return [(keys[op[1] % len(keys)], None)] if keys else []  # type: ignore[operator]
        if kind in ("move", "readdress"):  # the i-th endpoint: to another host, or other addresses
            eps = sorted((k, v) for k, (v, _) in self.truth.items() if isinstance(v, Endpoint))
            if not eps:
                return []
            k, ep = eps[op[1] % len(eps)]  # type: ignore[operator]
            return [(k, Endpoint(op[2], ep.ipv4, ep.ipv6) if kind == "move" else endpoint_value(ep.host, op[2]))]  # type: ignore[arg-type]
        if kind == "txn":  # several writes in one transaction: one revision, each key once
            return list(dict(m for o in op[1] for m in self.mutations(o)).items())  # type: ignore[attr-defined]
        raise AssertionError(op)

    def _write(self, op: tuple[object, ...], deliver: bool) -> None:
        """``op`` happens in etcd (a transaction: one revision); its events are watched if
        ``deliver`` (and within the scope), each handed to the topology and checked."""
        rev = self.rev + 1
        for raw_key, value in self.mutations(op):
            k = SCHEMA.parse_key(raw_key)
            assert k is not None
            was = self.truth.get(raw_key)
            if value is None:
                if was is None:
                    continue  # nothing to delete: no revision, no event
                del self.truth[raw_key]
            else:
                self.truth[raw_key] = (value, rev)
            self.rev = rev
            if not deliver or (self.scoped and k not in self.scope()):
                continue
            self.now += 1
            if value is None:
                events = self.registry.delete(raw_key, rev)
            else:
                events = self.registry.put(raw_key, SCHEMA.encode(value), rev)
            self.hand(events)
            self.check()
            self.check_registry()

    def watched(self, op: tuple[object, ...]) -> None:
        self._write(op, deliver=True)

    def gap(self, ops: Iterable[tuple[object, ...]], page: int) -> None:
        """``ops`` happen in etcd unseen (a disconnection, then a compaction), then the scope is read
        again: in one snapshot (``page`` 0) or in pages of ``page`` keys, each handed over as read."""
        for op in ops:
            self._write(op, deliver=False)
        self.now += 1
        self.read(self.scope(), page)
        self.check_registry()

    def read(self, scope: Scope, page: int) -> None:
        kvs = self.kvs()
        if page == 0:
            self.hand(self.registry.snapshot(kvs, self.rev, scope))
            self.check()
            return
        resync = self.registry.resync(scope)
        for i in range(0, len(kvs), page):
            self.hand(resync.feed(kvs[i : i + page]))
            self.check()
        self.hand(resync.finish(self.rev))
        self.check()

    def serve(self, vni: int, page: int) -> None:
        if vni in self.served:
            return
        self.now += 1
        if self.scoped:  # the agent reads the new network before serving it
            self.read(Scope(hosts=False, vnis=frozenset({vni})), page)
        self.served.add(vni)
        self.topology.serve(vni, self.now)
        self.check()
        if self.scoped:
            self.check_registry()

    def unserve(self, vni: int) -> None:
        if vni not in self.served:
            return
        self.topology.unserve(vni)
        self.served.discard(vni)
        if self.scoped:
            self.registry.drop(Scope(hosts=False, vnis=frozenset({vni})))
            self.check_registry()
        self.check()

    def learn(self, vni: int, mac: int, address: str) -> None:
        if vni in self.served:
            self.now += 1
            self.table.learn(vni, mac, Vtep.parse(address.partition("|")[0]), self.now)
            self.check()

    def run(self, op: tuple[object, ...]) -> None:
        kind = op[0]
        if kind == "resync":
            self.gap(op[1], op[2])  # type: ignore[arg-type]
        elif kind == "serve":
            self.serve(43, op[1])  # type: ignore[arg-type]
        elif kind == "unserve":
            self.unserve(43)
        elif kind == "learn":
            self.learn(*op[1:])  # type: ignore[arg-type]
        else:
            self.watched(op)

    def hand(self, events: list[Event]) -> None:
        self.topology.apply(events, self.now)

    # what must hold

    def check(self) -> None:
        assert self.table.vnis() == sorted(self.served)
        for vni in self.served:
            want = desired(self.registry, SELF, vni, self.underlay)
            fdb = {e.mac: e.vtep for e in self.table.entries() if e.vni == vni and e.source is Source.REGISTRY}
            if self.table.max_per_vni < BIG:  # desired() knows no cap: what is held is right
                assert fdb.items() <= want.fdb.items(), f"vni {vni}: forwarding entries"
            else:
                assert fdb == want.fdb, f"vni {vni}: forwarding entries"
            assert set(self.table.flood(vni)) == want.flood, f"vni {vni}: flood list"
            assert self.table.neighbours(vni) == want.neighbours, f"vni {vni}: neighbours"
        self.sink.assert_mirrors(self.table)
        # The counts by source kept for the status equal a walk of every VNI.
        walked = Counter({s: 0 for s in Source})
        for vni in self.table.vnis():
            walked.update(self.table.count(vni))
        assert self.table.count() == dict(walked)

    def check_registry(self) -> None:
        """After a read the registry holds what etcd holds within its scope, at the same revisions."""
        scope = self.scope()
        want = {}
        for raw_key, (value, mod) in self.truth.items():
            k = SCHEMA.parse_key(raw_key)
            if k in scope:
                want[k] = (value, mod)
        assert {k: (e.value, e.mod_revision) for k, e in self.registry.entries.items()} == want


# --- strategies ---------------------------------------------------------------------------------

vnis = st.sampled_from(VNIS)
macs = st.sampled_from(MACS)
owners = st.sampled_from(OWNERS)
addresses = st.lists(st.sampled_from(ADDRESSES), max_size=3).map(tuple)
index = st.integers(0, 63)
ENDPOINT = st.tuples(st.just("endpoint"), vnis, macs, owners, addresses)
# several endpoints written in one transaction (one revision) claiming the same addresses: the
# highest MAC takes them
TXN = st.builds(
    lambda eps, ips: ("txn", [("endpoint", vni, mac, owner, ips) for vni, mac, owner in eps]),
    st.lists(st.tuples(vnis, macs, st.sampled_from(HOSTS[1:])), min_size=2, max_size=3),
    addresses.filter(bool),
)
CHANGE = st.one_of(
    st.tuples(st.just("host"), st.sampled_from(HOSTS), st.sampled_from(UNDERLAY), st.sampled_from(PORTS)),
    st.tuples(st.just("host_del"), st.sampled_from(HOSTS)),
    st.tuples(st.just("member"), vnis, st.sampled_from(HOSTS)),
    st.tuples(st.just("member_del"), vnis, st.sampled_from(HOSTS)),
    ENDPOINT,
    ENDPOINT,
    st.tuples(st.just("move"), index, owners),
    st.tuples(st.just("readdress"), index, addresses),
    st.tuples(st.just("endpoint_del"), vnis, macs),
    st.tuples(st.just("del"), index),
    st.tuples(st.just("del"), index),
    st.tuples(st.just("network"), vnis, st.sampled_from(["", "blue"])),
    st.tuples(st.just("expire"), st.sampled_from(HOSTS[1:])),
    TXN,
)
PAGE = st.integers(0, 4)  # 0: one snapshot; else keys per page
OP = st.one_of(
    CHANGE,
    CHANGE,
    CHANGE,
    st.tuples(st.just("resync"), st.lists(CHANGE, max_size=8), PAGE),
    st.tuples(st.just("serve"), PAGE),
    st.tuples(st.just("unserve")),
    st.tuples(st.just("learn"), vnis, macs, st.sampled_from(UNDERLAY)),
)


@st.composite
def initial_states(draw: st.DrawFn) -> list[tuple[object, ...]]:
    """A populated registry to start from: most hosts known, most of them members, most MACs in use."""
    ops: list[tuple[object, ...]] = []
    for host in HOSTS:
        if draw(st.integers(0, 4)):
            ops.append(("host", host, draw(st.sampled_from(UNDERLAY)), draw(st.sampled_from(PORTS))))
        for vni in VNIS:
            if draw(st.integers(0, 3)):
                ops.append(("member", vni, host))
    for vni in VNIS:
        for mac in MACS:
            if draw(st.integers(0, 3)):
                ops.append(("endpoint", vni, mac, draw(owners), draw(addresses)))
    return ops


INITIAL = initial_states()
OPS = st.lists(OP, min_size=1, max_size=30)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

M1, M2, M3 = MACS[:3]
A1 = ADDRESSES[0]

# h1 dies unseen (its lease: host record and endpoint go), then a resync: the events come host first.
HOST_DIES_IN_A_GAP = (
    [("host", "h1", "198.18.0.1", 4789), ("endpoint", 42, M1, "h1", (A1,))],
    [("resync", [("expire", "h1")], 0)],
)


@pytest.mark.parametrize("scoped", [False, True], ids=["everything", "scoped"])
@SETTINGS
@given(initial=INITIAL, ops=OPS, underlay=st.sampled_from(sorted(UNDERLAYS)))
@example(initial=HOST_DIES_IN_A_GAP[0], ops=HOST_DIES_IN_A_GAP[1], underlay="any")
def test_the_table_equals_desired_after_every_event(
    initial: list[tuple[object, ...]], ops: list[tuple[object, ...]], scoped: bool, underlay: str
) -> None:
    w = World(scoped=scoped, underlay=underlay)
    w.start(initial)
    for op in ops:
        w.run(op)


@settings(SETTINGS, max_examples=100)
@given(initial=INITIAL, ops=st.lists(CHANGE, min_size=1, max_size=30))
def test_watched_events_alone_keep_the_table_equal_to_desired(
    initial: list[tuple[object, ...]], ops: list[tuple[object, ...]]
) -> None:
    """No resync: the registry's events exactly as it returns them (one at a time)."""
    w = World()
    w.start(initial)
    for op in ops:
        w.run(op)


# --- examples -----------------------------------------------------------------------------------


def kv(key: str, value: object, mod: int) -> tuple[str, bytes, int]:
    return (P + key, json.dumps(value).encode(), mod)


def small_world(max_per_vni: int = BIG) -> World:
    w = World(max_per_vni=max_per_vni)
    w.start(
        [
            ("host", "h1", "198.18.0.1", 4789),
            ("host", "h2", "198.18.0.2", 4789),
            ("host", "h3", "198.18.0.3", 4790),
            ("member", 42, "h1"),
            ("member", 42, "h2"),
            ("member", 42, "h3"),
            ("member", 42, SELF),
            ("endpoint", 42, MACS[0], "h1", ("198.19.42.1",)),
            ("endpoint", 42, MACS[1], "h1", ("198.19.42.2", "198.19.42.3")),
            ("endpoint", 42, MACS[2], "h1", ()),
            ("endpoint", 42, MACS[3], "h2", ("198.19.42.4",)),
            ("endpoint", 42, MACS[4], "h2", ()),
            ("endpoint", 42, MACS[5], SELF, ("198.19.42.9",)),
            ("endpoint", 43, MACS[6], "h1", ("198.19.42.1",)),
        ]
    )
    w.sink.reset()
    return w


def test_a_host_address_change_moves_exactly_that_hosts_macs() -> None:
    w = small_world()
    neighbours = w.table.neighbours(42)
    w.watched(("host", "h1", "198.18.0.11", 4789))
    assert w.sink.calls["fdb_set"] == 3  # h1's three endpoints on 42, none of h2's
    assert sorted(w.sink.touched("fdb_set", "fdb_delete")) == sorted(MACS[:3])  # once each, no delete
    assert {w.sink.fdb[42, m] for m in MACS[:3]} == {Vtep.parse("198.18.0.11")}
    assert w.sink.fdb[42, MACS[3]] == w.sink.fdb[42, MACS[4]] == Vtep.parse("198.18.0.2")
    assert w.sink.calls["flood_set"] == 1 and Vtep.parse("198.18.0.11") in w.table.flood(42)
    assert Vtep.parse("198.18.0.1") not in w.table.flood(42)
    # the addresses stay where they were: not even touched
    assert w.table.neighbours(42) == neighbours and w.sink.touched("neigh_set", "neigh_delete") == []
    # a host record written again with the same address and port changes nothing
    w.sink.reset()
    w.watched(("host", "h1", "198.18.0.11", 4789))
    assert w.sink.calls == Counter()


@pytest.mark.parametrize(
    "op",
    [
        ("endpoint", 42, MACS[7], "h3", ("198.19.42.5",)),  # new
        ("endpoint", 42, MACS[7], "h3", ("198.19.42.1",)),  # new, contesting an address
        ("endpoint", 42, MACS[1], "h1", ("198.19.42.3", "198.19.42.5")),  # other addresses
        ("endpoint", 42, MACS[1], "h1", ("198.19.42.2", "198.19.42.3")),  # the same value again
        ("endpoint", 42, MACS[0], "h2", ("198.19.42.1",)),  # a move
        ("endpoint", 42, MACS[0], "h3", ("198.19.42.4",)),  # a move, and an address taken
        ("endpoint", 42, MACS[0], SELF, ("198.19.42.1",)),  # now ours
        ("endpoint", 42, MACS[0], "ghost", ("198.19.42.1",)),  # now an unknown host's
        ("endpoint", 42, MACS[5], "h2", ("198.19.42.9",)),  # ours -> h2's
        ("endpoint", 43, MACS[6], "h2", ("198.19.42.2",)),  # a network not served
        ("endpoint_del", 42, MACS[1]),
        ("endpoint_del", 42, MACS[5]),  # ours
    ],
    ids=lambda op: "-".join(map(str, op[:4])),
)
def test_one_endpoint_event_touches_its_mac_and_its_addresses_only(op: tuple[object, ...]) -> None:
    w = small_world()
    vni, mac = op[1], op[2]
    assert isinstance(vni, int) and isinstance(mac, int)
    before = w.registry.endpoint(vni, mac)
    neighbours = dict(w.sink.neigh)
    w.watched(op)
    after = w.registry.endpoint(vni, mac)
    ips = (
        {ipaddress.ip_address(a) for ep in (before, after) if ep is not None for a in ep.ipv4 + ep.ipv6}
        if vni == 42
        else set()
    )
    # at most one change of the MAC's entry (set, move or delete), no flood list
    assert w.sink.calls["fdb_set"] + w.sink.calls["fdb_delete"] <= 1 and w.sink.calls["flood_set"] == 0
    assert set(w.sink.touched("fdb_set", "fdb_delete")) <= ({mac} if vni == 42 else set())
    # neighbour calls only for its addresses, and only where the answer changed
    touched = w.sink.touched("neigh_set", "neigh_delete")
    changed = {ip for _, ip in neighbours.keys() ^ w.sink.neigh.keys()} | {
        ip for (v, ip), m in w.sink.neigh.items() if neighbours.get((v, ip), m) != m
    }
    assert set(touched) <= ips and set(touched) == changed and len(touched) == len(changed)


def test_an_address_claimed_by_two_endpoints_goes_to_the_newer_and_back() -> None:
    w = World()
    w.start([("host", "h1", "198.18.0.1", 4789), ("host", "h2", "198.18.0.2", 4789)])
    ip = IPv4(A1)
    w.watched(("endpoint", 42, M2, "h1", (A1,)))  # the higher MAC, written first
    assert w.table.neighbours(42) == {ip: M2}
    w.watched(("endpoint", 42, M1, "h2", (A1,)))  # newer: it wins although its MAC is lower
    assert w.table.neighbours(42) == {ip: M1}
    w.watched(("endpoint_del", 42, M1))
    assert w.table.neighbours(42) == {ip: M2} and w.sink.neigh == {(42, ip): M2}
    w.watched(("endpoint", 42, M3, "h2", (A1,)))
    w.watched(("endpoint", 42, M1, "h1", (A1,)))
    assert w.table.neighbours(42) == {ip: M1}
    w.watched(("endpoint_del", 42, M1))
    assert w.table.neighbours(42) == {ip: M3}
    w.watched(("endpoint_del", 42, M3))
    assert w.table.neighbours(42) == {ip: M2}
    w.watched(("endpoint", 42, M2, "h1", ()))  # gives the address up
    assert w.table.neighbours(42) == {} and w.sink.neigh == {}


def test_an_endpoint_written_again_wins_its_contested_address() -> None:
    """The same value written again (an agent renewing its lease writes all it holds) is the most
    recently written: it takes the addresses it contests."""
    w = World()
    w.start([("host", "h1", "198.18.0.1", 4789), ("endpoint", 42, M1, "h1", (A1,)), ("endpoint", 42, M2, "h1", (A1,))])
    assert w.table.neighbours(42) == {IPv4(A1): M2}
    w.sink.reset()
    w.watched(("endpoint", 42, M1, "h1", (A1,)))
    assert desired(w.registry, SELF, 42).neighbours == {IPv4(A1): M1}
    assert w.table.neighbours(42) == {IPv4(A1): M1}
    assert w.sink.log == [("neigh_set", 42, IPv4(A1))]  # and nothing else


def test_a_refused_endpoint_gets_in_once_another_registry_entry_of_its_vni_leaves() -> None:
    w = World(max_per_vni=2)
    w.start(
        [
            ("host", "h1", "198.18.0.1", 4789),
            ("endpoint", 42, M1, "h1", ()),
            ("endpoint", 42, M2, "h1", ()),
            ("endpoint", 42, M3, "h1", ("198.19.42.3",)),
            ("endpoint", 43, M3, "h1", ()),  # another VNI's: not counted against 42
        ]
    )
    held = {e.mac for e in w.table.entries()}
    assert len(held) == 2 and w.table.counters.refused_cap == 1
    (refused,) = set(MACS[:3]) - held
    assert w.table.lookup(42, refused) is None
    w.watched(("endpoint_del", 42, sorted(held)[0]))
    entry = w.table.lookup(42, refused)
    assert entry is not None and entry.source is Source.REGISTRY and entry.vtep == Vtep.parse("198.18.0.1")
    assert w.sink.fdb[42, refused] == Vtep.parse("198.18.0.1") and len(w.table) == 2


def test_an_address_change_at_the_cap_keeps_the_endpoint_in_the_table() -> None:
    """An endpoint in the table whose addresses change keeps its slot (it does not leave and come
    back, which would let a refused MAC take the slot)."""
    w = World(max_per_vni=2)
    w.start(
        [
            ("host", "h1", "198.18.0.1", 4789),
            ("endpoint", 42, M1, "h1", ()),
            ("endpoint", 42, M2, "h1", ()),
            ("endpoint", 42, M3, "h1", ()),
        ]
    )
    assert {e.mac for e in w.table.entries()} == {M1, M2}
    w.sink.reset()
    w.watched(("endpoint", 42, M1, "h1", (A1,)))  # same host, one address more
    assert {e.mac for e in w.table.entries()} == {M1, M2}
    assert w.sink.log == [("neigh_set", 42, IPv4(A1))]


def test_a_host_and_its_endpoints_gone_in_one_resync_leave_the_table() -> None:
    """A resync returns Deleted(hosts/h1) before Deleted(its endpoints); when the host goes, the
    registry holds none of its endpoints any more, yet their entries and addresses must go."""
    r = Registry()
    t = ForwardingTable()
    topo = Topology(r, t, SELF)
    host = kv("/hosts/h1", {"address": "198.18.0.1"}, 2)
    topo.apply(
        r.snapshot([host, kv("/networks/42/endpoints/02:00:00:00:00:01", {"host": "h1", "ipv4": [A1]}, 3)], 3), 0
    )
    topo.serve(42, 0)
    assert t.lookup(42, M1) is not None and t.neighbours(42) == {IPv4(A1): M1}
    # h1's lease expired while we were away (and the revisions were compacted): read again
    events = r.snapshot([], 9)
    assert [type(e.key) for e in events] == [HostKey, EndpointKey]
    topo.apply(events, 1)
    assert desired(r, SELF, 42).fdb == {} and desired(r, SELF, 42).neighbours == {}
    assert t.lookup(42, M1) is None and t.neighbours(42) == {}
