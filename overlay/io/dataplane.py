"""Binds the TAP and the UDP sockets to the event loop and drives the fast path.

Per readiness event one call into the fast path drains a bounded batch (pump_tx: TAP reads ->
encap -> sendmmsg; pump_rx: recvmmsg -> decap -> TAP writes). Python runs once per batch, to
hand sources the fast path has not seen to the forwarding table (learning), and every few
seconds to age entries. Nothing here touches a packet.

Sockets, per underlay family this host has (IPv4, IPv6 or both): a UDP socket bound to
(local, port) receives, with UDP_GRO. A pool of UDP sockets bound to (local, source ports in
49152-65535) sends, with UDP_SEGMENT, each flow from the socket its hash picks, so flows keep
distinct and stable source ports for ECMP (ext/io.pxi); a VTEP is sent to from the pool of its
family. Outer packets are never fragmented (IP_PMTUDISC_DO; IPV6_DONTFRAG and
IPV6_PMTUDISC_DO). The sending sockets never read: a BPF filter that accepts nothing keeps
stray datagrams out. IPv6 sockets are IPv6-only (IPV6_V6ONLY), so a family is one socket set.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import ipaddress
import os
import socket
import struct
import time
from typing import Callable

from overlay.core.addresses import IPAddress
from overlay.core.fdb import ForwardingTable, Source, Vtep
from overlay.core.status import DataplaneStatus, FdbStatus, PeerTraffic, Totals, Wakeups
from overlay.core.wire import Drop, mac_to_str
from overlay.fastpath import api as fp
from overlay.fastpath.api import ForwardingCore, FrameBatch, from_c
from overlay.io.encryption import Encryption
from overlay.io.tap import NotLocal

IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2  # never fragment outer packets
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO, IPV6_DONTFRAG = 23, 2, 62  # nor on IPv6
SO_ATTACH_FILTER = 26
SOL_UDP, UDP_GRO = 17, 104
SEND_SOCKETS = 8  # source ports per host; ECMP spreads flows over them
SOCKET_BUFFER = 8 << 20
READS = 16  # TAP reads per batch: each up to a 64 KiB TCP super-frame
FRAMES = 1024  # ordinary frames made from them (a super-frame is up to ~45 segments)
MESSAGES = 64  # messages per recvmmsg: each up to 64 KiB of datagrams merged by UDP_GRO
DATAGRAMS = 256  # datagrams split out of them per decap batch
BUDGET = 256  # TAP reads or datagrams per readiness event, so neither direction starves the other
MAX_READ = 65535 + 10  # the largest TAP read: an IP datagram's limit plus the virtio-net header
MAINTENANCE_EVERY = 5.0  # seconds between ageing passes
RX_ROOM = 64  # bytes a received frame may exceed our MTU by (seal.OVERHEAD and more)


def slot_size(frame: int) -> int:
    """A FrameBatch slot size that holds ``frame`` bytes behind the headroom, plus tailroom."""
    return -(-(fp.HEADROOM_BYTES + frame + fp.TAILROOM_BYTES) // 64) * 64


class DataplaneError(RuntimeError):
    """The sockets could not be set up; the message says why and how to fix it."""


def _drop_all_filter() -> tuple[bytes, ctypes.Array[ctypes.c_uint64]]:
    """A one-instruction classic BPF program 'ret 0' as a sock_fprog (and what keeps it alive)."""
    program = (ctypes.c_uint64 * 1)(struct.unpack("Q", struct.pack("HBBI", 0x06, 0, 0, 0))[0])
    return struct.pack("HL", 1, ctypes.addressof(program)), program


def _bind_error(e: OSError, local: IPAddress, port: int) -> DataplaneError | NotLocal:
    if e.errno == errno.EADDRINUSE:
        return DataplaneError(
            f"UDP port {port} on {local} is in use (another overlay agent or a kernel vxlan "
            f"device?): stop it, or choose another --port"
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return NotLocal(f"--local {local} is not an address of this host (or still tentative: IPv6 DAD)")
    return DataplaneError(f"cannot bind UDP {local}:{port}: {e.strerror}")


def _set_buffer(sock: socket.socket, opt: int, force: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)  # SO_*BUFFORCE: past [rw]mem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


def _socket(local: IPAddress) -> socket.socket:
    """A UDP socket of ``local``'s family that never fragments what it sends."""
    if local.version == 4:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        return sock
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1)
    return sock


def _sender(local: IPAddress, k: int) -> socket.socket:
    """Sending socket k, bound to a source port in 49152-65535 (the next free candidate)."""
    for attempt in range(64):
        port = 49152 + (k * 2053 + attempt * 257 + int(local)) % 16384
        sock = _socket(local)
        try:
            sock.bind((str(local), port))
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                continue
            raise _bind_error(e, local, port) from None
        prog, _keep = _drop_all_filter()
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
        _set_buffer(sock, socket.SO_SNDBUF, 32)
        return sock
    raise DataplaneError(f"no free UDP source port in 49152-65535 on {local}")


