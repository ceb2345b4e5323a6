"""VXLAN wire format (RFC 7348): constants and the pure-Python reference codec.

This module is the specification. The Cython fast path (``ext/codec.pxi``) is a faster copy
of the same rules, and the tests hold the two equal on random input. Keep it small and
obvious: a reader should be able to put it beside the .pxi and tick off each rule.

Layout of one VXLAN datagram (the UDP payload)::

    0               1               2               3
    +---------------+---------------+---------------+---------------+
    |R|R|R|R|I|R|R|R|            reserved (24 bits)                 |
    +---------------+---------------+---------------+---------------+
    |             VNI (24 bits)                     |   reserved    |
    +---------------+---------------+---------------+---------------+
    |  inner Ethernet frame (no FCS): dst MAC, src MAC, EtherType...|

Receive rules, checked in this order (the first that fails names the drop reason):

1. fewer than 8 bytes                          -> ``Drop.TOO_SHORT``
2. the I flag (0x08) is not set                -> ``Drop.NO_I_FLAG``
3. fewer than 8 + 14 bytes                     -> ``Drop.INNER_TOO_SHORT``
4. the VNI is not one this host serves         -> ``Drop.UNKNOWN_VNI``
5. the inner frame carries a VLAN tag and VLAN
   passthrough is off (RFC 7348 section 6.1)   -> ``Drop.INNER_VLAN``

All reserved bits (the other seven flag bits, the 24 bits after the flags and the last byte)
are ignored on receive and always zero on send.

Inner VLAN tags (RFC 7348 section 6.1): "Decapsulated VXLAN frames with the inner VLAN tag
SHOULD be discarded unless configured otherwise", and an encapsulating VTEP SHOULD NOT send
them. We follow the RFC by default (a tagged frame is a counted drop in both directions) and
let the operator opt in with ``allow_vlan=True``, which passes tagged frames untouched in both
directions, as the Linux kernel's vxlan device does.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Container

VXLAN_HEADER_LEN = 8
ETH_HEADER_LEN = 14
MIN_DATAGRAM_LEN = VXLAN_HEADER_LEN + ETH_HEADER_LEN
FLAG_I = 0x08
VNI_MAX = (1 << 24) - 1
DEFAULT_PORT = 4789  # IANA; Linux's historical default is 8472
# Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14): a 1500 underlay gives 1450.
IPV4_OVERHEAD = 20 + 8 + VXLAN_HEADER_LEN + ETH_HEADER_LEN
IPV6_OVERHEAD = 40 + 8 + VXLAN_HEADER_LEN + ETH_HEADER_LEN  # 70: an IPv6 underlay's default MTU subtracts it
# An overlay MTU: at least IPv4's minimum, at most what an outer IPv4 datagram can carry.
MTU_MIN, MTU_MAX = 68, 65535 - IPV4_OVERHEAD

# UDP source ports for outer packets come from this range (RFC 7348 section 5: dynamic ports).
SOURCE_PORT_MIN = 49152
SOURCE_PORT_MASK = 0x3FFF  # 49152 + 0..16383 = 49152..65535

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
VLAN_ETHERTYPES = frozenset({0x8100, 0x88A8, 0x9100})  # 802.1Q, 802.1ad, old QinQ
PORTED_PROTOCOLS = frozenset({6, 17, 132})  # TCP, UDP, SCTP: first 4 L4 bytes are the ports

_HEADER = struct.Struct("!B3xI")  # flags, 3 reserved bytes, VNI << 8 | reserved byte


class Drop(enum.IntEnum):
    """Why a frame or datagram was dropped. One enum for the whole data path; the fast path
    exports the same numbers (``_fastpath.DROP_*``) and a test holds them equal."""

    TOO_SHORT = 1  # datagram shorter than the 8-byte VXLAN header
    NO_I_FLAG = 2  # VXLAN flags without the I (valid VNI) bit
    INNER_TOO_SHORT = 3  # no room for an inner Ethernet header
    UNKNOWN_VNI = 4  # a VNI this host does not serve
    INNER_VLAN = 5  # VLAN-tagged inner frame while VLAN passthrough is off
    NO_PEERS = 6  # encap: the frame must flood but the VNI has no other VTEP
    OUT_OF_ROOM = 7  # encap: a flood fan-out larger than the batch's output array
    # Beyond the wire rules, the data path adds:
    NOT_MEMBER = 8  # source check: the outer source is not a VTEP of the VNI
    TOO_BIG = 9  # send: the datagram exceeds the underlay path MTU (EMSGSIZE; never fragmented)
    TX_ERROR = 10  # send: any other error of the UDP send (no route, buffer full, ...)
    TAP_WRITE = 11  # receive: the TAP refused the frame
    OVERSIZE = 12  # receive: datagram larger than a buffer slot (truncated, so dropped)
    BAD_OFFLOAD = 13  # send: a TAP frame whose virtio-net header does not describe it
    ROUTER_ADVERT = 14  # send: an IPv6 router advertisement from a container (never flooded)
    # Encrypted networks (overlay/core/seal.py):
    AUTH_FAILED = 15  # receive: an encrypted datagram that does not authenticate (or no such session)
    REPLAYED = 16  # receive: an encrypted datagram's counter was seen, or is behind the window
    NOT_ENCRYPTED = 17  # receive: plaintext VXLAN for an encrypted VNI, whoever sent it
    NO_SESSION = 18  # send: no session with the VTEP yet (a handshake is started)
    HANDSHAKE_LIMITED = 19  # receive: a handshake message over the per-source rate or queue


@dataclass(frozen=True, slots=True)
class Decoded:
    """A datagram that passed every receive rule."""

    vni: int
    frame: bytes


def check_vni(vni: int) -> int:
    """Return ``vni`` if it fits 24 bits, else raise ValueError saying what is allowed."""
    if not isinstance(vni, int) or isinstance(vni, bool) or not 0 <= vni <= VNI_MAX:
        raise ValueError(f"VNI {vni!r} is out of range: a VNI is an integer from 0 to {VNI_MAX}")
    return vni


def is_vlan_tagged(frame: bytes) -> bool:
    """True when the inner frame's EtherType is a VLAN tag protocol identifier."""
    return int.from_bytes(frame[12:14], "big") in VLAN_ETHERTYPES


