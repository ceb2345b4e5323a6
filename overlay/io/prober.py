"""Underlay path monitoring, the shell: ``Prober`` runs the pure ``overlay.core.probing.Probes``
(wire format and rules are documented there) on one UDP socket (asyncio-dgram): one task
answering and recording, one task sending what ``Probes.due`` says every ``tick`` seconds.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from typing import Callable

import asyncio_dgram

from overlay.core.addresses import format_address
from overlay.core.probing import Peers, Probes
from overlay.core.status import ProbeCounters, ProbeStatus

log = logging.getLogger("overlay.probe")


class ProbeError(RuntimeError):
    """The probe socket could not be set up; the message says which address and what to do."""


PeerSource = Peers | Callable[[], Peers]


class Prober:
    """Runs ``Probes`` on a UDP socket bound to ``local``. ``peers`` is a mapping, or a callable
    asked on every tick (so peers from the registry are followed without further wiring)."""

    def __init__(
        self,
        local: tuple[str, int],
        peers: PeerSource | None = None,
        *,
        tick: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        probes: Probes | None = None,
    ) -> None:
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
        host, port = self.stream.sockname[:2]
        return str(host), int(port)

    def set_peers(self, peers: Peers) -> None:
        self.probes.set_peers(peers)

    def status(self) -> dict[str, ProbeStatus]:
        return self.probes.status()

    def counters(self) -> ProbeCounters:
        """Probes' counters plus ``errors``: datagrams the kernel refused to send or receive."""
        return ProbeCounters(bad=self.probes.bad, answered=self.probes.answered, errors=self.errors)

    async def start(self) -> None:
        host, port = self.local
        where = format_address(host, port)
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:
            raise ProbeError(f"cannot bind the probe socket to {where}: {host!r} is not an IP address") from None
        # Bound here rather than by asyncio_dgram.bind: uvloop's bind error hides the errno.
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
            sock.setblocking(False)
            stream = await asyncio_dgram.from_socket(sock)
            assert isinstance(stream, asyncio_dgram.aio.DatagramServer)  # an unconnected socket: a server
            self.stream = stream
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                hint = "is another agent probing on this host? choose another probe port"
            elif e.errno == errno.EADDRNOTAVAIL:
                hint = f"{host} is not an address of this host: use the local VTEP address"
            else:
                hint = "check the local address and probe port"
            raise ProbeError(f"cannot bind the probe socket to {where}: {e.strerror or e}; {hint}") from None
        self.tasks = [
            asyncio.create_task(self._receive(), name="probe-receive"),
            asyncio.create_task(self._send(), name="probe-send"),
        ]

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
                reply = self.probes.on_datagram(data, source if isinstance(source, tuple) else (source,), self.clock())
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
