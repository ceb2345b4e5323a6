"""The fast path's pumps on real kernel sockets: loopback UDP, and a SEQPACKET
socket pair standing in for the TAP (it keeps frame boundaries like a TAP, and the test writes
and reads the virtio-net header a TAP with IFF_VNET_HDR has; the real TAP is exercised by the
lab tests)."""

from __future__ import annotations

import os
import socket

import pytest

from overlay.core import wire
from overlay.core.wire import Drop
from overlay.fastpath import load

fp = load()
LOOPBACK = 0x7F000001
PLAIN = bytes(10)  # virtio-net header of a plain frame: the TAP runs with IFF_VNET_HDR

FRAME = (
    bytes.fromhex("020000000002 020000000001 0800")
    + bytes.fromhex("4500001c000140004011000 0c6130001c6130002".replace(" ", ""))
    + bytes.fromhex("13881389000800000000")
    + bytes(20)
)


def merge() -> fp.FrameBatch:
    return fp.FrameBatch(1, slot_size=65536 + 128)


@pytest.fixture
def sockets():
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the sending socket
    raw.bind(("127.0.0.1", 0))
    tap_agent, tap_kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap_agent.setblocking(False)
    yield udp, raw, tap_agent, tap_kernel
    for s in (udp, raw, tap_agent, tap_kernel):
        s.close()


def test_tap_frames_leave_as_vxlan_from_the_socket_of_their_flow(sockets) -> None:
    udp, _, tap_agent, tap_kernel = sockets
    senders = []
    for _ in range(3):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        senders.append(s)
    core = fp.ForwardingCore()
    core.vni_add(42)
    core.flood_set(42, [(LOOPBACK, udp.getsockname()[1])])
    tap_kernel.send(PLAIN + FRAME)
    tap_kernel.send(PLAIN + b"\xff" * 6 + FRAME[6:])
    fds = [s.fileno() for s in senders]
    assert fp.pump_tx(core, fp.FrameBatch(8), fp.FrameBatch(8), 42, tap_agent.fileno(), fds) == 2
    udp.setblocking(True)
    udp.settimeout(5)
    received = [udp.recvfrom(4096) for _ in range(2)]
    assert [d for d, _ in received] == [wire.encode(42, FRAME), wire.encode(42, b"\xff" * 6 + FRAME[6:])]
    chosen = senders[wire.source_port(FRAME) % 3].getsockname()[1]
    assert received[0][1][1] == chosen  # the flow hash picks the socket, so the source port
    assert core.vtep_stats()[0][4:] == (2, 2 * len(FRAME))  # tx frames, bytes
    for s in senders:
        s.close()


def test_same_size_frames_to_one_vtep_leave_in_one_gso_message_as_separate_datagrams(sockets) -> None:
    udp, raw, tap_agent, tap_kernel = sockets
    core = fp.ForwardingCore()
    core.vni_add(42)
    core.flood_set(42, [(LOOPBACK, udp.getsockname()[1])])
    frames = [FRAME[:-1] + bytes([k]) for k in range(20)] + [FRAME[:-5]]  # the last one shorter
    for f in frames:
        tap_kernel.send(PLAIN + f)
    fp.pump_tx(core, fp.FrameBatch(32), fp.FrameBatch(32), 42, tap_agent.fileno(), [raw.fileno()])
    udp.setsockopt(17, 104, 0)
    udp.setblocking(True)
    udp.settimeout(5)
    assert [udp.recv(4096) for _ in frames] == [wire.encode(42, f) for f in frames]


