"""io.prober: two Probers measuring each other over real loopback UDP, on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, Awaitable, Callable

import asyncio_dgram
import pytest
import uvloop

from overlay.core.probing import REPLY, REQUEST, Probes, encode
from overlay.io.prober import ProbeError, Prober

A = ("198.18.0.2", 4788)
B = ("198.18.0.3", 4788)


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
