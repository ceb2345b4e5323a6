"""A lab of hosts on one machine: network namespaces on an underlay bridge in 198.18.0.0/24
(IPv4, the default), 2001:2:0:1::/64 (IPv6 only: ``Lab(..., ipv6=True)``) or both
(``dual_stack=True``).

Used by the tests, the demo and the benchmarks (DESIGN.md, lab conventions)::

    <name>-sw   the "switch": bridge br0, one port per host (h1, h2, ...)
    <name>-h1   host 1: eth0 = 198.18.0.1/24, lo up
    <name>-h2   host 2: eth0 = 198.18.0.2/24 ...
    <name>-etcd1  a service host (``add_service("etcd1", 250)``): eth0 = 198.18.0.250/24, lo up,
                on the same bridge (port s-etcd1) but not an overlay host: etcd and the like

The address plan. Host N (1 .. 200) and service host N (201 .. 254) have, on eth0:

    IPv4 lab (default)   198.18.0.N/24
    IPv6-only lab        2001:2:0:1::N/64                       (no IPv4 on eth0)
    dual-stack lab       198.18.0.N/24 and 2001:2:0:1::N/64

where the IPv6 address mirrors the IPv4 one digit for digit: N is written in decimal as the
last group (host 12 is 2001:2:0:1::12, etcd1 at .250 is 2001:2:0:1::250), so both read alike.
``address(h)`` is a host's primary underlay address (IPv6 in an IPv6-only lab, else IPv4),
``address6(h)`` its IPv6 one, ``interfaces(h)`` everything on its eth0 (IPv4 first); each also
takes a service's name. In a lab with IPv6 the addresses are added with IFA_F_NODAD (no
duplicate address detection: usable at once, ``up`` and ``add_service`` still wait until the
kernel no longer marks them tentative), and router advertisements are ignored
(``accept_ra=0`` in every lab namespace, so on eth0 and on whatever is made in them later).

Built with pyroute2 (netlink, structured errors). Commands run inside a host with ``ip netns
exec``, which also gives the command the namespace's own /sys. ``down`` kills every process
still inside the lab's namespaces by PID and deletes the namespaces (their links go with them),
and is safe to call on a lab that is half built or already gone.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import time
from typing import Any, Sequence

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

UNDERLAY = ipaddress.IPv4Network("198.18.0.0/24")
UNDERLAY6 = ipaddress.IPv6Network("2001:2:0:1::/64")
IFA_F_NODAD, IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x02, 0x08, 0x40  # linux/if_addr.h
ADDRESS_TIMEOUT = 10.0  # seconds for a lab's IPv6 addresses to leave the tentative state
MAX_HOSTS = 200  # 198.18.0.1 .. .200; higher addresses are for lab services (etcd, ...)
SERVICES = range(MAX_HOSTS + 1, 255)  # 198.18.0.201 .. .254
SERVICE_NAME = re.compile(r"[a-z][a-z0-9]{0,12}")  # its bridge port s-<name> fits IFNAMSIZ
# Every lab namespace with IPv6: no router advertisements; IPv6 on even where the machine's
# default turns it off (the defaults apply to links made or moved into the namespace later).
IPV6_SYSCTLS = [
    f"net.ipv6.conf.{dev}.{key}={value}"
    for dev in ("all", "default")
    for key, value in (("disable_ipv6", 0), ("accept_ra", 0))
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def address6(host: int) -> ipaddress.IPv6Address:
    """Host or service host ``host``'s IPv6 underlay address: 2001:2:0:1::<host in decimal>."""
    return ipaddress.IPv6Address(f"{UNDERLAY6.network_address}{host}")


class LabError(RuntimeError):
    """The lab could not be built; the message says why."""


