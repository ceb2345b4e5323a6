"""The agent's TAP device (python-pytun): open, name, MAC, MTU, address, up; a non-blocking fd.

Frames are read and written on ``fd`` by the fast path (os.read/os.write semantics), never with
pytun's read(), which raises its own error on EAGAIN. The device is not persistent: closing the
fd (or the agent dying) removes it. Every failure a user can cause or fix becomes a TapError
with a one-line message that says what to do.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket

import pytun
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from overlay.core.addresses import IPAddress
from overlay.core.wire import IPV4_OVERHEAD, IPV6_OVERHEAD, mac_to_str

TUN_DEVICE = "/dev/net/tun"
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
# What the kernel may hand us: unfinished checksums and TCP super-frames (overlay/core/offload.py).
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN


class TapError(RuntimeError):
    """The TAP could not be set up; the message says why and how to fix it."""


class NotLocal(ValueError):
    """A --local address that is not an address of this host (network namespace): a flag the
    user got wrong, so the CLI exits 2."""


class Tap:
    """An open TAP device. Use ``Tap.open`` and ``close``."""

    def __init__(self, device: pytun.TunTapDevice, name: str) -> None:
        self._device = device
        self.name = name
        self.fd = device.fileno()

    @classmethod
    def open(cls, name: str, dev: str = TUN_DEVICE) -> Tap:
        """Create TAP ``name`` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, with checksum and TCP
        segmentation offloads) with a non-blocking fd. Every read and write on it carries a
        10-byte virtio-net header (overlay/core/offload.py)."""
        if not os.path.exists(dev):
            raise TapError(
                f"{dev} is missing: load the tun module ('modprobe tun') or, in a container, "
                f"pass the device in (docker run --device /dev/net/tun --cap-add NET_ADMIN)"
            )
        with IPRoute() as ipr:
            if ipr.link_lookup(ifname=name):
                raise TapError(
                    f"interface {name} already exists in this network namespace: choose another "
                    f"--tap, or remove it with 'ip link del {name}' if it is left over"
                )
        try:
            device = pytun.TunTapDevice(name=name, flags=pytun.IFF_TAP | pytun.IFF_NO_PI | pytun.IFF_VNET_HDR, dev=dev)
        except pytun.Error as e:
            code = e.args[0] if e.args and isinstance(e.args[0], int) else None
            if code in (errno.EPERM, errno.EACCES):
                raise TapError(
                    f"creating TAP {name} needs CAP_NET_ADMIN (and access to {dev}): run as root "
                    f"or grant the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN)"
                ) from None
            if code == errno.EBUSY:
                raise TapError(f"TAP {name} is in use by another process: choose another --tap") from None
            raise TapError(f"cannot create TAP {name}: {e}") from None
        try:
            fcntl.ioctl(device.fileno(), TUNSETOFFLOAD, OFFLOADS)
        except OSError as e:
            device.close()
            raise TapError(f"cannot enable offloads on TAP {name}: {e.strerror}") from None
        os.set_blocking(device.fileno(), False)
        return cls(device, name)

    def configure(self, mtu: int, mac: int | None, address: ipaddress.IPv4Interface | None) -> int:
        """Set MTU and MAC, add the address (already there is fine), bring it up. Returns the MAC."""
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=self.name)[0]
            changes: dict[str, object] = {"mtu": mtu}
            if mac is not None:
                changes["address"] = mac_to_str(mac)
            try:
                ipr.link("set", index=index, **changes)
            except NetlinkError as e:
                raise TapError(f"cannot set MTU {mtu} / MAC on {self.name}: {e.args[1]}") from None
            if address is not None:
                try:
                    ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise TapError(f"cannot add address {address} to {self.name}: {e.args[1]}") from None
            try:
                ipr.link("set", index=index, state="up")
            except NetlinkError as e:
                raise TapError(f"cannot bring {self.name} up: {e.args[1]}") from None
            link = ipr.get_links(index)[0]
            return int(link.get_attr("IFLA_ADDRESS").replace(":", ""), 16)

    def close(self) -> None:
        """Close the fd: the kernel removes the (non-persistent) device."""
        self._device.close()


def underlay_mtu(local: IPAddress) -> tuple[str, int]:
    """(interface name, MTU) of the interface that holds ``local`` (either family) in this
    network namespace."""
    with IPRoute() as ipr:
        addrs = ipr.get_addr(family=socket.AF_INET if local.version == 4 else socket.AF_INET6)
        for a in addrs:  # IFA_LOCAL is ours on point-to-point links, where IFA_ADDRESS is the peer's
            if ipaddress.ip_address(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")) == local:
                link = ipr.get_links(a["index"])[0]
                return link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU")
        have = sorted({a.get_attr("IFA_ADDRESS") for a in addrs} - {"127.0.0.1", "::1"})
        raise NotLocal(
            f"--local {local} is not an address of this host (network namespace); "
            f"addresses here: {', '.join(have) or 'none but loopback'}"
        )


def default_overlay_mtu(*locals: IPAddress) -> int:
    """The underlay interface's MTU minus the VXLAN overhead (50 bytes on IPv4, 70 on IPv6);
    on a dual-stack host the smaller of the two, so a frame fits whichever family carries it."""
    return min(underlay_mtu(a)[1] - (IPV4_OVERHEAD if a.version == 4 else IPV6_OVERHEAD) for a in locals)
