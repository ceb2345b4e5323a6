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
  gateway6) only once a network has a gateway, and only if it was off; the table then also
  drops forwarded traffic that is not a gateway's (core/nat.py ``forward_only_ours``), so the
  host forwards nothing it did not forward before except its containers'. What was turned on is
  turned off again with the table.
``close(keep)`` removes the table (and restores forwarding) unless containers stay attached
after the agent (``keep``: they keep their way out until the next agent takes over).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Mapping

from overlay.core import nat
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
    ) -> None:
        self.table = table
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
        self.turned_on: list[str] = []  # forwarding sysctls this agent turned on
        self.problems: list[str] = []
        self._warned = False

    async def apply(self) -> None:
        """Bring gateways, forwarding, the table and DNS to what should be; Refused (one line)
        if the table could not be replaced (it is then as it was)."""
        async with self.lock:
            served = self.networks()
            wanted = {vni: gateway_of(net) for vni, (net, _) in served.items()}
            wanted = {vni: g for vni, g in wanted.items() if g != (None, None)}
            for vni in [v for v in self.gateways if v not in wanted]:
                await self._unplumb(vni, served)
            for vni, g in wanted.items():
                if self.gateways.get(vni) != g:
                    await self._plumb(vni, g, served[vni][1])
            if wanted:
                await asyncio.to_thread(self._forwarding, {6} if any(g[1] for g in wanted.values()) else set())
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
            else:
                await self._replace(nat.ruleset(nets, published, forward_only_ours=bool(self.turned_on)))
            if wanted and not self._warned:
                self._warned = True
                await asyncio.to_thread(self._check_firewalls)

    async def _replace(self, script: str) -> None:
        if script == self.script:
            return
        try:
            await asyncio.to_thread(nft.apply, script)
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

    def _forwarding(self, families: set[int]) -> None:
        for family in {4} | families:
            name = FORWARDING[family]
            if name in self.turned_on:
                continue
            try:
                if nft.sysctl(name) == "0":
                    nft.set_sysctl(name, "1")
                    self.turned_on.append(name)
                    log.info("%s turned on for the gateways (and off again when the agent's table goes)", name)
            except nft.NftError as e:
                log.warning("cannot turn on %s: %s; containers cannot reach out", name, e)

    def _restore_forwarding(self) -> None:
        for name in self.turned_on:
            try:
                nft.set_sysctl(name, "0")
            except nft.NftError as e:
                log.warning("cannot turn %s back off: %s", name, e)
        self.turned_on = []

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
