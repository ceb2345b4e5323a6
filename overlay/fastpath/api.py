"""The compiled fast path's Python-level API, typed by ``_fastpath.pyi``: the agent and the IO
layer import these names from here, never from ``_fastpath`` itself. Importing this module
needs the extension: call ``overlay.fastpath.load()`` first where a missing build must be
reported as one line rather than an ImportError.

Addresses cross into the C tables as ints (``addressing.to_c``), re-exported here."""

from overlay.fastpath._fastpath import (
    DROP_REASONS,
    HEADROOM_BYTES,
    TAILROOM_BYTES,
    VNET_HDR_BYTES,
    ForwardingCore,
    FrameBatch,
    decap,
    encap,
    flow_source_port,
    prepare,
    pump_rx,
    pump_tx,
)
from overlay.fastpath.addressing import V6, from_c, to_c

__all__ = [
    "V6",
    "to_c",
    "from_c",
    "DROP_REASONS",
    "HEADROOM_BYTES",
    "TAILROOM_BYTES",
    "VNET_HDR_BYTES",
    "ForwardingCore",
    "FrameBatch",
    "decap",
    "encap",
    "flow_source_port",
    "prepare",
    "pump_rx",
    "pump_tx",
]
