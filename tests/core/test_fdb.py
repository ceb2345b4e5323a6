"""Forwarding-table semantics (overlay/core/fdb.py); the C table kept in step is tests/fastpath/test_sinks.py."""

from __future__ import annotations

import pytest

from overlay.core.fdb import ForwardingTable, Outcome, Source, Vtep

A, B, C = Vtep.parse("198.18.0.2"), Vtep.parse("198.18.0.3"), Vtep.parse("198.18.0.4")
M1, M2, M3 = 0x020000000001, 0x020000000002, 0x020000000003


def table(**kw: object) -> ForwardingTable:
    t = ForwardingTable(**kw)  # type: ignore[arg-type]
    t.add_vni(42)
    return t


def vtep_of(t: ForwardingTable, mac: int, vni: int = 42) -> Vtep | None:
    e = t.lookup(vni, mac)
    return e.vtep if e else None


def test_static_beats_registry_beats_learned() -> None:
    t = table()
    assert t.learn(42, M1, A, now=0) is Outcome.ADDED
    assert t.put(42, M1, B, Source.REGISTRY, now=1) is Outcome.MOVED
    assert t.learn(42, M1, C, now=2) is Outcome.SHADOWED
    assert vtep_of(t, M1) == B
    assert t.put(42, M1, C, Source.STATIC, now=3) is Outcome.MOVED
    assert t.put(42, M1, A, Source.REGISTRY, now=4) is Outcome.SHADOWED
    assert vtep_of(t, M1) == C and t.lookup(42, M1).source is Source.STATIC  # type: ignore[union-attr]


def test_removing_the_claim_in_force_reinstates_the_next() -> None:
    t = table()
    t.put(42, M1, A, Source.REGISTRY, now=0)
    t.put(42, M1, B, Source.STATIC, now=0)
    assert t.remove(42, M1, Source.STATIC)
    assert vtep_of(t, M1) == A
    assert t.remove(42, M1, Source.REGISTRY)
    assert t.lookup(42, M1) is None and len(t) == 0
    assert not t.remove(42, M1, Source.REGISTRY)


def test_learned_entries_age_out_after_300_seconds_by_default() -> None:
    t = table()
    t.learn(42, M1, A, now=0)
    t.learn(42, M2, A, now=100)
    assert t.expire(now=299.9) == []
    gone = t.expire(now=300)
    assert [(e.mac, e.vtep) for e in gone] == [(M1, A)]
    assert vtep_of(t, M1) is None and vtep_of(t, M2) == A
    assert t.counters.expired == 1


def test_seeing_a_mac_again_keeps_it_alive() -> None:
    t = table(ageing=10)
    t.learn(42, M1, A, now=0)
    t.learn(42, M2, A, now=5)
    t.touch(42, M1, now=8)
    assert [e.mac for e in t.expire(now=15)] == [M2]
    assert vtep_of(t, M1) == A


def test_static_and_registry_entries_never_age() -> None:
    t = table()
    t.put(42, M1, A, Source.STATIC, now=0)
    t.put(42, M2, A, Source.REGISTRY, now=0)
    assert t.expire(now=1e9) == []
    assert len(t) == 2


def test_cap_refuses_learned_macs_and_counts() -> None:
    t = table(max_per_vni=2)
    t.learn(42, M1, A, now=0)
    t.learn(42, M2, A, now=1)
    assert t.learn(42, M3, A, now=2) is Outcome.REFUSED_CAP
    assert t.counters.refused_cap == 1 and len(t) == 2
    assert t.learn(42, M1, B, now=3) is Outcome.MOVED  # known MACs still move at the cap


def test_cap_is_per_vni() -> None:
    t = table(max_per_vni=1)
    t.add_vni(7)
    t.learn(42, M1, A, now=0)
    assert t.learn(7, M1, A, now=0) is Outcome.ADDED


