"""The DNS responder on each network's gateway, the shell: ``DnsServer`` moves bytes between
sockets and the pure ``overlay.core.dns.answer`` (the rules are documented there), and
forwards what is not the overlay's to the host's upstream resolvers.

Per served address (``serve(vni, address)``): a UDP and a TCP socket on port 53 of that
address only, bound with IP_FREEBIND/IPV6_FREEBIND (so the address may come a moment later)
and, given ``device``, SO_BINDTODEVICE (only what arrives on the gateway's own link).

Who can send what:
- Queries: anyone who can route to the gateway address reaches the socket, the host itself
  and containers of the host's other networks included (the host routes between its bridges).
  The core answers only sources inside the network's own subnet(s) (``foreign_source`` drops
  the rest); ``device`` narrows it to the gateway's link, so a spoofed source address must
  also come from that network's bridge. Replies to junk are bare headers no larger than the
  query, and a reply never answers a reply (no amplification, no loops).
- Upstream replies: each forwarded UDP query goes out on a fresh connected socket (a random
  source port from the kernel; the kernel delivers only datagrams from that upstream's address
  and port), and a reply counts only if its id and question match (``core.dns.matches``);
  anything else is counted and ignored. An upstream that is one of our own gateway addresses
  is never asked (a loop).
- Load: at most ``max_inflight`` forwarded queries at once, and ``per_network_inflight`` (a
  quarter) per network (over either: REFUSED, counted as ``refused_overload``: one network's
  containers cannot starve the others'), at most ``max_tcp`` TCP connections, and
  ``per_network_tcp`` (a quarter) per network (more are closed at once, ``tcp_refused``), each closed after ``tcp_idle`` seconds without a whole query (slow
  senders included). TCP frames are a 2-byte length and the message; a frame cut short is
  dropped as ``tcp_short`` and ends the connection, as does any dropped query. A connection's
  queries are answered in turn (a forwarded one holds the next until it is answered).

Forwarding: the query is sent as it came to the first upstream (UDP for UDP, TCP for TCP); on
a timeout (``timeout`` seconds) or an error the next; when none answered, SERVFAIL.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections import Counter
from typing import Callable, cast

from overlay.core.addresses import IPAddress, format_address, ipv4
from overlay.core.dns import Drop, Forward, Names, Reply, answer, failure, matches

log = logging.getLogger("overlay.dns")

PORT = 53
IPV6_FREEBIND = getattr(socket, "IPV6_FREEBIND", 78)  # linux/in6.h; Python names it from 3.12 on
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
MAX_INFLIGHT = 1024
MAX_TCP = 64
TCP_IDLE = 5.0
COUNTERS = (
    "queries",
    "answered",
    "nodata",
    "nxdomain",
    "refused",
    "formerr",
    "notimp",
    "truncated",
    "forwarded",
    "forward_answered",
    "forward_timeouts",
    "forward_errors",
    "forward_mismatched",
    "servfail",
    "refused_overload",
    "tcp_connections",
    "tcp_refused",
    "tcp_idle_closed",
    "send_errors",
)
_REPLY_COUNTER = {"NXDOMAIN": "nxdomain", "REFUSED": "refused", "FORMERR": "formerr", "NOTIMP": "notimp"}

Send = Callable[[bytes], None]


class DnsError(RuntimeError):
    """A responder could not be set up; the message says which address and what to do."""


class _Listener:
    """The sockets on one address of one network."""

    def __init__(self, address: IPAddress) -> None:
        self.address = address
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.Server | None = None
        self.connections: set[asyncio.StreamWriter] = set()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer, vni: int) -> None:
        self.server, self.vni = server, vni
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # asyncio's is not a subclass of it

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.server._datagram(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        self.server.counters["send_errors"] += 1
        log.debug("dns: %s", exc)


class DnsServer:
    """Answers on the gateway addresses it is given, from ``names`` (kept up to date by the
    agent's registry events); asks ``upstreams`` the rest (none: REFUSED)."""

    def __init__(
        self,
        names: Names,
        upstreams: list[IPAddress],
        timeout: float = 2.0,
        *,
        max_inflight: int = MAX_INFLIGHT,
        max_tcp: int = MAX_TCP,
        tcp_idle: float = TCP_IDLE,
        port: int = PORT,
        per_network_inflight: int = MAX_INFLIGHT // 4,
        per_network_tcp: int = MAX_TCP // 4,
    ) -> None:
        self.names = names
        self.upstreams = list(upstreams)
        self.timeout, self.max_inflight, self.max_tcp, self.tcp_idle, self.port = (
            timeout,
            max_inflight,
            max_tcp,
            tcp_idle,
            port,
        )
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._served: dict[int, list[_Listener]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight = 0
        self._tcp_open = 0
        self._inflight_of: Counter[int] = Counter()  # per network (VNI)
        self._tcp_of: Counter[int] = Counter()
        self.per_network_inflight = min(per_network_inflight, max_inflight)
        self.per_network_tcp = min(per_network_tcp, max_tcp)

    # --- lifecycle ------------------------------------------------------------------------------

    async def serve(self, vni: int, address: IPAddress, *, device: str | None = None) -> None:
        """Answer network ``vni``'s containers on ``address`` port 53, UDP and TCP (a network
        may be served on an IPv4 and an IPv6 address); DnsError (one line) if a socket cannot
        be bound. ``device``: only what arrives on that link (the gateway's)."""
        listeners = self._served.setdefault(vni, [])
        if any(x.address == address for x in listeners):
            return
        listener = _Listener(address)
        udp = _bind(socket.SOCK_DGRAM, address, self.port, device)
        try:
            tcp = _bind(socket.SOCK_STREAM, address, self.port, device)
        except DnsError:
            udp.close()
            if not listeners:
                del self._served[vni]
            raise
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self, vni), sock=udp)
        listener.udp = transport
        listener.tcp = await asyncio.start_server(
            lambda r, w: self._connection(vni, listener, r, w), sock=tcp, limit=1 << 17
        )
        listeners.append(listener)
        log.info("network %d: DNS on %s", vni, format_address(str(address), self.port))

    async def unserve(self, vni: int) -> None:
        """Stop answering on network ``vni``'s addresses: the sockets are closed, and so are
        its TCP connections; queries being forwarded get no reply."""
        for listener in self._served.pop(vni, []):
            if listener.udp is not None:
                listener.udp.close()
            if listener.tcp is not None:
                listener.tcp.close()
            for writer in list(listener.connections):
                writer.close()
            if listener.tcp is not None:
                await listener.tcp.wait_closed()

    async def close(self) -> None:
        for vni in list(self._served):
            await self.unserve(vni)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def set_upstreams(self, upstreams: list[IPAddress]) -> None:
        """The host's resolvers changed (resolv.conf was rewritten)."""
        self.upstreams = list(upstreams)

    def status(self) -> dict[str, int]:
        """The counters (module doc), and ``inflight``, ``tcp_open`` and ``listening`` now."""
        return {
            **self.counters,
            "inflight": self._inflight,
            "tcp_open": self._tcp_open,
            "listening": sum(len(x) for x in self._served.values()),
        }

    def addresses(self, vni: int) -> list[IPAddress]:
        """The addresses network ``vni`` is answered on."""
        return [x.address for x in self._served.get(vni, [])]

    # --- UDP ------------------------------------------------------------------------------------

    def _datagram(self, proto: _Udp, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.counters["queries"] += 1
        transport = proto.transport
        assert transport is not None
        out = answer(data, proto.vni, self.names, bool(self.upstreams), source=_source(addr))
        if isinstance(out, Reply):
            self._count(out)
            try:
                transport.sendto(out.wire, addr)
            except OSError:
                self.counters["send_errors"] += 1
        elif isinstance(out, Forward):

            def send(wire: bytes) -> None:
                if not transport.is_closing():
                    try:
                        transport.sendto(wire, addr)
                    except OSError:
                        self.counters["send_errors"] += 1

            self._forward_later(out, data, send, proto.vni)
        else:
            self.counters[f"dropped_{out.reason}"] += 1

    def _overloaded(self, vni: int) -> bool:
        return self._inflight >= self.max_inflight or self._inflight_of[vni] >= self.per_network_inflight

    def _forward_later(self, fwd: Forward, data: bytes, send: Send, vni: int) -> None:
        if self._overloaded(vni):
            self.counters["refused_overload"] += 1
            send(failure(fwd, "REFUSED"))
            return
        self._inflight += 1
        self._inflight_of[vni] += 1
        task = asyncio.get_running_loop().create_task(self._forward(fwd, data, send, vni, tcp=False))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- TCP ------------------------------------------------------------------------------------

    async def _connection(
        self, vni: int, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._tcp_open >= self.max_tcp or self._tcp_of[vni] >= self.per_network_tcp:
            self.counters["tcp_refused"] += 1
            writer.close()
            return
        self._tcp_open += 1
        self._tcp_of[vni] += 1
        self.counters["tcp_connections"] += 1
        listener.connections.add(writer)
        source = _source(writer.get_extra_info("peername") or ("0.0.0.0", 0))
        try:
            while True:
                length = -1
                try:
                    async with asyncio.timeout(self.tcp_idle):
                        length = int.from_bytes(await reader.readexactly(2), "big")
                        data = await reader.readexactly(length)
                except asyncio.IncompleteReadError as e:
                    if e.partial or length >= 0:  # cut inside a frame (EOF between frames: a close)
                        self.counters["dropped_tcp_short"] += 1
                    return
                except TimeoutError:
                    self.counters["tcp_idle_closed"] += 1
                    return
                self.counters["queries"] += 1
                out = answer(data, vni, self.names, bool(self.upstreams), source=source, tcp=True)
                if isinstance(out, Drop):
                    self.counters[f"dropped_{out.reason}"] += 1
                    return
                if isinstance(out, Reply):
                    self._count(out)
                    wire = out.wire
                elif self._overloaded(vni):
                    self.counters["refused_overload"] += 1
                    wire = failure(out, "REFUSED")
                else:
                    self._inflight += 1
                    self._inflight_of[vni] += 1
                    got: list[bytes] = []
                    await self._forward(out, data, got.append, vni, tcp=True)
                    wire = got[0]
                writer.write(len(wire).to_bytes(2, "big") + wire)
                async with asyncio.timeout(self.tcp_idle):
                    await writer.drain()
        except (OSError, TimeoutError):  # the client went away or stopped reading
            return
        finally:
            self._tcp_open -= 1
            self._tcp_of[vni] -= 1
            listener.connections.discard(writer)
            writer.close()

    # --- forwarding -----------------------------------------------------------------------------

    async def _forward(self, fwd: Forward, data: bytes, send: Send, vni: int, *, tcp: bool) -> None:
        """Ask the upstreams in turn; send their reply or SERVFAIL. Holds one in-flight slot."""
        self.counters["forwarded"] += 1
        try:
            ours = {x.address for listeners in self._served.values() for x in listeners}
            for upstream in self.upstreams:
                if upstream in ours:
                    continue
                try:
                    async with asyncio.timeout(self.timeout):
                        reply = await (_ask_tcp if tcp else _ask_udp)(upstream, self.port, fwd, data, self.counters)
                except TimeoutError:
                    self.counters["forward_timeouts"] += 1
                    log.debug("dns: %s did not answer in %s s", upstream, self.timeout)
                    continue
                except (OSError, asyncio.IncompleteReadError) as e:
                    self.counters["forward_errors"] += 1
                    log.debug("dns: asking %s: %s", upstream, e)
                    continue
                if reply is None:
                    continue
                self.counters["forward_answered"] += 1
                send(reply)
                return
            self.counters["servfail"] += 1
            send(failure(fwd, "SERVFAIL"))
        finally:
            self._inflight -= 1
            self._inflight_of[vni] -= 1

    def _count(self, out: Reply) -> None:
        if out.truncated:
            self.counters["truncated"] += 1
        elif out.rcode == "NOERROR":
            self.counters["answered" if out.answers else "nodata"] += 1
        else:
            self.counters[_REPLY_COUNTER.get(out.rcode, out.rcode.lower())] += 1


async def _ask_udp(upstream: IPAddress, port: int, fwd: Forward, data: bytes, counters: Counter[str]) -> bytes:
    """One query to ``upstream`` on a fresh connected socket; the first reply that matches."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if upstream.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((str(upstream), port))  # connected: the kernel delivers only this peer's datagrams
        await loop.sock_sendall(sock, data)
        while True:
            reply = await loop.sock_recv(sock, 65535)
            if matches(fwd, reply):
                return reply
            counters["forward_mismatched"] += 1


async def _ask_tcp(upstream: IPAddress, port: int, fwd: Forward, data: bytes, counters: Counter[str]) -> bytes | None:
    """One query to ``upstream`` over a TCP connection of its own; its reply if it matches."""
    reader, writer = await asyncio.open_connection(str(upstream), port)
    try:
        writer.write(len(data).to_bytes(2, "big") + data)
        await writer.drain()
        reply = await reader.readexactly(int.from_bytes(await reader.readexactly(2), "big"))
    finally:
        writer.close()
    if matches(fwd, reply):
        return reply
    counters["forward_mismatched"] += 1
    return None


def _source(addr: tuple[str | int, ...]) -> IPAddress | None:
    host = str(addr[0])
    try:
        return ipv4(host) if ":" not in host else ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return None


def _bind(kind: int, address: IPAddress, port: int, device: str | None) -> socket.socket:
    """A socket of ``kind`` bound to (address, port), non-blocking (listening for TCP)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    proto = "TCP" if kind == socket.SOCK_STREAM else "UDP"
    where = format_address(str(address), port)
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, not past a listener
        if device is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind((str(address), port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            message = (
                f"{proto} port {port} on {address} is taken (a dnsmasq or systemd-resolved?): stop it or make it "
                "listen elsewhere (dnsmasq --bind-interfaces, resolved's DNSStubListener=no)"
            )
        elif e.errno in (errno.EACCES, errno.EPERM):
            message = f"cannot bind {proto} {where}: run the agent as root or with CAP_NET_BIND_SERVICE"
        elif e.errno == errno.ENODEV:
            message = f"cannot bind {proto} {where} to device {device}: there is no such device"
        else:
            message = f"cannot bind {proto} {where}: {e.strerror or e}"
        raise DnsError(message) from None
    return sock
