"""core.sessions: two (or three) hosts' Sessions wired together by an in-memory network with
loss, reordering, duplication, delay and clock jumps; the fast path's session table is a
dict fed by the key changes, and data is "sent" by checking the keys on both sides."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from overlay.core import handshake
from overlay.core.fdb import Vtep
from overlay.core.handshake import AES_256_GCM, CHACHA20_POLY1305, generate_private, public_key
from overlay.core.keys import fingerprint
from overlay.core.sessions import (
    ClearTx,
    InstallRx,
    KeyChange,
    Limits,
    RemoveRx,
    Sessions,
    SetTx,
)

A, B, C = Vtep.parse("198.18.0.1"), Vtep.parse("198.18.0.2"), Vtep.parse("198.18.0.3")
WALL = 1_700_000_000 * 10**9
LIMITS = Limits()


def private_of(seed: int) -> bytes:
    return generate_private(random.Random(seed).randbytes)


class Host:
    """One agent: its Sessions, the fast path's table as the key changes leave it, a clock."""

    def __init__(self, vtep: Vtep, seed: int, *, aes: bool = True, now: float = 0.0, wall: int = WALL) -> None:
        self.vtep = vtep
        self.private = private_of(seed)
        self.offset = 0.0  # this host's clock minus the simulation's
        self.sessions = Sessions(self.private, wall_ns=wall, now=now, rng=random.Random(seed + 1).randbytes, aes=aes)
        self.last_now, self.clock = now, 0.0  # a mirror of the rule clock: positive steps only
        self.rx: dict[int, InstallRx] = {}
        self.rx_since: dict[int, float] = {}  # index -> rule clock at install
        self.ever_rx: dict[int, InstallRx] = {}
        self.tx: dict[Vtep, SetTx] = {}
        self.sent: Counter[Vtep] = Counter()  # messages on the current tx key, per peer
        self.confirmed_rx: set[int] = set()
        self.log: list[KeyChange] = []

    @property
    def public(self) -> bytes:
        return self.sessions.public_key

    def at(self, now: float) -> float:
        mine = now + self.offset
        if mine > self.last_now:
            self.clock += mine - self.last_now
        self.last_now = mine
        return mine

    def apply(self, peers: dict[Vtep, Host]) -> list[KeyChange]:
        changes = self.sessions.key_changes()
        for change in changes:
            if isinstance(change, InstallRx):
                assert change.index not in self.rx and change.index != 0
                self.rx[change.index] = self.ever_rx[change.index] = change
                self.rx_since[change.index] = self.clock
            elif isinstance(change, RemoveRx):
                del self.rx[change.index]
                del self.rx_since[change.index]
            elif isinstance(change, SetTx):
                other = peers.get(change.peer)
                if other is not None:  # the other side has (or had) this index with this key
                    installed = other.ever_rx.get(change.index)
                    assert installed is not None and installed.key == change.key and installed.peer == self.vtep
                    assert installed.cipher == change.cipher
                self.tx[change.peer] = change
                self.sent[change.peer] = 0
            else:
                assert isinstance(change, ClearTx)
                del self.tx[change.peer]
        for peer in {c.peer for c in self.rx.values()}:
            assert sum(c.peer == peer for c in self.rx.values()) <= 3
        self.log += changes
        return changes


