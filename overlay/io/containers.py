"""Containers attached to this host's networks: attach, detach, check, and what survives restarts.

The agent owns attachments because it owns the lease: a container's address (IPAM key) and
endpoint are written under the agent's lease, so when a host dies its containers' addresses
come back to the pool when the lease expires. `overlay attach` and the CNI plugin ask the
agent over its control socket (overlay/io/control.py). What to do is decided in
overlay/core/attach.py, as plans of steps; this module gathers the facts those decisions need
(namespace ids, whether a veth exists, a random MAC, the clock) and executes the steps:

    attach: resolve the network -> claim its addresses, IPv4 and IPv6 (one etcd transaction;
            lowest free first, the loser of a race takes the next) -> veth into the container
            (overlay/io/bridge.py) -> publish the endpoint (MAC, addresses, this host) ->
            remember it in the state file;
            a failure undoes what was done (each undo step logged if it fails, never hiding
            the error that caused it)
    detach: remove the veth -> delete endpoint and addresses -> forget it

Attachments are remembered in ``<state_dir>/<host-id>.json`` so an agent restarted by systemd
takes its containers back (their veths outlive it); a container whose veth vanished (its
namespace was deleted) is noticed within two seconds and its address and endpoint released.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Collection, Iterable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable, assert_never

from pyroute2.netlink.exceptions import NetlinkError

from overlay.core.addresses import IPAddress
from overlay.core.attach import (
    Attachment,
    Attachments,
    AttachPlan,
    AttachStep,
    ClaimAddress,
    DetachStep,
    ForgetEndpoint,
    ForgetLocal,
    PlugVeth,
    PublishEndpoint,
    Refuse,
    ReleaseAddress,
    ReleaseEndpoint,
    SaveAttached,
    SaveDetached,
    UndoStep,
    Unplug,
    attachment_id,
    decode_state,
    encode_state,
    gateways,
    require_registry,
)
from overlay.core.control import AttachRequest, CheckRequest, DetachRequest, PublishRequest, Refused
from overlay.core.ports import PortSpec
from overlay.core.registry import DNS_LABEL, AddressKey, Allocation, Network, Registry
from overlay.io import bridge, ports
from overlay.io.etcd import FAILURES as ETCD_ERRORS
from overlay.io.etcd import EtcdClient

log = logging.getLogger("overlay.containers")
REAP_EVERY = 2.0


def plug_of(a: Attachment) -> bridge.Plug:
    """What the bridge module builds for ``a``."""
    return bridge.Plug(
        a.netns,
        a.ifname,
        a.host_ifname,
        bridge.bridge_name(a.vni),
        a.endpoint_key.mac,
        a.interface,
        a.router,
        a.mtu,
        a.interface6,
        a.router6,
    )


def netns_id(path: str) -> str:
    """A name for a network namespace that does not depend on how it was named (netns name,
    path or PID all lead to the same inode)."""
    try:
        st = os.stat(path)
        nsfs = os.stat("/proc/self/ns/net").st_dev
    except PermissionError as e:
        raise Refused(
            f"the agent may not open {path} ({e.strerror}): entering another process's namespace by PID "
            f"needs CAP_SYS_PTRACE (and CAP_SYS_ADMIN); or give a namespace path or name",
            "netns",
        ) from None
    except OSError as e:
        raise Refused(f"no network namespace at {path} ({e.strerror}): is the container running?", "netns") from None
    if st.st_dev != nsfs:
        raise Refused(
            f"{path} is not a network namespace: give a name from 'ip netns', a path like "
            f"/run/netns/NAME or /proc/PID/ns/net, or a PID",
            "netns",
        )
    return f"{st.st_dev}:{st.st_ino}"


class Containers:
    """This host's attachments, and the control commands that change them: executes the plans
    of overlay.core.attach."""

    def __init__(
        self,
        client: EtcdClient,
        registry: Registry,
        host_id: str,
        vnis: Collection[int],
        mtu: int,
        state_dir: Path | None,
        forget_local: Callable[[int, int], object],
        join: Callable[[str], Awaitable[object]] | None = None,
        emptied: Callable[[int], Awaitable[object]] | None = None,
        egress: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.client, self.registry, self.host_id = client, registry, host_id
        self.state = state_path(state_dir, host_id) if state_dir else None
        self.forget_local = forget_local  # the fast path's memory of MACs seen behind our TAP
        self.attachments = Attachments(host_id, vnis, mtu)  # vnis: the agent's live set (networks join and leave)
        self.lock = asyncio.Lock()  # one change at a time: IPAM picks must see each other
        self.own_netns = netns_id("/proc/self/ns/net")  # the agent's (the host's): never attached
        self.join = join  # joins a network this host is not on (networks on demand); refuses if it cannot
        self.emptied = emptied  # a network's last container left: the agent may leave it
        self.egress = egress  # applies the rules (NAT, published ports) for what is attached now
        self.reserved: dict[tuple[str, int], socket.socket] = {}  # published host ports, held
        self.stale_rules = False  # a detached container's published ports are still in the table

    @property
    def attached(self) -> dict[str, Attachment]:
        return self.attachments.attached

    # --- control commands ------------------------------------------------------------------

    async def attach(self, req: AttachRequest) -> dict[str, object]:
        this_id = attachment_id(req, netns_id(req.netns), self.own_netns)
        async with self.lock:
            vni, network, joined = await self._network(req.net)
            try:
                return await self._attach_to(req, this_id, vni, network)
            except BaseException:
                if joined and self.emptied is not None and not any(a.vni == vni for a in self.attached.values()):
                    await self.emptied(vni)  # joined for this container alone: left again
                raise

    async def _attach_to(self, req: AttachRequest, this_id: str, vni: int, network: Network) -> dict[str, object]:
        """attach, once its network is joined (under the lock)."""
        book = self.attachments
        gateway, gateway6 = gateways(req, network)
        require_registry(self.client.connected)
        existing = self.attached.get(this_id)
        if existing is not None:
            plugged = await asyncio.to_thread(bridge.exists, existing.host_ifname)
            return self._answer(book.again(existing, vni, plugged))  # asked twice: the same answer
        mac = book.mac(req.mac, vni, bridge.random_mac(), self.registry)
        choice = book.addresses(vni, network, req.ip, gateway, self.registry, req.ip6, gateway6)
        host_ifname = bridge.host_ifname(this_id)
        held: list[tuple[PortSpec, socket.socket]] = []
        try:
            while True:
                address, address6 = choice.next()
                plan_of = partial(
                    book.plan_attach,
                    req=req,
                    attachment_id=this_id,
                    host_ifname=host_ifname,
                    vni=vni,
                    network=network,
                    mac=mac,
                    gateway=gateway,
                    address=address,
                    gateway6=gateway6,
                    address6=address6,
                )
                plan = plan_of(published=[spec for spec, _ in held])
                if req.publish and not held:  # checked against the first candidate's addresses
                    book.check_publish(plan.attachment, req.publish)
                    held = self._reserve(plan.attachment, req.publish)
                    plan = plan_of(published=[spec for spec, _ in held])
                taken = await self._attach(plan)
                if not taken:
                    break
                choice.lost(taken)  # another host got one first: take the next
            self._hold(held)
            held = []
            if plan.attachment.published:
                await self._apply_or_detach(plan.attachment)
        except bridge.PlumbingError as e:
            raise Refused(str(e), e.kind) from None
        except ETCD_ERRORS as e:
            raise _etcd_refusal(e) from None
        finally:
            for _, sock in held:  # not attached: the ports are free again
                sock.close()
        await asyncio.to_thread(write_resolv_conf, plan.attachment, network)
        a = plan.attachment
        log.info(
            "attached %s: %s %s on network %s (%s) via %s%s",
            a.id,
            a.mac,
            a.addresses,
            a.network,
            a.vni,
            a.host_ifname,
            "".join(f", publishing {p}" for p in a.published),
        )
        return self._answer(a)

    def _answer(self, a: Attachment) -> dict[str, object]:
        """An attachment's JSON as attach answers it: with the resolver its network offers."""
        network = self.registry.networks().get(a.vni)
        servers = [g for g in (a.gateway, a.gateway6) if g] if network is not None else []
        dns = {"nameservers": servers, "search": [a.network]} if servers else None
        return a.to_json() | {"dns": dns}

    async def _network(self, net: str) -> tuple[int, Network, bool]:
        """The network ``net`` names, joined first if this host is not on it (and may join);
        whether it was joined for this."""
        try:
            return (*self.attachments.network(net, self.registry.networks()), False)
        except Refused as e:
            if e.kind != "network" or self.join is None:
                raise
        await self.join(net)  # refuses (one line) when the network is not in the registry
        return (*self.attachments.network(net, self.registry.networks()), True)

    # --- published ports ---------------------------------------------------------------------

    def _reserve(self, a: Attachment, specs: Iterable[PortSpec]) -> list[tuple[PortSpec, socket.socket]]:
        """Hold each host port of ``specs`` for ``a`` (a random free one where none is given);
        all or none: a port taken frees those held before it and refuses in one line."""
        held: list[tuple[PortSpec, socket.socket]] = []
        try:
            for spec in specs:
                target = a.target(spec)
                assert target is not None  # check_publish said so
                family = socket.AF_INET if target.version == 4 else socket.AF_INET6
                if spec.host_port:
                    held.append((spec, ports.reserve(spec, family)))
                    continue
                taken = set(self.reserved) | {s.key for s, _ in held}
                for _ in range(16):  # the kernel may pick a port published here on another address or family
                    sock, port = ports.reserve_random(spec, family)
                    if (spec.proto, port) not in taken:
                        held.append((replace(spec, host_port=port), sock))
                        break
                    sock.close()
                else:
                    raise ports.PortError(f"no free random {spec.proto} port that is not published here already")
        except ports.PortError as e:
            for _, sock in held:
                sock.close()
            raise Refused(str(e), "address") from None
        return held

    def _hold(self, held: Iterable[tuple[PortSpec, socket.socket]]) -> None:
        for spec, sock in held:
            self.reserved[spec.key] = sock

    def _free(self, specs: Iterable[PortSpec]) -> None:
        for spec in specs:
            sock = self.reserved.pop(spec.key, None)
            if sock is not None:
                sock.close()

    async def _apply_or_detach(self, a: Attachment) -> None:
        """The rules for ``a``'s new publications, or (they could not be applied) ``a`` detached
        again: an attach with ``--publish`` is whole or not at all."""
        try:
            await self._apply()
        except Refused:
            await self._remove(a, unplug=True)
            raise

    async def _apply(self) -> None:
        if self.egress is not None:
            await self.egress()

    async def publish(self, req: PublishRequest) -> dict[str, object]:
        """Publish ``req.spec`` onto the container ``req.target``: the host port held, the state
        file written, the rules applied; any failure leaves everything as it was."""
        async with self.lock:
            a = self.attachments.target(req.target, _netns_id_if_any(_as_netns(req.target)))
            wanted = [req.spec] if req.spec is not None else self.attachments.unpublished_exposed(a)
            self.attachments.check_publish(a, wanted)
            held = self._reserve(a, wanted)  # all or none
            specs = [spec for spec, _ in held]
            self._replace(self.attachments.with_published(a, specs))
            self._hold(held)
            try:
                await self._apply()
            except BaseException:
                self._free(specs)
                self._replace(a)
                raise
        log.info("published %s onto %s", ", ".join(map(str, specs)), a.id)
        target = a.target(specs[0])
        shown = [spec.to_json() for spec in specs]
        return {
            "id": a.id,
            "name": a.name,
            "address": str(target),
            "published": shown if req.spec is None else shown[0],
        }

    async def unpublish(self, req: PublishRequest) -> dict[str, object]:
        """Stop publishing what ``req.spec`` names (None: everything) on ``req.target``."""
        async with self.lock:
            a = self.attachments.target(req.target, _netns_id_if_any(_as_netns(req.target)))
            without, gone = self.attachments.unpublished(a, req.spec)
            self._replace(without)
            try:
                await self._apply()
            except BaseException:
                self._replace(a)
                raise
            self._free(gone)
        if gone:
            log.info("unpublished %s from %s", ", ".join(map(str, gone)), a.id)
        return {"id": a.id, "unpublished": [p.to_json() for p in gone]}

    def _replace(self, a: Attachment) -> None:
        """``a`` in place of the attachment of its id, in memory and in the state file."""
        self.attached[a.id] = a
        self._save()

    async def _attach(self, plan: AttachPlan) -> list[IPAddress]:
        """Run ``plan``'s steps; the addresses lost to another host, if its claim was lost
        (nothing is left behind then), else none. On a failure, undo and raise it."""
        a = plan.attachment
        try:
            for index, step in enumerate(plan.steps):
                try:
                    taken = await self._attach_step(step)
                except BaseException:  # nothing left behind: veth, endpoint, addresses
                    await asyncio.shield(self._undo(plan.undo(index)))
                    raise
                if taken:
                    await asyncio.shield(self._undo(plan.undo(index)))
                    return taken
            return []
        finally:
            self.attachments.attaching.discard((a.vni, a.endpoint_key.mac))

    async def _attach_step(self, step: AttachStep) -> list[IPAddress]:
        """Execute one step; the addresses another host has when it is a claim that lost."""
        if isinstance(step, ClaimAddress):  # every address at once: one transaction
            taken = await self.client.claim_all([(key, step.allocation) for key in step.keys])
            return [k.address for k in taken if isinstance(k, AddressKey)]
        if isinstance(step, Refuse):
            raise Refused(step.message, step.kind)
        if isinstance(step, PlugVeth):
            a = step.attachment
            self.attachments.attaching.add((a.vni, a.endpoint_key.mac))  # its frames are not a new local endpoint
            await asyncio.to_thread(bridge.plug, plug_of(a))
        elif isinstance(step, PublishEndpoint):
            await self.client.hold(step.key, step.endpoint)
        elif isinstance(step, SaveAttached):
            self._write([*self.attached.values(), step.attachment])  # written first: only then is it attached
            self.attached[step.attachment.id] = step.attachment
        else:
            assert_never(step)
        return []

    async def _undo(self, steps: Iterable[UndoStep]) -> None:
        """Roll back a half-made attach; errors here must not hide the one that caused it."""
        for step in steps:
            try:
                await self._do(step)
            except Exception as e:
                log.warning("rolling back an attach: %s (%s)", e.__class__.__name__, e)

    async def _do(self, step: UndoStep | DetachStep) -> None:
        """Execute one undo or detach step."""
        if isinstance(step, Unplug):
            await asyncio.to_thread(bridge.unplug, step.host_ifname)
        elif isinstance(step, ForgetLocal):  # noted first: a late frame must not publish it again
            self.attachments.note_detached(step.vni, step.mac, time.monotonic())
            self.forget_local(step.vni, step.mac)
        elif isinstance(step, (ReleaseEndpoint, ReleaseAddress)):
            await self.client.release(step.key)
        elif isinstance(step, ForgetEndpoint):
            self.client.forget(step.key)  # if etcd did not answer, it must not be written later
        elif isinstance(step, SaveDetached):
            del self.attached[step.attachment.id]
            self._save()
        else:
            assert_never(step)

    def owns(self, vni: int, mac: int) -> bool:
        """Whether ``mac`` on ``vni`` is (or just was) an attached container's (core.attach's rule, now)."""
        return self.attachments.owns(vni, mac, time.monotonic())

    async def detach(self, req: DetachRequest) -> dict[str, object]:
        """Detach by id, or by netns (and ifname); nothing attached is not an error (CNI DEL
        must be idempotent)."""
        async with self.lock:
            chosen = self.attachments.select(req, None if req.id is not None else _netns_id_if_any(req.netns))
            for a in chosen:
                try:
                    await self._remove(a, unplug=True)
                except ETCD_ERRORS as e:
                    # The container is off the network; its address and endpoint stay held until
                    # etcd answers again: the reaper (its veth is gone) releases them then.
                    log.warning(
                        "detached %s, but etcd did not answer (%s): its address and endpoint are released once it does",
                        a.id,
                        e.__class__.__name__,
                    )
                except bridge.PlumbingError as e:
                    raise Refused(str(e), e.kind) from None
        return {"detached": [a.to_json() for a in chosen]}

    async def check(self, req: CheckRequest) -> dict[str, object]:
        a = self.attachments.checked(req.id)
        try:
            problems = await asyncio.to_thread(bridge.problems, plug_of(a))
        except (bridge.PlumbingError, OSError, NetlinkError) as e:
            problems = [str(e)]
        self.attachments.verify(a, problems, self.registry)
        return a.to_json()

    def list(self) -> list[dict[str, object]]:
        """Every attachment, as its JSON object."""
        return [a.to_json() for a in self.attached.values()]

    # --- lifecycle ---------------------------------------------------------------------------

    async def adopt(self) -> None:
        """Take back the attachments of an earlier run whose veths still exist."""
        if self.state is None or not self.state.exists():
            return
        try:
            saved = [Attachment.from_json(a) for a in read_state(self.state)[1]]
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
        if not await asyncio.to_thread(bridge.exists, a.host_ifname):
            log.info("not adopting %s: its veth is gone", a.id)
            return
        if a.vni not in self.attachments.served and self.join is not None:
            try:  # a network joined on demand by the last run: joined again first
                await self.join(str(a.vni))
            except Refused as e:
                log.warning("not adopting %s: cannot join its network %s again: %s", a.id, a.vni, e)
        if a.vni not in self.attachments.served:
            log.info("not adopting %s: its network %s is not served", a.id, a.vni)
            return
        allocation = Allocation(self.host_id, a.mac, a.id)
        for key in a.address_keys:  # IPv4, then IPv6
            if await self.client.claim(key, allocation):
                continue
            if self.registry.get(key) == allocation:
                await self.client.hold(key, allocation)  # ours from before: under the new lease now
                continue
            log.warning("not adopting %s: address %s was taken meanwhile; unplugging it", a.id, key.address)
            for mine in a.address_keys:  # those claimed or held above (not the other host's)
                await self.client.release(mine)
            await asyncio.to_thread(bridge.unplug, a.host_ifname)
            return
        await asyncio.to_thread(bridge.replug, a.host_ifname, bridge.bridge_name(a.vni), a.endpoint_key.mac)
        await self.client.hold(a.endpoint_key, a.endpoint(self.host_id))
        kept = []
        for spec in a.published:  # held again; one taken meanwhile by another program is dropped
            try:
                held = self._reserve(a, [spec])
                self._hold(held)
                kept += [s for s, _ in held]
            except Refused as e:
                log.warning("not publishing %s for %s again: %s", spec, a.id, e)
        a = replace(a, published=tuple(kept))
        self.attached[a.id] = a
        log.info("adopted %s: %s %s on network %s", a.id, a.mac, a.addresses, a.network)

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
            if self.stale_rules:  # a detach's DNAT could not be removed: until it is, try again
                async with self.lock:
                    try:
                        await self._apply()
                        self.stale_rules = False
                    except Refused:
                        pass
            for a in list(self.attached.values()):
                if not await asyncio.to_thread(bridge.exists, a.host_ifname):
                    async with self.lock:
                        if self.attached.get(a.id) is a:
                            log.info("container of %s is gone; releasing %s and %s", a.id, a.addresses, a.mac)
                            try:
                                await self._remove(a, unplug=False)
                            except ETCD_ERRORS as e:
                                log.warning("releasing %s failed (%s); trying again", a.id, e.__class__.__name__)

    # --- helpers -----------------------------------------------------------------------------

    async def _remove(self, a: Attachment, unplug: bool) -> None:
        for step in self.attachments.plan_detach(a, unplug).steps:
            await self._do(step)
        log.info("detached %s: %s %s from network %s", a.id, a.mac, a.addresses, a.network)
        await asyncio.to_thread(remove_resolv_conf, a)
        if a.published:
            self._free(a.published)
            try:
                await self._apply()
            except Refused as e:  # the rules point at nothing now: the reaper tries again
                self.stale_rules = True
                log.warning("the rules of %s's published ports could not be removed yet: %s", a.id, e)
        if self.emptied is not None and not any(b.vni == a.vni for b in self.attached.values()):
            await self.emptied(a.vni)

    def _save(self, lease: int | None = None) -> None:
        """Write the attachments atomically (a crash mid-write keeps the old file), with the
        lease a successor may resume (only when stopping: see ``stopping``)."""
        self._write(self.attached.values(), lease)

    def _write(self, attachments: Iterable[Attachment], lease: int | None = None) -> None:
        if self.state is None:
            return
        try:
            self.state.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state.with_suffix(".tmp")
            tmp.write_text(encode_state(lease, attachments))
            os.replace(tmp, self.state)
        except OSError as e:
            log.warning(
                "cannot write the state file %s (%s): attachments will not survive a restart", self.state, e.strerror
            )


