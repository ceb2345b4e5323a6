"""``CoreSink``: the ``core.fdb.TableSink`` onto the C ``ForwardingCore``, so the pure
ForwardingTable's decisions reach the fast path's tables (VTEPs become (int ip, port))."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Sequence

from overlay.core.fdb import Vtep

if TYPE_CHECKING:
    from overlay.fastpath.api import ForwardingCore


class CoreSink:
    """fdb.TableSink onto a ``ForwardingCore``."""

    def __init__(self, core: ForwardingCore) -> None:
        self.core = core

    def fdb_set(self, vni: int, mac: int, vtep: Vtep) -> None:
        self.core.fdb_set(vni, mac, int(vtep.ip), vtep.port)

    def fdb_delete(self, vni: int, mac: int) -> None:
        self.core.fdb_delete(vni, mac)

    def flood_set(self, vni: int, vteps: Sequence[Vtep]) -> None:
        self.core.flood_set(vni, [(int(v.ip), v.port) for v in vteps])

    def vni_add(self, vni: int) -> None:
        self.core.vni_add(vni)

    def vni_remove(self, vni: int) -> None:
        self.core.vni_remove(vni)

    def neigh_set(self, vni: int, ip: IPAddress, mac: int) -> None:
        self.core.neigh_set(vni, int(ip), mac)

    def neigh_delete(self, vni: int, ip: IPAddress) -> None:
        self.core.neigh_delete(vni, int(ip))
