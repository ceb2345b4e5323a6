"""The Cython fast path against the reference codec (overlay/core/wire.py) and scapy, and its tables."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from overlay.core import seal, wire
from overlay.core.wire import Decoded, Drop
from overlay.fastpath import load
from tests.frames import datagrams, frames, unicast_macs, vnis

fp = load()

VTEP_A = (0xC6120002, 4789)  # 198.18.0.2
VTEP_B = (0xC6120003, 4789)  # 198.18.0.3
ARP_BROADCAST = b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x08\x06" + bytes(28)


def core_with(vni: int, flood: list[tuple[int, int]] = [VTEP_A], allow_vlan: bool = False) -> fp.ForwardingCore:
    core = fp.ForwardingCore(allow_vlan=allow_vlan)
    core.vni_add(vni)
    core.flood_set(vni, flood)
    return core


def fast_encode(vni: int, frame: bytes, allow_vlan: bool = True) -> tuple[int, bytes]:
    core = core_with(vni, allow_vlan=allow_vlan)
    batch = fp.FrameBatch(1)
    batch.put_frame(0, frame)
    fp.encap(core, batch, vni)
    return batch.result(0)[0], batch.datagram(0)


def fast_decode(datagram: bytes, vnis: set[int], allow_vlan: bool = False) -> Decoded | Drop | int:
    core = fp.ForwardingCore(allow_vlan=allow_vlan)
    for v in vnis:
        core.vni_add(v)
    batch = fp.FrameBatch(1)
    batch.put_datagram(0, datagram)
    fp.decap(core, batch, 1)
    status, vni = batch.result(0)
    if status == seal.PUNTED:
        return int(status)  # a handshake message: not a Drop
    return Decoded(vni, batch.frame(0)) if status == 0 else Drop(status)


def reference_receive(datagram: bytes, vnis: set[int], allow_vlan: bool) -> Decoded | Drop | int:
    """The receive path's rules: seal.kind first; a core without sessions opens nothing."""
    k = seal.kind(datagram)
    if k == "handshake":
        return seal.PUNTED
    if k == "bad_handshake":
        return Drop.AUTH_FAILED
    if k == "data":
        return seal.open_datagram({}, datagram)[0] or Drop.AUTH_FAILED
    return wire.decode(datagram, vnis, allow_vlan)


def test_drop_numbers_are_the_reference_enum() -> None:
    assert fp.DROP_REASONS == {d.name: d.value for d in Drop}


# --- differential: fast path == reference == scapy ---------------------------------------


@given(vnis, frames())
def test_encap_equals_reference_and_scapy(vni: int, frame: bytes) -> None:
    status, datagram = fast_encode(vni, frame)
    assert status == 0
    assert datagram == wire.encode(vni, frame) == bytes(VXLAN(flags=0x08, vni=vni) / Raw(frame))


@given(datagrams(), st.sets(vnis, max_size=3), st.booleans(), st.booleans())
def test_decap_equals_reference(datagram: bytes, served: set[int], allow_vlan: bool, serve_it: bool) -> None:
    if len(datagram) >= 8 and serve_it:
        served = served | {int.from_bytes(datagram[4:7], "big")}  # make "known VNI" common
    assert fast_decode(datagram, served, allow_vlan) == reference_receive(datagram, served, allow_vlan)


@given(vnis, frames())
def test_decap_reads_what_scapy_builds(vni: int, frame: bytes) -> None:
    assert fast_decode(bytes(VXLAN(flags=0x08, vni=vni) / Raw(frame)), {vni}, True) == Decoded(vni, frame)


@given(st.one_of(frames(), st.binary(max_size=13)), vnis, st.booleans())
def test_encap_drops_exactly_what_the_reference_send_rules_drop(frame: bytes, vni: int, allow_vlan: bool) -> None:
    status, _ = fast_encode(vni, frame, allow_vlan=allow_vlan)
    assert status == (wire.send_check(frame, allow_vlan) or 0)


@given(frames())
def test_source_port_equals_reference(frame: bytes) -> None:
    assert fp.flow_source_port(frame) == wire.source_port(frame)


