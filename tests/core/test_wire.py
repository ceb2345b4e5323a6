"""The reference codec (overlay/core/wire.py) against RFC 7348 and scapy's VXLAN layer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from overlay.core import wire
from overlay.core.wire import Decoded, Drop
from tests.frames import datagrams, frames, vnis

ARP_BROADCAST = b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x08\x06" + bytes(28)


def scapy_encode(vni: int, frame: bytes) -> bytes:
    # flags=0x08 explicitly: scapy's default flags make a VXLAN-GPE-style header.
    return bytes(VXLAN(flags=0x08, vni=vni) / Raw(frame))


@given(vnis, frames())
def test_encode_matches_scapy(vni: int, frame: bytes) -> None:
    assert wire.encode(vni, frame) == scapy_encode(vni, frame)


@given(vnis, frames())
def test_decode_reads_what_scapy_builds(vni: int, frame: bytes) -> None:
    result = wire.decode(scapy_encode(vni, frame), {vni}, allow_vlan=True)
    assert result == Decoded(vni, frame)


@given(datagrams())
def test_decode_agrees_with_scapy_parse(datagram: bytes) -> None:
    # scapy reads other flag bits as GPE/GBP extensions (other layouts); RFC 7348 ignores them,
    # so the comparison is over the plain header (reserved bytes still random).
    result = wire.decode(datagram, range(wire.VNI_MAX + 1), allow_vlan=True)
    if isinstance(result, Decoded) and datagram[0] == wire.FLAG_I:
        parsed = VXLAN(datagram)
        assert parsed.vni == result.vni
        assert bytes(datagram[8:]) == result.frame


def test_header_layout_is_rfc7348() -> None:
    assert wire.encode(0x123456, ARP_BROADCAST)[:8] == bytes.fromhex("08000000 12345600")


@pytest.mark.parametrize("vni", [0, 1, wire.VNI_MAX])
def test_extreme_vnis_round_trip(vni: int) -> None:
    assert wire.decode(wire.encode(vni, ARP_BROADCAST), {vni}) == Decoded(vni, ARP_BROADCAST)


@pytest.mark.parametrize("vni", [-1, wire.VNI_MAX + 1, True, "42"])
def test_encode_refuses_out_of_range_vni(vni: object) -> None:
    with pytest.raises(ValueError, match="0 to 16777215"):
        wire.encode(vni, ARP_BROADCAST)  # type: ignore[arg-type]


def test_encode_refuses_frame_without_ethernet_header() -> None:
    with pytest.raises(ValueError, match="at least 14 bytes"):
        wire.encode(1, b"short")


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (b"", Drop.TOO_SHORT),
        (bytes.fromhex("08000000000001"), Drop.TOO_SHORT),  # 7 bytes
        (bytes.fromhex("00000000 00000100") + ARP_BROADCAST, Drop.NO_I_FLAG),
        (bytes.fromhex("f7ffffff 000001ff") + ARP_BROADCAST, Drop.NO_I_FLAG),  # every bit but I
        (bytes.fromhex("08000000 00000100") + ARP_BROADCAST[:13], Drop.INNER_TOO_SHORT),
        (bytes.fromhex("08000000 00000200") + ARP_BROADCAST, Drop.UNKNOWN_VNI),
        (bytes.fromhex("08000000 00000100") + ARP_BROADCAST[:12] + b"\x81\x00\x00\x05\x08\x06", Drop.INNER_VLAN),
        (bytes.fromhex("08000000 00000100") + ARP_BROADCAST[:12] + b"\x88\xa8\x00\x05\x08\x06", Drop.INNER_VLAN),
    ],
)
def test_every_drop_reason_of_decode(datagram: bytes, reason: Drop) -> None:
    assert wire.decode(datagram, {1}) is reason


def test_reserved_bits_are_ignored_on_receive() -> None:
    noisy = bytes.fromhex("ffffffff 00002aff") + ARP_BROADCAST  # every reserved bit set
    assert wire.decode(noisy, {42}) == Decoded(42, ARP_BROADCAST)


@given(vnis, frames())
def test_reserved_bits_are_zero_on_send(vni: int, frame: bytes) -> None:
    header = wire.encode(vni, frame)[:8]
    assert header[0] == wire.FLAG_I and header[1:4] == bytes(3) and header[7] == 0


def test_vlan_tagged_frames_pass_when_allowed() -> None:
    tagged = ARP_BROADCAST[:12] + b"\x81\x00\x00\x05" + ARP_BROADCAST[12:]
    assert wire.decode(wire.encode(1, tagged), {1}, allow_vlan=True) == Decoded(1, tagged)


@given(frames())
def test_source_port_is_in_dynamic_range_and_stable(frame: bytes) -> None:
    port = wire.source_port(frame)
    assert 49152 <= port <= 65535
    assert wire.source_port(frame) == port


def test_source_port_follows_the_flow_not_the_payload() -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    def tcp(sport: int, payload: bytes) -> bytes:
        return bytes(
            Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01")
            / IP(src="198.19.0.1", dst="198.19.0.2")
            / TCP(sport=sport, dport=80)
            / payload
        )

    assert wire.source_port(tcp(1000, b"a")) == wire.source_port(tcp(1000, b"b" * 100))
    ports = {wire.source_port(tcp(p, b"")) for p in range(1000, 1064)}
    assert len(ports) > 48  # different flows spread over the range


@pytest.mark.parametrize("text", ["02:00:00:00:00:01", "02-00-00-00-00-01"])
def test_mac_parsing(text: str) -> None:
    assert wire.mac_to_int(text) == 0x020000000001
    assert wire.mac_to_str(0x020000000001) == "02:00:00:00:00:01"


@pytest.mark.parametrize("text", ["02:00:00:00:00", "zz:00:00:00:00:01", "0200.0000.0001", ""])
def test_bad_mac_says_the_expected_form(text: str) -> None:
    with pytest.raises(ValueError, match="six hex pairs"):
        wire.mac_to_int(text)


@given(st.integers(0, (1 << 48) - 1))
def test_mac_text_round_trip(mac: int) -> None:
    assert wire.mac_to_int(wire.mac_to_str(mac)) == mac
