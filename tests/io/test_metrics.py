"""The Prometheus endpoint: a real server on loopback, scraped with urllib and parsed with
prometheus_client's own parser; the values must be the status's."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from typing import Any, Callable

import pytest
import uvloop
from msgspec.structs import replace
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from overlay.core.status import (
    AgentInfo,
    DataplaneStatus,
    EncryptionStatus,
    FdbStatus,
    NetworkInfo,
    PeerTraffic,
    ProbeCounters,
    ProbeStatus,
    RegistryStatus,
    SessionStatus,
    Status,
    Totals,
    Wakeups,
)
from overlay.io.metrics import CONTENT_TYPE_LATEST, MetricsError, StatusCollector, serve

STATUS = Status(
    agent=AgentInfo(
        tap="ovl0",
        vni=42,
        local="198.18.0.1",
        port=4789,
        peers=["198.18.0.2"],
        mtu=1450,
        mac="02:00:00:00:00:01",
        address="198.19.0.1/24",
        source_check=True,
        uptime_s=12.5,
        networks=[NetworkInfo(vni=42, tap="ovl0", mac="02:00:00:00:00:01")],
    ),
    registry=RegistryStatus(
        endpoints=["http://198.18.0.250:2379"], host_id="h1", connected=True, revision=17, reconnects=2, resyncs=1
    ),
    dataplane=DataplaneStatus(
        wakeups=Wakeups(tx=10, tx_frames=250, rx=9, rx_frames=240),
        peers=[
            PeerTraffic(vtep="198.18.0.2:4789", rx_frames=3, rx_bytes=300, tx_frames=4, tx_bytes=400),
            PeerTraffic(vtep="198.18.0.3:4789", rx_frames=5, rx_bytes=500, tx_frames=6, tx_bytes=600),
        ],
        totals=Totals(rx_frames=8, rx_bytes=800, tx_frames=10, tx_bytes=1000),
        drops={"too_short": 1, "no_i_flag": 2, "unknown_vni": 0},
        fdb=FdbStatus(
            static=1,
            registry=2,
            learned=3,
            refused_cap=0,
            moves=4,
            expired=5,
            evicted=0,
            refused_table_full=0,
            learn_overflow=0,
        ),
        coalesced_frames=7,
        arp_suppressed=11,
    ),
    probes={
        "h2": ProbeStatus(
            address="198.18.0.2:4788", rtt_ms=0.25, srtt_ms=0.5, loss=0.1, reachable=True, sent=20, received=18
        ),
        "h3": ProbeStatus(
            address="198.18.0.3:4788", rtt_ms=None, srtt_ms=None, loss=1.0, reachable=False, sent=5, received=0
        ),
    },
    probe_counters=ProbeCounters(bad=3, answered=40, errors=0),
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    """GET in a thread (the server runs on the test's event loop)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[..., Any]:
    return uvloop.run if request.param == "uvloop" else asyncio.run


def test_a_scrape_of_the_served_endpoint_reports_the_status_values(run: Callable[..., Any]) -> None:
    status = [STATUS]
    calls = []

    def current() -> Status:
        calls.append(1)
        return status[0]

    async def main() -> tuple[int, str, str, str]:
        server = await serve("127.0.0.1", 0, current)
        port = server.sockets[0].getsockname()[1]
        try:
            code, ctype, first = await asyncio.to_thread(scrape, port)
            d = STATUS.dataplane  # read afresh on every scrape:
            status[0] = replace(STATUS, dataplane=replace(d, totals=replace(d.totals, rx_frames=99)))
            _, _, second = await asyncio.to_thread(scrape, port)
            return code, ctype, first, second
        finally:
            server.close()
            await server.wait_closed()

    code, ctype, text, again = run(main())
    assert code == 200 and ctype == CONTENT_TYPE_LATEST and len(calls) == 2
    got = samples(text)
    expected = {
        ("overlay_agent_uptime_seconds", ()): 12.5,
        ("overlay_network_info", (("mac", "02:00:00:00:00:01"), ("tap", "ovl0"), ("vni", "42"))): 1,
        ("overlay_rx_frames_total", ()): 8,
        ("overlay_rx_bytes_total", ()): 800,
        ("overlay_tx_frames_total", ()): 10,
        ("overlay_tx_bytes_total", ()): 1000,
        ("overlay_vtep_rx_frames_total", (("vtep", "198.18.0.2:4789"),)): 3,
        ("overlay_vtep_rx_bytes_total", (("vtep", "198.18.0.3:4789"),)): 500,
        ("overlay_vtep_tx_frames_total", (("vtep", "198.18.0.3:4789"),)): 6,
        ("overlay_vtep_tx_bytes_total", (("vtep", "198.18.0.2:4789"),)): 400,
        ("overlay_drops_total", (("reason", "no_i_flag"),)): 2,
        ("overlay_drops_total", (("reason", "unknown_vni"),)): 0,
        ("overlay_wakeups_total", (("direction", "tx"),)): 10,
        ("overlay_wakeup_frames_total", (("direction", "rx"),)): 240,
        ("overlay_fdb_entries", (("source", "static"),)): 1,
        ("overlay_fdb_entries", (("source", "learned"),)): 3,
        ("overlay_fdb_events_total", (("event", "moves"),)): 4,
        ("overlay_coalesced_frames_total", ()): 7,
        ("overlay_arp_suppressed_total", ()): 11,
        ("overlay_registry_connected", ()): 1,
        ("overlay_registry_revision", ()): 17,
        ("overlay_registry_reconnects_total", ()): 2,
        ("overlay_registry_resyncs_total", ()): 1,
        ("overlay_peer_rtt_seconds", (("peer", "h2"),)): 0.00025,
        ("overlay_peer_srtt_seconds", (("peer", "h2"),)): 0.0005,
        ("overlay_peer_loss_ratio", (("peer", "h2"),)): 0.1,
        ("overlay_peer_loss_ratio", (("peer", "h3"),)): 1.0,
        ("overlay_peer_reachable", (("peer", "h2"),)): 1,
        ("overlay_peer_reachable", (("peer", "h3"),)): 0,
        ("overlay_peer_probes_sent_total", (("peer", "h3"),)): 5,
        ("overlay_peer_probes_received_total", (("peer", "h2"),)): 18,
        ("overlay_probe_bad_total", ()): 3,
        ("overlay_probe_answered_total", ()): 40,
    }
    assert {k: got.get(k) for k in expected} == pytest.approx(expected)
    assert ("overlay_peer_rtt_seconds", (("peer", "h3"),)) not in got  # no RTT yet: no sample, not 0
    assert ("overlay_fdb_entries", (("source", "moves"),)) not in got
    info = [k for k in got if k[0] == "overlay_agent_info"]
    assert len(info) == 1 and ("local", "198.18.0.1") in info[0][1] and ("tap", "ovl0") in info[0][1]
    assert any(name == "process_resident_memory_bytes" for name, _ in got)
    assert samples(again)[("overlay_rx_frames_total", ())] == 99


def test_a_static_agent_without_registry_or_probes_scrapes_without_them() -> None:
    status = replace(STATUS, registry=None, probes={}, probe_counters=None)
    names = {m.name for m in StatusCollector(lambda: status).collect()}
    assert "overlay_rx_frames" in names and "overlay_drops" in names
    assert not any(
        n.startswith(("overlay_registry", "overlay_peer_rtt", "overlay_peer_reachable", "overlay_probe")) for n in names
    )


QUIET = Status.from_json(
    {  # what a static agent just started says, with every optional part left out
        "agent": {
            "tap": "ovl0",
            "vni": 42,
            "local": "198.18.0.1",
            "port": 4789,
            "peers": [],
            "mtu": 1450,
            "mac": "02:00:00:00:00:01",
            "address": None,
            "source_check": True,
            "uptime_s": 0.0,
        },
        "wakeups": {"tx": 0, "tx_frames": 0, "rx": 0, "rx_frames": 0},
        "peers": [],
        "totals": {"rx_frames": 0, "rx_bytes": 0, "tx_frames": 0, "tx_bytes": 0},
        "drops": {},
        "fdb": {
            "static": 0,
            "registry": 0,
            "learned": 0,
            "refused_cap": 0,
            "moves": 0,
            "expired": 0,
            "evicted": 0,
            "refused_table_full": 0,
            "learn_overflow": 0,
        },
    }
)


@pytest.mark.parametrize(
    "status",
    [
        QUIET,
        replace(
            QUIET, probes={"h": ProbeStatus(address="198.18.0.2:4788", loss=0.0, reachable=False, sent=0, received=0)}
        ),
        replace(STATUS, registry=replace(STATUS.registry, connected=False), probe_counters=None),
    ],
)
def test_a_status_missing_its_optional_parts_never_fails_a_scrape(status: Status) -> None:
    registry = CollectorRegistry()
    registry.register(StatusCollector(lambda: status))
    assert samples(generate_latest(registry).decode()) is not None


def test_other_paths_are_404_other_methods_405_and_garbage_400() -> None:
    async def raw(port: int, request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        writer.write_eof()  # the client sends no more: an unfinished head is answered at once
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return answer

    async def main() -> None:
        server = await serve("127.0.0.1", 0, lambda: STATUS)
        port = server.sockets[0].getsockname()[1]
        try:
            code, _, body = await asyncio.to_thread(scrape, port, "/")
            assert code == 404 and "/metrics" in body
            assert (await asyncio.to_thread(scrape, port, "/metrics?x=1"))[0] == 200
            assert (await raw(port, b"POST /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 405 ")
            assert (await raw(port, b"hello\r\n\r\n")).startswith(b"HTTP/1.0 400 ")
            assert (await raw(port, b"GET /metrics HTTP/1.0\r\nX: " + b"a" * 20000 + b"\r\n\r\n")).startswith(
                b"HTTP/1.0 400 "
            )
            assert (await raw(port, b"GET /metrics HTTP/1.0\r\n")).startswith(b"HTTP/1.0 400 ")  # cut short
            head = await raw(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200 ") and head.endswith(b"\r\n\r\n")
            assert (await asyncio.to_thread(scrape, port))[0] == 200  # still serving
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_a_client_that_sends_nothing_is_dropped_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("overlay.io.metrics.READ_TIMEOUT", 0.1)

    async def main() -> None:
        server = await serve("127.0.0.1", 0, lambda: STATUS)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_a_failing_status_is_a_500_and_the_server_keeps_serving() -> None:
    state = {"fail": True}

    def status() -> Status:
        if state["fail"]:
            raise RuntimeError("boom")
        return STATUS

    async def main() -> None:
        server = await serve("127.0.0.1", 0, status)
        port = server.sockets[0].getsockname()[1]
        try:
            code, _, body = await asyncio.to_thread(scrape, port)
            assert code == 500 and "boom" in body
            state["fail"] = False
            assert (await asyncio.to_thread(scrape, port))[0] == 200
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_a_port_in_use_is_a_metrics_error_saying_where_and_what_to_do(run: Callable[..., Any]) -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(MetricsError, match=rf"127\.0\.0\.1:{port}: .*--metrics HOST:PORT.*--metrics off"):
                await serve("127.0.0.1", port, lambda: STATUS)

    run(main())


def test_encryption_is_scraped_per_peer_session_and_absent_without_a_key() -> None:
    session = SessionStatus(
        peer="198.18.0.2:4789",
        key="6hzgkHf0",
        state="established",
        age_s=12.5,
        rekeys=3,
        handshakes_sent=4,
        handshakes_received=1,
        tx_messages=100,
        rx_messages=90,
    )
    encryption = EncryptionStatus(
        pubkey="x",
        fingerprint="Bg+I8vIq",
        networks=[42],
        sessions=[session],
        without_key=["h9"],
        handshakes={"completed": 2},
    )
    text = generate_latest_of(replace(STATUS, encryption=encryption))
    got = samples(text)
    peer = (("peer", "198.18.0.2:4789"),)
    assert got[("overlay_session_state", (("peer", "198.18.0.2:4789"), ("state", "established")))] == 1
    assert got[("overlay_session_state", (("peer", "198.18.0.2:4789"), ("state", "none")))] == 0
    assert got[("overlay_session_age_seconds", peer)] == 12.5
    assert got[("overlay_session_rekeys_total", peer)] == 3
    assert got[("overlay_session_tx_messages_total", peer)] == 100
    assert got[("overlay_network_encrypted", (("vni", "42"),))] == 1
    assert got[("overlay_handshakes_total", (("kind", "completed"),))] == 2
    assert got[("overlay_hosts_without_key", ())] == 1
    assert not any(name.startswith("overlay_session") for name, _ in samples(generate_latest_of(STATUS)))


def generate_latest_of(status: Status) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(lambda: status))
    return generate_latest(registry).decode()
