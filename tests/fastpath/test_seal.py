"""The fast path's seal and open stage (ext/crypto.pxi) against its reference, overlay/core/seal.py:
byte-identical sealed datagrams, the same verdict for every damaged or replayed one, and the
encrypted-network rules of encap and decap (no plaintext in, no plaintext out)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.core import seal, wire
from overlay.core.wire import Drop
from overlay.fastpath import load
from tests.frames import frames, vnis

fp = load()

PEER = (0xC6120002, 4789)  # 198.18.0.2
OTHER = (0xC6120003, 4789)  # 198.18.0.3
KEY = bytes(range(32))
ciphers = st.sampled_from([seal.AES_256_GCM, seal.CHACHA20_POLY1305])
keys = st.binary(min_size=32, max_size=32)
indexes = st.integers(0, 2**32 - 1)
BROADCAST = b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x08\x06" + bytes(28)


def encrypted_core(vni: int, flood: list[tuple[int, int]] = [PEER]) -> fp.ForwardingCore:
    core = fp.ForwardingCore(source_check=True, allow_vlan=True)
    core.vni_add(vni)
    core.flood_set(vni, flood)
    core.vni_encrypt(vni, True)
    return core


def receive(core: fp.ForwardingCore, datagrams: list[bytes], src: int = PEER[0]) -> list[tuple[int, bytes]]:
    batch = fp.FrameBatch(max(1, len(datagrams)))
    for i, d in enumerate(datagrams):
        batch.put_datagram(i, d, src)
    fp.decap(core, batch, len(datagrams))
    return [(batch.result(i)[0], batch.frame(i) if batch.result(i)[0] == 0 else b"") for i in range(len(datagrams))]


def test_the_overhead_is_32_bytes_and_no_type_has_vxlans_i_flag() -> None:
    assert seal.OVERHEAD == fp.SEAL_OVERHEAD_BYTES == 32
    assert all(not t & 0x08 for t in (seal.DATA, *seal.HANDSHAKE_TYPES))


@given(vnis, frames(), ciphers, keys, indexes)
def test_sealed_datagrams_are_byte_identical_to_the_reference(
    vni: int, frame: bytes, cipher: int, key: bytes, index: int
) -> None:
    core = encrypted_core(vni)
    core.tx_set(*PEER, index, key, cipher)
    batch = fp.FrameBatch(2)
    batch.put_frame(0, frame)
    batch.put_frame(1, frame)
    assert fp.encap(core, batch, vni) == 2
    plain = wire.encode(vni, frame)
    assert [batch.output(j) for j in range(batch.n_out)] == [
        seal.seal(cipher, key, index, 0, plain),
        seal.seal(cipher, key, index, 1, plain),
    ]
    assert core.tx_counters() == [(*PEER, index, 2)]


@given(vnis, frames(), ciphers, keys, indexes)
def test_what_the_reference_seals_the_fast_path_opens(
    vni: int, frame: bytes, cipher: int, key: bytes, index: int
) -> None:
    core = encrypted_core(vni)
    core.rx_add(index, *PEER, key, cipher)
    sealed = seal.seal(cipher, key, index, 7, wire.encode(vni, frame))
    assert receive(core, [sealed]) == [(0, frame)]
    assert core.take_confirmed() == [index]
    assert receive(core, [sealed]) == [(Drop.REPLAYED, b"")]  # the same datagram again
    assert core.take_confirmed() == []  # reported once


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    good = seal.seal(seal.AES_256_GCM, KEY, 5, draw(st.integers(0, 50)), wire.encode(42, draw(frames())))
    how = draw(st.sampled_from(["flip", "truncate", "extend", "index"]))
    if how == "flip":
        at = draw(st.integers(1, len(good) - 1))  # byte 0 is the type: another type is another path
        return good[:at] + bytes([good[at] ^ (1 << draw(st.integers(0, 7)))]) + good[at + 1 :]
    if how == "truncate":
        return good[: draw(st.integers(1, len(good) - 1))]
    if how == "extend":
        return good + draw(st.binary(min_size=1, max_size=8))
    return good[:4] + (6).to_bytes(4, "little") + good[8:]


@given(st.lists(st.one_of(damaged(), st.integers(0, 50)), min_size=1, max_size=20))
def test_damaged_and_replayed_datagrams_get_the_references_verdict(items: list[bytes | int]) -> None:
    core = encrypted_core(42)
    core.rx_add(5, *PEER, KEY, seal.AES_256_GCM)
    sessions = {5: seal.RxSession(seal.AES_256_GCM, KEY)}
    frame = BROADCAST
    for item in items:
        datagram = seal.seal(seal.AES_256_GCM, KEY, 5, item, wire.encode(42, frame)) if isinstance(item, int) else item
        verdict, _, inner = seal.open_datagram(sessions, datagram)
        expected = wire.decode(inner, {42}, allow_vlan=True) if verdict is None else verdict
        status, got = receive(core, [datagram])[0]
        if isinstance(expected, Drop):
            assert status == expected
        else:
            assert (status, got) == (0, expected.frame)


@given(st.lists(st.integers(0, 10_000), max_size=200))
def test_the_replay_window_accepts_exactly_what_the_reference_accepts(counters: list[int]) -> None:
    core = encrypted_core(42)
    core.rx_add(9, *PEER, KEY, seal.CHACHA20_POLY1305)
    window = seal.ReplayWindow()
    for c in counters:
        expected = 0 if window.accept(c) else Drop.REPLAYED
        assert (
            receive(core, [seal.seal(seal.CHACHA20_POLY1305, KEY, 9, c, wire.encode(42, BROADCAST))])[0][0] == expected
        )


def test_the_window_keeps_4032_counters_behind_the_newest() -> None:
    window = seal.ReplayWindow()
    assert window.accept(10_000) and window.accept(10_000 - seal.WINDOW) and not window.accept(10_000 - seal.WINDOW - 1)
    assert seal.WINDOW >= 2048


def test_plaintext_vxlan_for_an_encrypted_vni_is_dropped_even_from_a_member() -> None:
    core = encrypted_core(42)
    assert receive(core, [wire.encode(42, BROADCAST)]) == [(Drop.NOT_ENCRYPTED, b"")]
    assert core.drops()[Drop.NOT_ENCRYPTED] == 1
    core.vni_add(43)  # a plaintext network beside it still takes plaintext
    core.flood_set(43, [PEER])
    assert receive(core, [wire.encode(43, BROADCAST)]) == [(0, BROADCAST)]


def test_a_session_opens_only_datagrams_from_its_own_peer() -> None:
    core = encrypted_core(42, [PEER, OTHER])
    core.rx_add(1, *PEER, KEY, seal.AES_256_GCM)
    sealed = seal.seal(seal.AES_256_GCM, KEY, 1, 0, wire.encode(42, BROADCAST))
    assert receive(core, [sealed], src=OTHER[0]) == [(Drop.NOT_MEMBER, b"")]


def test_an_unknown_receiver_index_fails_authentication_and_a_removed_session_opens_nothing() -> None:
    core = encrypted_core(42)
    core.rx_add(1, *PEER, KEY, seal.AES_256_GCM)
    assert receive(core, [seal.seal(seal.AES_256_GCM, KEY, 2, 0, wire.encode(42, BROADCAST))])[0][0] == Drop.AUTH_FAILED
    assert core.rx_remove(1) and not core.rx_remove(1)
    assert receive(core, [seal.seal(seal.AES_256_GCM, KEY, 1, 0, wire.encode(42, BROADCAST))])[0][0] == Drop.AUTH_FAILED
    with pytest.raises(ValueError):
        core.rx_add(3, *PEER, b"short", seal.AES_256_GCM)
    core.rx_add(3, *PEER, KEY, seal.AES_256_GCM)
    with pytest.raises(KeyError):
        core.rx_add(3, *PEER, KEY, seal.AES_256_GCM)


def test_without_a_session_nothing_is_sent_and_the_peer_is_wanted_once() -> None:
    core = encrypted_core(42)
    batch = fp.FrameBatch(4)
    for i in range(4):
        batch.put_frame(i, BROADCAST)
    fp.encap(core, batch, 42)
    assert batch.n_out == 0 and core.drops()[Drop.NO_SESSION] == 4
    assert core.take_wanted() == [PEER] and core.take_wanted() == []
    core.tx_set(*PEER, 77, KEY, seal.AES_256_GCM)
    fp.encap(core, batch, 42)
    assert batch.n_out == 4
    assert core.tx_clear(*PEER) and not core.tx_clear(*PEER)


def test_an_encrypted_flood_seals_a_copy_per_peer_and_skips_peers_without_a_session() -> None:
    third = (0xC6120004, 4789)
    core = encrypted_core(42, [PEER, OTHER, third])
    keys = {PEER: bytes(32), OTHER: bytes([1]) * 32}
    for i, (vtep, key) in enumerate(keys.items()):
        core.tx_set(*vtep, 100 + i, key, seal.AES_256_GCM)
    batch = fp.FrameBatch(1)
    batch.put_frame(0, BROADCAST)
    fp.encap(core, batch, 42)
    plain = wire.encode(42, BROADCAST)
    sent = {core.vtep(vtep): batch.output(j) for j, (_, vtep, _) in enumerate(batch.outputs())}
    assert sent == {
        vtep: seal.seal(seal.AES_256_GCM, key, 100 + i, 0, plain) for i, (vtep, key) in enumerate(keys.items())
    }
    assert core.take_wanted() == [third]


def test_handshake_messages_are_handed_over_with_their_source_not_dropped() -> None:
    core = encrypted_core(42)
    messages = [bytes([1]) + bytes(132), bytes([2]) + bytes(76)]  # handshake.INITIATION_LEN, RESPONSE_LEN
    assert [s for s, _ in receive(core, messages)] == [seal.PUNTED, seal.PUNTED]
    assert core.take_handshakes() == [(m, PEER[0]) for m in messages] and core.take_handshakes() == []
    assert sum(core.drops()) == 0
    receive(core, [bytes([1]) + bytes(300), bytes([2]) + bytes(132)])  # no handshake message has these sizes
    assert core.drops()[Drop.AUTH_FAILED] == 2 and core.take_handshakes() == []
    receive(core, [messages[0]] * 65)  # more than the queue holds between two takes
    assert len(core.take_handshakes()) == 64 and core.drops()[Drop.HANDSHAKE_LIMITED] == 1


def test_a_session_is_no_membership_a_sealed_datagram_from_a_non_member_is_dropped() -> None:
    core = encrypted_core(42, [PEER])
    core.source_check = False  # plaintext networks may turn it off; sealed datagrams are still checked
    core.rx_add(7, *OTHER, KEY, seal.AES_256_GCM)  # a host with a session, not on network 42's flood list
    sealed = seal.seal(seal.AES_256_GCM, KEY, 7, 0, wire.encode(42, BROADCAST))
    assert receive(core, [sealed], src=OTHER[0]) == [(Drop.NOT_MEMBER, b"")]


def test_a_copy_from_another_address_burns_no_counter_of_the_genuine_datagram() -> None:
    core = encrypted_core(42, [PEER, OTHER])
    core.rx_add(1, *PEER, KEY, seal.AES_256_GCM)
    sealed = seal.seal(seal.AES_256_GCM, KEY, 1, 0, wire.encode(42, BROADCAST))
    assert receive(core, [sealed], src=OTHER[0]) == [(Drop.NOT_MEMBER, b"")]
    assert receive(core, [sealed]) == [(0, BROADCAST)]


def test_an_encrypted_flood_to_more_than_256_peers_reaches_every_one() -> None:
    peers = [(0xC6120000 + k, 4789) for k in range(2, 302)]
    core = encrypted_core(42, peers)
    for k, vtep in enumerate(peers):
        core.tx_set(*vtep, k, KEY, seal.AES_256_GCM)
    batch = fp.FrameBatch(2, out_capacity=1024)
    batch.put_frame(0, BROADCAST)
    batch.put_frame(1, BROADCAST)
    assert fp.encap(core, batch, 42) == 1  # one frame's 300 copies this call, the next frame the next
    assert sorted(core.vtep(v) for _, v, _ in batch.outputs()) == sorted(peers)
    assert fp.encap(core, batch, 42, 1) == 2 and batch.n_out == 300
    assert core.drops()[Drop.OUT_OF_ROOM] == 0


def test_a_keepalive_confirms_the_session_and_delivers_nothing() -> None:
    sender, receiver = encrypted_core(42), encrypted_core(42)
    assert sender.seal_keepalive(*PEER) is None  # no session yet
    sender.tx_set(*PEER, 3, KEY, seal.AES_256_GCM)
    keepalive = sender.seal_keepalive(*PEER)
    assert keepalive == seal.seal(seal.AES_256_GCM, KEY, 3, 0, b"") and len(keepalive) == seal.OVERHEAD
    receiver.rx_add(3, *PEER, KEY, seal.AES_256_GCM)
    assert receive(receiver, [keepalive]) == [(seal.PUNTED, b"")]
    assert receiver.take_confirmed() == [3] and sum(receiver.drops()) == 0
    assert receiver.rx_stats() == [(3, 1, 0)]  # one datagram opened, no inner bytes


@given(vnis, frames(), ciphers, keys)
def test_the_evp_fallback_seals_and_opens_exactly_as_the_direct_provider_calls(
    vni: int, frame: bytes, cipher: int, key: bytes
) -> None:
    assert fp.openssl_provider_in_use()  # the default provider of Debian's OpenSSL 3
    plain = wire.encode(vni, frame)
    fp.use_openssl_provider(False)
    try:
        evp = encrypted_core(vni)
        evp.tx_set(*PEER, 9, key, cipher)
        evp.rx_add(9, *PEER, key, cipher)
        assert not fp.openssl_provider_in_use()
    finally:
        fp.use_openssl_provider(True)
    batch = fp.FrameBatch(1)
    batch.put_frame(0, frame)
    fp.encap(evp, batch, vni)
    sealed = batch.output(0)
    assert sealed == seal.seal(cipher, key, 9, 0, plain)
    assert receive(evp, [sealed]) == [(0, frame)]
    other = seal.seal(cipher, key, 9, 1, plain)
    assert receive(evp, [other[:-1] + bytes([other[-1] ^ 1])])[0][0] == Drop.AUTH_FAILED  # the tag is checked


def test_data_for_a_session_we_do_not_have_names_its_source_once_per_burst() -> None:
    core = encrypted_core(42, [PEER, OTHER])
    stale = seal.seal(seal.AES_256_GCM, KEY, 12345, 0, wire.encode(42, BROADCAST))
    assert [s for s, _ in receive(core, [stale, stale, stale])] == [Drop.AUTH_FAILED] * 3
    assert core.take_stale() == [PEER[0]] and core.take_stale() == []
    core.rx_add(12345, *PEER, bytes(32), seal.AES_256_GCM)  # known index, wrong key: a forgery, not stale
    receive(core, [stale])
    assert core.take_stale() == []
