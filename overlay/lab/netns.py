"""A lab of hosts on one machine: network namespaces on an underlay bridge in 198.18.0.0/24.

Used by the tests, the demo and the benchmarks (DESIGN.md, lab conventions)::

    <name>-sw   the "switch": bridge br0, one port per host (h1, h2, ...)
    <name>-h1   host 1: eth0 = 198.18.0.1/24, lo up
    <name>-h2   host 2: eth0 = 198.18.0.2/24 ...
    <name>-etcd1  a service host (``add_service("etcd1", 250)``): eth0 = 198.18.0.250/24, lo up,
                on the same bridge (port s-etcd1) but not an overlay host: etcd and the like

Hosts have 198.18.0.1 .. .200, service hosts .201 .. .254. Built with pyroute2 (netlink,
structured errors). Commands run inside a host with ``ip netns exec``, which also gives the
command the namespace's own /sys. ``down`` kills every process still inside the lab's
namespaces by PID and deletes the namespaces (their links go with them), and is safe to call on
a lab that is half built or already gone.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import time
from typing import Any, Sequence

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

UNDERLAY = ipaddress.IPv4Network("198.18.0.0/24")
MAX_HOSTS = 200  # 198.18.0.1 .. .200; higher addresses are for lab services (etcd, ...)
SERVICES = range(MAX_HOSTS + 1, 255)  # 198.18.0.201 .. .254
SERVICE_NAME = re.compile(r"[a-z][a-z0-9]{0,12}")  # its bridge port s-<name> fits IFNAMSIZ


class LabError(RuntimeError):
    """The lab could not be built; the message says why."""


class Lab:
    """N hosts as network namespaces on a bridge. A context manager: ``with Lab(...) as lab``."""

    def __init__(self, name: str = "ovl", hosts: int = 3, mtu: int = 1500) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise LabError(f"a lab has 1 to {MAX_HOSTS} hosts, not {hosts}")
        if not name.replace("-", "").isalnum() or len(name) > 20:
            raise LabError(f"lab name {name!r}: use up to 20 letters, digits and dashes")
        self.name, self.hosts, self.mtu = name, hosts, mtu
        self.switch = f"{name}-sw"
        self.procs: list[subprocess.Popen[Any]] = []
        self.services: dict[str, ipaddress.IPv4Address] = {}  # added with add_service, by name

    def ns(self, host: int) -> str:
        return f"{self.name}-h{host}"

    def service_ns(self, service: str) -> str:
        return f"{self.name}-{service}"

    def address(self, host: int) -> ipaddress.IPv4Address:
        return UNDERLAY.network_address + host

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
            with NetNS(self.switch) as sw:
                sw.link("add", ifname="br0", kind="bridge")
                sw.link("set", index=sw.link_lookup(ifname="br0")[0], state="up", mtu=self.mtu)
                sw.link("set", index=sw.link_lookup(ifname="lo")[0], state="up")
            for host in range(1, self.hosts + 1):
                self._add_host(host)
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
        address = self.address(host)
        if service in self.services:
            raise LabError(f"lab {self.name!r} has a service {service!r} already")
        if address in self.services.values():
            raise LabError(f"lab {self.name!r} has a service at {address} already")
        if self.switch not in netns.listnetns():
            raise LabError(f"lab {self.name!r} is not up: add services after up()")
        self.services[service] = address  # first, so that down() finds a half-made one
        self._add_node(self.service_ns(service), host, port=f"s-{service}")
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
        """Namespace ``ns`` with eth0 = 198.18.0.<host>/24 and lo up, its other end ``port`` on br0."""
        inside, outside = f"{self.name}-v{host}", f"{self.name}-p{host}"  # host numbers differ from services'
        if len(outside) > 15:
            raise LabError(f"lab name {self.name!r} is too long for interface {outside!r} (15 characters at most)")
        netns.create(ns)
        with IPRoute() as ipr:  # make the pair in the root namespace, then move each end
            ipr.link("add", ifname=inside, kind="veth", peer={"ifname": outside})
            ipr.link("set", index=ipr.link_lookup(ifname=inside)[0], net_ns_fd=ns)
            ipr.link("set", index=ipr.link_lookup(ifname=outside)[0], net_ns_fd=self.switch)
        with NetNS(ns) as h:
            idx = h.link_lookup(ifname=inside)[0]
            h.link("set", index=idx, ifname="eth0", mtu=self.mtu)
            h.addr("add", index=idx, address=str(self.address(host)), prefixlen=UNDERLAY.prefixlen)
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