def test_datagrams_reach_the_tap_and_every_kind_of_junk_is_counted(sockets) -> None:
    udp, _, tap_agent, tap_kernel = sockets
    core = fp.ForwardingCore(source_check=True)
    core.vni_add(42)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    core.flood_set(42, [(LOOPBACK, 4789)])
    batch = fp.FrameBatch(8, slot_size=256)  # small slots, so a big datagram is OVERSIZE
    for junk in (os.urandom(5), b"\x00" * 30, wire.encode(43, FRAME), wire.encode(42, FRAME) + bytes(300)):
        sender.sendto(junk, udp.getsockname())
    sender.sendto(wire.encode(42, FRAME), udp.getsockname())
    assert fp.pump_rx(core, fp.FrameBatch(8, slot_size=65664), batch, merge(), udp.fileno(), tap_agent.fileno()) == 5
    assert tap_kernel.recv(4096) == PLAIN + FRAME
    drops = core.drops()
    assert [drops[d] for d in (Drop.TOO_SHORT, Drop.NO_I_FLAG, Drop.UNKNOWN_VNI, Drop.OVERSIZE)] == [1, 1, 1, 1]
    assert core.take_learned() == [(42, 0x020000000001, LOOPBACK)]
    stats = core.vtep_stats()[0]
    assert stats[2:4] == (1, len(FRAME))  # rx frames, bytes from the member VTEP
    sender.close()


def test_a_refused_tap_write_is_counted(sockets) -> None:
    udp, _, tap_agent, tap_kernel = sockets
    core = fp.ForwardingCore()
    core.vni_add(42)
    tap_kernel.close()  # writes to the "TAP" now fail (EPIPE)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.sendto(wire.encode(42, FRAME), udp.getsockname())
    fp.pump_rx(core, fp.FrameBatch(4, slot_size=65664), fp.FrameBatch(4), merge(), udp.fileno(), tap_agent.fileno())
    assert core.drops()[Drop.TAP_WRITE] == 1
    sender.close()


def test_send_errors_are_counted_not_raised(sockets) -> None:
    _, raw, tap_agent, tap_kernel = sockets
    core = fp.ForwardingCore()
    core.vni_add(42)
    core.flood_set(42, [(LOOPBACK, 4789)])
    tap_kernel.send(PLAIN + FRAME)
    raw_closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fd = raw_closed.detach()
    os.close(fd)  # a dead descriptor: EBADF on send
    fp.pump_tx(core, fp.FrameBatch(4), fp.FrameBatch(4), 42, tap_agent.fileno(), [fd])
    assert core.drops()[Drop.TX_ERROR] == 1


def tcp_stream(count: int, mss: int, v6: bool = False, psh_at: int | None = None) -> list[bytes]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    l3 = IPv6(src="2001:db8::1", dst="2001:db8::2") if v6 else IP(src="198.19.0.1", dst="198.19.0.2", flags="DF")
    frames = []
    for k in range(count):
        flags = "PA" if k == psh_at else "A"
        frames.append(
            bytes(
                Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01")
                / l3
                / TCP(
                    sport=5201,
                    dport=40000,
                    seq=1000 + k * mss,
                    ack=77,
                    flags=flags,
                    options=[("NOP", None), ("NOP", None), ("Timestamp", (5, 6))],
                )
                / (bytes([k]) * mss)
            )
        )
    return frames


def through_rx_pump(frames: list[bytes], sockets) -> list[bytes]:
    """Send ``frames`` as VXLAN datagrams, run pump_rx once, return what it wrote to the 'TAP'."""
    udp, _, tap_agent, tap_kernel = sockets
    core = fp.ForwardingCore()
    core.vni_add(42)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for f in frames:
        sender.sendto(wire.encode(42, f), udp.getsockname())
    sender.close()
    assert fp.pump_rx(
        core, fp.FrameBatch(64, slot_size=65664), fp.FrameBatch(64), merge(), udp.fileno(), tap_agent.fileno()
    ) == len(frames)
    tap_kernel.setblocking(False)
    out = []
    while True:
        try:
            out.append(tap_kernel.recv(1 << 17))
        except BlockingIOError:
            return out


