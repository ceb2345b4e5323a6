"""The one place that imports the compiled fast path, and the glue from fdb.py to its tables.

``load()`` turns a missing or broken extension into one clear sentence with the fix, so the
CLI never shows a traceback for a build problem. ``CoreSink`` is the ``fdb.TableSink`` that
keeps the C ForwardingCore in step with the pure ForwardingTable.
"""

from __future__ import annotations

import ipaddress
from types import ModuleType
from typing import Sequence

from overlay.fdb import Vtep

FIX = "reinstall with 'pip install .' (needs a C compiler and the Python headers)"


class FastPathMissing(RuntimeError):
    """The compiled extension overlay._fastpath is absent or does not import."""


def load() -> ModuleType:
    """Import overlay._fastpath, or raise FastPathMissing saying what is wrong and how to fix it."""
    try:
        from overlay import _fastpath
    except ImportError as e:
        raise FastPathMissing(
            f"the compiled fast path overlay._fastpath is missing or broken ({e}); {FIX}"
        ) from e
    return _fastpath


class CoreSink:
    """fdb.TableSink onto a ``_fastpath.ForwardingCore``: VTEPs become (int ip, port)."""

    def __init__(self, core: object) -> None:
        self.core = core

    def fdb_set(self, vni: int, mac: int, vtep: Vtep) -> None:
        self.core.fdb_set(vni, mac, int(vtep.ip), vtep.port)  # type: ignore[attr-defined]

    def fdb_delete(self, vni: int, mac: int) -> None:
        self.core.fdb_delete(vni, mac)  # type: ignore[attr-defined]

    def flood_set(self, vni: int, vteps: Sequence[Vtep]) -> None:
        self.core.flood_set(vni, [(int(v.ip), v.port) for v in vteps])  # type: ignore[attr-defined]

    def vni_add(self, vni: int) -> None:
        self.core.vni_add(vni)  # type: ignore[attr-defined]

    def vni_remove(self, vni: int) -> None:
        self.core.vni_remove(vni)  # type: ignore[attr-defined]

    def neigh_set(self, vni: int, ip: ipaddress.IPv4Address, mac: int) -> None:
        self.core.neigh_set(vni, int(ip), mac)  # type: ignore[attr-defined]

    def neigh_delete(self, vni: int, ip: ipaddress.IPv4Address) -> None:
        self.core.neigh_delete(vni, int(ip))  # type: ignore[attr-defined]
