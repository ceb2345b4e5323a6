"""TAP offloads (virtio-net header): the pure-Python reference for checksum completion and
TCP segmentation, which the fast path (ext/offload.pxi) copies and the tests hold equal.

With IFF_VNET_HDR and TUNSETOFFLOAD(CSUM | TSO4 | TSO6) the kernel hands the TAP reader
frames with unfinished checksums and TCP "super-frames" of up to 64 KiB, each behind a 10-byte
header, and so saves itself most of its per-packet work. VXLAN peers (a Linux vxlan device
among them) want ordinary frames with finished checksums, so before encapsulation:

- ``flags & NEEDS_CSUM``: the checksum field at csum_start + csum_offset holds the pseudo-
  header sum; the one's complement sum of [csum_start, end) goes there, complemented, and a
  result of 0 is written as 0xFFFF (the same in one's complement; for UDP 0 would mean "no
  checksum"), exactly as the kernel's skb_checksum_help does.
- ``gso_type`` TCPV4 / TCPV6: cut the payload after the headers (``hdr`` = csum_start + TCP
  header length) into ``gso_size`` pieces, each behind a copy of the headers, with
  IPv4 total length, ID (+1 per segment) and header checksum, or IPv6 payload length; TCP
  sequence number advanced by the bytes before; FIN and PSH only on the last segment, CWR only
  on the first; and each TCP checksum computed whole (pseudo-header + header + payload).

Writes to the TAP carry a header too: all zeros (a plain frame, checksum to be verified).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VNET_HDR_LEN = 10
F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6 = 0, 1, 3, 4
GSO_ECN = 0x80
_VNET = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80


class OffloadError(ValueError):
    """A frame whose offload header does not describe it (counted as a drop by the fast path)."""


@dataclass(frozen=True)
class VnetHdr:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> VnetHdr:
        return cls(*_VNET.unpack_from(data))

    def pack(self) -> bytes:
        return _VNET.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start, self.csum_offset)


def ones_sum(data: bytes, start: int = 0) -> int:
    """16-bit one's complement sum of ``data`` (odd length padded with a zero byte)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total: int = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def finish_checksum(frame: bytes, csum_start: int, csum_offset: int) -> bytes:
    """Complete a partial checksum (NEEDS_CSUM): see the module docstring."""
    where = csum_start + csum_offset
    if csum_start < 14 or where + 2 > len(frame):
        raise OffloadError(f"checksum at {csum_start}+{csum_offset} lies outside a {len(frame)}-byte frame")
    value = (~ones_sum(frame[csum_start:]) & 0xFFFF) or 0xFFFF  # as the kernel: 0 is sent as 0xFFFF
    return frame[:where] + value.to_bytes(2, "big") + frame[where + 2 :]


def _l3(frame: bytes) -> tuple[int, int]:
    """(offset of the IP header, EtherType), skipping one VLAN tag."""
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype in (0x8100, 0x88A8) and len(frame) >= 18:
        return 18, int.from_bytes(frame[16:18], "big")
    return 14, ethertype


