"""overlay.io.etcd against a real etcd on loopback: an agent's client follows only hosts/ and
the networks it serves (events of others never reach it), joining a network later reads that
network's full state, a snapshot is read in pages at one revision, values too large are refused
and counted, and ``applied`` answers once a revision is in."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aetcd
import pytest
import uvloop

import overlay.io.etcd as etcd_module
from overlay.core.registry import Endpoint, EndpointKey, Event, Host, HostKey, MemberKey, Registry, Schema, Scope
from overlay.io.etcd import EtcdClient, open_client
from overlay.lab import etcd as etcdlab

pytestmark = pytest.mark.etcd
S = Schema()
MAC = 0x020000000000


@pytest.fixture(scope="module")
def etcd() -> Iterator[etcdlab.EtcdServer]:
    server = etcdlab.single()
    try:
        yield server
    finally:
        server.stop()


def run(coro: Any) -> Any:
    return uvloop.run(asyncio.wait_for(coro, 60))


async def clear(writer: aetcd.Client) -> None:
    await writer.delete_prefix(b"/overlay/v1/")


async def put(writer: aetcd.Client, key: Any, value: Any) -> int:
    """Put and return the revision it made."""
    result = await writer.put(S.key(key).encode(), S.encode(value), prev_kv=False)
    return int(result.header.revision)


async def wait_until(predicate: Any, what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def watching(client: EtcdClient, writer: aetcd.Client) -> AsyncIterator[None]:
    """``client`` watching (both ranges open) for the block; then everything stopped and cleared."""
    task = asyncio.create_task(client.watch())
    try:
        await wait_until(lambda: len(client._watches) == 2, "both watches open")
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await clear(writer)
        await writer.close()


def follower(endpoint: str, vnis: set[int], seen: list[Event]) -> EtcdClient:
    return EtcdClient([endpoint], Registry(S), seen.extend, scope=Scope(hosts=True, vnis=frozenset(vnis)))


def test_an_agent_receives_no_event_of_a_network_it_does_not_serve_and_joining_reads_its_state(
    etcd: etcdlab.EtcdServer,
) -> None:
    async def main() -> None:
        writer = await open_client(etcd.endpoint, "/overlay/v1")
        await clear(writer)
        # Network 43 holds state before our client starts; 42 is ours.
        await put(writer, HostKey("h2"), Host("198.18.0.2"))
        await put(writer, MemberKey(43, "h2"), Host("198.18.0.2"))
        for i in range(5):
            await put(writer, EndpointKey(43, MAC + 0x4300 + i), Endpoint("h2", [f"198.19.43.{i + 1}"]))
        seen: list[Event] = []
        client = follower(etcd.endpoint, {42}, seen)
        await client.snapshot()
        assert client.registry.count(43) == 0 and client.registry.host("h2") == Host("198.18.0.2")
        async with watching(client, writer):
            before = client.events
            for i in range(20):  # a busy network we do not serve
                await put(writer, EndpointKey(43, MAC + 0x4320 + i), Endpoint("h2", [f"198.19.43.{i + 10}"]))
            marker = await put(writer, EndpointKey(42, MAC | 0x4201), Endpoint("h2", ["198.19.42.1"]))
            await client.applied(marker, 10)
            # Exactly one event reached us (the marker), none of network 43; nothing was out of scope.
            assert client.events == before + 1
            assert client.registry.out_of_scope == 0 and client.registry.count(43) == 0
            assert all(getattr(ev.key, "vni", 42) == 42 for ev in seen)

            # Joining 43 reads its full state (the 5 older and 20 newer endpoints), then follows it.
            await client.follow(43)
            assert client.registry.count(43) == 25
            assert {ev.key.mac for ev in seen if isinstance(ev.key, EndpointKey) and ev.key.vni == 43} == {
                *(MAC + 0x4300 + i for i in range(5)),
                *(MAC + 0x4320 + i for i in range(20)),
            }
            later = await put(writer, EndpointKey(43, MAC | 0x4399), Endpoint("h2", ["198.19.43.99"]))
            await client.applied(later, 10)
            assert client.registry.endpoint(43, MAC | 0x4399) == Endpoint("h2", ["198.19.43.99"])

            # Leaving it: its keys are forgotten and its events stop.
            await client.leave(43)
            assert client.registry.count(43) == 0 and len(client._watches) == 2
            before = client.events
            await put(writer, EndpointKey(43, MAC | 0x4398), Endpoint("h2", ["198.19.43.98"]))
            marker = await put(writer, EndpointKey(42, MAC | 0x4202), Endpoint("h2", ["198.19.42.2"]))
            await client.applied(marker, 10)
            assert client.events == before + 1 and client.registry.count(43) == 0

    run(main())


def test_a_snapshot_is_read_in_pages_at_one_revision_and_refuses_values_too_large(
    etcd: etcdlab.EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(etcd_module, "PAGE", 7)  # many pages from a few keys
    monkeypatch.setattr(etcd_module, "FEED", 3)  # and each fed in slices

    async def main() -> None:
        writer = await open_client(etcd.endpoint, "/overlay/v1")
        await clear(writer)
        await put(writer, HostKey("h2"), Host("198.18.0.2"))
        for i in range(50):
            await put(writer, EndpointKey(42, MAC | i), Endpoint("h2", [f"198.19.42.{i + 1}"]))
        huge = b'{"host": "h2", "ipv4": [], "pad": "' + b"x" * (1024 * 1024) + b'"}'  # 1 MiB
        await writer.put(S.key(EndpointKey(42, MAC | 0xFF)).encode(), huge)
        client = follower(etcd.endpoint, {42}, [])
        await client.snapshot()
        assert client.registry.count(42) == 50 and client.resync_keys == 52
        assert client.registry.too_large == 1 and client.registry.endpoint(42, MAC | 0xFF) is None
        assert client.applied_revision == client.registry.revision > 0
        await client.close()
        await clear(writer)
        await writer.close()

    run(main())


def test_applied_waits_for_a_revision_and_times_out_without_it(etcd: etcdlab.EtcdServer) -> None:
    async def main() -> None:
        writer = await open_client(etcd.endpoint, "/overlay/v1")
        await clear(writer)
        client = follower(etcd.endpoint, {42}, [])
        await client.snapshot()
        async with watching(client, writer):
            future = client.applied(client.applied_revision + 1, 10)
            waiting = asyncio.ensure_future(future)
            await asyncio.sleep(0)
            assert not waiting.done()
            revision = await put(writer, EndpointKey(42, MAC | 1), Endpoint("h2", ["198.19.42.1"]))
            applied, at = await waiting
            assert applied == revision and at is not None
            assert client.lag.status().count == 1
            with pytest.raises(TimeoutError):
                await client.applied(revision + 100, 0.2)

    run(main())