def encode(vni: int, frame: bytes) -> bytes:
    """Return the VXLAN datagram (header + frame) for ``frame`` on ``vni``. Reserved bits are 0."""
    check_vni(vni)
    if len(frame) < ETH_HEADER_LEN:
        raise ValueError(f"an Ethernet frame has at least {ETH_HEADER_LEN} bytes, got {len(frame)}")
    return _HEADER.pack(FLAG_I, vni << 8) + bytes(frame)


def send_check(frame: bytes, allow_vlan: bool = False) -> Drop | None:
    """The send rules, before ``encode``: why a frame from the TAP is not sent, or None.
    (Where it goes, and NO_PEERS when that is nowhere, is the forwarding table's business.)"""
    if len(frame) < ETH_HEADER_LEN:
        return Drop.INNER_TOO_SHORT
    if not allow_vlan and is_vlan_tagged(frame):
        return Drop.INNER_VLAN
    return None


def decode(datagram: bytes, vnis: Container[int], allow_vlan: bool = False) -> Decoded | Drop:
    """Apply the receive rules (module docstring) in order; return the frame or the drop reason."""
    if len(datagram) < VXLAN_HEADER_LEN:
        return Drop.TOO_SHORT
    flags, word = _HEADER.unpack_from(datagram)
    if not flags & FLAG_I:
        return Drop.NO_I_FLAG
    if len(datagram) < MIN_DATAGRAM_LEN:
        return Drop.INNER_TOO_SHORT
    vni = word >> 8
    if vni not in vnis:
        return Drop.UNKNOWN_VNI
    frame = bytes(datagram[VXLAN_HEADER_LEN:])
    if not allow_vlan and is_vlan_tagged(frame):
        return Drop.INNER_VLAN
    return Decoded(vni, frame)


