"""IPv6 in the fast path: neighbour solicitations answered on the TAP (held equal to
overlay/core/nd.py), router advertisements stopped, and VTEPs on an IPv6 underlay (loopback
::1 sockets; the TAP is a SEQPACKET pair as in test_pumps)."""

from __future__ import annotations

import ipaddress
import random
import socket

import pytest

from overlay.core import nd, wire
from overlay.core.wire import Drop
from overlay.fastpath import load
from overlay.fastpath.addressing import from_c, to_c

fp = load()
PLAIN = bytes(10)
ME, THEM = "02:00:00:00:00:01", "02:00:00:00:00:02"
KNOWN = ipaddress.IPv6Address("2001:2:0:42::2")
LO6 = ipaddress.IPv6Address("::1")


def solicit(target: str, src: str = "2001:2:0:42::1", hlim: int = 255, opt: bool = True) -> bytes:
    from scapy.layers.inet6 import ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, IPv6
    from scapy.layers.l2 import Ether

    t = ipaddress.IPv6Address(target)
    group = f"ff02::1:ff{t.packed[13]:02x}:{t.packed[14]:02x}{t.packed[15]:02x}"
    p = Ether(src=ME, dst="33:33:ff:00:00:02") / IPv6(src=src, dst=group, hlim=hlim) / ICMPv6ND_NS(tgt=target)
    if opt:
        p = p / ICMPv6NDOptSrcLLAddr(lladdr=ME)
    return bytes(p)


@pytest.fixture
def pair():
    """(core on VNI 42 flooding to a UDP socket on ::1, that socket, a sender, TAP pair)."""
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.bind(("::1", 0))
    udp.setblocking(False)
    send = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    send.bind(("::1", 0))
    tap_agent, tap_kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap_agent.setblocking(False)
    core = fp.ForwardingCore(source_check=True)
    core.vni_add(42)
    core.flood_set(42, [(to_c(LO6), udp.getsockname()[1])])
    core.neigh_set(42, to_c(KNOWN), 0x020000000002)
    yield core, udp, send, tap_agent, tap_kernel
    for s in (udp, send, tap_agent, tap_kernel):
        s.close()


def pump(core, tap_agent, send) -> None:
    fp.pump_tx(core, fp.FrameBatch(8), fp.FrameBatch(8), 42, tap_agent.fileno(), [], 256, [send.fileno()])


