"""The registry's schema and event logic (overlay/core/registry.py) and what the forwarding table
makes of it (overlay/core/topology.py): pure, no etcd."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.core.fdb import ForwardingTable, Source, Vtep
from overlay.core.registry import (
    EVERYTHING,
    MAX_VALUE,
    AddressKey,
    Allocation,
    Deleted,
    Endpoint,
    EndpointKey,
    Host,
    HostKey,
    Member,
    MemberKey,
    Network,
    NetworkKey,
    Put,
    Registry,
    Schema,
    Scope,
)
from overlay.core.topology import Topology

P = "/overlay/v1"
MAC1, MAC2 = 0x020000000001, 0x020000000002


def kv(key: str, value: object, mod: int) -> tuple[str, bytes, int]:
    return (P + key, json.dumps(value).encode() if not isinstance(value, bytes) else value, mod)


def test_keys_round_trip() -> None:
    s = Schema()
    for k in (
        NetworkKey(42),
        HostKey("h1"),
        MemberKey(42, "h1"),
        EndpointKey(42, MAC1),
        AddressKey(42, ipaddress.IPv4Address("198.19.42.5")),
    ):
        assert s.parse_key(s.key(k)) == k
    assert s.key(EndpointKey(42, MAC1)) == "/overlay/v1/networks/42/endpoints/02:00:00:00:00:01"
    assert s.key(AddressKey(42, ipaddress.IPv4Address("198.19.42.5"))) == "/overlay/v1/networks/42/ipam/198.19.42.5"


@given(st.integers(0, 0xFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_address_keys_round_trip(vni: int, address: int) -> None:
    s, k = Schema("/elsewhere/"), AddressKey(vni, ipaddress.IPv4Address(address))
    assert s.parse_key(s.key(k)) == k


@pytest.mark.parametrize(
    "raw",
    [
        "/other/hosts/h1",
        P + "/hosts/",
        P + "/hosts/a/b",
        P + "/networks/x",
        P + "/networks/16777216",
        P + "/networks/042",
        P + "/networks/42/endpoints/zz",
        P + "/networks/42/other/h1",
        P + "/hosts/-bad",
        P + "/networks/42/endpoints/02-00-00-00-00-01",
        P + "/networks/42/endpoints/0A:00:00:00:00:01",
        # IPAM keys: one spelling of an address only (an alias would let two hosts claim it at once)
        P + "/networks/42/ipam/198.019.0.5",
        P + "/networks/42/ipam/198.19.0.05",
        P + "/networks/42/ipam/3322609669",
        P + "/networks/42/ipam/0xc6.19.0.5",
        P + "/networks/42/ipam/ 198.19.0.5",
        P + "/networks/42/ipam/198.19.0.5 ",
        P + "/networks/42/ipam/198.19.0.5/32",
        P + "/networks/42/ipam/198.19.0.256",
        P + "/networks/42/ipam/2001:2:0:42:0:0:0:1",
        P + "/networks/42/ipam/",
        P + "/networks/042/ipam/198.19.0.5",
        P + "/networks/42/ipam",
    ],
)
def test_keys_outside_the_schema_are_not_parsed(raw: str) -> None:
    assert Schema().parse_key(raw) is None


def test_snapshot_then_watch_events() -> None:
    r = Registry()
    events = r.snapshot([kv("/hosts/h1", {"address": "198.18.0.1"}, 3), kv("/networks/42", {"vni": 42}, 4)], 4)
    assert events == [Put(HostKey("h1"), Host("198.18.0.1")), Put(NetworkKey(42), Network(42))]
    assert r.put(P + "/hosts/h1", b'{"address": "198.18.0.9"}', 5) == [Put(HostKey("h1"), Host("198.18.0.9"))]
    assert r.put(P + "/hosts/h1", b'{"address": "198.18.0.9"}', 6) == []  # same value: nothing to do
    assert r.delete(P + "/hosts/h1", 7) == [Deleted(HostKey("h1"), Host("198.18.0.9"))]
    assert r.revision == 7


def test_resync_diffs_by_mod_revision_so_nothing_in_a_gap_is_lost() -> None:
    r = Registry()
    r.snapshot(
        [
            kv("/hosts/h1", {"address": "198.18.0.1"}, 3),
            kv("/hosts/h2", {"address": "198.18.0.2"}, 4),
            kv("/hosts/h3", {"address": "198.18.0.3"}, 5),
        ],
        5,
    )
    # During an outage (and a compaction) h1 was deleted, h2 changed and changed back, h4 added.
    events = r.snapshot(
        [
            kv("/hosts/h2", {"address": "198.18.0.2"}, 9),
            kv("/hosts/h3", {"address": "198.18.0.3"}, 5),
            kv("/hosts/h4", {"address": "198.18.0.4"}, 10),
        ],
        12,
    )
    # Puts as the read returns them (a resync may come in pages), then what the read lacked.
    assert events == [
        Put(HostKey("h2"), Host("198.18.0.2")),
        Put(HostKey("h4"), Host("198.18.0.4")),
        Deleted(HostKey("h1"), Host("198.18.0.1")),
    ]
    assert r.revision == 12


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("/hosts/h1", b"{not json"),
        ("/hosts/h1", {"address": 5}),
        ("/hosts/h1", {"address": "198.18.0.300"}),
        ("/hosts/h1", {"address": "198.18.0.1", "port": 0}),
        ("/hosts/h1", {"address": "198.18.0.1", "port": True}),
        ("/networks/42", {"vni": 43}),
        ("/networks/42", {"vni": 42, "subnet": "198.19.42.0/33"}),
        ("/networks/42/endpoints/02:00:00:00:00:01", {"host": "h1", "ipv4": ["nope"]}),
        ("/networks/42/endpoints/02:00:00:00:00:01", {"host": ""}),
        ("/networks/42/endpoints/02:00:00:00:00:01", []),
        ("/whatever", {}),
        ("/networks/42", {"vni": 42, "gateway": "198.19.42.300"}),
        ("/networks/42", {"vni": 42, "gateway": "198.19.042.1"}),
        ("/networks/42", {"vni": 42, "gateway": "fe80::1"}),
        ("/networks/42", {"vni": 42, "gateway": 3322609665}),
        ("/networks/42", {"vni": 42, "subnet": "198.19.42.1/24"}),  # host bits set
        ("/hosts/h1", {"address": "198.18.0.1", "probe_port": 0}),
        ("/hosts/h1", {"address": "198.18.0.1", "probe_port": 65536}),
        ("/hosts/h1", {"address": "198.18.0.1", "probe_port": -1}),
        ("/hosts/h1", {"address": "198.18.0.1", "probe_port": "4799"}),
        ("/hosts/h1", {"address": "198.18.0.1", "probe_port": True}),
        ("/networks/42/ipam/198.19.42.5", {}),
        ("/networks/42/ipam/198.19.42.5", {"host": ""}),
        ("/networks/42/ipam/198.19.42.5", {"host": "-h1"}),
        ("/networks/42/ipam/198.19.42.5", {"host": "h1/../h2"}),
        ("/networks/42/ipam/198.19.42.5", {"host": "h" * 64}),
        ("/networks/42/ipam/198.19.42.5", {"host": 1}),
        ("/networks/42/ipam/198.19.42.5", {"host": None}),
        ("/networks/42/ipam/198.19.42.5", {"host": "h1", "mac": 2}),
        ("/networks/42/ipam/198.19.42.5", {"host": "h1", "owner": ["cni"]}),
        ("/networks/42/ipam/198.19.42.5", ["h1"]),
        ("/networks/42/ipam/198.19.42.5", "h1"),
        ("/networks/42/ipam/198.19.42.5", b"\xff\xfe"),
        ("/networks/42/ipam/198.019.42.5", {"host": "h1"}),  # the value is fine, the key is an alias
    ],
)
def test_bad_values_are_reported_once_and_ignored(key: str, value: object) -> None:
    r = Registry()
    assert r.snapshot([kv(key, value, 3)], 3) == []
    assert r.put(*kv(key, value, 3)) == [] and len(r.rejected) == 1
    assert r.rejected[0][0] == P + key and r.entries == {}


def test_a_good_value_overwritten_by_a_bad_one_stays_until_a_good_one_or_a_delete() -> None:
    r = Registry()
    r.snapshot([kv("/hosts/h1", {"address": "198.18.0.1"}, 3)], 3)
    assert r.put(P + "/hosts/h1", b"garbage", 4) == []
    assert r.get(HostKey("h1")) == Host("198.18.0.1")
    assert r.snapshot([kv("/hosts/h1", b"garbage", 4)], 5) == []  # a resync keeps it too
    assert r.get(HostKey("h1")) == Host("198.18.0.1")
    assert r.delete(P + "/hosts/h1", 6) == [Deleted(HostKey("h1"), Host("198.18.0.1"))]


@given(st.binary(max_size=200), st.text(max_size=60))
def test_no_value_or_key_makes_the_registry_raise(value: bytes, key: str) -> None:
    r = Registry()
    r.snapshot([(P + "/hosts/h1", value, 2), (P + "/" + key, value, 3)], 3)
    r.put(P + "/networks/42/endpoints/02:00:00:00:00:01", value, 4)
    r.put(P + "/networks/42/ipam/198.19.42.5", value, 5)
    r.delete(P + "/" + key, 6)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@given(st.dictionaries(st.sampled_from(["host", "mac", "owner", "other"]), JSONISH, max_size=4))
def test_hostile_allocations_never_raise_and_never_replace_a_good_one(value: dict[str, object]) -> None:
    good = Allocation("h1", "02:00:00:00:00:05", "cni/c1/eth0")
    r = Registry()
    r.snapshot(
        [kv("/networks/42/ipam/198.19.42.5", {"host": "h1", "mac": "02:00:00:00:00:05", "owner": "cni/c1/eth0"}, 3)], 3
    )
    raw = kv("/networks/42/ipam/198.19.42.5", value, 4)
    try:
        expected = Schema().decode(AddressKey(42, ipaddress.IPv4Address("198.19.42.5")), raw[1])
    except ValueError:
        expected = good  # rejected: the last good value stays
    r.put(*raw)
    assert r.allocations(42) == {ipaddress.IPv4Address("198.19.42.5"): expected}
    assert len(r.rejected) == (0 if expected is not good else 1)


@pytest.mark.parametrize("bad", [{"host": "bad host"}, {"host": 7}, {"host": "h2", "owner": 7}, [], b"{"])
def test_a_claimed_address_overwritten_by_a_bad_value_stays_claimed_by_its_holder(bad: object) -> None:
    key = "/networks/42/ipam/198.19.42.5"
    r = Registry()
    r.snapshot([kv(key, {"host": "h1", "mac": "02:00:00:00:00:05", "owner": "cni/c1/eth0"}, 3)], 3)
    good = Allocation("h1", "02:00:00:00:00:05", "cni/c1/eth0")
    assert r.put(*kv(key, bad, 4)) == [] and len(r.rejected) == 1 and r.rejected[0][0] == P + key
    assert r.allocations(42) == {ipaddress.IPv4Address("198.19.42.5"): good}
    assert r.snapshot([kv(key, bad, 4)], 5) == []  # a resync keeps it too
    assert r.allocations(42) == {ipaddress.IPv4Address("198.19.42.5"): good} and len(r.rejected) == 1
    k = AddressKey(42, ipaddress.IPv4Address("198.19.42.5"))
    assert r.delete(P + key, 6) == [Deleted(k, good)] and r.allocations(42) == {}


def test_allocations_are_per_network_and_typed() -> None:
    r = Registry()
    events = r.snapshot(
        [
            kv("/networks/42/ipam/198.19.42.5", {"host": "h1", "mac": "02:00:00:00:00:05", "owner": "cni/c1/eth0"}, 3),
            kv("/networks/42/ipam/198.19.42.6", {"host": "h2"}, 4),
            kv("/networks/7/ipam/198.19.42.5", {"host": "h3"}, 5),
        ],
        5,
    )
    assert Put(AddressKey(42, ipaddress.IPv4Address("198.19.42.6")), Allocation("h2")) in events
    assert r.allocations(42) == {
        ipaddress.IPv4Address("198.19.42.5"): Allocation("h1", "02:00:00:00:00:05", "cni/c1/eth0"),
        ipaddress.IPv4Address("198.19.42.6"): Allocation("h2"),
    }
    assert r.allocations(7) == {ipaddress.IPv4Address("198.19.42.5"): Allocation("h3")}
    assert r.allocations(8) == {}


def test_a_network_gateway_and_a_host_probe_port_are_read() -> None:
    r = Registry()
    r.snapshot(
        [
            kv("/networks/42", {"vni": 42, "subnet": "198.19.42.0/24", "gateway": "198.19.42.1"}, 2),
            kv("/hosts/h1", {"address": "198.18.0.1", "probe_port": 1}, 3),
            kv("/hosts/h2", {"address": "198.18.0.2", "probe_port": 65535}, 4),
            kv("/hosts/h3", {"address": "198.18.0.3"}, 5),
        ],
        5,
    )
    assert r.networks()[42].gateway == "198.19.42.1"
    assert [h.probe_port for _, h in sorted(r.hosts().items())] == [1, 65535, None]


@pytest.mark.parametrize("gateway", ["198.19.43.1", "198.19.42.0", "198.19.42.255"])
def test_a_gateway_that_cannot_be_a_gateway_of_the_subnet_is_rejected(gateway: str) -> None:
    r = Registry()
    r.snapshot([kv("/networks/42", {"vni": 42, "subnet": "198.19.42.0/24", "gateway": gateway}, 2)], 2)
    assert r.networks() == {} and len(r.rejected) == 1


# --- topology -------------------------------------------------------------------------------


def world(*extra: tuple[str, bytes, int]) -> tuple[Registry, ForwardingTable, Topology]:
    r = Registry()
    r.snapshot(
        [
            kv("/hosts/h1", {"address": "198.18.0.1"}, 2),
            kv("/hosts/h2", {"address": "198.18.0.2"}, 3),
            kv("/hosts/h3", {"address": "198.18.0.3", "port": 8472}, 4),
            kv("/networks/42/members/h1", {}, 5),
            kv("/networks/42/members/h2", {}, 6),
            kv("/networks/42/members/h3", {}, 7),
            kv("/networks/42/endpoints/02:00:00:00:00:01", {"host": "h1", "ipv4": ["198.19.42.1"]}, 8),
            kv("/networks/42/endpoints/02:00:00:00:00:02", {"host": "h2", "ipv4": ["198.19.42.2"]}, 9),
            *extra,
        ],
        20,
    )
    t = ForwardingTable()
    topo = Topology(r, t, "h1")
    topo.serve(42, now=0)
    return r, t, topo


def test_flood_list_is_the_other_known_members() -> None:
    _, t, _ = world()
    assert t.flood(42) == (Vtep.parse("198.18.0.2"), Vtep.parse("198.18.0.3", 8472))


def test_endpoints_of_other_hosts_are_registry_entries_and_own_ones_are_not() -> None:
    _, t, topo = world()
    entry = t.lookup(42, MAC2)
    assert entry is not None and entry.source is Source.REGISTRY and entry.vtep == Vtep.parse("198.18.0.2")
    assert t.lookup(42, MAC1) is None
    # ARP suppression answers for other hosts' endpoints; our own answer for themselves
    assert t.neighbours(42) == {ipaddress.IPv4Address("198.19.42.2"): MAC2}


def test_a_host_moving_moves_its_endpoints_and_a_host_leaving_takes_them_away() -> None:
    r, t, topo = world()
    topo.apply(r.put(P + "/hosts/h2", b'{"address": "198.18.0.22"}', 21), now=1)
    assert t.lookup(42, MAC2).vtep == Vtep.parse("198.18.0.22")  # type: ignore[union-attr]
    assert Vtep.parse("198.18.0.22") in t.flood(42)
    topo.apply(r.delete(P + "/hosts/h2", 22), now=2)
    assert t.lookup(42, MAC2) is None and Vtep.parse("198.18.0.22") not in t.flood(42)
    assert t.neighbours(42) == {}


def test_endpoint_put_and_delete_follow_etcd() -> None:
    r, t, topo = world()
    topo.apply(r.put(P + "/networks/42/endpoints/02:00:00:00:00:03", b'{"host": "h3"}', 21), now=1)
    assert t.lookup(42, 0x020000000003).vtep == Vtep.parse("198.18.0.3", 8472)  # type: ignore[union-attr]
    topo.apply(r.delete(P + "/networks/42/endpoints/02:00:00:00:00:03", 22), now=2)
    assert t.lookup(42, 0x020000000003) is None


def test_registry_entries_win_over_learned_ones_and_learning_resumes_after() -> None:
    r, t, topo = world()
    t.learn(42, 0x020000000003, Vtep.parse("198.18.0.2"), now=0)
    topo.apply(r.put(P + "/networks/42/endpoints/02:00:00:00:00:03", b'{"host": "h3"}', 21), now=1)
    assert t.lookup(42, 0x020000000003).source is Source.REGISTRY  # type: ignore[union-attr]
    topo.apply(r.delete(P + "/networks/42/endpoints/02:00:00:00:00:03", 22), now=2)
    assert t.lookup(42, 0x020000000003) is None
    assert t.learn(42, 0x020000000003, Vtep.parse("198.18.0.2"), now=3).value == "added"


def test_other_vnis_do_not_reach_the_table() -> None:
    r, t, topo = world()
    topo.apply(r.put(P + "/networks/7/endpoints/02:00:00:00:00:09", b'{"host": "h2"}', 21), now=1)
    assert t.vnis() == [42] and t.lookup(42, 0x020000000009) is None


def test_an_address_claimed_twice_goes_to_the_newest_endpoint() -> None:
    r, t, topo = world()
    topo.apply(
        r.put(P + "/networks/42/endpoints/02:00:00:00:00:05", b'{"host": "h3", "ipv4": ["198.19.42.2"]}', 30), now=1
    )
    assert t.neighbours(42)[ipaddress.IPv4Address("198.19.42.2")] == 0x020000000005


def test_an_endpoint_refused_at_the_cap_is_taken_once_there_is_room() -> None:
    r = Registry()
    r.snapshot(
        [
            kv("/hosts/h2", {"address": "198.18.0.2"}, 2),
            kv("/networks/42/endpoints/02:00:00:00:00:02", {"host": "h2"}, 3),
            kv("/networks/42/endpoints/02:00:00:00:00:03", {"host": "h2"}, 4),
        ],
        4,
    )
    t = ForwardingTable(max_per_vni=1)
    topo = Topology(r, t, "h1")
    topo.serve(42, now=0)
    assert len(t) == 1
    topo.apply(r.delete(P + "/networks/42/endpoints/02:00:00:00:00:02", 5), now=1)
    assert t.lookup(42, 0x020000000003) is not None


# --- values too large, scoped and paged resyncs, indexes ----------------------------------------


def sized(value: dict[str, object], size: int) -> bytes:
    """``value`` as JSON of exactly ``size`` bytes (padded with an unknown field, which is ignored)."""
    raw = json.dumps({**value, "pad": ""}).encode()
    out = json.dumps({**value, "pad": "x" * (size - len(raw))}).encode()
    assert len(out) == size
    return out


@pytest.mark.parametrize("size", [MAX_VALUE + 1, 1 << 20])
def test_a_value_too_large_at_a_new_key_is_refused_counted_and_reported_once(size: int) -> None:
    key = "/networks/42/endpoints/02:00:00:00:00:01"
    raw = sized({"host": "h1"}, size)
    r = Registry()
    assert r.put(P + key, raw, 3) == []
    assert r.get(EndpointKey(42, MAC1)) is None and r.entries == {} and r.count(42) == 0
    assert (r.too_large, r.refused) == (1, 1)
    assert len(r.rejected) == 1 and r.rejected[0][0] == P + key and str(size) in r.rejected[0][1]
    # the same (key, revision) again, watched or read: not counted or reported again
    assert r.put(P + key, raw, 3) == [] and r.snapshot([(P + key, raw, 3)], 4) == []
    assert (r.too_large, r.refused, len(r.rejected)) == (1, 1, 1)
    # written again (a new revision): refused again, counted and reported again
    assert r.put(P + key, raw, 5) == [] and (r.too_large, r.refused, len(r.rejected)) == (2, 2, 2)
    assert r.get(EndpointKey(42, MAC1)) is None


def test_a_value_of_max_value_bytes_is_taken() -> None:
    r = Registry()
    events = r.put(P + "/hosts/h1", sized({"address": "198.18.0.1"}, MAX_VALUE), 3)
    assert events == [Put(HostKey("h1"), Host("198.18.0.1"))] and (r.too_large, r.refused, r.rejected) == (0, 0, [])


def test_a_value_too_large_at_a_key_that_held_a_good_value_leaves_the_good_one() -> None:
    r = Registry()
    r.snapshot([kv("/hosts/h1", {"address": "198.18.0.1"}, 3)], 3)
    big = sized({"address": "198.18.0.9"}, 1 << 20)  # a good value, but too large
    assert r.put(P + "/hosts/h1", big, 4) == []
    assert r.get(HostKey("h1")) == Host("198.18.0.1") and r.revision_of(HostKey("h1")) == 3
    assert r.snapshot([(P + "/hosts/h1", big, 4)], 5) == []  # a resync keeps it too (not deleted)
    assert r.get(HostKey("h1")) == Host("198.18.0.1")
    assert (r.too_large, r.refused, len(r.rejected)) == (1, 1, 1)


def fleet() -> Registry:
    r = Registry()
    r.snapshot(
        [
            kv("/hosts/h1", {"address": "198.18.0.1"}, 2),
            kv("/hosts/h2", {"address": "198.18.0.2"}, 3),
            kv("/networks/42", {"vni": 42}, 4),
            kv("/networks/42/members/h1", {}, 5),
            kv("/networks/42/endpoints/02:00:00:00:00:01", {"host": "h1"}, 6),
            kv("/networks/42/endpoints/02:00:00:00:00:02", {"host": "h2"}, 7),
            kv("/networks/43", {"vni": 43}, 8),
            kv("/networks/43/members/h1", {}, 9),
            kv("/networks/43/endpoints/02:00:00:00:00:01", {"host": "h1"}, 10),
            kv("/networks/420/members/h1", {}, 11),
        ],
        11,
    )
    return r


def test_a_scoped_snapshot_reads_and_deletes_only_within_its_scope() -> None:
    r = fleet()
    before = r.entries
    read = [
        kv("/hosts/h1", {"address": "198.18.0.1"}, 2),  # h2 is gone: hosts/ are in the scope
        kv("/networks/42/members/h1", {}, 5),  # networks/42 and endpoint MAC1 are gone
        kv("/networks/42/endpoints/02:00:00:00:00:02", {"host": "h1"}, 20),  # moved
        kv("/networks/42/members/h2", {}, 21),  # new
        # other networks: changed, new, gone (43's network and member) in the read: all ignored
        kv("/networks/43/endpoints/02:00:00:00:00:01", {"host": "h2"}, 22),
        kv("/networks/43/endpoints/02:00:00:00:00:09", {"host": "h2"}, 23),
        kv("/networks/7/members/h1", {}, 24),
        kv("/networks/420/members/h2", {}, 25),
    ]
    events = r.snapshot(read, 30, Scope(vnis=frozenset({42})))
    assert events == [
        Put(EndpointKey(42, MAC2), Endpoint("h1")),
        Put(MemberKey(42, "h2"), Member()),
        Deleted(HostKey("h2"), Host("198.18.0.2")),
        Deleted(NetworkKey(42), Network(42)),
        Deleted(EndpointKey(42, MAC1), Endpoint("h1")),
    ]
    after = r.entries
    assert {k: e for k, e in after.items() if getattr(k, "vni", 42) != 42} == {
        k: e for k, e in before.items() if getattr(k, "vni", 42) != 42
    }
    assert r.get(EndpointKey(43, MAC1)) == Endpoint("h1") and r.get(EndpointKey(43, 0x020000000009)) is None
    assert r.members(7) == [] and r.members(420) == ["h1"] and r.revision == 30
    # without hosts/ in the scope the hosts stay too
    r = fleet()
    events = r.snapshot([kv("/networks/42", {"vni": 42}, 4)], 30, Scope(hosts=False, vnis=frozenset({42})))
    assert {type(e.key) for e in events} == {MemberKey, EndpointKey} and all(isinstance(e, Deleted) for e in events)
    assert sorted(r.hosts()) == ["h1", "h2"] and r.count(43) == 1 and r.count(42) == 0


def changed_fleet_read() -> list[tuple[str, bytes, int]]:
    return [
        kv("/hosts/h1", {"address": "198.18.0.11"}, 20),
        kv("/hosts/h3", {"address": "198.18.0.3"}, 21),
        kv("/networks/42", {"vni": 42}, 4),
        kv("/networks/42/endpoints/02:00:00:00:00:01", {"host": "h1"}, 6),
        kv("/networks/42/endpoints/02:00:00:00:00:02", {"host": "h3", "ipv4": ["198.19.42.2"]}, 22),
        kv("/networks/42/endpoints/02:00:00:00:00:03", b"{bad", 23),
        kv("/networks/43/members/h3", {}, 24),
        kv("/networks/43/endpoints/02:00:00:00:00:01", {"host": "h1"}, 10),
    ]


@pytest.mark.parametrize("page", [1, 2, 3, 100])
@pytest.mark.parametrize("scope", [EVERYTHING, Scope(vnis=frozenset({42})), Scope(hosts=False, vnis=frozenset({43}))])
def test_a_resync_in_pages_ends_as_one_snapshot(page: int, scope: Scope) -> None:
    kvs = changed_fleet_read()
    one = fleet()
    want = one.snapshot(kvs, 30, scope)
    paged = fleet()
    resync = paged.resync(scope)
    events = []
    for i in range(0, len(kvs), page):
        events += resync.feed(kvs[i : i + page])
    events += resync.finish(30)
    assert events == want and [type(e) for e in events] == [type(e) for e in want]
    assert paged.entries == one.entries and paged.revision == one.revision == 30
    assert (paged.refused, paged.rejected) == (one.refused, one.rejected)
    for host in ("h1", "h2", "h3"):
        for vni in (42, 43):
            assert sorted(paged.endpoints_of(host, vni)) == sorted(one.endpoints_of(host, vni))


def test_a_key_unchanged_in_a_resync_is_not_decoded_again() -> None:
    r = fleet()
    before = r.entries
    kvs = [(Schema().key(k), b"not even json", e.mod_revision) for k, e in before.items()]
    events = r.snapshot(kvs, 30)  # every key at the revision we hold: nothing to read
    assert events == [] and r.rejected == [] and r.refused == 0
    assert r.entries == before and r.revision == 30
    # one key at a new revision is decoded (and here refused: its last good value stays)
    kvs[0] = (kvs[0][0], b"not even json", 31)
    assert r.snapshot(kvs, 31) == [] and len(r.rejected) == 1 and r.entries == before


def test_the_host_index_follows_moves_and_deletes() -> None:
    r = Registry()
    ep = "/networks/42/endpoints/02:00:00:00:00:01"
    r.put(*kv(ep, {"host": "h1"}, 2))
    r.put(*kv("/networks/42/endpoints/02:00:00:00:00:02", {"host": "h1"}, 3))
    r.put(*kv("/networks/43/endpoints/02:00:00:00:00:01", {"host": "h1"}, 4))
    assert sorted(r.endpoints_of("h1", 42)) == [MAC1, MAC2] and r.endpoints_of("h1", 43) == [MAC1]
    assert r.count(42) == 2 and r.count(43) == 1 and r.count(44) == 0
    assert r.put(*kv(ep, {"host": "h2", "ipv4": ["198.19.42.1"]}, 5)) == [
        Put(EndpointKey(42, MAC1), Endpoint("h2", ["198.19.42.1"]), Endpoint("h1"))
    ]
    assert r.endpoints_of("h1", 42) == [MAC2] and r.endpoints_of("h2", 42) == [MAC1]
    assert r.endpoints_of("h1", 43) == [MAC1] and r.endpoints_of("h2", 43) == []
    assert r.endpoint(42, MAC1) == Endpoint("h2", ["198.19.42.1"]) and r.count(42) == 2
    r.put(*kv(ep, {"host": "h2"}, 6))  # same host, other addresses: still indexed once
    assert r.endpoints_of("h2", 42) == [MAC1]
    r.delete(P + ep, 7)
    assert r.endpoints_of("h2", 42) == [] and r.endpoint(42, MAC1) is None and r.count(42) == 1
    # a resync moves and deletes as well
    r.snapshot([kv("/networks/42/endpoints/02:00:00:00:00:02", {"host": "h3"}, 8)], 8)
    assert r.endpoints_of("h1", 42) == [] and r.endpoints_of("h3", 42) == [MAC2]
    assert r.endpoints_of("h1", 43) == [] and r.count(43) == 0
    # a bad value at an endpoint leaves it (and its index) as it was
    r.put(*kv("/networks/42/endpoints/02:00:00:00:00:02", {"host": "bad host"}, 9))
    assert r.endpoints_of("h3", 42) == [MAC2] and r.endpoint(42, MAC2) == Endpoint("h3")


def test_members_and_hosts_are_looked_up_by_id() -> None:
    r = fleet()
    assert r.is_member(42, "h1") and not r.is_member(42, "h2") and not r.is_member(44, "h1")
    r.put(*kv("/networks/42/members/h2", {}, 20))
    assert r.is_member(42, "h2") and r.members(42) == ["h1", "h2"]
    r.delete(P + "/networks/42/members/h1", 21)
    assert not r.is_member(42, "h1") and r.is_member(43, "h1") and r.members(42) == ["h2"]
    assert r.host("h1") == Host("198.18.0.1") and r.host("h9") is None


def test_drop_forgets_a_network_and_nothing_else() -> None:
    r = fleet()
    before = r.entries
    assert r.drop(Scope(hosts=False, vnis=frozenset({43}))) is None  # no events
    assert r.count(43) == 0 and r.members(43) == [] and 43 not in r.networks() and 43 not in r.vnis()
    assert r.endpoints_of("h1", 43) == [] and r.endpoints_of("h1", 42) == [MAC1]
    assert r.entries == {k: e for k, e in before.items() if getattr(k, "vni", None) != 43}
    assert r.members(420) == ["h1"]  # networks/420 is not networks/43... nor 42's
    # a network read again after a drop comes back as new keys (Puts)
    events = r.snapshot([kv("/networks/43/members/h1", {}, 9)], 12, Scope(hosts=False, vnis=frozenset({43})))
    assert events == [Put(MemberKey(43, "h1"), Member())]


@pytest.mark.parametrize(
    "raw",
    [
        P + "/networks/42/endpoints/02:00:00:00:00:0A",  # upper case
        P + "/networks/42/endpoints/02:00:00:00:00:Ab",
        P + "/networks/42/endpoints/02-00-00-00-00-0a",  # dashes
        P + "/networks/42/endpoints/0200.0000.000a",
        P + "/networks/42/endpoints/02000000000a",
        P + "/networks/42/endpoints/2:0:0:0:0:a",
        P + "/networks/42/endpoints/02:00:00:00:00:0a:",
        P + "/networks/42/endpoints/02:00:00:00:00:0a\n",
        P + "/networks/042/endpoints/02:00:00:00:00:01",  # a VNI with a leading zero
        P + "/networks/042/members/h1",
        P + "/networks/00",
        P + "/networks/+42",
        P + "/networks/ 42",
        P + "/networks/\u0664\u0662",  # Arabic-Indic digits: isdigit(), but not a VNI's spelling
        P + "/networks/16777216/members/h1",  # over 24 bits
        P + "/networks/99999999999999999999",
        P + "/networks/42/ipam/198.019.0.1",  # a non-canonical address
        P + "/networks/42/ipam/198.19.0.01",
        P + "/networks/42/ipam/0198.19.0.1",
        P + "/networks/42/ipam/198.19.1",
        P + "/networks/42/ipam/198.19.0.1.",
        P + "/networks/42/members/h1/x",
        P + "/networks/42/members/",
    ],
)
def test_parse_key_refuses_alias_spellings(raw: str) -> None:
    assert Schema().parse_key(raw) is None
    r = Registry()
    assert r.put(raw, b"{}", 3) == [] and len(r.rejected) == 1 and r.entries == {}


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (P + "/networks/0", NetworkKey(0)),
        (P + "/networks/16777215", NetworkKey(16777215)),
        (P + "/networks/42/endpoints/02:00:00:00:00:0a", EndpointKey(42, 0x02000000000A)),
        (P + "/networks/42/endpoints/ff:ff:ff:ff:ff:fe", EndpointKey(42, 0xFFFFFFFFFFFE)),
        (P + "/networks/42/members/h1", MemberKey(42, "h1")),
        (P + "/networks/42/ipam/198.19.0.1", AddressKey(42, ipaddress.IPv4Address("198.19.0.1"))),
        (P + "/networks/42/ipam/0.0.0.0", AddressKey(42, ipaddress.IPv4Address("0.0.0.0"))),
        (P + "/networks/42/ipam/198.19.0.10", AddressKey(42, ipaddress.IPv4Address("198.19.0.10"))),
        (P + "/hosts/H1.example_2-a", HostKey("H1.example_2-a")),
    ],
)
def test_parse_key_takes_the_canonical_spellings(raw: str, key: object) -> None:
    s = Schema()
    assert s.parse_key(raw) == key and s.key(key) == raw  # type: ignore[arg-type]


# --- a resync while events are watched (two bugs found by these, fixed) -------------------------


def test_a_page_older_than_a_watched_put_does_not_undo_it() -> None:
    r = Registry()
    r.snapshot([kv("/hosts/h1", {"address": "198.18.0.1"}, 2)], 2)
    resync = r.resync()  # a read at revision 8, in pages
    r.put(*kv("/hosts/h1", {"address": "198.18.0.9"}, 10))  # watched meanwhile
    events = resync.feed([kv("/hosts/h1", {"address": "198.18.0.5"}, 5)])  # the page, read at 8
    events += resync.finish(8)
    assert r.get(HostKey("h1")) == Host("198.18.0.9") and r.revision_of(HostKey("h1")) == 10
    assert events == []


def test_overlapping_resyncs_delete_only_what_neither_read_returned() -> None:
    r = fleet()
    everything = r.resync()  # a resync after a compaction, in pages ...
    network = r.resync(Scope(hosts=False, vnis=frozenset({43})))  # ... while a network is read again
    member = kv("/networks/43/members/h1", {}, 9)
    endpoint = kv("/networks/43/endpoints/02:00:00:00:00:01", {"host": "h1"}, 10)
    events = everything.feed([kv("/hosts/h1", {"address": "198.18.0.1"}, 2), member, endpoint])
    events += network.feed([kv("/networks/43", {"vni": 43}, 8), member, endpoint]) + network.finish(12)
    events += everything.finish(12)
    assert r.members(43) == ["h1"] and r.count(43) == 1
    assert not any(isinstance(e.key, (MemberKey, EndpointKey)) and e.key.vni == 43 for e in events)


# --- encrypted networks: a network's "encrypted", a host's "pubkey" ---------------------------

PUBKEY = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="  # RFC 7748 Alice's public key


def test_a_host_pubkey_is_read_and_absent_is_none() -> None:
    r = Registry()
    r.snapshot(
        [
            kv("/hosts/h1", {"address": "198.18.0.1", "pubkey": PUBKEY}, 3),
            kv("/hosts/h2", {"address": "198.18.0.2"}, 4),  # an older agent: no key
        ],
        4,
    )
    assert r.host("h1") == Host("198.18.0.1", pubkey=PUBKEY) and r.host("h2") == Host("198.18.0.2")
    assert r.host("h2").pubkey is None and r.rejected == []  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("pubkey", "why"),
    [
        ("not base64!", "pubkey: public key is not base64"),
        (PUBKEY[:-1], "pubkey: public key is not base64"),
        ("AAAA", "pubkey: public key is 3 bytes, not 32"),
        ("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "pubkey: public key is all zeros"),
        (PUBKEY[:-2] + "p=", "not the canonical base64"),
        (42, "Expected `str | null`"),
        ("", "pubkey: public key is empty"),
    ],
)
def test_a_malformed_pubkey_refuses_the_host_value_and_the_last_good_one_stays(pubkey: object, why: str) -> None:
    r = Registry()
    r.snapshot([kv("/hosts/h1", {"address": "198.18.0.1", "pubkey": PUBKEY}, 3)], 3)
    assert r.put(*kv("/hosts/h1", {"address": "198.18.0.1", "pubkey": pubkey}, 4)) == []
    assert r.host("h1") == Host("198.18.0.1", pubkey=PUBKEY)  # not taken off the overlay by a bad write
    assert r.refused == 1 and len(r.rejected) == 1 and why in r.rejected[0][1], r.rejected
    # a new host with a bad key is not taken at all, and neither is it in a snapshot
    assert r.put(*kv("/hosts/h2", {"address": "198.18.0.2", "pubkey": pubkey}, 5)) == [] and r.host("h2") is None
    assert Registry().snapshot([kv("/hosts/h2", {"address": "198.18.0.2", "pubkey": pubkey}, 5)], 5) == []
    with pytest.raises(ValueError, match="pubkey|str"):
        Schema().decode(HostKey("h1"), json.dumps({"address": "198.18.0.1", "pubkey": pubkey}).encode())


def test_a_network_is_encrypted_or_not() -> None:
    r = Registry()
    r.snapshot(
        [
            kv("/networks/42", {"vni": 42, "encrypted": True}, 3),
            kv("/networks/43", {"vni": 43, "encrypted": False}, 4),
            kv("/networks/44", {"vni": 44}, 5),  # written before encryption existed
            kv("/networks/45", {"vni": 45, "encrypted": "yes"}, 6),  # refused
            kv("/networks/46", {"vni": 46, "encrypted": 1}, 7),  # refused: a bool, not a number
        ],
        7,
    )
    assert {v: n.encrypted for v, n in r.networks().items()} == {42: True, 43: False, 44: False}
    assert [k for k, _ in r.rejected] == [P + "/networks/45", P + "/networks/46"] and r.refused == 2


def test_the_new_fields_are_left_out_of_the_json_at_their_defaults() -> None:
    s = Schema()
    plain = b'{"vni":42,"name":"blue","subnet":null,"mtu":null,"gateway":null,"subnet6":null,"gateway6":null}'
    assert s.encode(Network(42, "blue")) == plain  # byte for byte what it was before encryption
    assert s.encode(Network(42, "blue", encrypted=True)) == plain[:-1] + b',"encrypted":true}'
    host = b'{"address":"198.18.0.1","port":4789,"probe_port":null,"address6":null,"underlay_family":null}'
    assert s.encode(Host("198.18.0.1")) == host
    assert s.encode(Host("198.18.0.1", pubkey=PUBKEY)) == host[:-1] + b',"pubkey":"' + PUBKEY.encode() + b'"}'
    for value, k in (
        (Network(42, "blue", encrypted=True), NetworkKey(42)),
        (Network(42, "blue"), NetworkKey(42)),
        (Host("198.18.0.1", pubkey=PUBKEY), HostKey("h1")),
        (Host("198.18.0.1"), HostKey("h1")),
    ):
        assert s.decode(k, s.encode(value)) == value  # type: ignore[arg-type]
    # other values encode as they always did
    assert s.encode(Endpoint("h1", ["198.19.42.5"])) == b'{"host":"h1","ipv4":["198.19.42.5"],"ipv6":[]}'
