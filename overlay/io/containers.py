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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from pyroute2.netlink.exceptions import NetlinkError

from overlay.io import bridge
from overlay.core import ipam
from overlay.io.control import Refused
from overlay.io.etcd import ERRORS, EtcdClient, EtcdError
from overlay.core.registry import AddressKey, Allocation, Endpoint, EndpointKey, Network, Registry
from overlay.core.wire import mac_to_int, mac_to_str, unicast_mac

log = logging.getLogger("overlay.containers")
ETCD_ERRORS = (*ERRORS, EtcdError)  # etcd away, or refusing (a role revoked)
CLAIM_TRIES = 64
REAP_EVERY = 2.0
DETACH_GRACE = 10.0  # seconds a detached MAC's late frames are not taken for a new local endpoint


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
        nsfs = os.stat("/proc/self/ns/net").st_dev
    except PermissionError as e:
        raise Refused(f"the agent may not open {path} ({e.strerror}): entering another process's namespace by PID "
                      f"needs CAP_SYS_PTRACE (and CAP_SYS_ADMIN); or give a namespace path or name", "netns") from None
    except OSError as e:
        raise Refused(f"no network namespace at {path} ({e.strerror}): is the container running?", "netns") from None
    if st.st_dev != nsfs:
        raise Refused(f"{path} is not a network namespace: give a name from 'ip netns', a path like "
                      f"/run/netns/NAME or /proc/PID/ns/net, or a PID", "netns")
    return f"{st.st_dev}:{st.st_ino}"


