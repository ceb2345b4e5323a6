"""The way out and in for containers: each served network's distributed gateway, the agent's
nftables table (egress NAT, published ports) and the DNS responders on the gateways, kept
equal to what the registry and the attachments say.

``apply()`` is the one way to change any of it, and it is idempotent: it computes what should
be (core/nat.py for the rules, core/gateway.py for the plumbing) and changes only what differs:
- a served network with a ``gateway``/``gateway6`` has its gateway veth on its bridge (io/bridge.py
  ``ensure_gateway``), the gateway's neighbour entry in the fast path (its ARP is answered on
  the host, never flooded), and a DNS responder on each gateway address;
- the whole table ``inet overlay`` is replaced in one ``nft -f`` transaction when its text
  changes: it is the new one or, when nft refuses, still the old one (the caller is refused in
  one line and undoes its change);
- IP forwarding: turned on (``net.ipv4.ip_forward``; ``net.ipv6.conf.all.forwarding`` for a
  gateway6) only once a network has a gateway, only if it was off, and only after the table is
  in, which then also drops forwarded traffic that is not a gateway's (core/nat.py
  ``forward_only_ours``), so the host forwards nothing it did not forward before except its
  containers' (nft missing or refusing: forwarding stays off). What was turned on is remembered
  in a file beside the state file (a restarted agent keeps the guard) and turned off again with
  the table;
- containers never reach the underlay's VXLAN and probe ports or the etcd endpoints through the
  host (``guards``: egress NAT would make them speak as the host), and no gateway is plumbed
  whose subnet holds an underlay address of this host or overlaps another network's.
``close(keep)`` removes the table (and restores forwarding) unless containers stay attached
after the agent (``keep``: they keep their way out until the next agent takes over).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from overlay.core import nat
from overlay.core.addresses import IPAddress
from overlay.core.attach import Attachment
from overlay.core.control import Refused
from overlay.core.dns import Names
from overlay.core.fdb import ForwardingTable
from overlay.core.gateway import gateway_device, gateway_mac
from overlay.core.ports import PortSpec
from overlay.core.registry import Network
from overlay.core.status import Egress as EgressStatus
from overlay.io import bridge, nft
from overlay.io.dns import DnsError, DnsServer

log = logging.getLogger("overlay.egress")
FORWARDING = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}

Gateway = tuple[ipaddress.IPv4Interface | None, ipaddress.IPv6Interface | None]


def gateway_of(network: Network | None) -> Gateway:
    """The gateway interfaces (address with the subnet's length) a network's definition asks for."""
    if network is None:
        return None, None
    v4 = (
        ipaddress.IPv4Interface(f"{network.gateway}/{ipaddress.IPv4Network(network.subnet).prefixlen}")
        if network.gateway and network.subnet
        else None
    )
    v6 = (
        ipaddress.IPv6Interface(f"{network.gateway6}/{ipaddress.IPv6Network(network.subnet6).prefixlen}")
        if network.gateway6 and network.subnet6
        else None
    )
    return v4, v6


def _masquerades(network: Network | None) -> bool:
    return network is not None and network.masquerades


class Egress:
    """Gateways, rules and DNS of this host's networks (module doc)."""

    def __init__(
        self,
        table: ForwardingTable,
        networks: Callable[[], Mapping[int, tuple[Network | None, str]]],
        publications: Callable[[], list[tuple[Attachment, PortSpec]]],
        mtu: int,
        dns: DnsServer | None,
        guards: Sequence[nat.Guard] = (),
        underlay: Sequence[IPAddress] = (),
        forwarding_file: Path | None = None,
    ) -> None:
        self.table = table
        self.guards = list(guards)  # underlay ports containers never reach through the host (nat.Guard)
        self.underlay = list(underlay)  # this host's underlay addresses: no gateway subnet may hold one
        self.forwarding_file = forwarding_file  # which sysctls an earlier run of this agent turned on
        self.networks = networks  # served VNI -> (its definition, its TAP's name)
        self.publications = publications
        self.mtu = mtu
        self.dns = dns
        self.names: Names | None = dns.names if dns is not None else None
        self.lock = asyncio.Lock()
        self.gateways: dict[int, Gateway] = {}  # what is plumbed now
        self.listening: dict[int, list[str]] = {}  # VNI -> the DNS addresses it answers on
        self.script: str | None = ""  # the table's text as applied last (None: no table of ours; "": unknown,
        # a table a crashed agent left behind is removed by the first apply that wants none)
        self.rules = 0
        self.error: str | None = None
        self.turned_on: list[str] = self._remembered()  # forwarding sysctls this agent (or its last run) turned on
        self.problems: list[str] = []
        self._warned = False

    async def apply(self) -> None:
        """Bring gateways, forwarding, the table and DNS to what should be; Refused (one line)
        if the table could not be replaced (it is then as it was)."""
        async with self.lock:
            served = self.networks()
            wanted = self._sane({vni: gateway_of(net) for vni, (net, _) in served.items()})
            for vni in [v for v in self.gateways if v not in wanted]:
                await self._unplumb(vni, served)
            for vni, g in wanted.items():
                if self.gateways.get(vni) != g:
                    await self._plumb(vni, g, served[vni][1])
            families = ({4} | ({6} if any(g[1] for g in wanted.values()) else set())) if wanted else set()
            to_turn_on = await asyncio.to_thread(self._off, families)
            nets = [
                nat.GatewayNet(
                    vni,
                    g[0].network if g[0] else None,
                    g[0].ip if g[0] else None,
                    g[1].network if g[1] else None,
                    g[1].ip if g[1] else None,
                    nat=_masquerades(served[vni][0]),
                )
                for vni, g in sorted(wanted.items())
            ]
            published = [
                nat.Published(spec, target, a.vni, a.id)
                for a, spec in self.publications()
                if (target := a.target(spec)) is not None
            ]
            if not nets and not published:
                await self._remove_table()
            else:  # the table first (with its guard when forwarding was off), then forwarding
                guarded = bool(self.turned_on or to_turn_on)
                await self._replace(nat.ruleset(nets, published, forward_only_ours=guarded, guards=self.guards))
                await asyncio.to_thread(self._turn_on, to_turn_on)
            if wanted and not self._warned:
                self._warned = True
                await asyncio.to_thread(self._check_firewalls)

    async def _replace(self, script: str) -> None:
        if script == self.script:
            return
        applying = asyncio.ensure_future(asyncio.to_thread(nft.apply, script))
        try:
            try:
                await asyncio.shield(applying)
            except asyncio.CancelledError:  # the agent stops: hold the lock until nft is done,
                await asyncio.wait([applying])  # so close() cannot remove the table before it lands
                raise
        except nft.NftError as e:
            self.error = str(e)
            raise Refused(f"the agent's nftables table could not be updated, nothing changed: {e}", "invalid") from None
        self.script, self.error = script, None
        self.rules = nat.count_rules(script)

    async def _remove_table(self) -> None:
        if self.script is None:
            return
        if self.script == "" and nft.available() is not None:  # no nft here: nothing can be left over
            self.script = None
            await asyncio.to_thread(self._restore_forwarding)
            return
        try:
            await asyncio.to_thread(nft.remove)
        except nft.NftError as e:
            log.warning("cannot remove the nftables table inet overlay: %s", e)
        self.script, self.rules = None, 0
        await asyncio.to_thread(self._restore_forwarding)

    async def _plumb(self, vni: int, g: Gateway, tap: str) -> None:
        try:
            await asyncio.to_thread(bridge.ensure_gateway, vni, tap, gateway_mac(vni), g[0], g[1], self.mtu)
        except bridge.PlumbingError as e:
            log.warning("network %d: no gateway: %s", vni, e)
            return
        old = self.gateways.get(vni, (None, None))
        for before, now in zip(old, g):
            if before is not None and (now is None or before.ip != now.ip):
                if self.table.neighbour(vni, before.ip) == gateway_mac(vni):
                    self.table.remove_neighbour(vni, before.ip)
            if now is not None:
                self.table.set_neighbour(vni, now.ip, gateway_mac(vni))
        self.gateways[vni] = g
        log.info(
            "network %d: gateway %s on %s (mac %s)",
            vni,
            " ".join(str(x) for x in g if x is not None),
            gateway_device(vni),
            ":".join(f"{b:02x}" for b in gateway_mac(vni).to_bytes(6, "big")),
        )
        await self._serve_dns(vni, g)

    async def _unplumb(self, vni: int, served: Mapping[int, object]) -> None:
        g = self.gateways.pop(vni)
        if self.dns is not None and vni in self.listening:
            await self.dns.unserve(vni)
            del self.listening[vni]
        if vni in served:  # still served, no gateway any more
            for x in g:
                if x is not None and self.table.neighbour(vni, x.ip) == gateway_mac(vni):
                    self.table.remove_neighbour(vni, x.ip)
        await asyncio.to_thread(bridge.remove_gateway, vni)
        log.info("network %d: gateway removed", vni)

    async def _serve_dns(self, vni: int, g: Gateway) -> None:
        if self.dns is None:
            return
        if vni in self.listening:
            await self.dns.unserve(vni)
            del self.listening[vni]
        addresses = [x.ip for x in g if x is not None]
        try:
            for address in addresses:
                await self.dns.serve(vni, address, device=gateway_device(vni))  # only its own network asks
        except DnsError as e:
            log.warning("network %d: no DNS: %s", vni, e)
            await self.dns.unserve(vni)
            return
        self.listening[vni] = [f"[{a}]:53" if a.version == 6 else f"{a}:53" for a in addresses]

    def _sane(self, wanted: dict[int, Gateway]) -> dict[int, Gateway]:
        """The gateways to plumb: none whose subnet holds one of this host's underlay addresses
        or overlaps another network's gateway subnet (a registry mistake would otherwise take
        over the host's routes): those are left out, and logged."""
        out: dict[int, Gateway] = {}
        for vni, g in sorted(wanted.items()):
            if g == (None, None):
                continue
            nets = [x.network for x in g if x is not None]
            clash = next((str(a) for a in self.underlay for n in nets if a in n), None)
            if clash is None:
                clash = next(
                    (f"network {v}'s" for v, h in out.items() for n in nets for x in h if x and x.network.overlaps(n)),
                    None,
                )
            if clash is not None:
                log.warning("network %d: no gateway: its subnet holds %s addresses or overlaps them", vni, clash)
                continue
            out[vni] = g
        return out

    def _off(self, families: set[int]) -> list[str]:
        """The forwarding sysctls of ``families`` that are off now (to turn on once the table
        with its guard is in)."""
        out = []
        for family in sorted(families):
            name = FORWARDING[family]
            try:
                if name not in self.turned_on and nft.sysctl(name) == "0":
                    out.append(name)
            except nft.NftError as e:
                log.warning("cannot read %s: %s", name, e)
        return out

    def _turn_on(self, names: list[str]) -> None:
        for name in names:
            try:
                nft.set_sysctl(name, "1")
            except nft.NftError as e:
                log.warning("cannot turn on %s: %s; containers cannot reach out", name, e)
                continue
            self.turned_on.append(name)
            log.info("%s turned on for the gateways (and off again when the agent's table goes)", name)
        if names:
            self._remember()

    def _remembered(self) -> list[str]:
        try:
            if self.forwarding_file is None:
                return []
            names = json.loads(self.forwarding_file.read_text())
        except (OSError, ValueError):
            return []
        return [n for n in names if n in FORWARDING.values()] if isinstance(names, list) else []

    def _remember(self) -> None:
        if self.forwarding_file is None:
            return
        try:
            if self.turned_on:
                self.forwarding_file.parent.mkdir(parents=True, exist_ok=True)
                self.forwarding_file.write_text(json.dumps(self.turned_on))
            else:
                self.forwarding_file.unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot write %s (%s): a restarted agent may not turn forwarding off", self.forwarding_file, e)

    def _restore_forwarding(self) -> None:
        for name in self.turned_on:
            try:
                nft.set_sysctl(name, "0")
            except nft.NftError as e:
                log.warning("cannot turn %s back off: %s", name, e)
        self.turned_on = []
        self._remember()

    def _check_firewalls(self) -> None:
        try:
            self.problems = nat.firewall_problems(nft.ruleset_json(), nft.sysctl("net.bridge.bridge-nf-call-iptables"))
        except nft.NftError as e:
            self.problems = [f"cannot read the firewall's rules: {e}"]
        for problem in self.problems:
            log.warning("%s", problem)

    async def close(self, keep: bool) -> None:
        """The agent stops: the DNS responders go; the table, gateways and forwarding go too
        unless containers stay attached (``keep``)."""
        if self.dns is not None:
            await self.dns.close()
        if keep:
            return
        async with self.lock:
            await self._remove_table()

    def status(self) -> EgressStatus:
        return EgressStatus(
            table=f"{nat.FAMILY} {nat.TABLE}",
            applied=bool(self.script),
            rules=self.rules,
            error=self.error,
            forwarding=list(self.turned_on),
            problems=list(self.problems),
        )