def test_at_the_cap_authoritative_entries_evict_the_oldest_learned() -> None:
    t = table(max_per_vni=2)
    t.learn(42, M1, A, now=0)
    t.learn(42, M2, A, now=1)
    assert t.put(42, M3, B, Source.REGISTRY, now=2) is Outcome.ADDED
    assert vtep_of(t, M1) is None and t.counters.evicted == 1
    t.put(42, M2, B, Source.STATIC, now=3)  # replaces the learned M2: no learned left
    assert t.put(42, 0x020000000004, B, Source.REGISTRY, now=4) is Outcome.REFUSED_CAP


def test_moves_are_counted() -> None:
    t = table()
    t.learn(42, M1, A, now=0)
    assert t.learn(42, M1, A, now=1) is Outcome.REFRESHED
    assert t.learn(42, M1, B, now=2) is Outcome.MOVED
    assert t.counters.moves == 1 and vtep_of(t, M1) == B


def test_unknown_vni_and_group_macs_are_refused() -> None:
    t = table()
    assert t.learn(9, M1, A, now=0) is Outcome.REFUSED_UNKNOWN_VNI
    assert t.learn(42, 0xFFFFFFFFFFFF, A, now=0) is Outcome.REFUSED_MULTICAST
    assert len(t) == 0


def test_flood_lists_are_sets_per_vni() -> None:
    t = table()
    t.add_vni(7)
    t.set_flood(42, [B, A, A])
    t.add_flood(7, C)
    assert t.flood(42) == (A, B) and t.flood(7) == (C,)
    t.remove_flood(42, A)
    assert t.flood(42) == (B,)
    with pytest.raises(KeyError, match="not served"):
        t.set_flood(99, [A])


def test_removing_a_vni_forgets_its_entries() -> None:
    t = table()
    t.learn(42, M1, A, now=0)
    t.remove_vni(42)
    assert t.vnis() == [] and len(t) == 0


def test_counts_by_source() -> None:
    t = table()
    t.learn(42, M1, A, now=0)
    t.put(42, M2, A, Source.REGISTRY, now=0)
    t.put(42, M3, A, Source.STATIC, now=0)
    assert t.count() == {Source.LEARNED: 1, Source.REGISTRY: 1, Source.STATIC: 1}


def test_bad_settings_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="ageing"):
        ForwardingTable(ageing=0)
    with pytest.raises(ValueError, match="max_per_vni"):
        ForwardingTable(max_per_vni=0)


def test_a_sink_that_refuses_leaves_the_table_as_it_was() -> None:
    class Full:
        def fdb_set(self, vni: int, mac: int, vtep: Vtep) -> None:
            if vtep == C:
                raise OverflowError("no more VTEP ids")

        def fdb_delete(self, vni: int, mac: int) -> None: ...
        def flood_set(self, vni: int, vteps: object) -> None: ...
        def vni_add(self, vni: int) -> None: ...
        def vni_remove(self, vni: int) -> None: ...

    t = ForwardingTable(sink=Full())
    t.add_vni(42)
    t.learn(42, M1, A, now=0)
    with pytest.raises(OverflowError):
        t.learn(42, M1, C, now=1)
    with pytest.raises(OverflowError):
        t.learn(42, M2, C, now=1)
    assert vtep_of(t, M1) == A and t.lookup(42, M1).seen == 0 and t.lookup(42, M2) is None  # type: ignore[union-attr]
    assert len(t) == 1


def test_a_gateway_mac_from_another_host_is_never_learned() -> None:
    from overlay.core.gateway import gateway_mac

    t = ForwardingTable()
    t.add_vni(42)
    assert t.learn(42, gateway_mac(42), A, now=0) is Outcome.REFUSED_GATEWAY
    assert t.learn(42, gateway_mac(43), A, now=0) is Outcome.REFUSED_GATEWAY
    assert (t.lookup(42, gateway_mac(42)), t.counters.refused_gateway) == (None, 2)