class Lab:
    """N hosts as network namespaces on a bridge. A context manager: ``with Lab(...) as lab``."""

    def __init__(
        self, name: str = "ovl", hosts: int = 3, mtu: int = 1500, ipv6: bool = False, dual_stack: bool = False
    ) -> None:
        """``ipv6``: an IPv6-only underlay; ``dual_stack``: IPv4 and IPv6 (see the address plan)."""
        if not 1 <= hosts <= MAX_HOSTS:
            raise LabError(f"a lab has 1 to {MAX_HOSTS} hosts, not {hosts}")
        if not name.replace("-", "").isalnum() or len(name) > 20:
            raise LabError(f"lab name {name!r}: use up to 20 letters, digits and dashes")
        self.name, self.hosts, self.mtu = name, hosts, mtu
        self.has_ipv4 = dual_stack or not ipv6
        self.has_ipv6 = dual_stack or ipv6
        if self.has_ipv6 and mtu < 1280:
            raise LabError(f"an IPv6 underlay needs an MTU of 1280 or more, not {mtu}")
        self.switch = f"{name}-sw"
        self.procs: list[subprocess.Popen[Any]] = []
        self.services: dict[str, Address] = {}  # added with add_service: name -> its primary address
        self._service_hosts: dict[str, int] = {}  # name -> its host number (201 .. 254)

    def ns(self, host: int) -> str:
        return f"{self.name}-h{host}"

    def service_ns(self, service: str) -> str:
        return f"{self.name}-{service}"

    @property
    def family(self) -> str:
        """The underlay's kind: "ipv4", "ipv6" (IPv6 only) or "dual-stack"."""
        return "dual-stack" if self.has_ipv4 and self.has_ipv6 else "ipv6" if self.has_ipv6 else "ipv4"

    def _number(self, host: int | str) -> int:
        if isinstance(host, str):
            if host not in self._service_hosts:
                raise LabError(f"lab {self.name!r} has no service {host!r}")
            return self._service_hosts[host]
        return host

    def address(self, host: int | str) -> Address:
        """The primary underlay address of a host (or a service, by name): IPv6 in an IPv6-only
        lab, else IPv4."""
        return self.interfaces(host)[0].ip

    def address6(self, host: int | str) -> ipaddress.IPv6Address:
        """The IPv6 underlay address of a host (or a service, by name); LabError without IPv6."""
        if not self.has_ipv6:
            raise LabError(f"lab {self.name!r} has an IPv4 underlay only: Lab(..., ipv6=True) or dual_stack=True")
        return address6(self._number(host))

    def interfaces(self, host: int | str) -> list[Interface]:
        """The addresses on a host's (or service's) eth0 with their prefix, IPv4 first."""
        n = self._number(host)
        found: list[Interface] = []
        if self.has_ipv4:
            found.append(ipaddress.IPv4Interface(f"{UNDERLAY.network_address + n}/{UNDERLAY.prefixlen}"))
        if self.has_ipv6:
            found.append(ipaddress.IPv6Interface(f"{address6(n)}/{UNDERLAY6.prefixlen}"))
        return found

    def namespaces(self) -> list[str]:
        """This lab's namespaces that exist now, the switch last.

        Hosts by their exact names, service hosts by what this object added and by the switch's
        ``s-<name>`` ports (so ``overlay lab down`` in another process finds them too)."""
        services = set(self.services) | self._service_ports()
        mine = re.compile(
            rf"{re.escape(self.name)}-(h\d+|c-[a-z0-9]+|{'|'.join(map(re.escape, sorted(services)))})"
            if services
            else rf"{re.escape(self.name)}-(h\d+|c-[a-z0-9]+)"
        )
        found = [n for n in netns.listnetns() if mine.fullmatch(n)]
        return found + ([self.switch] if self.switch in netns.listnetns() else [])

    def _service_ports(self) -> set[str]:
        if self.switch not in netns.listnetns():
            return set()
        with NetNS(self.switch) as sw:
            names = (link.get("ifname") for link in sw.get_links())
            return {n[2:] for n in names if n and n.startswith("s-") and SERVICE_NAME.fullmatch(n[2:])}

    # --- building and tearing down -----------------------------------------------------------

    def up(self) -> Lab:
        if os.geteuid() != 0:
            raise LabError("building a lab needs root (network namespaces, veths, bridges)")
        if self.namespaces():
            raise LabError(f"lab {self.name!r} exists already: 'overlay lab down --name {self.name}' first")
        try:
            netns.create(self.switch)
            self._no_bridge_netfilter()
            self._ipv6_sysctls(self.switch)
            with NetNS(self.switch) as sw:
                # with IPv6 a plain switch: no MLD snooping, so neighbour discovery's multicast
                # reaches every port whatever reports it has (not) seen
                sw.link("add", ifname="br0", kind="bridge", **({"br_mcast_snooping": 0} if self.has_ipv6 else {}))
                sw.link("set", index=sw.link_lookup(ifname="br0")[0], state="up", mtu=self.mtu)
                sw.link("set", index=sw.link_lookup(ifname="lo")[0], state="up")
            for host in range(1, self.hosts + 1):
                self._add_host(host)
            self._wait_addresses([self.ns(h) for h in range(1, self.hosts + 1)])
        except Exception:
            self.down()
            raise
        return self

    def _no_bridge_netfilter(self) -> None:
        """The lab's bridge is a plain switch: where br_netfilter is loaded (Docker loads it),
        it would pass every bridged frame through iptables, a cost no real switch adds."""
        for table in ("iptables", "ip6tables", "arptables"):
            path = f"net.bridge.bridge-nf-call-{table}=0"
            subprocess.run(self.argv(self.switch, ["sysctl", "-q", "-w", path]), capture_output=True)

    def _ipv6_sysctls(self, ns: str) -> None:
        """In a lab with IPv6: IPv6 on and router advertisements ignored in namespace ``ns``,
        before its links arrive (they take the namespace's defaults)."""
        if not self.has_ipv6:
            return
        result = subprocess.run(self.argv(ns, ["sysctl", "-q", "-w", *IPV6_SYSCTLS]), capture_output=True, text=True)
        if result.returncode != 0:
            raise LabError(f"no IPv6 in namespace {ns} (is IPv6 disabled on this machine?): {result.stderr.strip()}")

    def _wait_addresses(self, namespaces: Sequence[str]) -> None:
        """Wait (bounded) until no IPv6 underlay address on eth0 in ``namespaces`` is tentative:
        NODAD addresses leave that state once the link has a carrier. LabError if DAD failed."""
        if not self.has_ipv6:
            return
        for ns in namespaces:
            with NetNS(ns) as h:
                idx = h.link_lookup(ifname="eth0")[0]
                try:
                    wait_for(
                        lambda h=h, idx=idx, ns=ns: self._addresses_ready(h, idx, ns),
                        ADDRESS_TIMEOUT,
                        f"the IPv6 address on eth0 in {ns} to leave the tentative state",
                    )
                except TimeoutError as e:
                    raise LabError(str(e)) from None

    @staticmethod
    def _addresses_ready(h: NetNS, idx: int, ns: str) -> bool:
        """Whether link ``idx`` has its IPv6 underlay addresses, none of them tentative."""
        flags = [
            a.get("IFA_FLAGS", a["flags"])
            for a in h.get_addr(family=socket.AF_INET6, index=idx)
            if ipaddress.IPv6Address(a.get("IFA_ADDRESS")) in UNDERLAY6
        ]
        if any(f & IFA_F_DADFAILED for f in flags):
            raise LabError(f"duplicate address detection failed on eth0 in {ns}")
        return bool(flags) and not any(f & IFA_F_TENTATIVE for f in flags)

    def add_service(self, service: str, host: int) -> str:
        """Add a service host to a lab that is up: namespace ``<lab>-<service>`` with
        eth0 = 198.18.0.<host>/24 (201 .. 254) and lo up, on the underlay bridge like the hosts
        but not an overlay host. Returns the namespace's name; ``down`` removes it."""
        if not SERVICE_NAME.fullmatch(service) or service == "sw" or re.fullmatch(r"h\d+", service):
            raise LabError(
                f"service name {service!r}: up to 13 lower-case letters and digits, "
                "starting with a letter, not 'sw' or h<number>"
            )
        if host not in SERVICES:
            raise LabError(f"a service host has 198.18.0.{SERVICES.start} .. .{SERVICES.stop - 1}, not .{host}")
        address = self.interfaces(host)[0].ip
        if service in self.services:
            raise LabError(f"lab {self.name!r} has a service {service!r} already")
        if host in self._service_hosts.values():
            raise LabError(f"lab {self.name!r} has a service at {address} already")
        if self.switch not in netns.listnetns():
            raise LabError(f"lab {self.name!r} is not up: add services after up()")
        self.services[service] = address  # first, so that down() finds a half-made one
        self._service_hosts[service] = host
        self._add_node(self.service_ns(service), host, port=f"s-{service}")
        self._wait_addresses([self.service_ns(service)])
        return self.service_ns(service)

    def container_ns(self, name: str) -> str:
        return f"{self.name}-c-{name}"

    def add_container(self, name: str) -> str:
        """A bare network namespace ``<lab>-c-<name>`` (lo up) standing in for a container, to
        attach to the overlay from a host; ``down`` removes it. Returns its name."""
        if not re.fullmatch(r"[a-z0-9]{1,12}", name):
            raise LabError(f"container name {name!r}: up to 12 lower-case letters and digits")
        ns = self.container_ns(name)
        netns.create(ns)
        with NetNS(ns) as c:
            c.link("set", index=c.link_lookup(ifname="lo")[0], state="up")
        return ns

    def _add_host(self, host: int) -> None:
        self._add_node(self.ns(host), host, port=f"h{host}")

    def _add_node(self, ns: str, host: int, port: str) -> None:
        """Namespace ``ns`` with eth0 = the host's addresses and lo up, its other end ``port`` on br0."""
        inside, outside = f"{self.name}-v{host}", f"{self.name}-p{host}"  # host numbers differ from services'
        if len(outside) > 15:
            raise LabError(f"lab name {self.name!r} is too long for interface {outside!r} (15 characters at most)")
        netns.create(ns)
        self._ipv6_sysctls(ns)
        with IPRoute() as ipr:  # make the pair in the root namespace, then move each end
            ipr.link("add", ifname=inside, kind="veth", peer={"ifname": outside})
            ipr.link("set", index=ipr.link_lookup(ifname=inside)[0], net_ns_fd=ns)
            ipr.link("set", index=ipr.link_lookup(ifname=outside)[0], net_ns_fd=self.switch)
        with NetNS(ns) as h:
            idx = h.link_lookup(ifname=inside)[0]
            h.link("set", index=idx, ifname="eth0", mtu=self.mtu)
            for iface in self.interfaces(host):
                nodad = {"flags": IFA_F_NODAD} if iface.version == 6 else {}
                h.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen, **nodad)
            h.link("set", index=idx, state="up")
            h.link("set", index=h.link_lookup(ifname="lo")[0], state="up")
        with NetNS(self.switch) as sw:
            idx = sw.link_lookup(ifname=outside)[0]
            sw.link("set", index=idx, ifname=port, mtu=self.mtu)
            sw.link("set", index=idx, master=sw.link_lookup(ifname="br0")[0], state="up")

    def down(self) -> None:
        """Kill what runs in the lab (by PID), delete its namespaces. Idempotent."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        for ns in self.namespaces():
            for pid in self._pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            netns.remove(ns)
        self.services.clear()
        self._service_hosts.clear()
        leftover = re.compile(rf"{re.escape(self.name)}-[vp]\d+")  # a veth left in the root namespace
        with IPRoute() as ipr:  # by a failed up() or add_service()
            for link in ipr.get_links():
                if leftover.fullmatch(link.get("ifname") or ""):
                    try:
                        ipr.link("del", index=link["index"])
                    except NetlinkError:  # its peer went first and took it along
                        pass

    @staticmethod
    def _pids(ns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- running things in hosts ---------------------------------------------------------------

    def argv(self, host: int | str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` in ``host``: a host number, a service's name or any namespace's name."""
        ns = self.service_ns(host) if host in self.services else host if isinstance(host, str) else self.ns(host)
        return ["ip", "netns", "exec", ns, *cmd]

    def run(
        self, host: int | str, cmd: Sequence[str], timeout: float = 60, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in ``host`` to completion (bounded by ``timeout``)."""
        result = subprocess.run(self.argv(host, cmd), capture_output=True, text=True, timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise LabError(f"{' '.join(cmd)} in {host} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def spawn(self, host: int | str, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` in ``host``; ``down`` kills it if it is still running."""
        proc = subprocess.Popen(self.argv(host, cmd), **kw)
        self.procs.append(proc)
        return proc


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something true; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