def state_path(state_dir: Path, host_id: str) -> Path:
    """Where a host's agent remembers its attachments (and, when stopped, its lease)."""
    return state_dir / f"{host_id}.json"


def read_state(path: Path) -> tuple[int | None, list[object]]:
    """(lease to resume, attachment records) from a state file; (None, []) if there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, []
    return decode_state(text)


def _netns_id_if_any(path: str | None) -> str | None:
    """The id of the namespace at ``path``; None if there is none (it is gone)."""
    if path is None:
        return None
    try:
        return netns_id(path)
    except Refused:  # the namespace is gone: what was attached by that path
        return None


def _etcd_refusal(e: BaseException) -> Refused:
    return Refused(f"the registry (etcd) did not answer ({e.__class__.__name__}): try again", "etcd")


def _as_netns(target: str) -> str | None:
    """``target`` as a namespace path, if it can be one (a PID, a path, or a name in /run/netns)."""
    if target.isdigit():
        return f"/proc/{target}/ns/net"
    if target.startswith("/"):
        return target
    if "/" not in target and os.path.exists(f"/run/netns/{target}"):
        return f"/run/netns/{target}"
    return None


RESOLV_MARK = "# written by overlay for its network's DNS; removed on detach\n"


def _resolv_conf(a: Attachment) -> Path | None:
    """Where a named namespace's resolv.conf lives (``ip netns exec`` binds it over /etc/resolv.conf)."""
    if not a.netns.startswith("/run/netns/"):
        return None
    return Path("/etc/netns") / a.netns.removeprefix("/run/netns/") / "resolv.conf"


def write_resolv_conf(a: Attachment, network: Network) -> None:
    """Point a named namespace's resolver at its network's gateway (our DNS responder), unless
    someone else wrote its resolv.conf."""
    path = _resolv_conf(a)
    servers = [g for g in (a.gateway, a.gateway6) if g]
    if path is None or not servers:
        return
    try:
        if path.exists() and not path.read_text().startswith(RESOLV_MARK):
            return  # the operator's own: left alone
        path.parent.mkdir(parents=True, exist_ok=True)
        search = [f"search {a.network}"] if DNS_LABEL.match(a.network) else []  # a name from the registry: checked
        lines = [f"nameserver {s}" for s in servers] + search + ["options ndots:0"]
        path.write_text(RESOLV_MARK + "\n".join(lines) + "\n")
    except OSError as e:
        log.warning("cannot write %s (%s): %s resolves with the host's resolvers", path, e.strerror, a.id)


def remove_resolv_conf(a: Attachment) -> None:
    path = _resolv_conf(a)
    try:
        if path is not None and path.read_text().startswith(RESOLV_MARK):
            path.unlink()
            path.parent.rmdir()
    except OSError:
        pass