@pytest.mark.parametrize(
    "frames",
    [
        tcp_stream(10, 1000),  # one run
        tcp_stream(10, 1000, v6=True),
        tcp_stream(10, 1000, psh_at=4),  # PSH ends a run
        tcp_stream(3, 1000) + [FRAME] + tcp_stream(3, 1000),  # another frame in between
        tcp_stream(5, 1000)[:2] + tcp_stream(5, 1000)[3:],  # a gap in the sequence
        [tcp_stream(1, 1000)[0][:-1] + b"x"] + tcp_stream(4, 1000)[1:],  # bad checksum: alone
    ],
    ids=["run", "run-v6", "psh", "interleaved", "gap", "bad-checksum"],
)
def test_received_tcp_runs_are_written_as_the_reference_coalesces_them(frames: list[bytes], sockets) -> None:
    from overlay.core import offload

    expected = [h.pack() + f for h, f in offload.coalesce(frames)]
    assert through_rx_pump(frames, sockets) == expected
    assert len(expected) < len(frames)  # something was coalesced


def test_a_coalesced_super_frame_segments_back_into_the_original_frames(sockets) -> None:
    from overlay.core import offload

    frames = tcp_stream(8, 1200)
    (written,) = through_rx_pump(frames, sockets)
    hdr = offload.VnetHdr.unpack(written)
    assert hdr.gso_type == offload.GSO_TCPV4 and hdr.gso_size == 1200
    # The kernel leaves the IP ID of the first segment on every segment after it; ours rises.
    resegmented = offload.segment(hdr, written[10:])
    assert [s[:18] + s[20:24] + s[26:] for s in resegmented] == [f[:18] + f[20:24] + f[26:] for f in frames]


def test_a_burst_crosses_tx_pump_gso_and_rx_pump_gro_intact(sockets) -> None:
    udp, raw, tap_agent, tap_kernel = sockets
    udp.setsockopt(17, 104, 1)  # UDP_GRO, as the agent's socket has: the burst arrives merged
    core = fp.ForwardingCore()
    core.vni_add(42)
    core.flood_set(42, [(LOOPBACK, udp.getsockname()[1])])
    frames = [FRAME[:-1] + bytes([k]) for k in range(40)]
    for f in frames:
        tap_kernel.send(PLAIN + f)
    fp.pump_tx(core, fp.FrameBatch(64), fp.FrameBatch(64), 42, tap_agent.fileno(), [raw.fileno()])
    messages = fp.FrameBatch(8, slot_size=65664)
    assert fp.pump_rx(core, messages, fp.FrameBatch(16), merge(), udp.fileno(), tap_agent.fileno()) == 40
    tap_kernel.setblocking(False)
    assert [tap_kernel.recv(4096) for _ in frames] == [PLAIN + f for f in frames]
    assert core.vtep_stats()[0][2] == 40  # rx frames


def test_an_arp_request_for_a_known_neighbour_is_answered_on_the_tap_not_sent(sockets) -> None:
    from scapy.layers.l2 import ARP, Ether

    udp, raw, tap_agent, tap_kernel = sockets
    core = fp.ForwardingCore()
    core.vni_add(42)
    core.flood_set(42, [(LOOPBACK, udp.getsockname()[1])])
    core.neigh_set(42, 0xC6130002, 0x020000000002)  # 198.19.0.2 is at 02:00:00:00:00:02

    def ask(ip: str) -> bytes:
        return bytes(
            Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:01")
            / ARP(op=1, hwsrc="02:00:00:00:00:01", psrc="198.19.0.1", pdst=ip)
        )

    tap_kernel.send(PLAIN + ask("198.19.0.2"))
    tap_kernel.send(PLAIN + ask("198.19.0.3"))  # unknown: flooded as usual
    fp.pump_tx(core, fp.FrameBatch(8), fp.FrameBatch(8), 42, tap_agent.fileno(), [raw.fileno()])
    reply = Ether(tap_kernel.recv(4096)[10:])
    assert reply.dst == "02:00:00:00:00:01" and reply.src == "02:00:00:00:00:02"
    assert (reply[ARP].op, reply[ARP].hwsrc, reply[ARP].psrc, reply[ARP].hwdst, reply[ARP].pdst) == (
        2,
        "02:00:00:00:00:02",
        "198.19.0.2",
        "02:00:00:00:00:01",
        "198.19.0.1",
    )
    udp.settimeout(5)
    assert udp.recv(4096) == wire.encode(42, ask("198.19.0.3"))  # only the unknown one went out
    assert core.arp_suppressed == 1
