"""Prometheus metrics: the agent's status, read on each scrape and served over plain HTTP.

The numbers are the ones `overlay status --json` prints: a collector calls the agent's
``status()`` per scrape, which gives the typed ``overlay.core.status.Status``, instead of keeping
a second set of counters in step with the fast path. The HTTP server runs on the agent's event
loop (asyncio, no thread), because ``status()`` reads state that the loop owns. It serves
``GET /metrics`` and nothing else, on loopback by default. A part the status lacks (a static
agent has no registry, probes may be off, a peer has no RTT before its first reply) leaves its
metrics out, never reads as 0.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Iterator

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from overlay import __version__
from overlay.core.addresses import format_address
from overlay.core.status import (
    FDB_SOURCES,
    AgentInfo,
    DataplaneStatus,
    EncryptionStatus,
    FdbStatus,
    ProbeCounters,
    ProbeStatus,
    RegistryStatus,
    Status,
)

MAX_HEAD = 8192  # request line and headers, bytes
READ_TIMEOUT = 5.0
log = logging.getLogger("overlay.metrics")

StatusSource = Callable[[], Status]


class MetricsError(RuntimeError):
    """The metrics endpoint could not be served; the message says where and what to do."""


class StatusCollector(Collector):
    """Turns one ``Status`` into metric families named ``overlay_*``."""

    def __init__(self, status: StatusSource) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status()
        yield from self._agent(s.agent)
        yield from self._traffic(s.dataplane)
        yield from self._table(s.dataplane.fdb)
        yield from self._registry(s.registry)
        yield from self._probes(s.probes, s.probe_counters)
        yield from self._encryption(s.encryption)
        yield from self._egress(s)

    def _agent(self, agent: AgentInfo) -> Iterator[Metric]:
        yield InfoMetricFamily(
            "overlay_agent",
            "The agent: version, first TAP, VTEP address and port.",
            value={"version": __version__, "tap": agent.tap, "local": agent.local, "port": str(agent.port)},
        )
        yield GaugeMetricFamily(
            "overlay_agent_uptime_seconds", "Seconds since the agent started.", float(agent.uptime_s)
        )
        networks = GaugeMetricFamily(
            "overlay_network_info", "A network (VNI) this agent serves, and its TAP.", labels=["vni", "tap", "mac"]
        )
        for net in agent.networks:
            networks.add_metric([str(net.vni), net.tap, net.mac], 1)
        if networks.samples:
            yield networks

    def _traffic(self, d: DataplaneStatus) -> Iterator[Metric]:
        for direction, verb in (("rx", "received from"), ("tx", "sent to")):
            for unit in ("frames", "bytes"):
                key = f"{direction}_{unit}"
                yield CounterMetricFamily(
                    f"overlay_{key}", f"Inner {unit} {verb} all peer VTEPs.", float(getattr(d.totals, key))
                )
                family = CounterMetricFamily(
                    f"overlay_vtep_{key}", f"Inner {unit} {verb} a peer VTEP (ip:port).", labels=["vtep"]
                )
                for p in d.peers:
                    family.add_metric([p.vtep], float(getattr(p, key)))
                yield family
        drops = CounterMetricFamily("overlay_drops", "Frames dropped, by reason.", labels=["reason"])
        for reason, n in d.drops.items():
            drops.add_metric([reason], float(n))
        yield drops
        calls = CounterMetricFamily("overlay_wakeups", "Event-loop calls into the fast path.", labels=["direction"])
        moved = CounterMetricFamily("overlay_wakeup_frames", "Frames moved by those calls.", labels=["direction"])
        for direction, n, frames in (
            ("rx", d.wakeups.rx, d.wakeups.rx_frames),
            ("tx", d.wakeups.tx, d.wakeups.tx_frames),
        ):
            calls.add_metric([direction], float(n))
            moved.add_metric([direction], float(frames))
        yield from (calls, moved)
        yield CounterMetricFamily(
            "overlay_coalesced_frames",
            "Received frames written to the TAP inside TCP super-frames.",
            float(d.coalesced_frames),
        )
        yield CounterMetricFamily(
            "overlay_arp_suppressed", "ARP requests answered by the agent from the registry.", float(d.arp_suppressed)
        )
        yield CounterMetricFamily(
            "overlay_nd_suppressed",
            "IPv6 neighbour solicitations answered by the agent from the registry.",
            float(d.nd_suppressed),
        )

    def _table(self, fdb: FdbStatus) -> Iterator[Metric]:
        size = GaugeMetricFamily("overlay_fdb_entries", "Forwarding-table entries, by source.", labels=["source"])
        events = CounterMetricFamily(
            "overlay_fdb_events",
            "Forwarding-table events (refusals, moves, expiries, evictions, overflows).",
            labels=["event"],
        )
        for key, n in msgspec.structs.asdict(fdb).items():
            (size if key in FDB_SOURCES else events).add_metric([key], float(n))
        yield from (size, events)

    def _registry(self, registry: RegistryStatus | None) -> Iterator[Metric]:
        if registry is None:
            return  # static mode: no registry, no registry metrics
        yield GaugeMetricFamily("overlay_registry_connected", "1 while etcd is connected.", float(registry.connected))
        yield GaugeMetricFamily(
            "overlay_registry_revision", "The last etcd revision applied.", float(registry.revision)
        )
        yield CounterMetricFamily("overlay_registry_reconnects", "Reconnections to etcd.", float(registry.reconnects))
        yield CounterMetricFamily(
            "overlay_registry_resyncs", "Full re-reads after a compaction.", float(registry.resyncs)
        )
        yield GaugeMetricFamily(
            "overlay_registry_applied_revision",
            "The newest etcd revision whose events are in the forwarding table.",
            float(registry.applied_revision),
        )
        yield CounterMetricFamily("overlay_registry_events", "Watch events received.", float(registry.events))
        yield CounterMetricFamily(
            "overlay_registry_out_of_scope_events",
            "Watch events of networks this agent does not serve (0 unless watch scoping fails).",
            float(registry.out_of_scope),
        )
        refused = CounterMetricFamily(
            "overlay_registry_refused", "Registry values refused, by reason.", labels=["reason"]
        )
        refused.add_metric(["too_large"], float(registry.too_large))
        refused.add_metric(["invalid"], float(registry.refused - registry.too_large))
        yield refused
        yield GaugeMetricFamily("overlay_registry_keys", "Registry keys held.", float(registry.keys))
        yield GaugeMetricFamily(
            "overlay_registry_resync_seconds", "How long the last snapshot or resync took.", registry.resync_s
        )
        lag = registry.apply_lag
        cumulative, buckets = 0, []
        for bound, count in lag.buckets:
            cumulative += int(count or 0)
            buckets.append(("+Inf" if bound is None else repr(float(bound)), float(cumulative)))
        if buckets:
            yield HistogramMetricFamily(
                "overlay_registry_apply_seconds",
                "From a watch event's arrival to its application in the forwarding table.",
                buckets=buckets,
                sum_value=lag.sum_s,
            )

    def _probes(self, probes: dict[str, ProbeStatus], counters: ProbeCounters | None) -> Iterator[Metric]:
        rtt = GaugeMetricFamily("overlay_peer_rtt_seconds", "Last probe round-trip time to a peer.", labels=["peer"])
        srtt = GaugeMetricFamily("overlay_peer_srtt_seconds", "Smoothed probe round-trip time.", labels=["peer"])
        loss = GaugeMetricFamily("overlay_peer_loss_ratio", "Lost fraction of the last probes.", labels=["peer"])
        up = GaugeMetricFamily("overlay_peer_reachable", "1 while the peer answers probes.", labels=["peer"])
        sent = CounterMetricFamily("overlay_peer_probes_sent", "Probes sent to a peer host.", labels=["peer"])
        received = CounterMetricFamily("overlay_peer_probes_received", "Probe replies received.", labels=["peer"])
        for host, p in probes.items():
            if p.rtt_ms is not None:  # no reply yet: no sample, not 0
                rtt.add_metric([host], p.rtt_ms * 1e-3)
            if p.srtt_ms is not None:
                srtt.add_metric([host], p.srtt_ms * 1e-3)
            loss.add_metric([host], float(p.loss))
            up.add_metric([host], float(p.reachable))
            sent.add_metric([host], float(p.sent))
            received.add_metric([host], float(p.received))
        if probes:
            yield from (rtt, srtt, loss, up, sent, received)
        if counters is not None:  # probing off: none
            yield CounterMetricFamily(
                "overlay_probe_bad", "Probe datagrams ignored as malformed, unsolicited or stale.", float(counters.bad)
            )
            yield CounterMetricFamily("overlay_probe_answered", "Probe requests answered.", float(counters.answered))

    def _encryption(self, e: EncryptionStatus | None) -> Iterator[Metric]:
        if e is None:  # a host without a static key
            return
        yield InfoMetricFamily(
            "overlay_host_key", "This host's static public key.", value={"fingerprint": e.fingerprint}
        )
        nets = GaugeMetricFamily(
            "overlay_network_encrypted", "1 for an encrypted network this host serves.", labels=["vni"]
        )
        for vni in e.networks:
            nets.add_metric([str(vni)], 1)
        yield nets
        state = GaugeMetricFamily(
            "overlay_session_state", "1 for the state of the session with a peer VTEP.", labels=["peer", "state"]
        )
        age = GaugeMetricFamily(
            "overlay_session_age_seconds", "Age of the current session with a peer.", labels=["peer"]
        )
        rekeys = CounterMetricFamily("overlay_session_rekeys", "Rekeys of the session with a peer.", labels=["peer"])
        tx = CounterMetricFamily(
            "overlay_session_tx_messages", "Datagrams sealed on the current session with a peer.", labels=["peer"]
        )
        rx = CounterMetricFamily(
            "overlay_session_rx_messages", "Datagrams opened on the installed sessions with a peer.", labels=["peer"]
        )
        for p in e.sessions:
            for name in ("none", "handshaking", "established"):
                state.add_metric([p.peer, name], float(p.state == name))
            if p.age_s is not None:
                age.add_metric([p.peer], p.age_s)
            rekeys.add_metric([p.peer], float(p.rekeys))
            tx.add_metric([p.peer], float(p.tx_messages))
            rx.add_metric([p.peer], float(p.rx_messages))
        yield from (state, age, rekeys, tx, rx)
        handshakes = CounterMetricFamily("overlay_handshakes", "Handshake events, by kind.", labels=["kind"])
        for kind, n in e.handshakes.items():
            handshakes.add_metric([kind], float(n))
        yield handshakes
        yield GaugeMetricFamily(
            "overlay_hosts_without_key",
            "Registered hosts that publish no key (nothing reaches them encrypted).",
            float(len(e.without_key)),
        )

    def _egress(self, s: Status) -> Iterator[Metric]:
        """The way out and in: the nft table, published ports, DNS answers (where the agent has them)."""
        if s.egress is not None:
            yield GaugeMetricFamily(
                "overlay_egress_applied",
                "1 when the agent's nftables table is as the agent wants it.",
                float(s.egress.error is None),
            )
            yield GaugeMetricFamily(
                "overlay_egress_rules", "Rules in the agent's nftables table.", float(s.egress.rules)
            )
            yield GaugeMetricFamily(
                "overlay_firewall_problems",
                "Other firewalls' settings that block containers' traffic.",
                float(len(s.egress.problems)),
            )
        published = GaugeMetricFamily(
            "overlay_published_ports", "Host ports published onto containers, by protocol.", labels=["proto"]
        )
        counts = {"tcp": 0, "udp": 0}
        for a in s.attachments:
            for p in a.get("published") or []:  # type: ignore[attr-defined]
                counts[str(p.get("proto"))] = counts.get(str(p.get("proto")), 0) + 1
        for proto, n in counts.items():
            published.add_metric([proto], float(n))
        yield published
        if s.dns is not None:
            queries = CounterMetricFamily("overlay_dns", "DNS queries on the gateways, by outcome.", labels=["outcome"])
            for outcome, n in sorted(s.dns.counters.items()):
                queries.add_metric([outcome], float(n))
            yield queries


def registry_for(status: StatusSource) -> CollectorRegistry:
    """The agent's metrics plus the process's own (CPU, memory, file descriptors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    ProcessCollector(registry=registry)
    return registry


def _response(
    code: int, reason: str, body: bytes, content_type: str = "text/plain; charset=utf-8", head_only: bool = False
) -> bytes:
    head = (
        f"HTTP/1.0 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
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


async def serve(host: str, port: int, status: StatusSource) -> asyncio.AbstractServer:
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
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    try:
        return await asyncio.start_server(on_client, host, port, limit=MAX_HEAD)
    except OSError as e:
        where = format_address(host, port)
        raise MetricsError(
            f"cannot serve metrics on {where}: {e.strerror or e}; pass --metrics HOST:PORT for "
            "another address, or --metrics off"
        ) from None
