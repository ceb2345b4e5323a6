"""Peer probes: the sans-IO core with a fake clock, then two Probers on real loopback UDP."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, Awaitable, Callable

import asyncio_dgram
import pytest
import uvloop

from overlay.core.probing import HEADER, REPLY, REQUEST, Probes, encode
from overlay.core.status import ProbeStatus
from overlay.io.prober import ProbeError, Prober

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


# Real UDP on loopback, on the standard loop and on uvloop (the agent's).


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[Any]], Any]:
    def runner(coro: Awaitable[Any]) -> Any:
        if request.param == "uvloop":
            return uvloop.run(coro)
        return asyncio.run(coro)

    return runner


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.02)


def test_two_probers_on_loopback_measure_each_other(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def main() -> None:
        one, two = Prober(("127.0.0.1", 0), tick=0.05), Prober(("127.0.0.1", 0), tick=0.05)
        await one.start()
        await two.start()
        try:
            one.set_peers({"two": two.address})
            two.set_peers({"one": one.address})
            await until(
                lambda: one.status()["two"].received >= 2 and two.status()["one"].received >= 2, "both saw two replies"
            )
            for s, other in ((one.status()["two"], two), (two.status()["one"], one)):
                assert s.reachable is True and s.loss == 0.0
                assert s.address == f"127.0.0.1:{other.address[1]}"
                assert s.rtt_ms > 0
            assert one.counters().bad == 0 and two.counters().answered >= 2
        finally:
            await one.stop()
            await two.stop()

    run(main())


def test_a_stopped_peer_becomes_unreachable(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def main() -> None:
        # Fast beat so the test takes a fraction of a second; the rules are the same.
        one = Prober(("127.0.0.1", 0), tick=0.02, probes=Probes(interval=0.05, timeout=0.05))
        two = Prober(("127.0.0.1", 0), tick=0.02)
        await one.start()
        await two.start()
        try:
            one.set_peers({"two": two.address})
            await until(lambda: one.status()["two"].reachable, "two is reachable")
            await two.stop()
            await until(lambda: not one.status()["two"].reachable, "two is unreachable")
            s = one.status()["two"]
            assert s.loss > 0 and s.sent > s.received
            assert one.tasks and not any(t.done() for t in one.tasks)  # still probing
        finally:
            await one.stop()
            await two.stop()

    run(main())


def test_a_peer_the_socket_cannot_reach_does_not_stop_probing_the_others(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def main() -> None:
        two = Prober(("127.0.0.1", 0), tick=0.05)
        await two.start()
        one = Prober(("127.0.0.1", 0), tick=0.02, probes=Probes(interval=0.05, timeout=0.05))
        await one.start()
        try:
            one.set_peers({"v6": ("::1", 4788), "two": two.address})  # an IPv6 peer for an IPv4 socket
            await until(
                lambda: one.status()["v6"].sent >= 3 and one.status()["two"].received >= 3,
                "both peers were probed several times",
            )
            assert one.counters().errors >= 3 and not any(t.done() for t in one.tasks)
        finally:
            await one.stop()
            await two.stop()

    run(main())


def test_peers_from_a_callable_are_followed(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def main() -> None:
        two = Prober(("127.0.0.1", 0), tick=0.05)
        await two.start()
        peers: dict[str, tuple[str, int]] = {}
        one = Prober(("127.0.0.1", 0), lambda: peers, tick=0.05)
        await one.start()
        try:
            await asyncio.sleep(0)
            assert one.status() == {}
            peers["two"] = two.address
            await until(lambda: "two" in one.status() and one.status()["two"].reachable, "two is probed and answers")
        finally:
            await one.stop()
            await two.stop()

    run(main())


def test_garbage_on_the_socket_does_not_stop_the_prober(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def main() -> None:
        one = Prober(("127.0.0.1", 0), tick=0.05)
        await one.start()
        try:
            client = await asyncio_dgram.bind(("127.0.0.1", 0))
            await client.send(b"hello", one.address)
            await client.send(encode(REQUEST, 1, 2), one.address)
            assert await asyncio.wait_for(client.recv(), 10) == (encode(REPLY, 1, 2), one.address)
            await until(lambda: one.counters().bad == 1, "the garbage was counted")
            client.close()
        finally:
            await one.stop()

    run(main())


def test_a_port_in_use_is_a_probe_error_saying_where(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            with pytest.raises(ProbeError, match=rf"127\.0\.0\.1:{port}: .*another probe port"):
                await Prober(("127.0.0.1", port)).start()

    run(main())


def test_an_address_not_on_this_host_is_a_probe_error(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def main() -> None:
        with pytest.raises(ProbeError, match=r"198\.18\.255\.254:4788: .*not an address of this host"):
            await Prober(("198.18.255.254", 4788)).start()

    run(main())


def test_a_name_instead_of_an_address_is_a_probe_error(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def main() -> None:
        with pytest.raises(ProbeError, match=r"'localhost' is not an IP address"):
            await Prober(("localhost", 4788)).start()

    run(main())