@given(st.lists(frames(), min_size=1, max_size=64), vnis)
def test_batch_encap_sends_each_frame_from_its_flow_port(batch_frames: list[bytes], vni: int) -> None:
    core = core_with(vni)
    batch = fp.FrameBatch(64)
    for i, f in enumerate(batch_frames):
        batch.put_frame(i, f)
    assert fp.encap(core, batch, vni, 0, len(batch_frames)) == len(batch_frames)
    for slot, vtep, sport in batch.outputs():
        assert core.vtep(vtep) == VTEP_A
        assert sport == wire.source_port(batch_frames[slot])
        assert batch.datagram(slot) == wire.encode(vni, batch_frames[slot])


# --- every drop reason, counted -----------------------------------------------------------


def test_every_drop_reason_is_counted() -> None:
    core = core_with(1, flood=[])
    core.vni_add(2)
    core.source_check = True
    rx = fp.FrameBatch(7)
    rx.put_datagram(6, bytes.fromhex("08000000 00000100") + ARP_BROADCAST, src_ip=VTEP_B[0])  # not a member
    rx.put_datagram(0, b"\x08\x00")
    rx.put_datagram(1, bytes.fromhex("00000000 00000100") + ARP_BROADCAST)
    rx.put_datagram(2, bytes.fromhex("08000000 00000100") + ARP_BROADCAST[:10])
    rx.put_datagram(3, bytes.fromhex("08000000 00000300") + ARP_BROADCAST)
    rx.put_datagram(4, bytes.fromhex("08000000 00000100") + ARP_BROADCAST[:12] + b"\x81\x00\x00\x01\x08\x06")
    core.flood_set(1, [VTEP_A])
    rx.put_datagram(5, bytes.fromhex("08000000 00000100") + ARP_BROADCAST, src_ip=VTEP_A[0])
    assert fp.decap(core, rx, 7) == 1
    core.flood_set(1, [])
    tx = fp.FrameBatch(2, out_capacity=1)
    tx.put_frame(0, ARP_BROADCAST)  # VNI 1 has an empty flood list
    tx.put_frame(1, b"short")
    fp.encap(core, tx, 1)
    core.flood_set(2, [VTEP_A, VTEP_B])  # fan-out 2 > out_capacity 1
    tx.put_frame(0, ARP_BROADCAST)
    fp.encap(core, tx, 2, 0, 1)
    counts = core.drops()
    expected = {d: 1 for d in Drop if d <= Drop.NOT_MEMBER} | {Drop.INNER_TOO_SHORT: 2}  # rx and tx
    assert {d: counts[d] for d in expected} == expected
    # TOO_BIG, TX_ERROR, TAP_WRITE and OVERSIZE come from the kernel: tests/test_pumps.py


def test_encap_on_unserved_vni_drops_every_frame() -> None:
    core = fp.ForwardingCore()
    batch = fp.FrameBatch(3)
    for i in range(3):
        batch.put_frame(i, ARP_BROADCAST)
    fp.encap(core, batch, 7)
    assert core.drops()[Drop.UNKNOWN_VNI] == 3 and batch.n_out == 0


# --- forwarding decisions -----------------------------------------------------------------


@given(unicast_macs, vnis)
def test_known_unicast_goes_to_its_vtep_only(mac: bytes, vni: int) -> None:
    core = core_with(vni, flood=[VTEP_A, VTEP_B])
    core.fdb_set(vni, int.from_bytes(mac, "big"), *VTEP_B)
    batch = fp.FrameBatch(1)
    batch.put_frame(0, mac + bytes(6) + b"\x08\x00" + bytes(46))
    fp.encap(core, batch, vni)
    assert [core.vtep(v) for _, v, _ in batch.outputs()] == [VTEP_B]


