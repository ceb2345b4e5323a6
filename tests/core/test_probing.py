"""core.probing: the probing protocol (wire format and rules), with a fake clock."""

from __future__ import annotations

import pytest

from overlay.core.probing import HEADER, REPLY, REQUEST, Probes, encode
from overlay.core.status import ProbeStatus

A = ("198.18.0.2", 4788)
B = ("198.18.0.3", 4788)


def exchange(p: Probes, now: float, rtt: float, answer: bool = True) -> list[tuple[tuple[str, int], bytes]]:
    """One tick at ``now``: what ``due`` sends is answered by its peer ``rtt`` later (or not)."""
    sent = p.due(now)
    if answer:
        for address, datagram in sent:
            reply = Probes().on_datagram(datagram, ("198.18.0.1", 4788), now + rtt / 2)  # the peer's side
            assert reply is not None
            assert p.on_datagram(reply, address, now + rtt) is None
    return sent


def test_wire_format_is_a_fixed_20_byte_header() -> None:
    assert HEADER.size == 20
    assert encode(REQUEST, 7, 123) == b"OVP1" + bytes([1, 0, 0, 0]) + (7).to_bytes(4, "big") + (123).to_bytes(8, "big")


def test_a_request_is_answered_with_its_sequence_and_timestamp_echoed() -> None:
    p = Probes()
    reply = p.on_datagram(encode(REQUEST, 99, 5_000_000_000), A, 1.0)
    assert reply == encode(REPLY, 99, 5_000_000_000)
    assert p.counters() == {"bad": 0, "answered": 1}


def test_one_probe_per_peer_per_interval_first_at_once() -> None:
    p = Probes()
    p.set_peers({"a": A, "b": B})
    first = p.due(10.0)
    assert sorted(addr for addr, _ in first) == [A, B]
    assert p.due(10.2) == [] and p.due(10.99) == []
    assert len(p.due(11.0)) == 2
    assert p.due(11.5) == []
    assert len(p.due(12.1)) == 2  # the beat is kept: next at 13.0, not 13.1
    assert p.due(12.9) == [] and len(p.due(13.0)) == 2


def test_after_a_stall_probing_resumes_without_a_burst() -> None:
    p = Probes()
    p.set_peers({"a": A})
    p.due(0.0)
    assert len(p.due(60.0)) == 1
    assert p.due(60.5) == [] and len(p.due(61.0)) == 1


def test_rtt_is_the_last_sample_and_a_smoothed_one() -> None:
    p = Probes()
    p.set_peers({"a": A})
    exchange(p, 0.0, 0.010)
    s = p.status()["a"]
    assert s == ProbeStatus(
        address="198.18.0.2:4788", rtt_ms=10.0, srtt_ms=10.0, loss=0.0, reachable=True, sent=1, received=1
    )
    exchange(p, 1.0, 0.002)
    s = p.status()["a"]
    assert s.rtt_ms == 2.0
    assert s.srtt_ms == pytest.approx(0.875 * 10 + 0.125 * 2)


def test_a_new_peer_is_not_reachable_until_it_answers() -> None:
    p = Probes()
    p.set_peers({"a": A})
    assert p.status()["a"].reachable is False and p.status()["a"].rtt_ms is None
    p.due(0.0)
    assert p.status()["a"] == ProbeStatus(
        address="198.18.0.2:4788", rtt_ms=None, srtt_ms=None, loss=0.0, reachable=False, sent=1, received=0
    )


def test_loss_counts_decided_probes_in_a_window_of_the_last_20() -> None:
    p = Probes()
    p.set_peers({"a": A})
    for i in range(10):
        exchange(p, float(i), 0.001, answer=i % 2 == 0)  # every other probe lost
    p.due(10.0)  # expires the 10th; the new one is pending and not counted
    assert p.status()["a"].loss == 0.5
    for i in range(11, 40):
        exchange(p, float(i), 0.001)
    s = p.status()["a"]
    assert s.loss == 0.0  # the lost ones fell out of the window
    assert s.sent == 40 and s.received == 34
    assert len(p.peers["a"].window) == 20 and len(p.outstanding) <= 20


