"""TAP offloads: the fast path's checksum completion and TCP segmentation against the reference
(overlay/core/offload.py), and both against scapy's checksums."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from overlay.core import offload
from overlay.core.offload import F_NEEDS_CSUM, GSO_ECN, GSO_TCPV4, GSO_TCPV6, OffloadError, VnetHdr
from overlay.core.wire import Drop
from overlay.fastpath import load

fp = load()
ETH = dict(dst="02:00:00:00:00:02", src="02:00:00:00:00:01")


def tcp_superframe(v6: bool, payload: bytes, flags: str, options: list, ip_id: int = 7) -> bytes:
    l3 = IPv6(src="2001:db8::1", dst="2001:db8::2") if v6 else IP(src="198.19.0.1", dst="198.19.0.2", id=ip_id)
    return bytes(
        Ether(**ETH) / l3 / TCP(sport=40000, dport=5201, seq=0xFFFFFF00, flags=flags, options=options) / payload
    )


def fast_prepare(hdr: VnetHdr, frame: bytes, slots: int = 256) -> tuple[int, list[bytes]]:
    reads, frames = fp.FrameBatch(1, slot_size=65536 + 128), fp.FrameBatch(slots)
    reads.put_frame(0, hdr.pack() + frame)
    status, used = fp.prepare(reads, 0, frames)
    return status, [frames.frame(i) for i in range(used)]


def checksums_ok(frame: bytes) -> bool:
    """scapy recomputes every checksum; equal bytes mean ours were right."""
    pkt = Ether(frame)
    for layer in (IP, TCP, UDP):
        if layer in pkt:
            del pkt[layer].chksum
    return bytes(pkt) == frame


@given(
    v6=st.booleans(),
    size=st.integers(0, 6000),
    mss=st.sampled_from([536, 1000, 1398, 1410]),
    flags=st.sampled_from(["A", "PA", "FPA", "CA", "CPA"]),
    options=st.sampled_from([[], [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]]),
    ecn=st.booleans(),
)
def test_segmentation_equals_reference_and_checksums_verify(
    v6: bool, size: int, mss: int, flags: str, options: list, ecn: bool
) -> None:
    frame = tcp_superframe(v6, bytes(range(256)) * (size // 256) + bytes(size % 256), flags, options)
    l4 = 14 + (40 if v6 else 20)
    hdr = VnetHdr(F_NEEDS_CSUM, (GSO_TCPV6 if v6 else GSO_TCPV4) | (GSO_ECN if ecn else 0), 0, mss, l4, 16)
    expected = offload.segment(hdr, frame)
    status, segments = fast_prepare(hdr, frame)
    assert status == 0 and segments == expected
    assert all(checksums_ok(s) for s in segments)
    assert (
        b"".join(s[len(s) - (len(s) - l4 - (s[l4 + 12] >> 4) * 4) :] for s in segments)
        == frame[l4 + (frame[l4 + 12] >> 4) * 4 :]
    )
    tcp_flags = [s[l4 + 13] for s in segments]
    assert all(not f & 0x09 for f in tcp_flags[:-1]) and all(not f & 0x80 for f in tcp_flags[1:])


@given(kind=st.sampled_from(["tcp", "udp", "tcp6", "udp6"]), payload=st.binary(max_size=1400))
def test_checksum_completion_equals_reference(kind: str, payload: bytes) -> None:
    l3 = IPv6(src="2001:db8::1", dst="2001:db8::2") if kind.endswith("6") else IP(src="198.19.0.1", dst="198.19.0.2")
    l4 = TCP(sport=1, dport=2) if kind.startswith("tcp") else UDP(sport=1, dport=2)
    good = bytes(Ether(**ETH) / l3 / l4 / payload)
    start = 14 + (40 if kind.endswith("6") else 20)
    offset = 16 if kind.startswith("tcp") else 6
    # What the kernel hands over: the pseudo-header sum in the checksum field.
    pseudo_len = len(good) - start
    if kind.endswith("6"):
        pseudo = good[22:54] + struct.pack("!IxxxB", pseudo_len, 6 if kind.startswith("tcp") else 17)
    else:
        pseudo = good[26:34] + struct.pack("!BBH", 0, 6 if kind.startswith("tcp") else 17, pseudo_len)
    partial = good[: start + offset] + offload.ones_sum(pseudo).to_bytes(2, "big") + good[start + offset + 2 :]
    hdr = VnetHdr(F_NEEDS_CSUM, 0, 0, 0, start, offset)
    assert offload.finish_checksum(partial, start, offset) == good
    assert fast_prepare(hdr, partial) == (0, [good])


def test_plain_frames_pass_untouched() -> None:
    frame = bytes(Ether(**ETH) / IP(src="198.19.0.1", dst="198.19.0.2") / UDP() / b"x")
    assert fast_prepare(VnetHdr(), frame) == (0, [frame])


@pytest.mark.parametrize(
    "hdr",
    [
        VnetHdr(F_NEEDS_CSUM, 0, 0, 0, 5, 16),  # checksum start inside the Ethernet header
        VnetHdr(F_NEEDS_CSUM, 0, 0, 0, 34, 4000),  # checksum field past the end
        VnetHdr(F_NEEDS_CSUM, GSO_TCPV6, 0, 1000, 34, 16),  # TCPv6 on an IPv4 frame
        VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 0, 0, 34, 16),  # gso_size 0
        VnetHdr(F_NEEDS_CSUM, 9, 0, 1000, 34, 16),  # a GSO type we did not enable
    ],
)
def test_headers_that_do_not_describe_the_frame_are_counted_drops(hdr: VnetHdr) -> None:
    frame = tcp_superframe(False, bytes(3000 if hdr.gso_type else 100), "A", [])
    status, segments = fast_prepare(hdr, frame)
    assert status == Drop.BAD_OFFLOAD and segments == []
    if hdr.gso_type:
        with pytest.raises(OffloadError):
            offload.segment(hdr, frame)


def test_too_many_segments_for_the_batch_is_out_of_room_not_an_overflow() -> None:
    frame = tcp_superframe(False, bytes(10000), "A", [])
    status, segments = fast_prepare(VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 0, 1000, 34, 16), frame, slots=4)
    assert status == Drop.OUT_OF_ROOM and segments == []