class Containers:
    """This host's attachments, and the control commands that change them."""

    def __init__(self, client: EtcdClient, registry: Registry, host_id: str, vnis: list[int], mtu: int,
                 state_dir: Path | None, forget_local: Callable[[int, int], None]) -> None:
        self.client, self.registry, self.host_id = client, registry, host_id
        self.vnis, self.mtu = vnis, mtu
        self.state = state_path(state_dir, host_id) if state_dir else None
        self.forget_local = forget_local  # the fast path's memory of MACs seen behind our TAP
        self.attached: dict[str, Attachment] = {}
        self._attaching: set[tuple[int, int]] = set()  # (vni, MAC) plugged but not yet recorded
        self._detached: dict[tuple[int, int], float] = {}  # (vni, MAC) -> when: its frames may still be queued
        self.lock = asyncio.Lock()  # one change at a time: IPAM picks must see each other

    # --- control commands ------------------------------------------------------------------

    async def attach(self, req: dict[str, Any]) -> dict[str, Any]:
        netns = _text(req, "netns", required=True)
        assert netns is not None
        ifname = _text(req, "ifname") or "eth0"
        vni, network = self._network(_text(req, "net", required=True))
        if netns_id(netns) == netns_id("/proc/self/ns/net"):
            raise Refused(f"{netns} is the agent's own network namespace (the host's): attach containers, "
                          f"not the host", "netns")
        attachment_id = _text(req, "id") or f"netns/{netns_id(netns)}/{ifname}"
        gateway = self._gateway(_text(req, "gateway") or network.gateway, network)
        self._connected()
        async with self.lock:
            existing = self.attached.get(attachment_id)
            if existing is not None:
                if existing.vni == vni and await asyncio.to_thread(bridge.exists, existing.host_ifname):
                    return existing.to_json()  # asked twice: the same answer
                raise Refused(f"{attachment_id} is already attached to network {existing.network}: detach it first",
                              "invalid")
            mac = self._mac(_text(req, "mac"), vni)
            try:
                address = await self._claim(vni, network, _text(req, "ip"), mac, attachment_id, gateway)
            except ETCD_ERRORS as e:
                raise _etcd_refusal(e) from None
            if gateway is not None and gateway not in address.network:
                await self._quietly(self._release_address(vni, address))
                raise Refused(f"--gateway {gateway} is outside the container's subnet {address.network}", "address")
            a = Attachment(attachment_id, vni, network.name or str(vni), netns, ifname,
                           bridge.host_ifname(attachment_id), mac, str(address), str(gateway) if gateway else None,
                           min(network.mtu or self.mtu, self.mtu))  # never above the TAP's: the bridge would drop
            endpoint = EndpointKey(vni, mac_to_int(mac))
            self._attaching.add((vni, endpoint.mac))
            try:
                await asyncio.to_thread(bridge.plug, a.plug())
                await self.client.hold(endpoint, Endpoint(self.host_id, [str(address.ip)]))
            except BaseException as e:  # nothing left behind: veth, endpoint, address
                await asyncio.shield(self._undo(a, endpoint, address))
                if isinstance(e, bridge.PlumbingError):
                    raise Refused(str(e), e.kind) from None
                if isinstance(e, ETCD_ERRORS):
                    raise _etcd_refusal(e) from None
                raise
            finally:
                self._attaching.discard((vni, endpoint.mac))
            self.attached[a.id] = a
            self._save()
        log.info("attached %s: %s %s on network %s (%s) via %s", a.id, a.mac, a.address, a.network, a.vni, a.host_ifname)
        return a.to_json()

    def owns(self, vni: int, mac: int) -> bool:
        """Whether ``mac`` on ``vni`` is (or just was) an attached container's: attach publishes
        its endpoint, and a frame it sent before a detach, read from the TAP after it, must not
        publish it again."""
        if (vni, mac) in self._attaching or any(a.vni == vni and mac_to_int(a.mac) == mac
                                                for a in self.attached.values()):
            return True
        when = self._detached.get((vni, mac))
        return when is not None and time.monotonic() - when < DETACH_GRACE

    async def _undo(self, a: Attachment, endpoint: EndpointKey, address: ipaddress.IPv4Interface) -> None:
        """Roll back a half-made attach; errors here must not hide the one that caused it."""
        await self._quietly(asyncio.to_thread(bridge.unplug, a.host_ifname))
        await self._quietly(self.client.release(endpoint))  # it may have been written before the failure
        self.client.forget(endpoint)  # and if etcd did not answer, it must not be written later
        await self._quietly(self._release_address(a.vni, address))

    @staticmethod
    async def _quietly(step: Any) -> None:
        try:
            await step
        except Exception as e:
            log.warning("rolling back an attach: %s (%s)", e.__class__.__name__, e)

    def _connected(self) -> None:
        if not self.client.connected:
            raise Refused("the registry (etcd) is unreachable from this agent, so addresses and endpoints "
                          "cannot be written: try again when 'overlay status' shows it connected", "etcd")

    async def detach(self, req: dict[str, Any]) -> dict[str, Any]:
        """Detach by id, or by netns (and ifname); nothing attached is not an error (CNI DEL
        must be idempotent)."""
        attachment_id = _text(req, "id")
        ifname = _text(req, "ifname")
        netns = _text(req, "netns")
        if attachment_id is None and netns is None:
            raise Refused("say what to detach: a namespace (netns) or an attachment id", "invalid")
        async with self.lock:
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
                try:
                    await self._remove(a, unplug=True)
                except ETCD_ERRORS as e:
                    # The container is off the network; its address and endpoint stay held until
                    # etcd answers again: the reaper (its veth is gone) releases them then.
                    log.warning("detached %s, but etcd did not answer (%s): its address and endpoint are "
                                "released once it does", a.id, e.__class__.__name__)
                except bridge.PlumbingError as e:
                    raise Refused(str(e), e.kind) from None
        return {"detached": [a.to_json() for a in chosen]}

    async def check(self, req: dict[str, Any]) -> dict[str, Any]:
        attachment_id = _text(req, "id", required=True)
        a = self.attached.get(attachment_id)
        if a is None:
            raise Refused(f"{attachment_id} is not attached on this host", "unknown")
        try:
            problems = await asyncio.to_thread(bridge.problems, a.plug())
        except (bridge.PlumbingError, OSError, NetlinkError) as e:
            problems = [str(e)]
        endpoint = self.registry.get(EndpointKey(a.vni, mac_to_int(a.mac)))
        if not isinstance(endpoint, Endpoint) or endpoint.host != self.host_id:
            problems.append(f"the registry does not have endpoint {a.mac} on this host")
        allocation = self.registry.get(AddressKey(a.vni, ipaddress.IPv4Interface(a.address).ip))
        if not isinstance(allocation, Allocation) or allocation.host != self.host_id:
            problems.append(f"address {a.address} is not held by this host in the registry")
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
            saved = [Attachment(**a) for a in read_state(self.state)[1]]
        except (OSError, ValueError, TypeError) as e:
            log.warning("state file %s is unreadable (%s); starting without attachments", self.state, e)
            return
        for a in saved:
            try:
                await self._adopt(a)
            except Exception as e:  # one bad record must not stop the agent or the others
                log.warning("not adopting %s: %s (%s)", a.id, e.__class__.__name__, e)
        self._save()

    async def _adopt(self, a: Attachment) -> None:
        if a.vni not in self.vnis or not await asyncio.to_thread(bridge.exists, a.host_ifname):
            log.info("not adopting %s: its network or veth is gone", a.id)
            return
        address = ipaddress.IPv4Interface(a.address)
        key, allocation = AddressKey(a.vni, address.ip), Allocation(self.host_id, a.mac, a.id)
        if not await self.client.claim(key, allocation):
            owner = self.registry.get(key)
            if owner != allocation:
                log.warning("not adopting %s: address %s was taken meanwhile; unplugging it", a.id, address.ip)
                await asyncio.to_thread(bridge.unplug, a.host_ifname)
                return
            await self.client.hold(key, allocation)  # ours from before: under the new lease now
        await asyncio.to_thread(bridge.replug, a.host_ifname, bridge.bridge_name(a.vni), mac_to_int(a.mac))
        await self.client.hold(EndpointKey(a.vni, mac_to_int(a.mac)), Endpoint(self.host_id, [str(address.ip)]))
        self.attached[a.id] = a
        log.info("adopted %s: %s %s on network %s", a.id, a.mac, a.address, a.network)

    def stopping(self, lease: int | None) -> bool:
        """The agent stops. With containers attached, keep the lease alive (True): their
        addresses and endpoints stay claimed for the lease's TTL, and a restarted agent resumes
        the lease, so no other host can take an address meanwhile."""
        keep = bool(self.attached) and lease is not None
        self._save(lease if keep else None)
        return keep

    async def reap(self) -> None:
        """Forever: release the attachments whose veth vanished (the container's namespace
        was deleted without a detach)."""
        while True:
            await asyncio.sleep(REAP_EVERY)
            for a in list(self.attached.values()):
                if not await asyncio.to_thread(bridge.exists, a.host_ifname):
                    async with self.lock:
                        if self.attached.get(a.id) is a:
                            log.info("container of %s is gone; releasing %s and %s", a.id, a.address, a.mac)
                            try:
                                await self._remove(a, unplug=False)
                            except ETCD_ERRORS as e:
                                log.warning("releasing %s failed (%s); trying again", a.id, e.__class__.__name__)

    # --- helpers -----------------------------------------------------------------------------

    def _network(self, name: str) -> tuple[int, Network]:
        networks = self.registry.networks()
        named = [v for v, n in networks.items() if n.name == name]
        if name.isdigit() and (int(name) in networks or int(name) in self.vnis):
            vni: int | None = int(name)  # a VNI first: names are for people, and need not be unique
        elif len(named) > 1:
            raise Refused(f"several networks are named {name!r} (VNIs {', '.join(map(str, sorted(named)))}): "
                          f"give the VNI", "network")
        else:
            vni = named[0] if named else (int(name) if name.isdigit() else None)
        if vni is None or (vni not in networks and vni not in self.vnis):
            known = ", ".join(f"{n.name or v} ({v})" for v, n in sorted(networks.items())) or "none"
            raise Refused(f"network {name!r} is unknown; networks in the registry: {known} "
                          f"(create one with 'overlay net create')", "network")
        if vni not in self.vnis:
            raise Refused(f"this host's agent is not on network {name} (VNI {vni}): start it with --network {vni}",
                          "network")
        return vni, networks.get(vni) or Network(vni, str(vni))

    @staticmethod
    def _gateway(text: str | None, network: Network) -> ipaddress.IPv4Address | None:
        if text is None:
            return None
        try:
            gateway = ipaddress.IPv4Address(text)
        except ValueError:
            raise Refused(f"--gateway {text!r} is not an IPv4 address", "invalid") from None
        if network.subnet is not None:
            subnet = ipaddress.IPv4Network(network.subnet)
            if gateway not in subnet:
                raise Refused(f"--gateway {gateway} is outside the container's subnet {subnet}", "address")
            if gateway in (subnet.network_address, subnet.broadcast_address):
                raise Refused(f"--gateway {gateway} is the network or broadcast address of {subnet}", "address")
        return gateway

    def _mac(self, wanted: str | None, vni: int) -> str:
        if wanted is None:
            return mac_to_str(bridge.random_mac())
        try:
            mac = unicast_mac(wanted)
        except ValueError as e:
            raise Refused(f"--mac {e}", "invalid") from None
        owner = self.registry.get(EndpointKey(vni, mac))
        if isinstance(owner, Endpoint) and owner.host != self.host_id:
            raise Refused(f"MAC {mac_to_str(mac)} is in use on network {vni} by host {owner.host}: detach it there "
                          f"first, or choose another --mac", "address")
        if any(a.vni == vni and a.mac == mac_to_str(mac) for a in self.attached.values()):
            raise Refused(f"MAC {mac_to_str(mac)} is already attached here on network {vni}", "address")
        return mac_to_str(mac)

    async def _claim(self, vni: int, network: Network, wanted: str | None, mac: str, owner: str,
                     gateway: ipaddress.IPv4Address | None) -> ipaddress.IPv4Interface:
        allocation = Allocation(self.host_id, mac, owner)
        used = ipam.taken(self.registry, vni) | ({gateway} if gateway else set())  # never the route out
        try:
            if wanted is not None:
                try:
                    address = ipaddress.IPv4Interface(wanted)
                except ValueError:
                    raise Refused(f"--ip {wanted!r} is not an address with a prefix length like 198.19.1.5/24",
                                  "invalid") from None
                if "/" not in wanted:
                    if not network.subnet:
                        raise Refused(f"--ip {wanted}: give the prefix length too (network {network.name or vni} "
                                      f"has no subnet to take it from)", "invalid")
                    address = ipaddress.IPv4Interface(f"{address.ip}/{ipaddress.IPv4Network(network.subnet).prefixlen}")
                if network.subnet is not None:
                    ipam.check(network, address, used)
                if not await self.client.claim(AddressKey(vni, address.ip), allocation):
                    raise Refused(f"address {address.ip} is in use on network {network.name or vni}: pick another, "
                                  f"or leave out --ip to get a free one", "address")
                return address
            lost: set[ipaddress.IPv4Address] = set()
            for _ in range(CLAIM_TRIES):
                address = ipam.pick(network, used | lost)
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
        self._detached = {k: t for k, t in self._detached.items() if time.monotonic() - t < DETACH_GRACE}
        self._detached[a.vni, mac] = time.monotonic()  # first: a late frame must not publish it again
        self.forget_local(a.vni, mac)
        await self.client.release(EndpointKey(a.vni, mac))
        await self._release_address(a.vni, ipaddress.IPv4Interface(a.address))
        del self.attached[a.id]
        self._save()
        log.info("detached %s: %s %s from network %s", a.id, a.mac, a.address, a.network)

    def _save(self, lease: int | None = None) -> None:
        """Write the attachments atomically (a crash mid-write keeps the old file), with the
        lease a successor may resume (only when stopping: see ``stopping``)."""
        if self.state is None:
            return
        try:
            self.state.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state.with_suffix(".tmp")
            state = {"lease": lease, "attachments": [a.to_json() for a in self.attached.values()]}
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, self.state)
        except OSError as e:
            log.warning("cannot write the state file %s (%s): attachments will not survive a restart",
                        self.state, e.strerror)


def state_path(state_dir: Path, host_id: str) -> Path:
    """Where a host's agent remembers its attachments (and, when stopped, its lease)."""
    return state_dir / f"{host_id}.json"


def read_state(path: Path) -> tuple[int | None, list[dict[str, Any]]]:
    """(lease to resume, attachments) from a state file; (None, []) if there is none."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, []
    if isinstance(data, list):  # the first format: attachments only
        return None, data
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    lease = data.get("lease")
    return (lease if isinstance(lease, int) else None), list(data.get("attachments") or [])


def _etcd_refusal(e: BaseException) -> Refused:
    return Refused(f"the registry (etcd) did not answer ({e.__class__.__name__}): try again", "etcd")


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
