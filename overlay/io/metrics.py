"""Prometheus metrics: the agent's status, read on each scrape and served over plain HTTP.

The numbers are the ones `overlay status --json` prints: a collector calls the agent's
``status()`` per scrape instead of keeping a second set of counters in step with the fast path.
The HTTP server runs on the agent's event loop (asyncio, no thread), because ``status()`` reads
state that the loop owns. It serves ``GET /metrics`` and nothing else, on loopback by default.
A key missing from the status (a static agent has no registry, probes may be off) leaves its
metrics out; it never fails a scrape.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from overlay import __version__
from overlay.core.addresses import format_address

MAX_HEAD = 8192  # request line and headers, bytes
READ_TIMEOUT = 5.0
log = logging.getLogger("overlay.metrics")

Status = Callable[[], dict[str, Any]]


class MetricsError(RuntimeError):
    """The metrics endpoint could not be served; the message says where and what to do."""


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None  # bool is an int: 0/1


class StatusCollector(Collector):
    """Turns one ``status()`` dict into metric families named ``overlay_*``."""

    def __init__(self, status: Status) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = _dict(self.status())
        yield from self._agent(_dict(s.get("agent")))
        yield from self._traffic(s)
        yield from self._table(s)
        yield from self._registry(s.get("registry"))
        yield from self._probes(_dict(s.get("probes")), _dict(s.get("probe_counters")))

    def _agent(self, agent: dict[str, Any]) -> Iterator[Metric]:
        info = {k: str(agent[k]) for k in ("tap", "local", "port") if agent.get(k) is not None}
        yield InfoMetricFamily("overlay_agent", "The agent: version, first TAP, VTEP address and port.",
                               value={"version": __version__, **info})
        if (uptime := _number(agent.get("uptime_s"))) is not None:
            yield GaugeMetricFamily("overlay_agent_uptime_seconds", "Seconds since the agent started.", uptime)
        networks = GaugeMetricFamily("overlay_network_info", "A network (VNI) this agent serves, and its TAP.",
                                     labels=["vni", "tap", "mac"])
        for net in agent.get("networks") or []:
            if isinstance(net, dict) and "vni" in net:
                networks.add_metric([str(net["vni"]), str(net.get("tap", "")), str(net.get("mac", ""))], 1)
        if networks.samples:
            yield networks

    def _traffic(self, s: dict[str, Any]) -> Iterator[Metric]:
        totals = _dict(s.get("totals"))
        peers = [p for p in s.get("peers") or [] if isinstance(p, dict) and "vtep" in p]
        for direction, verb in (("rx", "received from"), ("tx", "sent to")):
            for unit in ("frames", "bytes"):
                key = f"{direction}_{unit}"
                if (total := _number(totals.get(key))) is not None:
                    yield CounterMetricFamily(f"overlay_{key}", f"Inner {unit} {verb} all peer VTEPs.", total)
                family = CounterMetricFamily(f"overlay_vtep_{key}", f"Inner {unit} {verb} a peer VTEP (ip:port).",
                                             labels=["vtep"])
                for p in peers:
                    if (v := _number(p.get(key))) is not None:
                        family.add_metric([str(p["vtep"])], v)
                yield family
        drops = CounterMetricFamily("overlay_drops", "Frames dropped, by reason.", labels=["reason"])
        for reason, v in _dict(s.get("drops")).items():
            if (n := _number(v)) is not None:
                drops.add_metric([reason], n)
        yield drops
        wakeups = _dict(s.get("wakeups"))
        calls = CounterMetricFamily("overlay_wakeups", "Event-loop calls into the fast path.", labels=["direction"])
        moved = CounterMetricFamily("overlay_wakeup_frames", "Frames moved by those calls.", labels=["direction"])
        for d in ("rx", "tx"):
            if (n := _number(wakeups.get(d))) is not None:
                calls.add_metric([d], n)
            if (n := _number(wakeups.get(f"{d}_frames"))) is not None:
                moved.add_metric([d], n)
        yield from (calls, moved)
        for key, text in (("coalesced_frames", "Received frames written to the TAP inside TCP super-frames."),
                          ("arp_suppressed", "ARP requests answered by the agent from the registry.")):
            if (n := _number(s.get(key))) is not None:
                yield CounterMetricFamily(f"overlay_{key}", text, n)

    def _table(self, s: dict[str, Any]) -> Iterator[Metric]:
        fdb = _dict(s.get("fdb"))
        size = GaugeMetricFamily("overlay_fdb_entries", "Forwarding-table entries, by source.", labels=["source"])
        events = CounterMetricFamily("overlay_fdb_events", "Forwarding-table events (refusals, moves, "
                                     "expiries, evictions, overflows).", labels=["event"])
        for key, v in fdb.items():
            if (n := _number(v)) is not None:
                (size if key in ("static", "registry", "learned") else events).add_metric([key], n)
        yield from (size, events)

    def _registry(self, registry: Any) -> Iterator[Metric]:
        if not isinstance(registry, dict):
            return  # static mode: no registry, no registry metrics
        for key, name, family, text in (
            ("connected", "overlay_registry_connected", GaugeMetricFamily, "1 while etcd is connected."),
            ("revision", "overlay_registry_revision", GaugeMetricFamily, "The last etcd revision applied."),
            ("reconnects", "overlay_registry_reconnects", CounterMetricFamily, "Reconnections to etcd."),
            ("resyncs", "overlay_registry_resyncs", CounterMetricFamily, "Full re-reads after a compaction."),
        ):
            if (n := _number(registry.get(key))) is not None:
                yield family(name, text, n)

    def _probes(self, probes: dict[str, Any], counters: dict[str, Any]) -> Iterator[Metric]:
        rtt = GaugeMetricFamily("overlay_peer_rtt_seconds", "Last probe round-trip time to a peer.", labels=["peer"])
        srtt = GaugeMetricFamily("overlay_peer_srtt_seconds", "Smoothed probe round-trip time.", labels=["peer"])
        loss = GaugeMetricFamily("overlay_peer_loss_ratio", "Lost fraction of the last probes.", labels=["peer"])
        up = GaugeMetricFamily("overlay_peer_reachable", "1 while the peer answers probes.", labels=["peer"])
        sent = CounterMetricFamily("overlay_peer_probes_sent", "Probes sent to a peer host.", labels=["peer"])
        received = CounterMetricFamily("overlay_peer_probes_received", "Probe replies received.", labels=["peer"])
        for host, p in probes.items():
            p = _dict(p)
            for family, key, scale in ((rtt, "rtt_ms", 1e-3), (srtt, "srtt_ms", 1e-3), (loss, "loss", 1),
                                       (up, "reachable", 1), (sent, "sent", 1), (received, "received", 1)):
                if (v := _number(p.get(key))) is not None:
                    family.add_metric([str(host)], v * scale)
        if probes:
            yield from (rtt, srtt, loss, up, sent, received)
        for key, text in (("bad", "Probe datagrams ignored as malformed, unsolicited or stale."),
                          ("answered", "Probe requests answered.")):
            if (n := _number(counters.get(key))) is not None:
                yield CounterMetricFamily(f"overlay_probe_{key}", text, n)


def registry_for(status: Status) -> CollectorRegistry:
    """The agent's metrics plus the process's own (CPU, memory, file descriptors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    ProcessCollector(registry=registry)
    return registry


def _response(code: int, reason: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
              head_only: bool = False) -> bytes:
    head = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head if head_only else head + body


async def _read_head(reader: asyncio.StreamReader) -> list[bytes] | None:
    """The request line and header lines, or None when they are too long or never end."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = await reader.readline()
        size += len(line)
        if size > MAX_HEAD or not line.endswith(b"\n"):
            return None
        if not line.strip():
            return lines
        lines.append(line.rstrip(b"\r\n"))


async def serve(host: str, port: int, status: Status) -> asyncio.AbstractServer:
    """Serve ``GET /metrics`` on host:port until the returned server is closed."""
    registry = registry_for(status)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(_read_head(reader), READ_TIMEOUT)
            except (ValueError, asyncio.LimitOverrunError):  # a line longer than the reader's limit
                head = None
            parts = head[0].split() if head else []
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
                answer = _response(400, "Bad Request", b"send an HTTP request: GET /metrics\n")
            elif parts[0] not in (b"GET", b"HEAD"):
                answer = _response(405, "Method Not Allowed", b"only GET /metrics\n")
            elif parts[1].split(b"?", 1)[0] != b"/metrics":
                answer = _response(404, "Not Found", b"metrics are at /metrics\n", head_only=parts[0] == b"HEAD")
            else:
                try:
                    body = generate_latest(registry)
                except Exception as e:  # a bug in a collector: say so, keep serving
                    log.exception("metrics scrape failed")
                    answer = _response(500, "Internal Server Error", f"scrape failed: {e}\n".encode())
                else:
                    answer = _response(200, "OK", body, CONTENT_TYPE_LATEST, head_only=parts[0] == b"HEAD")
            writer.write(answer)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    try:
        return await asyncio.start_server(on_client, host, port, limit=MAX_HEAD)
    except OSError as e:
        where = format_address(host, port)
        raise MetricsError(f"cannot serve metrics on {where}: {e.strerror or e}; pass --metrics HOST:PORT for "
                           "another address, or --metrics off") from None
