"""The lab: hosts as network namespaces on a bridge (netns), a real etcd in them (etcd), and the
demo (demo). For tests, the demo and the benchmarks only; the agent never imports it."""

from overlay.lab.netns import Lab, LabError, wait_for

__all__ = ["Lab", "LabError", "wait_for"]
