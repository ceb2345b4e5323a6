"""overlay: a userspace VXLAN overlay network for containers."""

__version__ = "0.1.0"