def drain(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


def lookup(ip: ipaddress.IPv6Address) -> int | None:
    return 0x020000000002 if ip == KNOWN else None


def test_a_solicitation_for_a_known_address_is_answered_on_the_tap_as_the_reference_does(pair) -> None:
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
    from scapy.layers.l2 import Ether

    core, udp, send, tap_agent, tap_kernel = pair
    ns = solicit(str(KNOWN))
    tap_kernel.send(PLAIN + ns)
    pump(core, tap_agent, send)
    answer = tap_kernel.recv(4096)
    assert answer[:10] == PLAIN and answer[10:] == nd.neighbor_advert(ns, lookup)
    na = Ether(answer[10:])
    assert (na.src, na.dst, na[IPv6].src, na[IPv6].dst, na[IPv6].hlim) == (THEM, ME, str(KNOWN), "2001:2:0:42::1", 255)
    assert (na[ICMPv6ND_NA].tgt, na[ICMPv6ND_NA].S, na[ICMPv6ND_NA].O, na[ICMPv6ND_NA].R) == (str(KNOWN), 1, 1, 0)
    assert na[ICMPv6NDOptDstLLAddr].lladdr == THEM
    checksum = na[ICMPv6ND_NA].cksum
    del na[ICMPv6ND_NA].cksum
    assert Ether(bytes(na))[ICMPv6ND_NA].cksum == checksum  # scapy computes the same checksum
    assert core.nd_suppressed == 1 and drain(udp) == []  # nothing left the host


def test_unknown_targets_dad_probes_and_odd_solicitations_flood_as_before(pair) -> None:
    core, udp, send, tap_agent, tap_kernel = pair
    frames = [
        solicit("2001:2:0:42::3"),  # unknown
        solicit(str(KNOWN), src="::"),  # duplicate address detection
        solicit(str(KNOWN), hlim=64),  # not from the link
        solicit(str(KNOWN), opt=False)[:-1],  # truncated below an NS
    ]
    for f in frames:
        assert nd.neighbor_advert(f, lookup) is None
        tap_kernel.send(PLAIN + f)
    pump(core, tap_agent, send)
    assert sorted(drain(udp)) == sorted(wire.encode(42, f) for f in frames)
    assert core.nd_suppressed == 0 and drain(tap_kernel) == []


def test_a_router_advertisement_from_a_container_is_dropped_and_counted(pair) -> None:
    from scapy.layers.inet6 import ICMPv6ND_RA, IPv6
    from scapy.layers.l2 import Ether

    core, udp, send, tap_agent, tap_kernel = pair
    ra = bytes(Ether(src=ME, dst="33:33:00:00:00:01") / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6ND_RA())
    assert nd.is_router_advert(ra)
    tap_kernel.send(PLAIN + ra)
    pump(core, tap_agent, send)
    assert drain(udp) == [] and core.drops()[Drop.ROUTER_ADVERT] == 1


def test_mutated_solicitations_are_answered_exactly_when_the_reference_answers(pair) -> None:
    core, udp, send, tap_agent, tap_kernel = pair
    rng = random.Random(13)
    base = solicit(str(KNOWN))
    answered = 0
    for _ in range(300):
        f = bytearray(base)
        for _ in range(rng.randint(0, 2)):
            i = rng.choice([7, 12, 13, 14, 18, 19, 20, 21, 22, 54, 55, 62, 77])  # fields the rules read
            f[i] = rng.choice([0, 0xFF, f[i] ^ 1, base[i]])
        frame = bytes(f)
        expect = nd.neighbor_advert(frame, lookup)
        tap_kernel.send(PLAIN + frame)
        pump(core, tap_agent, send)
        got = [x[10:] for x in drain(tap_kernel)]
        sent = drain(udp)
        if expect is not None:
            answered += 1
            assert got == [expect] and sent == []
        else:
            assert got == []
            assert sent == ([] if nd.is_router_advert(frame) else [wire.encode(42, frame)])
    assert answered > 30 and core.nd_suppressed == answered


def test_datagrams_from_an_ipv6_vtep_pass_the_source_check_and_are_learned_with_its_address(pair) -> None:
    core, udp, send, tap_agent, tap_kernel = pair
    frame = bytes.fromhex("020000000001 020000000009 0800") + bytes(46)
    send.sendto(wire.encode(42, frame), udp.getsockname())
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # IPv4 loopback: no member of 42
    try:
        udp4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp4.bind(("127.0.0.1", 0))
        udp4.setblocking(False)
        stranger.sendto(wire.encode(42, frame), udp4.getsockname())
        batches = (fp.FrameBatch(8, slot_size=65536 + 128), fp.FrameBatch(8), fp.FrameBatch(1, slot_size=65536 + 128))
        for sock in (udp, udp4):
            for _ in range(100):
                if fp.pump_rx(core, *batches, sock.fileno(), tap_agent.fileno(), 256):
                    break
        udp4.close()
    finally:
        stranger.close()
    assert drain(tap_kernel) == [PLAIN + frame]  # the member's frame, once
    assert core.drops()[Drop.NOT_MEMBER] == 1  # the IPv4 stranger's
    [(vni, mac, ip)] = core.take_learned()
    assert (vni, mac, from_c(ip)) == (42, 0x020000000009, LO6)
    [(ip, port, rx_frames, *_)] = core.vtep_stats()
    assert from_c(ip) == LO6 and rx_frames == 1


def test_address_ints_of_both_families_round_trip_and_bad_ones_are_refused() -> None:
    core = fp.ForwardingCore()
    core.vni_add(1)
    for text in ("198.18.0.1", "2001:2:0:1::1", "::ffff:198.18.0.9"):
        a = ipaddress.ip_address(text)
        core.fdb_set(1, 5, to_c(a), 4789)
        got = from_c(core.fdb_get(1, 5)[0])
        assert got == (a.ipv4_mapped if a.version == 6 and a.ipv4_mapped else a)
    for bad in (-1, 1 << 32, 1 << 129, 1 << 128):
        with pytest.raises(ValueError):
            core.fdb_set(1, 6, bad, 4789)
    core.flood_set(1, [(to_c(ipaddress.ip_address("2001:2:0:1::2")), 4789), (0xC6120002, 4789)])
    assert [from_c(ip) for ip, _ in core.flood_get(1)] == [
        ipaddress.ip_address("2001:2:0:1::2"),
        ipaddress.ip_address("198.18.0.2"),
    ]
