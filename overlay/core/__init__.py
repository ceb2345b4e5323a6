"""The pure core: decisions as data, no IO.

No module here opens a socket or a device, runs an event loop, a thread or a subprocess, talks
netlink or etcd, or reads a clock: time is a parameter (``now``), IO is the caller's. So every
rule of the agent is unit-tested exactly and fast, without root (tests/core/). The IO layer
(``overlay.io``) executes what these modules decide. import-linter and ruff keep it so.
"""
