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

The asyncio shell that runs it on a socket is ``overlay.io.prober.Prober``.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping

from overlay.core.addresses import format_address
from overlay.core.status import ProbeStatus

MAGIC = b"OVP1"
REQUEST, REPLY = 1, 2
HEADER = struct.Struct("!4sB3xIQ")
INTERVAL, TIMEOUT, WINDOW, MISSES = 1.0, 1.0, 20, 3

Peers = Mapping[str, tuple[str, int]]  # host id -> (IP address, probe port)


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

    def __init__(
        self, interval: float = INTERVAL, timeout: float = TIMEOUT, window: int = WINDOW, misses: int = MISSES
    ) -> None:
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

    def on_datagram(self, data: bytes, source: tuple[object, ...], now: float) -> bytes | None:
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

    def status(self) -> dict[str, ProbeStatus]:
        """host id -> the path to it: address, RTTs (ms, rounded to the µs), loss, reachability."""
        out = {}
        for host, peer in self.peers.items():
            decided = [p for p in peer.window if p.answered or p.lost]
            lost = sum(p.lost for p in decided)
            ip, port = peer.address
            out[host] = ProbeStatus(
                address=format_address(ip, port),
                rtt_ms=None if peer.rtt is None else round(peer.rtt * 1e3, 3),
                srtt_ms=None if peer.srtt is None else round(peer.srtt * 1e3, 3),
                loss=round(lost / len(decided), 3) if decided else 0.0,
                reachable=peer.reachable,
                sent=peer.sent,
                received=peer.received,
            )
        return out

    def counters(self) -> dict[str, int]:
        return {"bad": self.bad, "answered": self.answered}
