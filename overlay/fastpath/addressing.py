"""How addresses cross into the C tables: as ints, IPv4 its 32-bit value, IPv6 its 128-bit
value with bit 128 set, so both families share one argument and the IPv4 form is unchanged.
Needs no extension (the sinks import it before the fast path is loaded)."""

from __future__ import annotations

import ipaddress

from overlay.core.addresses import IPAddress

V6 = 1 << 128  # the flag that marks an IPv6 address int


def to_c(ip: IPAddress) -> int:
    """An address as the C tables take it."""
    return int(ip) | V6 if ip.version == 6 else int(ip)


def from_c(value: int) -> IPAddress:
    """The address of a C table's address int."""
    return ipaddress.IPv6Address(value ^ V6) if value >> 128 else ipaddress.IPv4Address(value)
