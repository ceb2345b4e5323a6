"""Linux plumbing for containers on the overlay (pyroute2 netlink), one bridge per network.

On each host, network <vni> has a bridge ``ovbr<vni>`` holding the agent's TAP for that VNI
and one veth per attached container, so traffic between local containers stays in the kernel
and only remote traffic crosses the TAP into the agent. The host's own overlay address (and
MAC) sit on the bridge. A container gets the other end of its veth, moved into its network
namespace and renamed (eth0 by default), with its MAC, addresses, MTU and default routes. An
IPv6 address is added without duplicate address detection (IFA_F_NODAD: IPAM made it unique,
and it is usable at once), and the container's interface ignores router advertisements
(``accept_ra`` and ``autoconf`` 0): its addresses and routes are the agent's alone.

Every function here is synchronous netlink. The agent calls them from a worker thread: pyroute2
runs its own event loop, and the data path's loop must not wait on netlink.
Failures a user can cause become PlumbingError with a one-line message (``kind`` for callers
that map them to codes: "netns" when the namespace is missing, "invalid" for a bad name).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from overlay.core.gateway import gateway_device, gateway_port
from overlay.core.wire import mac_to_str

log = logging.getLogger("overlay.bridge")

NUD_NOARP = 0x40  # 'static' in bridge fdb terms; 'permanent' would mean the bridge's own (local) address
NTF_MASTER = 0x04
NTF_STICKY = 0x40  # a static entry learning never moves (a gateway's MAC on its port)
IFNAMSIZ = 15
IFA_F_NODAD = 0x02
AF_INET6 = socket.AF_INET6
NO_ROUTER_ADVERTISEMENTS = (("accept_ra", "0"), ("autoconf", "0"))  # a container's IPv6 sysctls


class PlumbingError(RuntimeError):
    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


def bridge_name(vni: int) -> str:
    return f"ovbr{vni}"


def host_ifname(attachment_id: str) -> str:
    """The host end of an attachment's veth: stable for the id, unique enough, <= 15 chars."""
    return "ov" + hashlib.sha256(attachment_id.encode()).hexdigest()[:11]


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def quiet_port(ifname: str) -> None:
    """No IPv6 on a bridge port (the TAP, a container's host end). A port with a link-local
    address sends neighbour discovery from its own MAC, which the overlay would then carry and
    publish as an endpoint that is nobody. Only the bridge itself speaks for the host."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as f:
            f.write("1")
    except FileNotFoundError:
        pass  # no IPv6 in this kernel: nothing to quieten
    except OSError as e:  # e.g. /proc/sys read-only in a container
        log.warning(
            "cannot turn IPv6 off on bridge port %s (%s): its own neighbour discovery will reach the "
            "overlay and be published as an endpoint; mount /proc/sys writable to avoid it",
            ifname,
            e.strerror,
        )


def ensure_bridge(vni: int, tap: str, mtu: int, mac: int | None, address: ipaddress.IPv4Interface | None) -> int:
    """Create (or take over) network ``vni``'s bridge with ``tap`` as a port; give it the MTU,
    the host's overlay MAC and address; bring both up. Returns the bridge's MAC.

    STP off and no forwarding delay (a new container talks at once), bridge netfilter off (the
    overlay is L2: iptables on every bridged frame would cost and surprise)."""
    name = bridge_name(vni)
    with IPRoute() as ipr:
        index = _index(ipr, name)
        if index is not None and _kind(ipr.get_links(index)[0]) != "bridge":
            raise PlumbingError(f"{name} exists and is not a bridge: remove it ('ip link del {name}')")
        try:
            if index is None:
                ipr.link("add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0, br_nf_call_iptables=0)
                index = _index(ipr, name)
                assert index is not None
            # An explicit MAC, always: a bridge left to itself takes its lowest port's MAC, and
            # would change it (and the host's endpoint) whenever a container is plugged in.
            if mac is None:  # a bridge kept from our last run keeps the MAC we gave it
                current = ipr.get_links(index)[0]
                mac = int(current.get_attr("IFLA_ADDRESS").replace(":", ""), 16) if mac_was_set(name) else None
            ipr.link("set", index=index, mtu=mtu, address=mac_to_str(mac if mac is not None else random_mac()))
            quiet_port(tap)
            ipr.link("set", index=_index(ipr, tap), master=index, state="up")
            if address is not None:
                try:
                    ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
            ipr.link("set", index=index, state="up")
            link = ipr.get_links(index)[0]
        except NetlinkError as e:
            raise PlumbingError(f"cannot set up bridge {name} for network {vni}: {e.args[1]}") from None
        return int(link.get_attr("IFLA_ADDRESS").replace(":", ""), 16)


def isolate(ifname: str) -> None:
    """Make bridge port ``ifname`` isolated: the bridge forwards nothing between it and another
    isolated port (the TAP and the gateway's port: core/gateway.py)."""
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        if index is None:
            raise PlumbingError(f"cannot isolate bridge port {ifname}: it does not exist")
        try:
            ipr.brport("set", index=index, isolated=1)
        except NetlinkError as e:
            raise PlumbingError(f"cannot isolate bridge port {ifname}: {e.args[1]}") from None


def ensure_gateway(
    vni: int,
    tap: str,
    mac: int,
    gateway: ipaddress.IPv4Interface | None,
    gateway6: ipaddress.IPv6Interface | None,
    mtu: int,
) -> None:
    """Network ``vni``'s distributed gateway on its bridge (core/gateway.py): the veth pair
    ``ovgp<vni>`` (an isolated port, as ``tap`` becomes) / ``ovgw<vni>`` (``mac``, the gateway
    addresses, up). Idempotent: an existing pair is brought to this state (addresses of an
    earlier gateway removed)."""
    port, device, bridge = gateway_port(vni), gateway_device(vni), bridge_name(vni)
    with IPRoute() as ipr:
        master = _index(ipr, bridge)
        if master is None:
            raise PlumbingError(f"bridge {bridge} is missing: cannot put network {vni}'s gateway on it")
        try:
            if _index(ipr, device) is None:
                if _index(ipr, port) is not None:
                    ipr.link("del", ifname=port)  # half a pair, left by a crash
                ipr.link("add", ifname=port, kind="veth", peer={"ifname": device})
            index = _index(ipr, device)
            quiet_port(port)
            if gateway6 is None:
                quiet_port(device)  # no IPv6 gateway: no IPv6 chatter from it either
            else:
                for name, value in NO_ROUTER_ADVERTISEMENTS:
                    _write_sysctl(_ipv6_conf(device, name), value)
            # ARP for the gateway is answered by the gateway alone: the host answers an ARP request
            # on an interface only for that interface's own addresses (never from the bridge's MAC).
            for ifname in (bridge, device):
                _write_sysctl(f"/proc/sys/net/ipv4/conf/{ifname}/arp_ignore", "1")
                _write_sysctl(f"/proc/sys/net/ipv4/conf/{ifname}/arp_announce", "2")
            ipr.link("set", index=index, address=mac_to_str(mac), mtu=mtu)
            ipr.link("set", ifname=port, mtu=mtu, master=master, state="up")
            wanted = {(str(g.ip), g.network.prefixlen) for g in (gateway, gateway6) if g is not None}
            for a in ipr.get_addr(index=index):
                have = (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                if have not in wanted and not have[0].startswith("fe80:"):
                    ipr.addr("del", index=index, address=have[0], prefixlen=have[1])
            for g in (gateway, gateway6):
                if g is None:
                    continue
                try:
                    flags = IFA_F_NODAD if g.version == 6 else 0
                    ipr.addr("add", index=index, address=str(g.ip), prefixlen=g.network.prefixlen, flags=flags)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
            ipr.link("set", index=index, state="up")
            ipr.fdb(
                "replace",
                ifindex=_index(ipr, port),
                lladdr=mac_to_str(mac),
                state=NUD_NOARP,
                flags=NTF_MASTER | NTF_STICKY,
                master=master,
            )
        except NetlinkError as e:
            raise PlumbingError(f"cannot set up network {vni}'s gateway on {bridge}: {e.args[1]}") from None
    isolate(port)
    isolate(tap)


def remove_gateway(vni: int) -> bool:
    """Remove network ``vni``'s gateway veth (both ends go together); False if there was none."""
    return unplug(gateway_device(vni))


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise PlumbingError(f"cannot set {path} to {value} ({e.strerror}): mount /proc/sys writable") from None


def mac_was_set(ifname: str) -> bool:
    """Whether an interface's MAC was set explicitly (NET_ADDR_SET), e.g. by us before a restart.
    From sysfs: pyroute2 does not decode IFLA_ADDR_ASSIGN_TYPE."""
    try:
        with open(f"/sys/class/net/{ifname}/addr_assign_type") as f:
            return f.read().strip() == "3"
    except OSError:
        return False


def random_mac() -> int:
    """A random locally administered unicast MAC."""
    return (0x02 << 40) | int.from_bytes(os.urandom(5), "big")


def _kind(link: object) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")  # type: ignore[attr-defined]
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def bridge_ports(vni: int) -> list[str]:
    """Names of the ports of network ``vni``'s bridge (empty if there is no bridge)."""
    with IPRoute() as ipr:
        index = _index(ipr, bridge_name(vni))
        if index is None:
            return []
        return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links() if link.get_attr("IFLA_MASTER") == index]


def remove_bridge_if_unused(vni: int) -> bool:
    """Delete network ``vni``'s bridge (and its gateway) unless containers are still plugged
    into it."""
    if [p for p in bridge_ports(vni) if p != gateway_port(vni)]:
        return False
    remove_gateway(vni)
    with IPRoute() as ipr:
        index = _index(ipr, bridge_name(vni))
        if index is not None:
            try:
                ipr.link("del", index=index)
            except NetlinkError:
                return False
    return True


@dataclass(frozen=True)
class Plug:
    """What to build for one container."""

    netns: str  # path of the container's network namespace file
    ifname: str  # its interface's name inside the container
    host_ifname: str  # the host end, a port of the bridge
    bridge: str
    mac: int
    address: ipaddress.IPv4Interface | None
    gateway: ipaddress.IPv4Address | None
    mtu: int
    address6: ipaddress.IPv6Interface | None = None
    gateway6: ipaddress.IPv6Address | None = None


def open_netns(path: str) -> int:
    """An fd on a network namespace file; PlumbingError (kind "netns") if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise PlumbingError(
            f"no network namespace at {path} ({e.strerror}): is the container running?", kind="netns"
        ) from None
    return fd


def plug(p: Plug) -> None:
    """Create the veth pair, move one end into the container and configure both. All or
    nothing: a failure removes what was made."""
    if not 1 <= len(p.ifname) <= IFNAMSIZ or "/" in p.ifname or p.ifname.strip() != p.ifname:
        raise PlumbingError(
            f"--ifname {p.ifname!r} is not a valid interface name (1 to 15 characters, no '/')", kind="invalid"
        )
    fd = open_netns(p.netns)
    try:
        with IPRoute() as ipr:
            bridge = _index(ipr, p.bridge)
            if bridge is None:
                raise PlumbingError(f"bridge {p.bridge} is missing: is the agent running?")
            if _index(ipr, p.host_ifname) is not None:
                ipr.link("del", ifname=p.host_ifname)  # left over by a crash mid-attach
            try:
                ipr.link("add", ifname=p.host_ifname, kind="veth", peer={"ifname": p.ifname, "net_ns_fd": fd})
            except NetlinkError as e:
                if e.code == errno.EEXIST:
                    raise PlumbingError(
                        f"the container already has an interface {p.ifname}: choose another --ifname", kind="invalid"
                    ) from None
                raise
            try:
                _configure_container(p)
                ipr.link("set", ifname=p.host_ifname, mtu=p.mtu)
                _enslave(ipr, p.host_ifname, bridge, p.mac)
            except BaseException:
                ipr.link("del", ifname=p.host_ifname)
                raise
    except NetlinkError as e:
        raise PlumbingError(f"cannot plug {p.ifname} into the container: {e.args[1]}") from None
    finally:
        os.close(fd)


def _enslave(ipr: IPRoute, host_ifname: str, bridge: int, mac: int) -> None:
    quiet_port(host_ifname)
    host = _index(ipr, host_ifname)
    ipr.link("set", index=host, master=bridge, state="up")
    # The container's MAC is on this port from the start: a MAC that moved here from another
    # host is not left pointing at the TAP until the container speaks.
    ipr.fdb("replace", ifindex=host, lladdr=mac_to_str(mac), state=NUD_NOARP, flags=NTF_MASTER, master=bridge)


def replug(host_ifname: str, bridge_ifname: str, mac: int) -> None:
    """Put an existing container veth back into its bridge (an agent restarted)."""
    with IPRoute() as ipr:
        bridge = _index(ipr, bridge_ifname)
        if bridge is None:
            raise PlumbingError(f"bridge {bridge_ifname} is missing")
        try:
            _enslave(ipr, host_ifname, bridge, mac)
        except NetlinkError as e:
            raise PlumbingError(f"cannot put {host_ifname} back into {bridge_ifname}: {e.args[1]}") from None


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def _inside(path: str) -> Iterator[None]:
    """This thread inside the network namespace at ``path`` for the block, then back home.

    Only what the block opens belongs to the namespace: a socket (it stays in the namespace it
    was made in), a file under /proc/sys/net (a sysctl of that namespace). pyroute2's own
    ``IPRoute(netns=...)`` forks a helper, which is not safe in a process that runs threads (it
    crashed in the agent)."""
    fd = open_netns(path)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(fd)
        except OSError as e:
            hint = ": the agent needs CAP_SYS_ADMIN to enter a container's namespace" if e.errno == errno.EPERM else ""
            raise PlumbingError(f"cannot enter the network namespace at {path} ({e.strerror}){hint}", "netns") from None
        try:
            yield
        finally:
            try:
                _setns(home)
            except OSError as e:  # this thread would go on working inside the container: stop hard
                log.critical("cannot return to the agent's network namespace (%s); exiting", e)
                os._exit(70)
    finally:
        os.close(fd)
        os.close(home)


def netns_socket(path: str) -> IPRoute:
    """A netlink socket inside the network namespace at ``path``."""
    with _inside(path):
        return IPRoute()


def _ipv6_conf(ifname: str, name: str) -> str:
    return f"/proc/sys/net/ipv6/conf/{ifname}/{name}"


def _ignore_router_advertisements(p: Plug) -> None:
    """In the container: ``ifname`` takes no address or route from router advertisements."""
    with _inside(p.netns):
        for name, value in NO_ROUTER_ADVERTISEMENTS:
            try:
                with open(_ipv6_conf(p.ifname, name), "w") as f:
                    f.write(value)
            except OSError as e:
                raise PlumbingError(
                    f"cannot set net.ipv6.conf.{p.ifname}.{name}={value} in the container ({e.strerror}): "
                    f"IPv6 needs a kernel with IPv6 and /proc/sys writable"
                ) from None


def _router_advertisement_settings(p: Plug) -> dict[str, str | None]:
    """The container's ``accept_ra`` and ``autoconf`` for ``ifname`` (None: unreadable)."""
    out: dict[str, str | None] = {}
    with _inside(p.netns):
        for name, _ in NO_ROUTER_ADVERTISEMENTS:
            try:
                with open(_ipv6_conf(p.ifname, name)) as f:
                    out[name] = f.read().strip()
            except OSError:
                out[name] = None
    return out


def _configure_container(p: Plug) -> None:
    if p.address6 is not None:  # before the link is up: no advertisement is ever acted on
        _ignore_router_advertisements(p)
    with netns_socket(p.netns) as ns:
        index = _index(ns, p.ifname)
        ns.link("set", index=index, address=mac_to_str(p.mac), mtu=p.mtu)
        if p.address is not None:
            ns.addr("add", index=index, address=str(p.address.ip), prefixlen=p.address.network.prefixlen)
        if p.address6 is not None:
            ns.addr(
                "add",
                index=index,
                address=str(p.address6.ip),
                prefixlen=p.address6.network.prefixlen,
                flags=IFA_F_NODAD,
            )
        ns.link("set", index=index, state="up")
        lo = _index(ns, "lo")
        if lo is not None:
            ns.link("set", index=lo, state="up")
        if p.gateway is not None:
            ns.route("replace", dst="0.0.0.0/0", gateway=str(p.gateway), oif=index)
        if p.gateway6 is not None:
            ns.route("replace", family=AF_INET6, dst="::/0", gateway=str(p.gateway6), oif=index)


def unplug(host_ifname: str) -> bool:
    """Delete the veth pair (the container's end goes with it); False if it was already gone."""
    with IPRoute() as ipr:
        index = _index(ipr, host_ifname)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise PlumbingError(f"cannot remove {host_ifname}: {e.args[1]}") from None
            return False
    return True


def exists(ifname: str) -> bool:
    """Whether ``ifname`` exists in this network namespace."""
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def problems(p: Plug) -> list[str]:
    """What is wrong with an attachment as it stands (empty: intact). For CNI CHECK."""
    found: list[str] = []
    with IPRoute() as ipr:
        host = _index(ipr, p.host_ifname)
        bridge = _index(ipr, p.bridge)
        if host is None:
            return [f"the host end {p.host_ifname} of the veth is gone"]
        link = ipr.get_links(host)[0]
        if bridge is None or link.get_attr("IFLA_MASTER") != bridge:
            found.append(f"{p.host_ifname} is not a port of bridge {p.bridge}")
        if link.get_attr("IFLA_OPERSTATE") not in ("UP", "UNKNOWN"):
            found.append(f"{p.host_ifname} is down")
    try:
        container = netns_socket(p.netns)
    except PlumbingError as e:
        return found + [str(e)]
    with container as ns:
        index = _index(ns, p.ifname)
        if index is None:
            return found + [f"the container has no interface {p.ifname}"]
        link = ns.get_links(index)[0]
        if link.get_attr("IFLA_ADDRESS") != mac_to_str(p.mac):
            found.append(f"{p.ifname} has MAC {link.get_attr('IFLA_ADDRESS')}, not {mac_to_str(p.mac)}")
        if link.get_attr("IFLA_MTU") != p.mtu:
            found.append(f"{p.ifname} has MTU {link.get_attr('IFLA_MTU')}, not {p.mtu}")
        addresses = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ns.get_addr(index=index)}
        for address in (p.address, p.address6):
            if address is not None and (str(address.ip), address.network.prefixlen) not in addresses:
                found.append(f"{p.ifname} lacks address {address}")
        for family, gateway in ((socket.AF_INET, p.gateway), (AF_INET6, p.gateway6)):
            if gateway is not None:
                routes = ns.get_routes(family=family, dst_len=0)
                if not any(r.get_attr("RTA_GATEWAY") == str(gateway) for r in routes):
                    found.append(f"the container has no default route via {gateway}")
    if p.address6 is not None:
        for name, value in _router_advertisement_settings(p).items():
            if value != "0":
                found.append(f"the container's net.ipv6.conf.{p.ifname}.{name} is {value or 'unreadable'}, not 0")
    return found


