"""Hypothesis strategies for inner Ethernet frames and VXLAN datagrams."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from overlay.core.wire import VNI_MAX

vnis = st.one_of(st.sampled_from([0, 1, 42, VNI_MAX]), st.integers(0, VNI_MAX))
macs = st.binary(min_size=6, max_size=6)
unicast_macs = macs.map(lambda m: bytes([m[0] & 0xFE]) + m[1:])


def _ipv4(proto: int, frag: int, ihl: int, l4: bytes) -> bytes:
    opts = bytes((ihl - 5) * 4)
    header = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            0,
            20 + len(opts) + len(l4),
            1,
            frag,
            64,
            proto,
            0,
            b"\xc6\x13\x00\x01",
            b"\xc6\x13\x00\x02",
        )
        + opts
    )
    return header + l4


@st.composite
def frames(draw: st.DrawFn, max_size: int = 1500) -> bytes:
    """Ethernet frames of every kind the flow hash treats differently, plus random bytes."""
    dst, src = draw(macs), draw(macs)
    kind = draw(st.sampled_from(["random", "ipv4", "ipv6", "vlan", "arp"]))
    payload = draw(st.binary(min_size=0, max_size=64))
    if kind == "ipv4":
        proto = draw(st.sampled_from([1, 6, 17, 132, 47]))
        frag = draw(st.sampled_from([0, 0x4000, 0x2000, 0x0010]))  # none, DF, MF, offset
        ihl = draw(st.integers(5, 7))
        body = _ipv4(proto, frag, ihl, payload)
        body = body[: draw(st.integers(0, len(body)))]  # truncated headers too
        return dst + src + b"\x08\x00" + body
    if kind == "ipv6":
        nh = draw(st.sampled_from([6, 17, 58, 132]))
        body = (
            struct.pack(
                "!IHBB16s16s",
                0x60000000,
                len(payload),
                nh,
                64,
                draw(st.binary(min_size=16, max_size=16)),
                draw(st.binary(min_size=16, max_size=16)),
            )
            + payload
        )
        body = body[: draw(st.integers(0, len(body)))]
        return dst + src + b"\x86\xdd" + body
    if kind == "vlan":
        return dst + src + b"\x81\x00" + draw(st.binary(min_size=2, max_size=2)) + b"\x08\x00" + payload
    if kind == "arp":
        return dst + src + b"\x08\x06" + payload
    return dst + src + draw(st.binary(min_size=2, max_size=max_size - 12))


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    """VXLAN datagrams with random flags and reserved bits, and plain random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(min_size=0, max_size=40))
    flags = draw(st.integers(0, 255))
    reserved = draw(st.binary(min_size=3, max_size=3))
    vni = draw(vnis)
    last = draw(st.integers(0, 255))
    return bytes([flags]) + reserved + vni.to_bytes(3, "big") + bytes([last]) + draw(frames())
