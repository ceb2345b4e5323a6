"""Containers attached to this host's networks: attach, detach, check, and what survives restarts.

The agent owns attachments because it owns the lease: a container's address (IPAM key) and
endpoint are written under the agent's lease, so when a host dies its containers' addresses
come back to the pool when the lease expires. `overlay attach` and the CNI plugin ask the
agent over its control socket (overlay/control.py); this module does the work:

    attach: resolve the network -> claim an address (etcd transaction; lowest free first,
            the loser of a race takes the next) -> veth into the container (overlay/bridge.py)
            -> publish the endpoint (MAC, address, this host) -> remember it in the state file
    detach: remove the veth -> delete endpoint and address -> forget it

Attachments are remembered in ``<state_dir>/<host-id>.json`` so an agent restarted by systemd
takes its containers back (their veths outlive it); a container whose veth vanished (its
namespace was deleted) is noticed within two seconds and its address and endpoint released.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from overlay import bridge, ipam
from overlay.control import Refused
from overlay.etcdclient import ERRORS as ETCD_ERRORS
from overlay.etcdclient import EtcdClient
from overlay.registry import AddressKey, Allocation, Endpoint, EndpointKey, Network, Registry
from overlay.wire import mac_to_int, mac_to_str

log = logging.getLogger("overlay.containers")
CLAIM_TRIES = 64
REAP_EVERY = 2.0


@dataclass(frozen=True)
class Attachment:
    id: str  # who asked: "cni/<container id>/<ifname>", or "netns/<inode>/<ifname>" for overlay attach
    vni: int
    network: str
    netns: str
    ifname: str
    host_ifname: str
    mac: str
    address: str  # A.B.C.D/len
    gateway: str | None
    mtu: int

    def plug(self) -> bridge.Plug:
        return bridge.Plug(self.netns, self.ifname, self.host_ifname, bridge.bridge_name(self.vni),
                           mac_to_int(self.mac), ipaddress.IPv4Interface(self.address),
                           ipaddress.IPv4Address(self.gateway) if self.gateway else None, self.mtu)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def netns_id(path: str) -> str:
    """A name for a network namespace that does not depend on how it was named (netns name,
    path or PID all lead to the same inode)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise Refused(f"no network namespace at {path} ({e.strerror}): is the container running?", "netns") from None
    return f"{st.st_dev}:{st.st_ino}"


