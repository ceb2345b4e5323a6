"""Underlay path monitoring: every agent probes every peer VTEP over UDP, about once a second,
and keeps the round-trip time and loss per peer, so a broken underlay path shows up in
`overlay status` and the metrics before users notice it as a silent overlay.

Wire format (big-endian, 20 bytes, nothing after it; anything else is counted as bad):

    0       4     5        8            12                         20
    | magic | type | zero x3 | sequence  | sender timestamp (ns)   |
    | OVP1  | 1/2  |         | uint32    | uint64                  |

A request (type 1) carries the sender's sequence number and its own monotonic clock in ns; the
reply (type 2) echoes both unchanged, so only the sender ever interprets the timestamp and the
two hosts' clocks need not agree. Any well-formed request is answered (the reply is the same
size, so it amplifies nothing); a reply counts only if it matches a probe still outstanding in
that peer's window, by sequence, timestamp and source address.

Rules (``Probes``, pure: no IO, time passed in as ``now``, monotonic seconds):
- One request per peer every ``interval`` seconds (1.0), the first one at once.
- A probe unanswered after ``timeout`` seconds (1.0) is lost; a reply arriving later is still
  taken for its RTT (the window keeps the last ``window`` = 20 probes), which clears the loss.
- ``loss`` is the lost fraction of the decided probes in the window (pending ones excluded).
- RTT: the last sample and a smoothed one, srtt = 7/8 srtt + 1/8 sample (RFC 6298).
- A peer is ``reachable`` once it answered and until ``misses`` (3) consecutive probes are lost.

``Prober`` is the thin asyncio shell: one socket (asyncio-dgram), one task answering and
recording, one task sending what ``Probes.due`` says every ``tick`` seconds.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import asyncio_dgram

log = logging.getLogger("overlay.probe")

MAGIC = b"OVP1"
REQUEST, REPLY = 1, 2
HEADER = struct.Struct("!4sB3xIQ")
INTERVAL, TIMEOUT, WINDOW, MISSES = 1.0, 1.0, 20, 3

Peers = Mapping[str, tuple[str, int]]  # host id -> (IP address, probe port)


class ProbeError(RuntimeError):
    """The probe socket could not be set up; the message says which address and what to do."""


def encode(kind: int, seq: int, stamp_ns: int) -> bytes:
    return HEADER.pack(MAGIC, kind, seq & 0xFFFFFFFF, stamp_ns & 0xFFFFFFFFFFFFFFFF)


@dataclass
class _Probe:
    seq: int
    stamp: int  # the timestamp sent, ns
    sent_at: float
    answered: bool = False
    lost: bool = False


@dataclass
class _Peer:
    address: tuple[str, int]
    next_at: float | None = None
    window: deque[_Probe] = field(default_factory=deque)
    rtt: float | None = None
    srtt: float | None = None
    misses: int = 0
    reachable: bool = False
    sent: int = 0
    received: int = 0


class Probes:
    """The probing protocol for one agent; see the module docstring for the rules."""

    def __init__(self, interval: float = INTERVAL, timeout: float = TIMEOUT, window: int = WINDOW,
                 misses: int = MISSES) -> None:
        self.interval, self.timeout, self.window, self.misses = interval, timeout, window, misses
        self.peers: dict[str, _Peer] = {}
        self.outstanding: dict[int, tuple[str, _Probe]] = {}  # seq -> (host id, probe)
        self.seq = 0
        self.bad = 0  # malformed, unsolicited or stale datagrams, ignored
        self.answered = 0  # requests answered

    def set_peers(self, peers: Peers) -> None:
        """Probe exactly these peers; one whose address is unchanged keeps its history.
        Addresses must be IP literals (a name would need a DNS lookup on every send)."""
        wanted = {}
        for host, (ip, port) in peers.items():
            wanted[host] = (str(ipaddress.ip_address(ip)), int(port))
        for host in list(self.peers):
            if wanted.get(host) != self.peers[host].address:
                self._forget(host)
        for host, address in wanted.items():
            self.peers.setdefault(host, _Peer(address))

    def _forget(self, host: str) -> None:
        for probe in self.peers.pop(host).window:
            self.outstanding.pop(probe.seq, None)

    def due(self, now: float) -> list[tuple[tuple[str, int], bytes]]:
        """Expire overdue probes and return the requests to send now, as (address, datagram)."""
        self._expire(now)
        out = []
        for host, peer in self.peers.items():
            if peer.next_at is not None and now < peer.next_at:
                continue
            if peer.next_at is None or now - peer.next_at >= self.interval:
                peer.next_at = now + self.interval  # first probe, or after a stall: no burst
            else:
                peer.next_at += self.interval  # keep the beat
            self.seq = (self.seq + 1) & 0xFFFFFFFF
            probe = _Probe(self.seq, int(now * 1e9) & 0xFFFFFFFFFFFFFFFF, now)
            self.outstanding.pop(self.seq, None)  # a wrapped sequence number: the old probe is long gone
            peer.window.append(probe)
            self.outstanding[probe.seq] = (host, probe)
            if len(peer.window) > self.window:
                self.outstanding.pop(peer.window.popleft().seq, None)
            peer.sent += 1
            out.append((peer.address, encode(REQUEST, probe.seq, probe.stamp)))
        return out

    def _expire(self, now: float) -> None:
        for peer in self.peers.values():
            for probe in peer.window:
                if not probe.answered and not probe.lost and now - probe.sent_at >= self.timeout:
                    probe.lost = True
                    peer.misses += 1
                    if peer.misses >= self.misses:
                        peer.reachable = False

    def on_datagram(self, data: bytes, source: tuple[Any, ...], now: float) -> bytes | None:
        """Take one received datagram: returns the reply to send back to ``source`` for a
        request, records a reply, counts anything else as bad. Never raises."""
        if len(data) != HEADER.size:
            self.bad += 1
            return None
        magic, kind, seq, stamp = HEADER.unpack(data)
        if magic != MAGIC:
            self.bad += 1
            return None
        if kind == REQUEST:
            self.answered += 1
            return encode(REPLY, seq, stamp)
        entry = self.outstanding.get(seq) if kind == REPLY else None
        if entry is None or entry[1].stamp != stamp or entry[1].answered:
            self.bad += 1
            return None
        host, probe = entry
        peer = self.peers[host]
        if (str(source[0]), source[1]) != peer.address:
            self.bad += 1
            return None
        probe.answered, probe.lost = True, False
        rtt = max(now - probe.sent_at, 0.0)
        peer.rtt = rtt
        peer.srtt = rtt if peer.srtt is None else 0.875 * peer.srtt + 0.125 * rtt
        peer.received += 1
        peer.misses = 0
        peer.reachable = True
        return None

    def status(self) -> dict[str, dict[str, Any]]:
        """host id -> {"address", "rtt_ms", "srtt_ms", "loss", "reachable", "sent", "received"}."""
        out = {}
        for host, peer in self.peers.items():
            decided = [p for p in peer.window if p.answered or p.lost]
            lost = sum(p.lost for p in decided)
            ip, port = peer.address
            out[host] = {
                "address": f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}",
                "rtt_ms": None if peer.rtt is None else round(peer.rtt * 1e3, 3),
                "srtt_ms": None if peer.srtt is None else round(peer.srtt * 1e3, 3),
                "loss": round(lost / len(decided), 3) if decided else 0.0,
                "reachable": peer.reachable,
                "sent": peer.sent,
                "received": peer.received,
            }
        return out

    def counters(self) -> dict[str, int]:
        return {"bad": self.bad, "answered": self.answered}


PeerSource = Peers | Callable[[], Peers]


class Prober:
    """Runs ``Probes`` on a UDP socket bound to ``local``. ``peers`` is a mapping, or a callable
    asked on every tick (so peers from the registry are followed without further wiring)."""

    def __init__(self, local: tuple[str, int], peers: PeerSource | None = None, *, tick: float = 0.2,
                 clock: Callable[[], float] = time.monotonic, probes: Probes | None = None) -> None:
        self.local = local
        self.probes = probes or Probes()
        self.tick, self.clock = tick, clock
        self.source: Callable[[], Peers] | None = peers if callable(peers) else None
        if peers is not None and not callable(peers):
            self.probes.set_peers(peers)
        self.stream: asyncio_dgram.aio.DatagramServer | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.errors = 0  # sends or receives refused (ICMP unreachable, wrong address family); probing goes on

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (the real port when ``local`` asked for port 0)."""
        assert self.stream is not None, "start() first"
        return self.stream.sockname[:2]

    def set_peers(self, peers: Peers) -> None:
        self.probes.set_peers(peers)

    def status(self) -> dict[str, dict[str, Any]]:
        return self.probes.status()

    def counters(self) -> dict[str, int]:
        """Probes' counters plus ``errors``: datagrams the kernel refused to send or receive."""
        return {**self.probes.counters(), "errors": self.errors}

    async def start(self) -> None:
        host, port = self.local
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:
            raise ProbeError(f"cannot bind the probe socket to {where}: {host!r} is not an IP address") from None
        # Bound here rather than by asyncio_dgram.bind: uvloop's bind error hides the errno.
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
            sock.setblocking(False)
            self.stream = await asyncio_dgram.from_socket(sock)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                hint = "is another agent probing on this host? choose another probe port"
            elif e.errno == errno.EADDRNOTAVAIL:
                hint = f"{host} is not an address of this host: use the local VTEP address"
            else:
                hint = "check the local address and probe port"
            raise ProbeError(f"cannot bind the probe socket to {where}: {e.strerror or e}; {hint}") from None
        self.tasks = [asyncio.create_task(self._receive(), name="probe-receive"),
                      asyncio.create_task(self._send(), name="probe-send")]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def _drain_errors(self) -> None:
        """Count the errors asyncio-dgram queued from earlier sends: left queued, each would be
        raised by the next send or receive instead of doing it (one dead peer would starve the rest)."""
        assert self.stream is not None
        while True:
            try:
                _ = self.stream.exception  # raises the first queued error, if any
                return
            except OSError as e:
                self.errors += 1
                log.debug("probe socket: %s", e)

    async def _receive(self) -> None:
        assert self.stream is not None
        while True:
            try:
                data, source = await self.stream.recv()
                reply = self.probes.on_datagram(data, source, self.clock())
                if reply is not None:
                    self._drain_errors()
                    await self.stream.send(reply, source)
            except asyncio_dgram.TransportClosed:
                return
            except OSError as e:
                self.errors += 1
                log.debug("probe socket: %s", e)

    async def _send(self) -> None:
        assert self.stream is not None
        failed: str | None = None
        while True:
            if self.source is not None:
                try:
                    self.probes.set_peers(self.source())
                    failed = None
                except Exception as e:  # a bad peer list must not end probing; say so once
                    if repr(e) != failed:
                        log.error("probe: the peer list was refused, probing the previous one: %r", e)
                    failed = repr(e)
            for address, datagram in self.probes.due(self.clock()):
                try:
                    self._drain_errors()
                    await self.stream.send(datagram, address)
                except asyncio_dgram.TransportClosed:
                    return
                except (OSError, ValueError) as e:  # uvloop: ValueError for an address of the other family
                    self.errors += 1
                    log.debug("probe to %s: %s", address, e)
            await asyncio.sleep(self.tick)
