"""The compiled fast path's Python-level API, typed by ``_fastpath.pyi``: the agent and the IO
layer import these names from here, never from ``_fastpath`` itself. Importing this module
needs the extension: call ``overlay.fastpath.load()`` first where a missing build must be
reported as one line rather than an ImportError."""

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

__all__ = [
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