@dataclass
class Net:
    """Hosts and the datagrams in flight between them."""

    hosts: dict[Vtep, Host]
    now: float = 0.0
    flight: list[tuple[bytes, Vtep, Vtep]] = field(default_factory=list)  # (data, source, destination)

    def collect(self) -> None:
        for host in self.hosts.values():
            host.apply(self.hosts)
            self.flight += [(data, host.vtep, to) for data, to in host.sessions.datagrams_to_send()]

    def deliver(self, data: bytes, source: Vtep, to: Vtep, port: int | None = None) -> None:
        host = self.hosts[to]
        host.sessions.receive(data, (source.ip, source.port if port is None else port), host.at(self.now))
        self.collect()

    def run(self) -> int:
        """Deliver everything in flight, in order, until nothing is left; how many were moved."""
        moved = 0
        self.collect()
        while self.flight:
            self.deliver(*self.flight.pop(0))
            moved += 1
        return moved

    def want(self, frm: Vtep, to: Vtep) -> None:
        host = self.hosts[frm]
        host.sessions.want(to, host.at(self.now))
        self.collect()

    def send_data(self, frm: Vtep, to: Vtep) -> bool:
        """One data message from ``frm`` to ``to`` as the fast path would: sealed with the tx key
        if there is one (then opened if the receiver holds that index), else ``want``."""
        host, other = self.hosts[frm], self.hosts[to]
        tx = host.tx.get(to)
        if tx is None:
            self.want(frm, to)
            return False
        host.sent[to] += 1
        rx = other.rx.get(tx.index)
        if rx is None:
            return False  # the receiver dropped this session already: the datagram is lost
        assert rx.key == tx.key and rx.peer == frm and rx.cipher == tx.cipher
        if tx.index not in other.confirmed_rx:
            other.confirmed_rx.add(tx.index)
            other.sessions.confirmed(tx.index, other.at(self.now))
            self.collect()
        return True

    def tick(self) -> None:
        for host in self.hosts.values():
            host.sessions.tick(host.at(self.now), dict(host.sent))
        self.collect()

    def advance(self, seconds: float, traffic: tuple[tuple[Vtep, Vtep], ...] = (), step: float = 1.0) -> None:
        """Let time pass, ticking every ``step`` s, delivering at once, with data each step."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = min(end, self.now + step)
            for frm, to in traffic:
                self.send_data(frm, to)
            self.tick()
            self.run()


def pair(*, aes_a: bool = True, aes_b: bool = True) -> Net:
    a, b = Host(A, 1, aes=aes_a), Host(B, 2, aes=aes_b)
    a.sessions.set_peer(B, b.public, 0.0)
    b.sessions.set_peer(A, a.public, 0.0)
    return Net({A: a, B: b})


BOTH_WAYS = ((A, B), (B, A))


def established(net: Net) -> Net:
    net.want(A, B)
    net.run()
    assert net.send_data(A, B) and net.send_data(B, A)
    return net


def assert_working(net: Net, x: Vtep = A, y: Vtep = B) -> None:
    for frm, to in ((x, y), (y, x)):
        tx = net.hosts[frm].tx[to]
        rx = net.hosts[to].rx[tx.index]
        assert (rx.key, rx.cipher, rx.peer) == (tx.key, tx.cipher, frm)


def states(net: Net, at: Vtep) -> dict[Vtep, str]:
    host = net.hosts[at]
    return {s.peer: s.state for s in host.sessions.status(host.at(net.now))}


# --- establishing ---------------------------------------------------------------------------


def test_a_handshake_on_demand_gives_both_sides_matching_keys_in_both_directions() -> None:
    net = pair()
    net.want(A, B)
    first = net.flight[0][0]
    assert first[0] == handshake.INITIATION and len(first) == handshake.INITIATION_LEN
    net.deliver(*net.flight.pop(0))
    b = net.hosts[B]
    assert [type(c) for c in b.log] == [InstallRx] and b.tx == {}  # no tx before confirmation
    net.deliver(*net.flight.pop(0))
    a = net.hosts[A]
    assert [type(c) for c in a.log] == [InstallRx, SetTx]
    assert a.tx[B].keepalive  # the initiator confirms the session to the responder at once
    installed = b.log[0]
    assert isinstance(installed, InstallRx)
    assert a.tx[B].index == installed.index and a.tx[B].key == installed.key
    assert net.send_data(A, B)
    assert [type(c) for c in b.log] == [InstallRx, SetTx]
    assert_working(net)
    assert a.tx[B].cipher == b.tx[A].cipher == AES_256_GCM
    assert states(net, A) == {B: "established"} and states(net, B) == {A: "established"}
    assert a.sessions.counters.completed == b.sessions.counters.completed == 1
    assert a.tx[B].key != b.tx[A].key


@pytest.mark.parametrize("aes_a,aes_b", [(False, True), (True, False), (False, False)])
def test_chacha20_poly1305_is_chosen_unless_both_hosts_have_fast_aes(aes_a: bool, aes_b: bool) -> None:
    net = established(pair(aes_a=aes_a, aes_b=aes_b))
    assert net.hosts[A].tx[B].cipher == net.hosts[B].tx[A].cipher == CHACHA20_POLY1305


def test_want_starts_one_handshake_and_retries_only_after_the_rekey_timeout() -> None:
    net = pair()
    for t in (0.0, 1.0, 4.9):
        net.now = t
        net.want(A, B)
    assert len(net.flight) == 1
    net.now = 5.0
    net.want(A, B)
    assert len(net.flight) == 2
    assert states(net, A) == {B: "handshaking"}


def test_a_lost_response_is_retried_by_the_initiator_and_strands_nothing() -> None:
    net = pair()
    net.want(A, B)
    net.deliver(*net.flight.pop(0))
    net.flight.clear()  # the response is lost
    b = net.hosts[B]
    first_rx = next(iter(b.rx))
    assert b.tx == {} and states(net, B) == {A: "handshaking"}
    net.now = 4.0
    net.tick()
    assert net.flight == []
    net.now = 5.0
    net.tick()  # A sends a fresh initiation
    net.run()
    assert first_rx not in b.rx and len(b.rx) == 1  # the unanswered session was replaced
    assert net.send_data(A, B) and net.send_data(B, A)
    assert_working(net)


def test_an_unanswered_handshake_is_retried_every_5_s_and_given_up_after_90_s() -> None:
    net = pair()
    net.want(A, B)
    attempts = 1
    net.flight.clear()
    while net.now < 120:
        net.now += 1
        net.tick()
        attempts += len(net.flight)
        net.flight.clear()
    assert attempts == 18  # at 0, 5, ..., 85 s
    assert states(net, A) == {B: "none"}
    net.want(A, B)  # new data starts a new series
    assert len(net.flight) == 1


def test_a_responder_with_data_waits_for_the_confirmation_before_starting_its_own_handshake() -> None:
    net = pair()
    net.want(A, B)
    net.deliver(*net.flight.pop(0))
    net.flight.clear()  # the response is lost
    net.now = 2.0
    net.want(B, A)  # B has data but the session it answered may be confirmed any moment
    assert net.flight == []
    net.now = 5.0
    net.want(B, A)
    assert len(net.flight) == 1


# --- rekeying and expiry --------------------------------------------------------------------


def test_the_initiator_rekeys_a_used_session_at_120_s_and_the_responder_switches_on_confirmation() -> None:
    net = established(pair())
    a, b = net.hosts[A], net.hosts[B]
    old_tx_a, old_tx_b = a.tx[B], b.tx[A]
    net.advance(119, BOTH_WAYS)
    assert a.tx[B] == old_tx_a and a.sessions.counters.rekeys == 0
    net.now += 1
    net.send_data(A, B)
    net.tick()
    assert a.sessions.counters.rekeys == 1 and len(net.flight) == 1
    net.deliver(*net.flight.pop(0))
    assert b.tx[A] == old_tx_b  # B keeps sending on the old session, A still receives it
    assert old_tx_b.index in a.rx
    net.deliver(*net.flight.pop(0))
    assert a.tx[B] != old_tx_a and old_tx_a.index in b.rx  # A's previous session stays installed
    assert net.send_data(A, B)
    assert b.tx[A] != old_tx_b
    assert_working(net)
    assert len(a.rx) == len(b.rx) == 2  # current and previous
    assert {s.peer: s.rekeys for s in a.sessions.status(net.now)} == {B: 1}


def test_an_unused_session_is_not_rekeyed_and_expires_after_180_s() -> None:
    net = established(pair())
    net.advance(179)
    assert net.hosts[A].tx and net.hosts[A].sessions.counters.rekeys == 0
    net.advance(1)
    for host in net.hosts.values():
        assert host.rx == {} and host.tx == {}
        assert host.sessions.counters.expired == 1
        assert isinstance(host.log[-1], RemoveRx) and isinstance(host.log[-2], ClearTx)
    assert states(net, A) == {B: "none"}
    net.advance(1000)
    assert net.flight == []  # an idle peer has no session and no handshakes
    net.send_data(A, B)
    net.run()
    assert net.send_data(A, B) and net.send_data(B, A)


def test_the_responder_rekeys_at_150_s_when_only_it_sends() -> None:
    net = established(pair())
    net.advance(149, ((B, A),))
    assert net.hosts[B].sessions.counters.rekeys == 0 and net.hosts[A].sessions.counters.rekeys == 0
    net.advance(1, ((B, A),))
    assert net.hosts[B].sessions.counters.rekeys == 1
    assert net.hosts[B].tx[A].index in net.hosts[A].rx
    net.advance(100, ((B, A),))
    assert net.hosts[A].sessions.counters.rekeys == 0  # A never sent: it never rekeyed
    assert net.send_data(B, A)


def test_sessions_in_steady_use_are_rekeyed_without_a_gap_for_an_hour() -> None:
    net = established(pair())
    delivered = 0
    for _ in range(3600):
        net.now += 1
        delivered += net.send_data(A, B) + net.send_data(B, A)
        net.tick()
        net.run()
    assert delivered == 7200
    rekeys = net.hosts[A].sessions.counters.rekeys + net.hosts[B].sessions.counters.rekeys
    assert 3600 / 121 - 1 <= rekeys <= 3600 / 119 + 1
    assert net.hosts[A].sessions.counters.rejected == net.hosts[B].sessions.counters.rejected == 0


def test_a_session_is_rekeyed_after_2_to_the_60_messages_whatever_its_age() -> None:
    net = established(pair())
    net.now += 10
    net.hosts[B].sent[A] = LIMITS.rekey_after_messages
    net.tick()
    assert net.hosts[B].sessions.counters.rekeys == 1 and len(net.flight) == 1


# --- crossing initiations -------------------------------------------------------------------


@pytest.mark.parametrize("order", ["a first", "b first"])
def test_crossing_initiations_converge_on_one_session_and_stop(order: str) -> None:
    net = pair()
    net.want(A, B)
    net.want(B, A)
    assert len(net.flight) == 2
    if order == "b first":
        net.flight.reverse()
    net.run()
    net.advance(3, BOTH_WAYS)
    assert_working(net)
    a, b = net.hosts[A], net.hosts[B]
    assert a.sessions.counters.crossed + b.sessions.counters.crossed == 1
    assert len(a.rx) == len(b.rx) == 1  # one session, initiated by the greater key
    sent = a.sessions.counters.handshakes_sent + b.sessions.counters.handshakes_sent
    net.advance(100, BOTH_WAYS)
    assert a.sessions.counters.handshakes_sent + b.sessions.counters.handshakes_sent == sent


def test_simultaneous_rekeys_converge_too() -> None:
    net = established(pair())
    net.advance(100, BOTH_WAYS)
    for host in net.hosts.values():  # both decide at once
        host.sessions.tick(host.at(net.now + 50), {p: n + 1 for p, n in host.sent.items()})
    net.now += 50
    net.collect()
    assert len(net.flight) == 2
    net.run()
    net.advance(3, BOTH_WAYS)
    assert_working(net)


# --- what is refused ------------------------------------------------------------------------


def test_an_initiation_from_a_host_whose_key_is_unknown_gets_no_answer_and_changes_nothing() -> None:
    net = pair()
    c = Host(C, 3)
    net.hosts[C] = c
    c.sessions.set_peer(A, net.hosts[A].public, 0.0)
    net.want(C, A)
    net.run()
    a = net.hosts[A]
    assert a.log == [] and a.sessions.counters.rejected == 1 and a.sessions.datagrams_to_send() == []
    assert c.tx == {}


def test_an_initiation_from_a_known_key_at_another_address_is_rejected() -> None:
    net = pair()
    net.want(A, B)
    data, _, to = net.flight.pop()
    net.deliver(data, Vtep.parse("198.18.0.9"), to)
    net.deliver(data, C, to)
    b = net.hosts[B]
    assert b.log == [] and b.sessions.counters.rejected == 2 and net.flight == []


def test_an_initiation_from_another_port_of_the_peers_address_is_accepted() -> None:
    net = pair()
    net.want(A, B)
    net.deliver(*net.flight.pop(), port=40000)
    assert net.flight[0][2] == A  # the response goes to the peer's VTEP, not the source port
    net.run()
    assert net.send_data(A, B)
    assert_working(net)


def test_a_replayed_initiation_is_counted_and_ignored() -> None:
    net = pair()
    net.want(A, B)
    data, source, to = net.flight.pop()
    net.deliver(data, source, to)
    b = net.hosts[B]
    before = list(b.log)
    net.flight.clear()
    net.now = 30
    net.deliver(data, source, to)
    assert b.log == before and net.flight == [] and b.sessions.counters.replayed_initiations == 1


def test_a_restarted_host_is_accepted_as_its_timestamps_grow_with_the_wall_clock() -> None:
    net = established(pair())
    net.now = 10
    restarted = Host(A, 1, now=0.0, wall=WALL + 20 * 10**9)  # its monotonic clock restarted
    restarted.sessions.set_peer(B, net.hosts[B].public, 0.0)
    net.hosts[A] = restarted
    net.want(A, B)
    net.run()
    assert net.send_data(A, B) and net.send_data(B, A)
    behind = Host(A, 1, now=0.0, wall=WALL)  # its wall clock went back: looks like a replay
    behind.sessions.set_peer(B, net.hosts[B].public, 0.0)
    net.hosts[A] = behind
    net.want(A, B)
    net.run()
    assert net.hosts[B].sessions.counters.replayed_initiations == 1 and behind.tx == {}


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x08" + bytes(15),
        b"\x01",
        bytes([1]) + bytes(132),
        bytes([2]) + bytes(76),
        bytes([4]) + bytes(60),
        b"\xff" * 200,
    ],
)
def test_garbage_changes_nothing_and_is_counted(garbage: bytes) -> None:
    net = established(pair())
    b = net.hosts[B]
    before, rejected = list(b.log), b.sessions.counters.rejected
    net.deliver(garbage, A, B)
    assert b.log == before and net.flight == [] and b.sessions.counters.rejected == rejected + 1


def test_a_response_nobody_asked_for_is_rejected_before_any_crypto(monkeypatch: pytest.MonkeyPatch) -> None:
    net = pair()
    net.want(A, B)
    net.deliver(*net.flight.pop(0))
    response, source, to = net.flight.pop(0)
    net.deliver(response, source, to)
    calls = []
    monkeypatch.setattr(handshake, "complete", lambda *args: calls.append(args))
    net.deliver(response, source, to)  # a duplicate: nothing pending for that index any more
    forged = Vtep.parse("198.18.0.9")
    net.deliver(response, forged, to)
    assert calls == [] and net.hosts[A].sessions.counters.rejected == 2


def test_a_removed_peer_loses_its_sessions_and_a_short_key_is_refused() -> None:
    net = established(pair())
    a = net.hosts[A]
    a.sessions.set_peer(B, net.hosts[B].public, net.now)  # the same key: nothing happens
    assert a.sessions.key_changes() == []
    net.hosts[B].sessions.remove_peer(A, net.now)
    net.collect()
    assert net.hosts[B].rx == {} and net.hosts[B].tx == {} and states(net, B) == {}
    with pytest.raises(ValueError):
        a.sessions.set_peer(B, b"short", net.now)


def test_a_key_the_peer_does_not_hold_gets_nothing_through_after_the_rekey_timeout() -> None:
    net = established(pair())
    a, b = net.hosts[A], net.hosts[B]
    rejected = b.sessions.counters.rejected
    a.sessions.set_peer(B, public_key(private_of(50)), net.now)  # the registry names an impostor
    net.run()
    assert a.tx and b.sessions.counters.rejected == rejected + 1  # tried at once; B cannot answer
    net.advance(6, BOTH_WAYS)
    assert a.rx == {} and B not in a.tx and states(net, A) == {B: "handshaking"}
    assert not net.send_data(A, B)


def test_a_host_rotating_its_key_loses_no_datagram_in_either_direction() -> None:
    net = established(pair())
    a, b = net.hosts[A], net.hosts[B]
    new = private_of(60)
    b.sessions.rotate(new, b.at(net.now))
    net.advance(3, BOTH_WAYS)  # A does not know yet: the old sessions carry on
    assert b.sessions.public_key == public_key(new)
    a.sessions.set_peer(B, public_key(new), a.at(net.now))  # the registry tells A
    net.collect()
    for _ in range(10):  # the handshake to the new key runs while data flows
        assert net.send_data(A, B) and net.send_data(B, A)
        net.run()
        net.tick()
    assert_working(net)
    assert a.sessions.status(net.now)[0].fingerprint == fingerprint(public_key(new))
    net.advance(400, BOTH_WAYS)  # rekeys with the new key only, long after the old one is gone
    assert_working(net)


def test_an_initiation_to_a_rotated_away_key_is_answered_for_180_s_only() -> None:
    net = pair()
    b = net.hosts[B]
    b.sessions.rotate(private_of(61), 0.0)  # A still has the old key
    net.want(A, B)
    net.run()
    assert net.send_data(A, B) and net.send_data(B, A)
    c = Host(C, 3)
    net.hosts[C] = c
    c.sessions.set_peer(B, public_key(private_of(2)), 0.0)  # B's key before the rotation
    b.sessions.set_peer(C, c.public, 0.0)
    net.advance(181)
    net.want(C, B)
    net.run()
    assert B not in c.tx


def test_status_shows_each_peer_its_key_fingerprint_state_age_and_tx_index() -> None:
    net = established(pair())
    net.advance(12)
    (status,) = net.hosts[A].sessions.status(net.now)
    assert status.peer == B and status.fingerprint == fingerprint(net.hosts[B].public)
    assert status.state == "established" and status.age_s == 12.0
    assert status.tx_index == net.hosts[A].tx[B].index and status.rekeys == 0
    assert (status.handshakes_sent, status.handshakes_received) == (1, 1)


def test_local_indices_are_nonzero_and_unique_even_when_the_rng_repeats_itself() -> None:
    draws = iter([bytes(4), (7).to_bytes(4, "little")] + [b"\x11" * 32] * 2 + [(7).to_bytes(4, "little")] * 3)

    def rng(n: int) -> bytes:
        nxt = next(draws, None)
        return nxt if nxt is not None and len(nxt) == n else random.Random(n).randbytes(n)

    s = Sessions(private_of(1), wall_ns=WALL, now=0.0, rng=rng)
    s.set_peer(B, Host(B, 2).public, 0.0)
    s.set_peer(C, Host(C, 3).public, 0.0)
    s.want(B, 0.0)
    s.want(C, 0.0)
    indices = [int.from_bytes(d[4:8], "little") for d, _ in s.datagrams_to_send()]
    assert indices[0] == 7 and indices[1] not in (0, 7)


# --- rate limiting --------------------------------------------------------------------------


def test_handshakes_over_the_rate_limit_are_counted_and_cost_no_crypto(monkeypatch: pytest.MonkeyPatch) -> None:
    net = pair()
    b = net.hosts[B]
    calls = []
    real = handshake.respond_to

    def counted(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(handshake, "respond_to", counted)
    junk = bytes([1]) + bytes(132)
    for _ in range(100):
        net.deliver(junk, A, B)
    assert len(calls) == 40 and b.sessions.counters.limited == 60
    net.now += 1.0  # 20 tokens later
    for _ in range(30):
        net.deliver(junk, A, B)
    assert len(calls) == 60 and b.sessions.counters.limited == 70
    net.deliver(junk, Vtep.parse("198.18.0.77"), B)  # another source has a bucket of its own
    assert b.sessions.counters.limited == 70


def test_the_rate_limiters_table_is_bounded_and_forgets_idle_sources() -> None:
    s = Sessions(private_of(1), wall_ns=WALL, now=0.0, rng=random.Random(0).randbytes, limits=Limits(buckets=100))
    junk = bytes([1]) + bytes(132)
    peer_key = public_key(private_of(2))
    for i in range(1000):  # 1000 peers' addresses (strangers get no bucket at all: the next test)
        s.set_peer(Vtep(ipaddress.ip_address(f"2001:2:0:1::{i:x}")), peer_key, 0.0)
    for i in range(1000):
        s.receive(junk, (ipaddress.ip_address(f"2001:2:0:1::{i:x}"), 4789), 0.0)
        assert s.rate_limited_sources() <= 100
    assert s.counters.rejected == 1000 and s.counters.limited == 0
    s.tick(1.0, {})
    assert s.rate_limited_sources() == 100
    s.tick(2.0, {})  # a full bucket again is forgotten
    assert s.rate_limited_sources() == 0


def test_a_stranger_or_an_unasked_response_gets_no_bucket_and_no_crypto() -> None:
    net = pair()
    b = net.hosts[B].sessions
    for i in range(50):
        b.receive(bytes([1]) + bytes(132), (ipaddress.ip_address(f"198.18.1.{i}"), 4789), 0.0)
        b.receive(bytes([2]) + bytes(76), (A.ip, 4789), 0.0)  # from a peer, but answering nothing of ours
    assert b.rate_limited_sources() == 0 and b.counters.rejected == 100 and b.counters.limited == 0


def test_an_ipv4_mapped_source_counts_as_the_ipv4_peer() -> None:
    net = pair()
    net.want(A, B)
    data, _, to = net.flight.pop()
    b = net.hosts[B]
    b.sessions.receive(data, (ipaddress.ip_address("::ffff:198.18.0.1"), 4789), 0.0)
    assert [type(c) for c in b.sessions.key_changes()] == [InstallRx]


# --- clocks ---------------------------------------------------------------------------------


def test_a_clock_going_back_crashes_nothing_and_sessions_still_expire() -> None:
    net = established(pair())
    net.advance(100)
    net.hosts[A].offset = -10_000.0
    net.hosts[B].offset = -50.0
    net.tick()  # the clocks went back: the rules' clock stands still, then goes on
    net.advance(79)
    assert net.hosts[A].tx and net.hosts[B].tx
    net.advance(1)
    assert all(host.rx == {} and host.tx == {} for host in net.hosts.values())


def test_a_clock_jumping_forward_expires_sessions_at_the_next_tick() -> None:
    net = established(pair())
    net.hosts[A].offset = 10_000.0
    net.tick()
    assert net.hosts[A].rx == {} and net.hosts[A].tx == {} and net.hosts[B].tx
    net.run()
    net.send_data(A, B)  # A has data: a new handshake, B takes it as a rekey
    net.run()
    assert net.send_data(A, B) and net.send_data(B, A)
    assert_working(net)


# --- random schedules -----------------------------------------------------------------------


class Chaos(RuleBasedStateMachine):
    """Two hosts with data both ways over a network that loses, reorders, duplicates, delays
    and replays, with clocks that jump; a third host whose key nobody knows; garbage."""

    def __init__(self) -> None:
        super().__init__()
        self.net = pair()
        self.stranger = Host(C, 3)
        self.stranger.sessions.set_peer(A, self.net.hosts[A].public, 0.0)
        self.stranger.sessions.set_peer(B, self.net.hosts[B].public, 0.0)
        self.delivered: list[tuple[bytes, Vtep, Vtep]] = []
        self.knocks = 0

    def _deliver(self, item: tuple[bytes, Vtep, Vtep]) -> None:
        host = self.net.hosts[item[2]]
        limited = host.sessions.counters.limited
        self.net.deliver(*item)
        if host.sessions.counters.limited == limited:
            self.delivered.append(item)

    @rule(frm=st.sampled_from([A, B]))
    def data(self, frm: Vtep) -> None:
        self.net.send_data(frm, B if frm == A else A)

    @rule()
    def both_want(self) -> None:
        self.net.want(A, B)
        self.net.want(B, A)

    @rule(i=st.integers(0, 100))
    @precondition(lambda self: self.net.flight)
    def deliver_one(self, i: int) -> None:  # any of those in flight: reordering
        self._deliver(self.net.flight.pop(i % len(self.net.flight)))

    @rule(i=st.integers(0, 100))
    @precondition(lambda self: self.net.flight)
    def lose_one(self, i: int) -> None:
        self.net.flight.pop(i % len(self.net.flight))

    @rule(i=st.integers(0, 100))
    @precondition(lambda self: self.net.flight)
    def duplicate_one(self, i: int) -> None:
        self.net.flight.append(self.net.flight[i % len(self.net.flight)])

    @rule()
    def deliver_all(self) -> None:
        while self.net.flight:
            self._deliver(self.net.flight.pop(0))

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 5.0, 30.0, 60.0, 119.0]))
    def time_passes(self, seconds: float) -> None:
        self.net.now += seconds
        self.net.tick()

    @rule(who=st.sampled_from([A, B]), jump=st.sampled_from([-1000.0, -100.0, -1.0, 100.0, 200.0, 10_000.0]))
    def clock_jumps(self, who: Vtep, jump: float) -> None:
        self.net.hosts[who].offset += jump
        self.net.tick()

    @rule(i=st.integers(0, 1000))
    @precondition(lambda self: self.delivered)
    def replay(self, i: int) -> None:
        data, source, to = self.delivered[i % len(self.delivered)]
        host = self.net.hosts[to]
        log, flight = len(host.log), len(self.net.flight)
        self.net.deliver(data, source, to)
        assert len(host.log) == log and len(self.net.flight) == flight

    @rule(to=st.sampled_from([A, B]), data=st.binary(max_size=140))
    def garbage(self, to: Vtep, data: bytes) -> None:
        host = self.net.hosts[to]
        log, flight = len(host.log), len(self.net.flight)
        self.net.deliver(data, C, to)
        assert len(host.log) == log and len(self.net.flight) == flight

    @rule(to=st.sampled_from([A, B]), from_a_peers_address=st.booleans())
    def stranger_knocks(self, to: Vtep, from_a_peers_address: bool) -> None:
        self.knocks += 1
        self.stranger.sessions.want(to, 10.0 * self.knocks)  # a fresh initiation each time
        source = (A if to == B else B) if from_a_peers_address else C
        host = self.net.hosts[to]
        log, flight = len(host.log), len(self.net.flight)
        refused = host.sessions.counters.rejected + host.sessions.counters.limited
        for data, _ in self.stranger.sessions.datagrams_to_send():
            self.net.deliver(data, source, to)
        assert len(host.log) == log and len(self.net.flight) == flight
        assert host.sessions.counters.rejected + host.sessions.counters.limited == refused + 1

    @invariant()
    def sessions_expire_and_the_rate_limiter_is_bounded(self) -> None:
        for host in self.net.hosts.values():
            for index, since in host.rx_since.items():
                assert host.clock - since <= LIMITS.reject_after_time + 1e-6, index
            assert host.sessions.rate_limited_sources() <= LIMITS.buckets
            assert len(host.rx) <= 3

    def teardown(self) -> None:
        """Whatever happened, a good network and data both ways give working keys soon."""
        net = self.net
        net.flight.clear()
        net.advance(30, BOTH_WAYS)
        assert_working(net)


Chaos.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestTwoHostsKeepMatchingKeysUnderLossReorderingDuplicatesReplaysAndClockJumps = Chaos.TestCase


def test_a_peer_holds_at_most_current_previous_and_next_sessions() -> None:
    net = established(pair())
    net.advance(120, BOTH_WAYS)  # A rekeys: A holds current and previous
    a, b = net.hosts[A], net.hosts[B]
    assert len(a.rx) == 2 and a.sessions.counters.rekeys == 1
    net.now += 10
    b.sessions.tick(b.at(net.now), {A: LIMITS.rekey_after_messages})  # B rekeys too
    net.collect()
    net.deliver(*net.flight.pop(0))
    assert len(a.rx) == 3  # and next, B's, not confirmed yet
    net.flight.clear()  # the response is lost
    net.now += 5
    net.tick()  # B tries again: A's next is replaced, not added
    net.deliver(*net.flight.pop(0))
    assert len(a.rx) == 3
    net.run()
    assert net.send_data(B, A)  # confirmed: A's oldest goes
    assert len(a.rx) == 2 and a.tx[B].index in b.rx
    assert_working(net)


@pytest.mark.parametrize("rotating", [A, B])
def test_crossing_initiations_right_after_a_rotation_still_converge(rotating: Vtep) -> None:
    """The rotating host's peer knows only its previous key: its initiation is answered with
    that key, and the tie is not broken with the new one (which the peer cannot check)."""
    net = pair()
    host, peer = net.hosts[rotating], net.hosts[B if rotating == A else A]
    seed = next(k for k in range(70, 200) if public_key(private_of(k)) > peer.public)  # the tie goes its way
    host.sessions.rotate(private_of(seed), host.at(net.now))
    net.hosts[A].sessions.want(B, net.now)  # both at once: the initiations cross
    net.hosts[B].sessions.want(A, net.now)
    net.collect()
    net.run()
    net.advance(12, BOTH_WAYS)
    assert_working(net)


def test_an_initiation_sent_before_the_peer_knew_our_key_is_sent_again_when_its_own_crosses() -> None:
    """Two agents starting: A's initiation reaches B before B knows A's key (rejected, no answer);
    then B learns it and initiates too. A, with the greater key, ignores B's initiation and
    sends its own again at once: a session within a round trip, not after rekey_timeout."""
    seed_a = next(k for k in range(1, 200) if public_key(private_of(k)) > public_key(private_of(2)))
    a, b = Host(A, seed_a), Host(B, 2)
    net = Net({A: a, B: b})
    a.sessions.set_peer(B, b.public, 0.0)
    net.want(A, B)
    net.run()  # B knows no key for A: rejected
    assert b.sessions.counters.rejected == 1 and not a.tx
    b.sessions.set_peer(A, a.public, 0.0)
    net.want(B, A)
    net.run()
    assert a.sessions.counters.crossed == 1
    assert net.send_data(A, B) and net.send_data(B, A)  # no clock has moved
    assert_working(net)


def test_traffic_for_a_peer_whose_key_is_not_known_yet_handshakes_as_soon_as_it_is() -> None:
    a, b = Host(A, 1), Host(B, 2)
    net = Net({A: a, B: b})
    b.sessions.set_peer(A, a.public, 0.0)
    net.want(A, B)  # A's registry has not brought B's key yet: nothing to do but remember
    assert net.flight == []
    net.now = 3.0
    a.sessions.set_peer(B, b.public, a.at(net.now))  # the key arrives: the handshake goes at once
    net.collect()
    net.run()
    assert net.send_data(A, B) and net.send_data(B, A)
