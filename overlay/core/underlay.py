"""Which underlay family two hosts talk over. Pure.

A host has an IPv4 underlay address, an IPv6 one, or both (``hosts/<id>``: ``address`` of
either family, ``address6`` beside an IPv4 ``address``). Two hosts talk over a family they
share: when they share both, IPv6, unless either of them says 4 (``--underlay-family 4``,
published as ``"underlay_family": 4`` in its host value). A host that shares no family with
this one cannot be reached: it gets no VTEP (it is left out of flood lists and forwarding, and
shown as unreachable), rather than one this host has no socket for.

The rule is symmetric: both ends of a pair compute the same family from the two host values,
so each receives from the address the other has as its VTEP, and the source check holds both
ways (a member's datagrams are accepted from its VTEP's address only).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from overlay.core.fdb import Vtep
from overlay.core.registry import Host

UNDERLAY_FAMILIES = {"auto": 6, "6": 6, "4": 4}  # --underlay-family -> the family preferred


@dataclass(frozen=True)
class Underlay:
    """This host's underlay addresses and the family it prefers when a peer has both."""

    v4: ipaddress.IPv4Address | None = None
    v6: ipaddress.IPv6Address | None = None
    prefer: int = 6

    @classmethod
    def any(cls) -> Underlay:
        """A host that reaches both families (tests, and tools that only read the registry)."""
        return cls(ipaddress.IPv4Address("0.0.0.1"), ipaddress.IPv6Address("::1"))

    def vtep(self, host: Host) -> Vtep | None:
        """The VTEP to send to ``host`` at (a checked registry value), or None when the two
        share no underlay family."""
        v4, v6 = host.addresses()
        both = v4 is not None and self.v4 is not None
        if v6 is not None and self.v6 is not None and not (both and 4 in (self.prefer, host.underlay_family)):
            return Vtep(v6, host.port)
        if v4 is not None and self.v4 is not None:
            return Vtep(v4, host.port)
        return None