class Containers:
    """This host's attachments, and the control commands that change them."""

    def __init__(self, client: EtcdClient, registry: Registry, host_id: str, vnis: list[int], mtu: int,
                 state_dir: Path | None, forget_local: Callable[[int, int], None]) -> None:
        self.client, self.registry, self.host_id = client, registry, host_id
        self.vnis, self.mtu = vnis, mtu
        self.state = state_dir / f"{host_id}.json" if state_dir else None
        self.forget_local = forget_local  # the fast path's memory of MACs seen behind our TAP
        self.attached: dict[str, Attachment] = {}
        self._lock = asyncio.Lock()  # one change at a time: IPAM picks must see each other

    # --- control commands ------------------------------------------------------------------

    async def attach(self, req: dict[str, Any]) -> dict[str, Any]:
        netns = _text(req, "netns", required=True)
        ifname = _text(req, "ifname") or "eth0"
        vni, network = self._network(_text(req, "net", required=True))
        attachment_id = _text(req, "id") or f"netns/{netns_id(netns)}/{ifname}"
        async with self._lock:
            existing = self.attached.get(attachment_id)
            if existing is not None:
                if existing.vni == vni and await asyncio.to_thread(bridge.exists, existing.host_ifname):
                    return existing.to_json()  # asked twice: the same answer
                raise Refused(f"{attachment_id} is already attached to network {existing.network}: detach it first",
                              "invalid")
            mac = self._mac(_text(req, "mac"), vni)
            address = await self._claim(vni, network, _text(req, "ip"), mac, attachment_id)
            gateway = _text(req, "gateway") or network.gateway
            if gateway is not None:
                try:
                    gw = ipaddress.IPv4Address(gateway)
                except ValueError:
                    await self._release_address(vni, address)
                    raise Refused(f"--gateway {gateway!r} is not an IPv4 address", "invalid") from None
                if gw not in address.network:
                    await self._release_address(vni, address)
                    raise Refused(f"--gateway {gw} is outside the container's subnet {address.network}", "address")
            a = Attachment(attachment_id, vni, network.name or str(vni), netns, ifname,
                           bridge.host_ifname(attachment_id), mac, str(address), gateway,
                           network.mtu or self.mtu)
            try:
                await asyncio.to_thread(bridge.plug, a.plug())
            except bridge.PlumbingError as e:
                await self._release_address(vni, address)
                raise Refused(str(e), e.kind) from None
            except BaseException:
                await self._release_address(vni, address)
                raise
            await self.client.hold(EndpointKey(vni, mac_to_int(mac)), Endpoint(self.host_id, [str(address.ip)]))
            self.attached[a.id] = a
            self._save()
        log.info("attached %s: %s %s on network %s (%s) via %s", a.id, a.mac, a.address, a.network, a.vni, a.host_ifname)
        return a.to_json()

    async def detach(self, req: dict[str, Any]) -> dict[str, Any]:
        """Detach by id, or by netns (and ifname); nothing attached is not an error (CNI DEL
        must be idempotent)."""
        attachment_id = _text(req, "id")
        ifname = _text(req, "ifname")
        netns = _text(req, "netns")
        if attachment_id is None and netns is None:
            raise Refused("say what to detach: a namespace (netns) or an attachment id", "invalid")
        async with self._lock:
            if attachment_id is not None:
                chosen = [self.attached[attachment_id]] if attachment_id in self.attached else []
            else:
                assert netns is not None
                try:
                    prefix = f"netns/{netns_id(netns)}/"
                except Refused:  # the namespace is gone: what was attached by that path
                    prefix = "\0"
                chosen = [a for a in self.attached.values()
                          if (a.id.startswith(prefix) or a.netns == netns) and (ifname is None or a.ifname == ifname)]
            for a in chosen:
                await self._remove(a, unplug=True)
        return {"detached": [a.to_json() for a in chosen]}

    async def check(self, req: dict[str, Any]) -> dict[str, Any]:
        attachment_id = _text(req, "id", required=True)
        a = self.attached.get(attachment_id)
        if a is None:
            raise Refused(f"{attachment_id} is not attached on this host", "unknown")
        problems = await asyncio.to_thread(bridge.problems, a.plug())
        endpoint = self.registry.get(EndpointKey(a.vni, mac_to_int(a.mac)))
        if not isinstance(endpoint, Endpoint) or endpoint.host != self.host_id:
            problems.append(f"the registry does not have endpoint {a.mac} on this host")
        if problems:
            raise Refused(f"{a.id} is broken: " + "; ".join(problems), "broken")
        return a.to_json()

    def list(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        return [a.to_json() for a in self.attached.values()]

    # --- lifecycle ---------------------------------------------------------------------------

    async def adopt(self) -> None:
        """Take back the attachments of an earlier run whose veths still exist."""
        if self.state is None or not self.state.exists():
            return
        try:
            saved = [Attachment(**a) for a in json.loads(self.state.read_text())]
        except (OSError, ValueError, TypeError) as e:
            log.warning("state file %s is unreadable (%s); starting without attachments", self.state, e)
            return
        for a in saved:
            if a.vni not in self.vnis or not await asyncio.to_thread(bridge.exists, a.host_ifname):
                log.info("not adopting %s: its network or veth is gone", a.id)
                continue
            address = ipaddress.IPv4Interface(a.address)
            if not await self.client.claim(AddressKey(a.vni, address.ip), Allocation(self.host_id, a.mac, a.id)):
                owner = self.registry.get(AddressKey(a.vni, address.ip))
                if not (isinstance(owner, Allocation) and owner.owner == a.id and owner.host == self.host_id):
                    log.warning("not adopting %s: address %s was taken meanwhile; detaching it", a.id, address.ip)
                    await asyncio.to_thread(bridge.unplug, a.host_ifname)
                    continue
            await asyncio.to_thread(bridge.replug, a.host_ifname, bridge.bridge_name(a.vni), mac_to_int(a.mac))
            await self.client.hold(EndpointKey(a.vni, mac_to_int(a.mac)), Endpoint(self.host_id, [str(address.ip)]))
            self.attached[a.id] = a
            log.info("adopted %s: %s %s on network %s", a.id, a.mac, a.address, a.network)
        self._save()

    async def reap(self) -> None:
        """Forever: release the attachments whose veth vanished (the container's namespace
        was deleted without a detach)."""
        while True:
            await asyncio.sleep(REAP_EVERY)
            for a in list(self.attached.values()):
                if not await asyncio.to_thread(bridge.exists, a.host_ifname):
                    async with self._lock:
                        if self.attached.get(a.id) is a:
                            log.info("container of %s is gone; releasing %s and %s", a.id, a.address, a.mac)
                            try:
                                await self._remove(a, unplug=False)
                            except ETCD_ERRORS as e:
                                log.warning("releasing %s failed (%s); trying again", a.id, e.__class__.__name__)

    # --- helpers -----------------------------------------------------------------------------

    def _network(self, name: str) -> tuple[int, Network]:
        networks = self.registry.networks()
        vni = next((v for v, n in networks.items() if n.name == name), None)
        if vni is None and name.isdigit():
            vni = int(name)
        if vni is None or (vni not in networks and vni not in self.vnis):
            known = ", ".join(f"{n.name or v} ({v})" for v, n in sorted(networks.items())) or "none"
            raise Refused(f"network {name!r} is unknown; networks in the registry: {known} "
                          f"(create one with 'overlay net create')", "network")
        if vni not in self.vnis:
            raise Refused(f"this host's agent is not on network {name} (VNI {vni}): start it with --network {vni}",
                          "network")
        return vni, networks.get(vni) or Network(vni, str(vni))

    def _mac(self, wanted: str | None, vni: int) -> str:
        if wanted is None:
            return mac_to_str(bridge.random_mac())
        try:
            mac = mac_to_int(wanted)
        except ValueError:
            raise Refused(f"--mac {wanted!r} is not a MAC address like 02:42:c6:13:00:05", "invalid") from None
        if mac >> 40 & 1 or mac == 0:
            raise Refused(f"--mac {wanted} is a multicast or zero address: containers need a unicast MAC", "invalid")
        owner = self.registry.get(EndpointKey(vni, mac))
        if isinstance(owner, Endpoint) and owner.host != self.host_id:
            raise Refused(f"MAC {mac_to_str(mac)} is in use on network {vni} by host {owner.host}: detach it there "
                          f"first, or choose another --mac", "address")
        if any(a.vni == vni and a.mac == mac_to_str(mac) for a in self.attached.values()):
            raise Refused(f"MAC {mac_to_str(mac)} is already attached here on network {vni}", "address")
        return mac_to_str(mac)

    async def _claim(self, vni: int, network: Network, wanted: str | None, mac: str,
                     owner: str) -> ipaddress.IPv4Interface:
        allocation = Allocation(self.host_id, mac, owner)
        try:
            if wanted is not None:
                try:
                    address = ipaddress.IPv4Interface(wanted)
                except ValueError:
                    raise Refused(f"--ip {wanted!r} is not an address with a prefix length like 198.19.1.5/24",
                                  "invalid") from None
                if "/" not in wanted and network.subnet:
                    address = ipaddress.IPv4Interface(f"{address.ip}/{ipaddress.IPv4Network(network.subnet).prefixlen}")
                if network.subnet is not None:
                    ipam.check(network, address, ipam.taken(self.registry, vni))
                if not await self.client.claim(AddressKey(vni, address.ip), allocation):
                    raise Refused(f"address {address.ip} is in use on network {network.name or vni}: pick another, "
                                  f"or leave out --ip to get a free one", "address")
                return address
            lost: set[ipaddress.IPv4Address] = set()
            for _ in range(CLAIM_TRIES):
                address = ipam.pick(network, ipam.taken(self.registry, vni) | lost)
                if await self.client.claim(AddressKey(vni, address.ip), allocation):
                    return address
                lost.add(address.ip)  # another host got it first: take the next
        except ipam.IpamError as e:
            raise Refused(str(e), e.kind) from None
        raise Refused(f"could not claim an address on network {network.name or vni} after {CLAIM_TRIES} tries "
                      f"(many hosts allocating at once?): try again", "address")

    async def _release_address(self, vni: int, address: ipaddress.IPv4Interface) -> None:
        await self.client.release(AddressKey(vni, address.ip))

    async def _remove(self, a: Attachment, unplug: bool) -> None:
        if unplug:
            await asyncio.to_thread(bridge.unplug, a.host_ifname)
        mac = mac_to_int(a.mac)
        await self.client.release(EndpointKey(a.vni, mac))
        await self._release_address(a.vni, ipaddress.IPv4Interface(a.address))
        self.forget_local(a.vni, mac)
        del self.attached[a.id]
        self._save()
        log.info("detached %s: %s %s from network %s", a.id, a.mac, a.address, a.network)

    def _save(self) -> None:
        """Write the attachments atomically (a crash mid-write keeps the old file)."""
        if self.state is None:
            return
        try:
            self.state.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state.with_suffix(".tmp")
            tmp.write_text(json.dumps([a.to_json() for a in self.attached.values()], indent=1))
            os.replace(tmp, self.state)
        except OSError as e:
            log.warning("cannot write the state file %s (%s): attachments will not survive a restart",
                        self.state, e.strerror)


def _text(req: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = req.get(name)
    if value is None or value == "":
        if required:
            raise Refused(f"missing {name}", "invalid")
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise Refused(f"{name} must be a string, not {type(value).__name__}", "invalid")
    return value