def segment(hdr: VnetHdr, frame: bytes) -> list[bytes]:
    """Cut a TCP super-frame into ``gso_size`` segments (see the module docstring)."""
    kind = hdr.gso_type & ~GSO_ECN
    l3, ethertype = _l3(frame)
    l4 = hdr.csum_start
    if kind not in (GSO_TCPV4, GSO_TCPV6) or hdr.gso_size == 0:
        raise OffloadError(f"cannot segment gso_type {hdr.gso_type} with gso_size {hdr.gso_size}")
    if (kind == GSO_TCPV4) != (ethertype == 0x0800) or (kind == GSO_TCPV6) != (ethertype == 0x86DD):
        raise OffloadError(f"gso_type {hdr.gso_type} does not match EtherType {ethertype:#06x}")
    if l4 < l3 + (20 if kind == GSO_TCPV4 else 40) or l4 + 20 > len(frame):
        raise OffloadError(f"TCP header at {l4} does not fit the {len(frame)}-byte frame")
    end = l4 + (frame[l4 + 12] >> 4) * 4
    if end < l4 + 20 or end > len(frame):
        raise OffloadError("TCP header length runs past the frame")
    headers, payload = frame[:end], frame[end:]
    seq = int.from_bytes(frame[l4 + 4 : l4 + 8], "big")
    flags = frame[l4 + 13]
    count = max(1, -(-len(payload) // hdr.gso_size))
    out = []
    for k in range(count):
        piece = payload[k * hdr.gso_size : (k + 1) * hdr.gso_size]
        seg = bytearray(headers + piece)
        if kind == GSO_TCPV4:
            ihl = (seg[l3] & 0x0F) * 4
            seg[l3 + 2 : l3 + 4] = (end - l3 + len(piece)).to_bytes(2, "big")
            seg[l3 + 4 : l3 + 6] = ((int.from_bytes(frame[l3 + 4 : l3 + 6], "big") + k) & 0xFFFF).to_bytes(2, "big")
            seg[l3 + 10 : l3 + 12] = b"\0\0"
            seg[l3 + 10 : l3 + 12] = (~ones_sum(bytes(seg[l3 : l3 + ihl])) & 0xFFFF).to_bytes(2, "big")
            pseudo = bytes(seg[l3 + 12 : l3 + 20]) + struct.pack("!BBH", 0, 6, end - l4 + len(piece))
        else:
            seg[l3 + 4 : l3 + 6] = (end - l3 - 40 + len(piece)).to_bytes(2, "big")
            pseudo = bytes(seg[l3 + 8 : l3 + 40]) + struct.pack("!IxxxB", end - l4 + len(piece), 6)
        seg[l4 + 4 : l4 + 8] = ((seq + k * hdr.gso_size) & 0xFFFFFFFF).to_bytes(4, "big")
        f = flags
        if k != count - 1:
            f &= ~(TCP_FIN | TCP_PSH)
        if k != 0:
            f &= ~TCP_CWR
        seg[l4 + 13] = f
        seg[l4 + 16 : l4 + 18] = b"\0\0"
        seg[l4 + 16 : l4 + 18] = (~ones_sum(bytes(seg[l4:]), ones_sum(pseudo)) & 0xFFFF).to_bytes(2, "big")
        out.append(bytes(seg))
    return out


# --- receive: coalescing TCP segments into super-frames (GRO) ---------------------------------
#
# Frames decapsulated from one batch of datagrams are written to the TAP in arrival order. A run
# of consecutive frames that are segments of one TCP stream is written as one super-frame
# behind a GSO header instead, so the kernel's TCP takes them in one pass, as Linux's GRO does
# for a NIC. A frame may extend the run when (Linux's tcp_gro_receive rules, simplified):
# - it is IPv4 without options and unfragmented, or IPv6 without extension headers, carrying
#   TCP with data, flags ACK or ACK|PSH, lengths consistent with the frame, checksum valid;
# - Ethernet header, IP addresses, TOS/traffic class, TTL/hop limit and (v6) flow label equal
#   the run's first frame; TCP ports, ack, header length, flags, window and options equal too;
# - its sequence number follows the previous segment's last byte;
# - the previous segment was full-sized (``gso_size`` = the first segment's payload) and had
#   no PSH, and the new payload is not larger than ``gso_size``;
# - the super-frame stays within 64 KiB of IP payload and 64 segments.
# A run of one is written as it came, behind a zero header. A longer run becomes one frame with
# the first segment's headers, the payloads concatenated, the PSH of the last segment, IP
# lengths and IPv4 checksum set, and the TCP checksum field holding the pseudo-header sum
# (NEEDS_CSUM, csum_start = TCP header, csum_offset = 16; gso_type TCPV4/TCPV6, gso_size).

MAX_RUN = 64
MAX_SUPER = 65535


@dataclass(frozen=True)
class _Seg:
    v6: bool
    l4: int
    end: int  # where the payload starts
    seq: int
    flags: int
    payload: int


def _tcp_segment(frame: bytes) -> _Seg | None:
    """The frame as a coalescable TCP segment (see the rules above), or None."""
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == 0x0800 and len(frame) >= 14 + 20:
        ihl = frame[14] & 0x0F
        total = int.from_bytes(frame[16:18], "big")
        if (frame[14] >> 4) != 4 or ihl != 5 or frame[23] != 6 or total != len(frame) - 14:
            return None
        if int.from_bytes(frame[20:22], "big") & 0x3FFF:  # MF or a fragment offset
            return None
        l4, v6 = 34, False
        pseudo = frame[26:34] + struct.pack("!BBH", 0, 6, total - 20)
    elif ethertype == 0x86DD and len(frame) >= 14 + 40:
        if (frame[14] >> 4) != 6 or frame[20] != 6 or int.from_bytes(frame[18:20], "big") != len(frame) - 54:
            return None
        l4, v6 = 54, True
        pseudo = frame[22:54] + struct.pack("!IxxxB", len(frame) - 54, 6)
    else:
        return None
    if len(frame) < l4 + 20:
        return None
    end = l4 + (frame[l4 + 12] >> 4) * 4
    flags = frame[l4 + 13]
    if end < l4 + 20 or end >= len(frame) or flags & ~(0x10 | TCP_PSH) or not flags & 0x10:
        return None
    if ones_sum(frame[l4:], ones_sum(pseudo)) != 0xFFFF:
        return None  # a bad checksum: the kernel must see (and drop) it as it is
    return _Seg(v6, l4, end, int.from_bytes(frame[l4 + 4 : l4 + 8], "big"), flags, len(frame) - end)


def _joins(first: bytes, f: _Seg, last: _Seg, total: int, count: int, frame: bytes, s: _Seg) -> bool:
    if s.v6 != f.v6 or s.end != f.end or count >= MAX_RUN or total + s.payload > MAX_SUPER - (f.end - 14):
        return False
    if last.flags & TCP_PSH or last.payload != f.payload or s.payload > f.payload:
        return False
    if s.seq != (last.seq + last.payload) & 0xFFFFFFFF:
        return False
    if frame[:14] != first[:14]:
        return False
    if f.v6:
        same_ip = frame[14:18] == first[14:18] and frame[21:54] == first[21:54]  # class, flow, hop, addrs
    else:
        same_ip = (
            frame[15] == first[15]
            and frame[20] & 0x40 == first[20] & 0x40
            and frame[22:24] == first[22:24]
            and frame[26:34] == first[26:34]
        )  # TOS, DF, TTL + protocol, addresses
    l4 = f.l4
    tcp_same = (
        frame[l4 : l4 + 4] == first[l4 : l4 + 4]
        and frame[l4 + 8 : l4 + 13] == first[l4 + 8 : l4 + 13]
        and frame[l4 + 14 : l4 + 16] == first[l4 + 14 : l4 + 16]
        and frame[l4 + 20 : f.end] == first[l4 + 20 : f.end]
        and (frame[l4 + 13] & ~TCP_PSH) == (first[l4 + 13] & ~TCP_PSH)
    )
    return same_ip and tcp_same


def _merge(run: list[bytes], head: _Seg, last: _Seg) -> tuple[VnetHdr, bytes]:
    out = bytearray(run[0][: head.end] + b"".join(fr[head.end :] for fr in run))
    l4 = head.l4
    out[l4 + 13] |= last.flags & TCP_PSH
    tcp_len = len(out) - l4
    if head.v6:
        out[18:20] = (len(out) - 54).to_bytes(2, "big")
        pseudo = bytes(out[22:54]) + struct.pack("!IxxxB", tcp_len, 6)
        kind = GSO_TCPV6
    else:
        out[16:18] = (len(out) - 14).to_bytes(2, "big")
        out[24:26] = b"\0\0"
        out[24:26] = (~ones_sum(bytes(out[14:34])) & 0xFFFF).to_bytes(2, "big")
        pseudo = bytes(out[26:34]) + struct.pack("!BBH", 0, 6, tcp_len)
        kind = GSO_TCPV4
    out[l4 + 16 : l4 + 18] = ones_sum(pseudo).to_bytes(2, "big")
    return VnetHdr(F_NEEDS_CSUM, kind, head.end, head.payload, l4, 16), bytes(out)


def coalesce(frames: list[bytes]) -> list[tuple[VnetHdr, bytes]]:
    """What the receive path writes to the TAP for ``frames`` (one batch, in order)."""
    out: list[tuple[VnetHdr, bytes]] = []
    run: list[bytes] = []
    head = last = None
    total = 0

    def flush() -> None:
        if len(run) == 1:
            out.append((VnetHdr(), run[0]))
        elif run:
            out.append(_merge(run, head, last))  # type: ignore[arg-type]
        run.clear()

    for frame in frames:
        seg = _tcp_segment(frame)
        if (
            run
            and seg is not None
            and head is not None
            and last is not None
            and _joins(run[0], head, last, total, len(run), frame, seg)
        ):
            run.append(frame)
            last, total = seg, total + seg.payload
            continue
        flush()
        if seg is None:
            out.append((VnetHdr(), frame))
            head = last = None
        else:
            run.append(frame)
            head = last = seg
            total = seg.payload
    flush()
    return out
