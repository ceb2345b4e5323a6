"""The fast path's C table follows the pure forwarding table (core.fdb) through CoreSink,
after any sequence of operations."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from overlay.core.fdb import ForwardingTable, Source, Vtep
from overlay.fastpath import load
from overlay.fastpath.sinks import CoreSink

A, B, C = Vtep.parse("198.18.0.2"), Vtep.parse("198.18.0.3"), Vtep.parse("198.18.0.4")
M1, M2, M3 = 0x020000000001, 0x020000000002, 0x020000000003


# --- the C table follows the pure table ---------------------------------------------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "remove", "expire", "flood"]),
        st.sampled_from(list(Source)),
        st.integers(0, 5),  # MAC
        st.sampled_from([A, B, C]),
        st.integers(0, 400),  # time step
    ),
    max_size=80,
)


@given(ops)
def test_fast_path_table_mirrors_fdb_after_any_operations(sequence: list[tuple[str, Source, int, Vtep, int]]) -> None:
    fp = load()
    core = fp.ForwardingCore()
    t = ForwardingTable(sink=CoreSink(core), max_per_vni=4)
    t.add_vni(42)
    now = 0.0
    for op, source, mac, vtep, step in sequence:
        now += step
        if op == "put":
            t.put(42, 0x020000000000 | mac, vtep, source, now)
        elif op == "remove":
            t.remove(42, 0x020000000000 | mac, source)
        elif op == "expire":
            t.expire(now)
        else:
            t.add_flood(42, vtep)
    for mac in range(6):
        entry = t.lookup(42, 0x020000000000 | mac)
        fast = core.fdb_get(42, 0x020000000000 | mac)
        assert fast == (None if entry is None else (int(entry.vtep.ip), entry.vtep.port))
    assert len(core) == len(t)
    assert core.flood_get(42) == [(int(v.ip), v.port) for v in t.flood(42)]
