"""Frames from a TAP that the agent answers or stops itself: the reference for ext/io.pxi's
``answered_here``. Pure.

- An ARP request (Ethernet/IPv4) for an address the registry maps to a MAC is answered on the
  TAP (ARP suppression, ``arp_suppressed``).
- An IPv6 neighbour solicitation (RFC 4861 section 4.3) for such an address is answered on the
  TAP with the solicited neighbour advertisement (section 4.4: flags S and O, the target
  link-layer address option), from the target's MAC to the asker (NS suppression,
  ``nd_suppressed``). Only untagged Ethernet/IPv6/ICMPv6 frames without extension headers, hop
  limit 255, code 0, a unicast target; a duplicate-address probe (source ::) is not answered
  (it floods, so a real duplicate still answers it).
- An IPv6 router advertisement from a container never leaves its host: dropped and counted
  (``Drop.ROUTER_ADVERT``); a container must not become the router of other hosts' containers.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Callable

from overlay.core.offload import ones_sum

ICMP6 = 58
ROUTER_ADVERT, NEIGHBOR_SOLICIT, NEIGHBOR_ADVERT = 134, 135, 136
NA_FLAGS = 0x60000000  # solicited, override (not a router)


def icmp6_type(frame: bytes) -> int | None:
    """The ICMPv6 type of an untagged Ethernet/IPv6/ICMPv6 frame without extension headers."""
    if len(frame) < 14 + 40 + 4 or frame[12:14] != b"\x86\xdd" or frame[14] >> 4 != 6 or frame[20] != ICMP6:
        return None
    return frame[54]


def is_router_advert(frame: bytes) -> bool:
    return icmp6_type(frame) == ROUTER_ADVERT


def neighbor_advert(frame: bytes, lookup: Callable[[ipaddress.IPv6Address], int | None]) -> bytes | None:
    """The neighbour advertisement that answers ``frame``, a neighbour solicitation, when
    ``lookup`` knows the MAC of its target; None for any other frame."""
    if icmp6_type(frame) != NEIGHBOR_SOLICIT or len(frame) < 14 + 40 + 24:
        return None
    ip, icmp = frame[14:54], frame[54:]
    if ip[7] != 255 or icmp[1] != 0 or struct.unpack("!H", ip[4:6])[0] < 24 or icmp[8] == 0xFF:
        return None
    asker, target = ip[8:24], icmp[8:24]
    if asker == bytes(16):
        return None  # duplicate address detection
    mac = lookup(ipaddress.IPv6Address(target))
    if mac is None:
        return None
    mac_bytes = mac.to_bytes(6, "big")
    body = struct.pack("!BBHI", NEIGHBOR_ADVERT, 0, 0, NA_FLAGS) + target + b"\x02\x01" + mac_bytes
    pseudo = target + asker + struct.pack("!IxxxB", len(body), ICMP6)
    checksum = ~ones_sum(pseudo + body) & 0xFFFF
    body = body[:2] + struct.pack("!H", checksum) + body[4:]
    header = struct.pack("!IHBB", 0x60000000, len(body), ICMP6, 255) + target + asker
    return frame[6:12] + mac_bytes + b"\x86\xdd" + header + body