# --- flow hash -> outer UDP source port --------------------------------------------------------
#
# RFC 7348 section 5 asks for a source port computed from a hash of the inner headers so that
# ECMP in the underlay spreads flows but keeps each flow on one path. The key is:
#   IPv4: src, dst, protocol, and for TCP/UDP/SCTP in an unfragmented packet the two ports;
#   IPv6: src, dst, next header, and for TCP/UDP/SCTP the two ports;
#   anything else (ARP, VLAN-tagged, truncated): the 14-byte Ethernet header.
# The hash is 32-bit FNV-1a over the key, xor-folded to 16 bits, masked to 14.

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a32(data: bytes) -> int:
    """32-bit FNV-1a: tiny, byte-oriented, and the same in C and Python."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def flow_key(frame: bytes) -> bytes:
    """The bytes of ``frame`` that identify its flow (see the comment above)."""
    ethertype = int.from_bytes(frame[12:14], "big")
    l3 = ETH_HEADER_LEN
    if ethertype == ETHERTYPE_IPV4 and len(frame) >= l3 + 20:
        ihl = (frame[l3] & 0x0F) * 4
        if ihl >= 20 and len(frame) >= l3 + ihl:
            proto = frame[l3 + 9]
            key = frame[l3 + 12 : l3 + 20] + bytes([proto])
            fragmented = int.from_bytes(frame[l3 + 6 : l3 + 8], "big") & 0x3FFF
            l4 = l3 + ihl
            if proto in PORTED_PROTOCOLS and not fragmented and len(frame) >= l4 + 4:
                key += frame[l4 : l4 + 4]
            return bytes(key)
    if ethertype == ETHERTYPE_IPV6 and len(frame) >= l3 + 40:
        nh = frame[l3 + 6]
        key = frame[l3 + 8 : l3 + 40] + bytes([nh])
        l4 = l3 + 40
        if nh in PORTED_PROTOCOLS and len(frame) >= l4 + 4:
            key += frame[l4 : l4 + 4]
        return bytes(key)
    return bytes(frame[:ETH_HEADER_LEN])


def source_port(frame: bytes) -> int:
    """The outer UDP source port for ``frame``: 49152..65535, the same for every frame of a flow."""
    h = fnv1a32(flow_key(frame))
    return SOURCE_PORT_MIN + ((h ^ (h >> 16)) & SOURCE_PORT_MASK)


# --- MAC addresses -----------------------------------------------------------------------------


def mac_to_int(mac: str | bytes) -> int:
    """'02:00:00:00:00:01' or 6 raw bytes -> 48-bit int; ValueError with the expected form."""
    if isinstance(mac, (bytes, bytearray, memoryview)):
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, got {len(mac)}")
        return int.from_bytes(mac, "big")
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"bad MAC address {mac!r}: write six hex pairs, e.g. 02:00:00:00:00:01")
    try:
        return int("".join(parts), 16)
    except ValueError:
        raise ValueError(f"bad MAC address {mac!r}: write six hex pairs, e.g. 02:00:00:00:00:01") from None


def mac_to_str(mac: int) -> str:
    """48-bit int -> '02:00:00:00:00:01'."""
    return ":".join(f"{b:02x}" for b in mac.to_bytes(6, "big"))


def is_multicast_mac(mac: int) -> bool:
    """Group bit (I/G, the low bit of the first octet): broadcast and multicast."""
    return bool((mac >> 40) & 1)


def unicast_mac(text: str) -> int:
    """A MAC an interface or endpoint can have, from text: six hex pairs, neither a group
    (multicast, broadcast) nor the null address. The one rule for every place that takes a MAC
    from a user; ValueError saying what is wrong."""
    try:
        mac = mac_to_int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a MAC address: write six hex pairs, e.g. 02:00:00:00:00:01") from None
    if is_multicast_mac(mac) or mac == 0:
        raise ValueError(
            f"{text} is a group or null address (multicast, broadcast or all zeros): use a unicast "
            f"one such as 02:00:00:00:00:01"
        )
    return mac