@pytest.mark.parametrize("dst", ["ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "33:33:00:00:00:01", "02:00:00:00:00:99"])
def test_broadcast_multicast_and_unknown_unicast_flood(dst: str) -> None:
    core = core_with(42, flood=[VTEP_A, VTEP_B])
    core.fdb_set(42, 0x020000000002, *VTEP_A)
    batch = fp.FrameBatch(1)
    batch.put_frame(0, wire.mac_to_int(dst).to_bytes(6, "big") + bytes(6) + b"\x08\x00" + bytes(46))
    fp.encap(core, batch, 42)
    outputs = batch.outputs()
    assert sorted(core.vtep(v) for _, v, _ in outputs) == [VTEP_A, VTEP_B]
    assert len({sport for _, _, sport in outputs}) == 1  # replicas of one frame, one flow


def test_same_mac_in_another_vni_is_another_entry() -> None:
    core = core_with(1, flood=[VTEP_A])
    core.vni_add(2)
    core.fdb_set(1, 0x020000000002, *VTEP_B)
    assert core.fdb_get(1, 0x020000000002) == VTEP_B
    assert core.fdb_get(2, 0x020000000002) is None


def test_encap_stops_when_outputs_are_full_and_resumes() -> None:
    core = core_with(42, flood=[VTEP_A, VTEP_B])
    batch = fp.FrameBatch(4, out_capacity=5)
    for i in range(4):
        batch.put_frame(i, ARP_BROADCAST)
    nxt = fp.encap(core, batch, 42)
    assert nxt == 2 and batch.n_out == 4  # a third flood (2 more outputs) would not fit
    assert fp.encap(core, batch, 42, nxt) == 4 and batch.n_out == 4
    assert core.drops()[Drop.OUT_OF_ROOM] == 0  # nothing lost


# --- learning -----------------------------------------------------------------------------


def test_decap_queues_new_sources_and_marks_known_ones() -> None:
    core = core_with(42)
    core.fdb_set(42, 0x020000000001, *VTEP_A)
    frame_from = lambda src: b"\xff" * 6 + src.to_bytes(6, "big") + b"\x08\x06" + bytes(28)  # noqa: E731
    batch = fp.FrameBatch(4)
    batch.put_datagram(0, wire.encode(42, frame_from(0x020000000001)), src_ip=VTEP_A[0])  # known: hit
    batch.put_datagram(1, wire.encode(42, frame_from(0x020000000005)), src_ip=VTEP_B[0])  # new
    batch.put_datagram(2, wire.encode(42, frame_from(0x020000000005)), src_ip=VTEP_B[0])  # same: once
    batch.put_datagram(3, wire.encode(42, frame_from(0x010000000005)), src_ip=VTEP_B[0])  # group: never
    assert fp.decap(core, batch, 4) == 4
    assert core.take_learned() == [(42, 0x020000000005, VTEP_B[0])]
    assert core.take_learned() == []
    assert core.take_hits() == [(42, 0x020000000001)]
    assert core.take_hits() == []


def test_a_mac_seen_from_another_vtep_is_queued_as_a_move() -> None:
    core = core_with(42)
    core.fdb_set(42, 0x020000000001, *VTEP_A)
    batch = fp.FrameBatch(1)
    batch.put_datagram(0, wire.encode(42, ARP_BROADCAST), src_ip=VTEP_B[0])
    fp.decap(core, batch, 1)
    assert core.take_learned() == [(42, 0x020000000001, VTEP_B[0])]


# --- the hash table under inserts and deletes (backward-shift deletion) --------------------


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 40)), max_size=300))
def test_table_matches_a_dict_under_any_sequence_of_sets_and_deletes(ops: list[tuple[bool, int, int]]) -> None:
    core = fp.ForwardingCore(capacity=4)  # small, so it grows and probe runs collide
    model: dict[tuple[int, int], tuple[int, int]] = {}
    for n, (is_set, vni, mac) in enumerate(ops):
        if is_set:
            core.fdb_set(vni, mac, n, 4789)
            model[vni, mac] = (n, 4789)
        else:
            assert core.fdb_delete(vni, mac) == ((vni, mac) in model)
            model.pop((vni, mac), None)
    assert len(core) == len(model)
    for vni in range(4):
        for mac in range(41):
            assert core.fdb_get(vni, mac) == model.get((vni, mac))


def test_bad_keys_are_refused() -> None:
    core = fp.ForwardingCore()
    with pytest.raises(ValueError):
        core.vni_add(1 << 24)
    with pytest.raises(ValueError):
        core.fdb_set(1, 1 << 48, 1, 4789)
    with pytest.raises(KeyError, match="vni_add it first"):
        core.flood_set(5, [VTEP_A])


def test_batch_refuses_oversized_frames_and_bad_slots() -> None:
    batch = fp.FrameBatch(2, slot_size=2048)
    with pytest.raises(ValueError, match="exceeds"):
        batch.put_frame(0, bytes(batch.max_frame + 1))
    with pytest.raises(IndexError):
        batch.put_frame(2, ARP_BROADCAST)
    with pytest.raises(ValueError, match="multiple of 64"):
        fp.FrameBatch(2, slot_size=100)