def test_unreachable_after_three_consecutive_misses_and_back_after_an_answer() -> None:
    p = Probes()
    p.set_peers({"a": A})
    exchange(p, 0.0, 0.001)
    for t in (1.0, 2.0, 3.0):
        exchange(p, t, 0, answer=False)
    p.due(3.5)
    assert p.status()["a"].reachable is True  # two misses decided, the third still pending
    p.due(4.0)  # the probe of 3.0 times out
    s = p.status()["a"]
    assert s.reachable is False and s.rtt_ms == 1.0  # the last RTT seen is kept
    exchange(p, 5.0, 0.003)
    assert p.status()["a"].reachable is True
    assert p.peers["a"].misses == 0


def test_a_late_reply_still_counts_and_clears_its_loss() -> None:
    p = Probes()
    p.set_peers({"a": A})
    [(_, request)] = p.due(0.0)
    p.due(1.5)  # times out
    assert p.status()["a"].loss == 1.0
    reply = Probes().on_datagram(request, A, 1.6)
    assert reply is not None
    assert p.on_datagram(reply, A, 1.7) is None
    s = p.status()["a"]
    assert s.loss == 0.0 and s.rtt_ms == 1700.0 and s.reachable is True


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"OVP1",
        b"x" * 20,
        b"OVP2" + bytes(16),
        encode(3, 1, 0),
        encode(REQUEST, 1, 0) + b"\0",
        encode(REPLY, 12345, 0),  # a reply to nothing we sent
    ],
)
def test_garbage_and_unsolicited_datagrams_are_counted_and_ignored(datagram: bytes) -> None:
    p = Probes()
    p.set_peers({"a": A})
    assert p.on_datagram(datagram, A, 0.0) is None
    assert p.counters()["bad"] == 1
    assert p.status()["a"].received == 0


def test_replies_that_do_not_match_the_probe_are_bad() -> None:
    p = Probes()
    p.set_peers({"a": A, "b": B})
    sent = dict(p.due(0.0))
    _, seq, stamp = HEADER.unpack(sent[A])[1:]
    assert p.on_datagram(encode(REPLY, seq, stamp + 1), A, 0.1) is None  # timestamp not echoed
    assert p.on_datagram(encode(REPLY, seq, stamp), B, 0.1) is None  # from another peer
    assert p.counters()["bad"] == 2
    assert p.on_datagram(encode(REPLY, seq, stamp), A, 0.1) is None
    assert p.on_datagram(encode(REPLY, seq, stamp), A, 0.1) is None  # a duplicate
    assert p.counters()["bad"] == 3
    assert p.status()["a"].received == 1 and p.status()["b"].received == 0


def test_set_peers_keeps_history_of_unchanged_peers_and_forgets_the_rest() -> None:
    p = Probes()
    p.set_peers({"a": A, "b": B})
    exchange(p, 0.0, 0.001)
    p.set_peers({"a": A, "b": ("198.18.0.9", 4788), "c": ("198.18.0.4", 4788)})
    s = p.status()
    assert s["a"].received == 1
    assert s["b"].address == "198.18.0.9:4788" and s["b"].sent == 0
    assert s["c"].sent == 0
    p.set_peers({})
    assert p.status() == {} and p.outstanding == {}


def test_set_peers_wants_ip_addresses_and_changes_nothing_when_refused() -> None:
    p = Probes()
    p.set_peers({"a": A})
    with pytest.raises(ValueError):
        p.set_peers({"a": A, "b": ("h2.example", 4788)})
    assert list(p.status()) == ["a"]


def test_ipv6_addresses_are_shown_in_brackets() -> None:
    p = Probes()
    p.set_peers({"a": ("::1", 4788)})
    assert p.status()["a"].address == "[::1]:4788"