def plug_for_engine(host_ifname: str, peer_ifname: str, bridge_ifname: str, mac: int, mtu: int) -> None:
    """A veth pair for a container engine (Docker): the host end a port of the bridge, the other
    end ``peer_ifname`` left in this namespace, down, with the container's MAC and MTU, for the
    engine to move into its container and give its address. All or nothing; a pair left over by
    a crash is made anew."""
    for name in (host_ifname, peer_ifname):
        if not 1 <= len(name) <= IFNAMSIZ or "/" in name:
            raise PlumbingError(f"{name!r} is not a valid interface name (1 to 15 characters, no '/')", "invalid")
    with IPRoute() as ipr:
        bridge = _index(ipr, bridge_ifname)
        if bridge is None:
            raise PlumbingError(f"bridge {bridge_ifname} is missing: is the agent running?")
        try:
            for name in (host_ifname, peer_ifname):
                if _index(ipr, name) is not None:
                    ipr.link("del", ifname=name)
            ipr.link("add", ifname=host_ifname, kind="veth", peer={"ifname": peer_ifname})
            try:
                ipr.link("set", ifname=peer_ifname, address=mac_to_str(mac), mtu=mtu)
                ipr.link("set", ifname=host_ifname, mtu=mtu)
                _enslave(ipr, host_ifname, bridge, mac)
            except BaseException:
                ipr.link("del", ifname=host_ifname)
                raise
        except NetlinkError as e:
            raise PlumbingError(f"cannot make the veth {host_ifname}/{peer_ifname}: {e.args[1]}") from None