def open_sockets(local: IPAddress, port: int) -> tuple[socket.socket, list[socket.socket]]:
    """(receiving UDP socket, sending UDP sockets) on ``local`` (either family); DataplaneError
    with the fix on failure."""
    udp = _socket(local)
    senders: list[socket.socket] = []
    try:
        try:
            udp.bind((str(local), port))
        except OSError as e:
            raise _bind_error(e, local, port) from None
        udp.setsockopt(SOL_UDP, UDP_GRO, 1)
        _set_buffer(udp, socket.SO_RCVBUF, 33)
        udp.setblocking(False)
        senders = [_sender(local, k) for k in range(SEND_SOCKETS)]
    except (DataplaneError, NotLocal, OSError) as e:
        udp.close()
        for s in senders:
            s.close()
        if isinstance(e, (DataplaneError, NotLocal)):
            raise
        raise DataplaneError(f"cannot set up the UDP sockets on {local}: {e.strerror}") from None
    return udp, senders


class Dataplane:
    """The running data path: one TAP per network (VNI), one UDP socket per underlay family
    for all (``local`` of either family, ``local6`` beside an IPv4 ``local`` on a dual-stack
    host)."""

    def __init__(
        self,
        core: ForwardingCore,
        table: ForwardingTable,
        taps: dict[int, int],
        local: IPAddress,
        port: int,
        mtu: int,
        clock: Callable[[], float] = time.monotonic,
        local6: ipaddress.IPv6Address | None = None,
    ) -> None:
        self.core, self.table = core, table
        self.taps, self.local, self.port = dict(taps), local, port  # VNI -> TAP fd
        self.tap_fd = next(iter(self.taps.values()))
        for vni, fd in self.taps.items():
            core.vni_tap(vni, fd)  # received frames go to their network's TAP
        self.clock = clock
        self.udps: list[socket.socket] = []
        self.by_family: dict[int, socket.socket] = {}  # 4, 6 -> the receiving socket (handshakes go out of it)
        self.senders: list[socket.socket] = []
        sends: dict[int, list[int]] = {4: [], 6: []}
        try:
            for address in (local, local6):
                if address is not None:
                    udp, senders = open_sockets(address, port)
                    self.udps.append(udp)
                    self.by_family[address.version] = udp
                    self.senders += senders
                    sends[address.version] = [s.fileno() for s in senders]
        except (DataplaneError, NotLocal):
            self._close_sockets()
            raise
        self.send_fds, self.send_fds6 = sends[4], sends[6]
        frame = slot_size(mtu + 18)  # + Ethernet header and a VLAN tag
        self.reads = FrameBatch(READS, slot_size=slot_size(MAX_READ))
        self.frames = FrameBatch(FRAMES, slot_size=frame)
        self.messages = FrameBatch(MESSAGES, slot_size=slot_size(MAX_READ))
        # Received frames may be larger than ours by the room this host keeps for sealing: a kernel
        # vxlan peer or an older agent at MTU 1450 beside our 1418 (the bridge decides their fate).
        self.datagrams = FrameBatch(DATAGRAMS, slot_size=slot_size(mtu + 18 + RX_ROOM))
        self.merge = FrameBatch(1, slot_size=slot_size(MAX_READ))
        self.on_fatal: Callable[[str], None] = lambda message: None
        self.on_local: Callable[[list[tuple[int, int, IPAddress | None]]], None] | None = None  # MACs behind our TAP
        self.wakeups = {"tx": 0, "tx_frames": 0, "rx": 0, "rx_frames": 0}
        self.encryption: Encryption | None = None  # sessions of encrypted networks, when this host can encrypt
        self._loop: asyncio.AbstractEventLoop | None = None
        self._maintenance: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for vni, fd in self.taps.items():
            loop.add_reader(fd, self._on_tap, vni, fd)
        for udp in self.udps:
            loop.add_reader(udp.fileno(), self._on_udp, udp.fileno())
        self._maintenance = loop.create_task(self._maintain())
        if self.encryption is not None:
            self.encryption.start(loop)

    def add_tap(self, vni: int, fd: int) -> None:
        """Carry network ``vni`` too (joined at run time): its TAP is read from now on and frames
        received for it go to it. The table must serve ``vni`` already (ForwardingTable.add_vni)."""
        self.taps[vni] = fd
        self.core.vni_tap(vni, fd)
        if self._loop is not None:
            self._loop.add_reader(fd, self._on_tap, vni, fd)

    def remove_tap(self, vni: int) -> None:
        """Stop carrying network ``vni`` (left at run time): its TAP is no longer read. The
        first network's TAP stays (it is where frames of no network's TAP go)."""
        fd = self.taps.pop(vni, None)
        if fd is not None and self._loop is not None:
            self._loop.remove_reader(fd)

    def _close_sockets(self) -> None:
        for s in self.udps + self.senders:
            s.close()

    def stop(self) -> None:
        if self._loop is not None:
            for fd in self.taps.values():
                self._loop.remove_reader(fd)
            for udp in self.udps:
                self._loop.remove_reader(udp.fileno())
        if self._maintenance is not None:
            self._maintenance.cancel()
        if self.encryption is not None:
            self.encryption.stop()
        self._close_sockets()

    def _on_tap(self, vni: int, fd: int) -> None:
        self.wakeups["tx"] += 1
        self.wakeups["tx_frames"] += fp.pump_tx(
            self.core, self.reads, self.frames, vni, fd, self.send_fds, BUDGET, self.send_fds6
        )
        if self.reads.io_error:
            self._fatal(f"the TAP failed ({os.strerror(self.reads.io_error)}): was it deleted?")
        if self.encryption is not None:
            self.encryption.after_tx()
        if self.on_local is not None:
            local = self.core.take_local()
            if local:
                self.on_local([(vni, mac, from_c(ip) if ip else None) for vni, mac, ip in local])

    def _fatal(self, message: str) -> None:
        """An fd is broken for good: stop watching it (no busy loop) and stop the agent."""
        if self._loop is not None:
            for fd in self.taps.values():
                self._loop.remove_reader(fd)
            for udp in self.udps:
                self._loop.remove_reader(udp.fileno())
        self.on_fatal(message)

    def _on_udp(self, fd: int) -> None:
        self.wakeups["rx"] += 1
        self.wakeups["rx_frames"] += fp.pump_rx(
            self.core, self.messages, self.datagrams, self.merge, fd, self.tap_fd, BUDGET
        )
        if self.messages.io_error:
            self._fatal(f"the UDP socket failed: {os.strerror(self.messages.io_error)}")
            return
        if self.encryption is not None:
            self.encryption.after_rx()
        learned = self.core.take_learned()
        if learned:
            now = self.clock()
            for vni, mac, ip in learned:
                try:
                    self.table.learn(vni, mac, Vtep(from_c(ip), self.port), now)
                except (OverflowError, MemoryError):  # the C table is out of VTEP ids: not learned
                    self.table.counters.refused_table_full += 1

    async def _maintain(self) -> None:
        """Keep learned entries that carry traffic alive; age out the rest."""
        while True:
            await asyncio.sleep(min(MAINTENANCE_EVERY, self.table.ageing / 4))
            now = self.clock()
            for vni, mac in self.core.take_hits():
                self.table.touch(vni, mac, now)
            self.table.expire(now)

    # --- what `overlay status` and `overlay fdb` show ----------------------------------------

    def status(self) -> DataplaneStatus:
        peers = [
            PeerTraffic(vtep=str(Vtep(from_c(ip), port)), rx_frames=rx_f, rx_bytes=rx_b, tx_frames=tx_f, tx_bytes=tx_b)
            for ip, port, rx_f, rx_b, tx_f, tx_b in self.core.vtep_stats()
        ]
        drops = self.core.drops()
        by_source = self.table.count()
        counters = self.table.counters
        w = self.wakeups
        return DataplaneStatus(
            wakeups=Wakeups(tx=w["tx"], tx_frames=w["tx_frames"], rx=w["rx"], rx_frames=w["rx_frames"]),
            peers=peers,
            totals=Totals(
                rx_frames=sum(p.rx_frames for p in peers),
                rx_bytes=sum(p.rx_bytes for p in peers),
                tx_frames=sum(p.tx_frames for p in peers),
                tx_bytes=sum(p.tx_bytes for p in peers),
            ),
            drops={d.name.lower(): drops[d] for d in Drop}
            | (  # the C queue's overflow and the sessions' rate limit are one reason
                {"handshake_limited": drops[Drop.HANDSHAKE_LIMITED] + self.encryption.sessions.counters.limited}
                if self.encryption is not None
                else {}
            ),
            fdb=FdbStatus(
                static=by_source[Source.STATIC],
                registry=by_source[Source.REGISTRY],
                learned=by_source[Source.LEARNED],
                refused_cap=counters.refused_cap,
                moves=counters.moves,
                expired=counters.expired,
                evicted=counters.evicted,
                refused_table_full=counters.refused_table_full,
                learn_overflow=self.core.learn_overflow,
            ),
            coalesced_frames=self.core.coalesced,
            arp_suppressed=self.core.arp_suppressed,
            nd_suppressed=self.core.nd_suppressed,
        )

    def fdb(self) -> list[dict[str, object]]:
        now = self.clock()
        return [
            {
                "vni": e.vni,
                "mac": mac_to_str(e.mac),
                "vtep": str(e.vtep),
                "source": e.source.name.lower(),
                "age_s": None if e.seen is None else round(now - e.seen, 1),
            }
            for e in self.table.entries()
        ]
