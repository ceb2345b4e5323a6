"""``CoreSink``: the ``core.fdb.TableSink`` onto the C ``ForwardingCore``, so the pure
ForwardingTable's decisions reach the fast path's tables (VTEPs become (address int, port): fastpath.api.to_c)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from overlay.core.addresses import IPAddress
from overlay.core.fdb import Vtep
from overlay.fastpath.addressing import to_c

if TYPE_CHECKING:
    from overlay.fastpath.api import ForwardingCore


class CoreSink:
    """fdb.TableSink onto a ``ForwardingCore``."""

    def __init__(self, core: ForwardingCore) -> None:
        self.core = core

    def fdb_set(self, vni: int, mac: int, vtep: Vtep) -> None:
        self.core.fdb_set(vni, mac, to_c(vtep.ip), vtep.port)

    def fdb_delete(self, vni: int, mac: int) -> None:
        self.core.fdb_delete(vni, mac)

    def flood_set(self, vni: int, vteps: Sequence[Vtep]) -> None:
        self.core.flood_set(vni, [(to_c(v.ip), v.port) for v in vteps])

    def vni_add(self, vni: int) -> None:
        self.core.vni_add(vni)

    def vni_remove(self, vni: int) -> None:
        self.core.vni_remove(vni)

    def neigh_set(self, vni: int, ip: IPAddress, mac: int) -> None:
        self.core.neigh_set(vni, to_c(ip), mac)

    def neigh_delete(self, vni: int, ip: IPAddress) -> None:
        self.core.neigh_delete(vni, to_c(ip))
