"""The distributed gateway: a network's ``gateway`` (and ``gateway6``) on every member host,
with the same MAC everywhere. Pure: names and numbers only (the plumbing is io/bridge.py).

On each host the gateway is a veth pair on the network's bridge ``ovbr<vni>``: ``ovgp<vni>``,
the bridge port, and ``ovgw<vni>``, the host's end, which holds the gateway address(es) and the
MAC ``gateway_mac(vni)``: 02:6f:76 ("ov", locally administered) and the 24-bit VNI. So a
container that moves to another host finds the same gateway at the same MAC.

The gateway is answered locally, never across the overlay:
- the bridge ports ``ovgp<vni>`` and the agent's TAP are both *isolated*: the bridge never
  forwards a frame between them (the gateway's ARP, ND and traffic stay on the host, and frames
  from other hosts never reach it), while containers (not isolated) talk to both;
- a container's ARP request for the gateway also reaches the TAP (broadcast): the agent answers
  it itself from the gateway's neighbour entry (ARP suppression) and sends it nowhere;
- a frame from another host whose source is a gateway MAC is not learned (fdb.py refuses it),
  and the gateway's MAC is a sticky static entry on its port, so nothing moves it;
- the gateway's address is never handed out by IPAM (core/attach.py) and its MAC is never an
  endpoint (it never crosses the TAP, so nothing publishes it).
"""

from __future__ import annotations

GATEWAY_OUI = 0x026F76  # the MAC's top 24 bits: 02:6f:76


def gateway_mac(vni: int) -> int:
    """The gateway's MAC on network ``vni``, the same on every host."""
    return (GATEWAY_OUI << 24) | (vni & 0xFFFFFF)


def is_gateway_mac(mac: int) -> bool:
    """Whether ``mac`` is some network's gateway MAC (never learned, never an endpoint)."""
    return mac >> 24 == GATEWAY_OUI


def gateway_device(vni: int) -> str:
    """The host end of network ``vni``'s gateway veth: it holds the gateway address."""
    return f"ovgw{vni}"


def gateway_port(vni: int) -> str:
    """The bridge end of network ``vni``'s gateway veth."""
    return f"ovgp{vni}"
