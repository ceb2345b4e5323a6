"""Egress NAT, published ports and isolation between networks: the agent's one nftables table,
``inet overlay``, computed as the text of one ``nft -f`` script. Pure: no subprocess, no
sockets; overlay/io/nft.py applies the script (one transaction: all of it or nothing).

Plumbing it relies on: network <vni> with a gateway has, on every member host, a veth pair on
its bridge ``ovbr<vni>``; the host end ``ovgw<vni>`` carries the gateway address(es).
Containers route through the gateway, so their traffic to the outside arrives on
``ovgw<vni>`` and is routed by the host; replies leave through ``ovgw<vni>``. The rules count
a network's bridge device ``ovbr<vni>`` as one of its own too: unless its arp_ignore says
otherwise it also answers ARP for the gateway, and routed traffic then arrives there.

The rules (``ruleset``), per chain:

- postrouting (nat, srcnat):
  * egress: for each network with ``nat`` and a gateway (IPv4, and the same for IPv6 with
    ``gateway6``), traffic from its subnet to anywhere but its subnet that does not leave
    through an overlay device (``ovgw*``, ``ovbr*``) is masqueraded: the outside sees the
    host's address. Traffic between containers, of one network or of two, is never NATed.
  * hairpin: for each network with a publication of that family, a connection DNATed to a
    published port that comes from the network's own subnet and leaves through its own
    devices (a container reaching a published port of its own network through the
    host's address) is masqueraded to the gateway, so the reply comes back through the host.
- prerouting (nat, dstnat) and output (nat, -100): each publication is a DNAT of
  ``<proto> dport <host_port>`` to ``<address>:<port>``, for traffic to the publication's
  ``host_ip``, or without one to any local address of the host (``fib daddr type local``).
  Only the family of the container's address: an IPv6 ``host_ip`` with an IPv4 container is
  left out (and the reverse). The output chain lets the host itself reach its published ports
  through its own addresses; loopback is left out there (a packet from 127.0.0.1 or ::1
  cannot be routed to a container).
- bridged (filter, prerouting, raw): frames bridged between a network's containers and its
  gateway veth (to or from ``gateway_mac(vni)`` on ``ovbr<vni>``) are not tracked. br_netfilter
  (bridge-nf-call-iptables=1, as on Docker hosts) hands them to the IP hooks on their way to
  or from ``ovgw<vni>``; tracked there, a connection's first packet would be confirmed without
  NAT before it is routed, and never be masqueraded or DNATed after. Routed packets are
  tracked where they are routed, on ``ovgw<vni>``.
- forward (filter, policy accept): DNATed connections are accepted first (a published port is
  reachable from outside and from every network's containers); then traffic arriving on one
  network's devices and leaving through another network's gateway or bridge is dropped
  (a red container cannot reach a blue one by routing). With ``forward_only_ours`` (the agent
  turned IP forwarding on, the host did not forward before), forwarded traffic that neither
  arrives on nor leaves through an overlay device (``ovgw*``, or ``ovbr*`` for frames that
  br_netfilter hands to the IP hooks) is dropped: the host forwards nothing but ours.

Every masquerade and DNAT rule has a counter; each DNAT names its owner (an attachment id) in
its comment. The script is deterministic: networks by VNI, publications by network, protocol,
host port and address.

An accept in our forward chain does not override a drop in another table's forward chain
(every base chain on a hook must accept): ``firewall_problems`` finds such chains (Docker's
``ip filter FORWARD`` policy drop, firewalld's final reject) in ``nft -j list ruleset`` and
says how to let our traffic through. Tables of iptables-legacy are not visible there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from overlay.core.gateway import gateway_mac
from overlay.core.ports import PortSpec
from overlay.core.wire import mac_to_str

TABLE = "overlay"
FAMILY = "inet"
GATEWAY_DEVICE = "ovgw"  # + vni: the host end of the gateway veth, with the gateway address
BRIDGE_DEVICE = "ovbr"  # + vni: the network's bridge
COMMENT_MAX = 120  # nft keeps 128 bytes of a comment
OURS = f'{{ "{GATEWAY_DEVICE}*", "{BRIDGE_DEVICE}*" }}'  # every overlay device, as an nft set
_COMMENT_SAFE = re.compile(r"[^A-Za-z0-9 _.:/@+=,-]")

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True)
class GatewayNet:
    """One network served on this host, as NAT sees it: its subnets and gateways (None: none),
    and whether its containers' egress is masqueraded (``nat``)."""

    vni: int
    subnet: IPv4Network | None
    gateway: IPv4Address | None
    subnet6: IPv6Network | None = None
    gateway6: IPv6Address | None = None
    nat: bool = True

    @property
    def device(self) -> str:
        """The host end of the gateway veth, carrying the gateway address(es)."""
        return f"{GATEWAY_DEVICE}{self.vni}"

    @property
    def bridge(self) -> str:
        return f"{BRIDGE_DEVICE}{self.vni}"

    @property
    def devices(self) -> str:
        """Its gateway veth and its bridge as an nft set: where its routed traffic may arrive
        and leave (the bridge device answers ARP for the gateway too, unless its arp_ignore
        says otherwise)."""
        return f'{{ "{self.device}", "{self.bridge}" }}'

    def routed(self) -> list[IPNetwork]:
        """The subnets the host routes for this network (those with a gateway), IPv4 first."""
        out: list[IPNetwork] = []
        if self.subnet is not None and self.gateway is not None:
            out.append(self.subnet)
        if self.subnet6 is not None and self.gateway6 is not None:
            out.append(self.subnet6)
        return out

    @property
    def has_gateway(self) -> bool:
        return bool(self.routed())


@dataclass(frozen=True)
class Published:
    """A published port: ``spec`` (its host port chosen, not 0) to the container at
    ``address`` on network ``vni``, owned by attachment ``owner``."""

    spec: PortSpec
    address: IPAddress
    vni: int
    owner: str

    def __post_init__(self) -> None:
        if self.spec.host_port == 0:
            raise ValueError(f"publication {self.spec} of {self.owner} has no host port yet: reserve one first")

    @property
    def applies(self) -> bool:
        """Whether the host address and the container's address are of one family (a wildcard
        host address takes the container's)."""
        return self.spec.host_ip is None or self.spec.host_ip.version == self.address.version

    def order(self) -> tuple[int, str, int, int, int, int, tuple[int, int], str]:
        """A sort key across families."""
        host_ip = self.spec.host_ip
        return (
            self.vni,
            self.spec.proto,
            self.spec.host_port,
            self.address.version,
            int(self.address),
            self.spec.port,
            (0, 0) if host_ip is None else (host_ip.version, int(host_ip)),
            self.owner,
        )


def _ip(version: int) -> str:
    return "ip" if version == 4 else "ip6"


def comment(owner: str) -> str:
    """``owner`` as a safe nft comment: no quotes, backslashes or control characters, short."""
    return _COMMENT_SAFE.sub("_", owner)[:COMMENT_MAX]


def _masquerade(net: GatewayNet) -> Iterator[str]:
    for subnet in net.routed():
        ip = _ip(subnet.version)
        yield f"{ip} saddr {subnet} {ip} daddr != {subnet} oifname != {OURS} counter masquerade"


def _hairpin(net: GatewayNet, versions: set[int]) -> Iterator[str]:
    for subnet in net.routed():
        if subnet.version in versions:
            ip = _ip(subnet.version)
            yield f"ct status dnat {ip} saddr {subnet} oifname {net.devices} counter masquerade"


def _target(p: Published) -> str:
    if p.address.version == 6:
        return f"dnat ip6 to [{p.address}]:{p.spec.port}"
    return f"dnat ip to {p.address}:{p.spec.port}"


def _dnat(p: Published, output: bool, gateways: Sequence[IPAddress] = ()) -> str:
    """A publication's DNAT. A wildcard one never takes what is sent to a gateway address
    (``gateways``): those are the networks' own (their DNS on port 53, for one)."""
    ip = _ip(p.address.version)
    own = sorted((g for g in gateways if g.version == p.address.version), key=int)
    spared = f" {ip} daddr != {{ {', '.join(map(str, own))} }}" if own else ""
    if p.spec.host_ip is not None:
        match = f"{ip} daddr {p.spec.host_ip}"
    elif output:
        loopback = "127.0.0.0/8" if p.address.version == 4 else "::1"
        match = f"fib daddr type local {ip} daddr != {loopback}{spared}"
    else:
        match = f"meta nfproto ipv{p.address.version} fib daddr type local{spared}"
    return f'{match} {p.spec.proto} dport {p.spec.host_port} counter {_target(p)} comment "{comment(p.owner)}"'


def _isolation(net: GatewayNet) -> str:
    return f"iifname {net.devices} oifname {OURS} oifname != {net.devices} drop"


@dataclass(frozen=True)
class Chain:
    """One base chain of the table: its name, its ``type ... hook ... priority ...; policy``
    line and its rules in order."""

    name: str
    header: str
    rules: tuple[str, ...]


@dataclass(frozen=True, order=True)
class Guard:
    """A port of the underlay that containers never reach through the host's routing (where
    egress NAT would make them speak as the host): the VXLAN and probe ports of every host
    (``address`` None), the registry's etcd endpoints. Locally generated traffic is not touched."""

    proto: str  # "tcp" or "udp"
    port: int
    address: IPAddress | None = None

    def rule(self) -> str:
        to = "" if self.address is None else f"{_ip(self.address.version)} daddr {self.address} "
        return f"iifname {OURS} {to}{self.proto} dport {self.port} counter drop"


def chains(
    networks: Iterable[GatewayNet],
    published: Iterable[Published],
    forward_only_ours: bool = False,
    guards: Iterable[Guard] = (),
) -> list[Chain]:
    """The table's chains, as the module docstring says."""
    nets = sorted((n for n in networks if n.has_gateway), key=lambda n: n.vni)
    pubs = sorted((p for p in published if p.applies), key=Published.order)
    versions: dict[int, set[int]] = {}
    for p in pubs:
        versions.setdefault(p.vni, set()).add(p.address.version)

    postrouting: list[str] = []
    for net in nets:
        if net.nat:
            postrouting += _masquerade(net)
    for net in nets:
        postrouting += _hairpin(net, versions.get(net.vni, set()))

    bridged = [
        f'iifname "{net.bridge}" ether {end} {mac_to_str(gateway_mac(net.vni))} notrack'
        for net in nets
        for end in ("daddr", "saddr")
    ]
    forward = [g.rule() for g in sorted(set(guards), key=lambda g: (g.proto, g.port, str(g.address)))]
    forward += ["ct status dnat accept"] + [_isolation(net) for net in nets]
    own = [a for net in nets for a in (net.gateway, net.gateway6) if a is not None]
    if forward_only_ours:
        forward.append(f"iifname != {OURS} oifname != {OURS} drop")
    return [
        Chain("bridged", "type filter hook prerouting priority raw; policy accept;", tuple(bridged)),
        Chain("postrouting", "type nat hook postrouting priority srcnat; policy accept;", tuple(postrouting)),
        Chain(
            "prerouting",
            "type nat hook prerouting priority dstnat; policy accept;",
            tuple(_dnat(p, False, own) for p in pubs),
        ),
        Chain("output", "type nat hook output priority -100; policy accept;", tuple(_dnat(p, True, own) for p in pubs)),
        Chain("forward", "type filter hook forward priority filter; policy accept;", tuple(forward)),
    ]


def render(table: Sequence[Chain]) -> str:
    """The ``nft -f`` script that replaces table ``inet overlay`` with ``table`` in one
    transaction, whether or not it exists (add it empty, delete it, add it whole)."""
    lines = [
        "# overlay: egress NAT, published ports, isolation between networks (overlay/core/nat.py)",
        f"table {FAMILY} {TABLE} {{}}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
    ]
    for i, chain in enumerate(table):
        if i:
            lines.append("")
        lines += [f"\tchain {chain.name} {{", f"\t\t{chain.header}", *(f"\t\t{r}" for r in chain.rules), "\t}"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def ruleset(
    networks: Iterable[GatewayNet],
    published: Iterable[Published],
    forward_only_ours: bool = False,
    guards: Iterable[Guard] = (),
) -> str:
    """The whole ``nft -f`` script for these networks and publications (module docstring)."""
    return render(chains(networks, published, forward_only_ours, guards))


def removal() -> str:
    """The ``nft -f`` script that deletes table ``inet overlay`` if it exists."""
    return f"table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n"


def count_rules(script: str) -> int:
    """How many rules a script from ``ruleset`` holds (for ``overlay status``)."""
    count = 0
    depth = 0
    for raw in script.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("{"):
            depth += 1
        elif line == "}":
            depth -= 1
        elif depth == 2 and not line.startswith("type "):
            count += 1
    return count


# --- other tables that stand in our way ---------------------------------------------------------

_UNCONDITIONAL = {"counter", "log", "limit"}  # statements that let every packet through to the verdict


def _items(ruleset: object) -> list[dict[str, object]]:
    """The objects of ``nft -j list ruleset`` ({"nftables": [{"table": {...}}, ...]}), each
    as {kind: body}; anything of another shape is left out."""
    if not isinstance(ruleset, dict):
        return []
    items = ruleset.get("nftables")
    if not isinstance(items, list):
        return []
    return [item for item in items if isinstance(item, dict) and len(item) == 1]


def _str(body: dict[str, object], key: str) -> str | None:
    value = body.get(key)
    return value if isinstance(value, str) else None


def _verdict(expr: list[object]) -> tuple[str | None, list[dict[str, object]]]:
    """A rule's verdict ("accept", "drop", "reject", "return", "jump:<chain>", "goto:<chain>")
    and its matches; (None, []) if it has no verdict or holds a statement this does not read."""
    verdict: str | None = None
    matches: list[dict[str, object]] = []
    for statement in expr:
        if not isinstance(statement, dict) or len(statement) != 1:
            return None, []
        ((kind, body),) = statement.items()
        if kind in ("accept", "drop", "reject", "return"):
            verdict = kind
        elif kind in ("jump", "goto") and isinstance(body, dict) and isinstance(body.get("target"), str):
            verdict = f"{kind}:{body['target']}"
        elif kind == "match" and isinstance(body, dict):
            matches.append(body)
        elif kind not in _UNCONDITIONAL:
            return None, []
    return verdict, matches


def _names(match: dict[str, object]) -> tuple[str, set[str]] | None:
    """("iifname" | "oifname", the names) of an ``==`` match on an interface name."""
    left, right = match.get("left"), match.get("right")
    if match.get("op", "==") not in ("==", "in") or not isinstance(left, dict):
        return None
    meta = left.get("meta")
    if not isinstance(meta, dict) or meta.get("key") not in ("iifname", "oifname"):
        return None
    if isinstance(right, str):
        names = {right}
    elif isinstance(right, dict) and isinstance(right.get("set"), list):
        names = {n for n in right["set"] if isinstance(n, str)}
    else:
        return None
    return str(meta["key"]), names


def _covers(names: set[str], device: str) -> bool:
    """Whether an interface-name match on ``names`` takes every device ``device``* (as nft's
    "ovgw*" or iptables' "ovgw+")."""
    return any(n.endswith(("*", "+")) and device.startswith(n[:-1]) for n in names)


def _accepts(matches: list[dict[str, object]], iif: str | None, oif: str | None) -> bool:
    """Whether a rule with ``matches`` and verdict accept accepts all of ``iif``* -> ``oif``*
    (None: any device): it matches on nothing but those interface names."""
    seen: dict[str, set[str]] = {}
    for match in matches:
        named = _names(match)
        if named is None:
            return False
        seen.setdefault(named[0], set()).update(named[1])
    for key, wanted in (("iifname", iif), ("oifname", oif)):
        if key in seen and (wanted is None or not _covers(seen[key], wanted)):
            return False
    return True


class _Tables:
    """The chains and rules of a parsed ruleset, for the questions ``firewall_problems`` asks."""

    def __init__(self, ruleset: object) -> None:
        self.base: list[tuple[str, str, str, str | None]] = []  # (family, table, chain, policy) on hook forward
        self.chains: set[tuple[str, str, str]] = set()
        self.rules: dict[tuple[str, str, str], list[list[object]]] = {}
        for item in _items(ruleset):
            ((kind, body),) = item.items()
            if not isinstance(body, dict):
                continue
            family, table = _str(body, "family"), _str(body, "table")
            if family is None or table is None:
                continue
            if kind == "chain" and (name := _str(body, "name")) is not None:
                self.chains.add((family, table, name))
                if body.get("hook") == "forward" and (family, table) != (FAMILY, TABLE):
                    self.base.append((family, table, name, _str(body, "policy")))
            elif kind == "rule" and (chain := _str(body, "chain")) is not None and isinstance(body.get("expr"), list):
                self.rules.setdefault((family, table, chain), []).append(body["expr"])

    def blocks(self, family: str, table: str, chain: str, policy: str | None) -> bool:
        """Whether the chain drops what it does not accept: policy drop, or a last rule that
        drops or rejects everything (firewalld's)."""
        if policy == "drop":
            return True
        rules = self.rules.get((family, table, chain), [])
        if not rules:
            return False
        verdict, matches = _verdict(rules[-1])
        return verdict in ("drop", "reject") and not matches

    def accepts(self, key: tuple[str, str, str], iif: str | None, oif: str | None, seen: set[object]) -> bool:
        """Whether the chain (or a chain it jumps to) accepts ``iif``* -> ``oif``* before it
        drops everything."""
        if key in seen:
            return False
        seen.add(key)
        for expr in self.rules.get(key, []):
            verdict, matches = _verdict(expr)
            if verdict is None:
                continue
            if verdict == "accept" and _accepts(matches, iif, oif):
                return True
            if verdict.startswith(("jump:", "goto:")) and _accepts(matches, iif, oif):
                if self.accepts((key[0], key[1], verdict.split(":", 1)[1]), iif, oif, seen):
                    return True
            if verdict in ("drop", "reject", "return") and not matches:
                return False
        return False


def _tool(family: str) -> str | None:
    return {"ip": "iptables", "ip6": "ip6tables"}.get(family)


def firewall_problems(ruleset: object, bridge_nf_call_iptables: str | None) -> list[str]:
    """What in ``ruleset`` (the parsed JSON of ``nft -j list ruleset``) blocks our traffic, as
    one-line warnings that say the fix; ``bridge_nf_call_iptables`` is the value of
    net.bridge.bridge-nf-call-iptables (None: br_netfilter is not loaded). Whatever has a shape
    this does not understand is skipped, never fatal.

    - a base chain on hook forward in another table (ip, ip6, inet) that drops what it does not
      accept (policy drop, or a final unconditional drop or reject) and does not accept our
      gateways' traffic (``ovgw*`` in and out): containers' egress and published ports are
      blocked;
    - with bridge-nf-call-iptables=1, such a chain in an ip or inet table that does not accept
      ``ovbr*`` -> ``ovbr*``: frames between containers on one host's bridge pass it and die;
    - a bridge-family forward chain that drops by default: frames on our bridges die.
    """
    tables = _Tables(ruleset)
    found: list[str] = []
    for family, table, chain, policy in sorted(tables.base, key=lambda b: b[:3]):
        if not tables.blocks(family, table, chain, policy):
            continue
        key = (family, table, chain)
        where = f"table {family} {table} chain {chain}"
        how = (
            "drops forwarded traffic by default" if policy == "drop" else "rejects forwarded traffic it does not accept"
        )
        docker = any(c[:2] == (family, table) and c[2].startswith("DOCKER") for c in tables.chains)
        who = " (Docker sets this)" if docker else " (firewalld does this)" if table == "firewalld" else ""
        tool = _tool(family)
        if family == "bridge":
            found.append(
                f"{where} {how.replace('forwarded traffic', 'bridged frames')}: frames between containers on one "
                f"host's bridge are blocked; accept them: 'nft insert rule bridge {table} {chain} meta ibrname \"ovbr*\" accept'"
            )
            continue
        if family not in ("ip", "ip6", "inet"):
            continue
        gateways = tables.accepts(key, GATEWAY_DEVICE, None, set()) and tables.accepts(key, None, GATEWAY_DEVICE, set())
        if not gateways:
            fix = (
                f"'{tool} -I {chain} -i ovgw+ -j ACCEPT' and '{tool} -I {chain} -o ovgw+ -j ACCEPT' (or the nft equivalent)"
                if tool is not None
                else f"'nft insert rule {family} {table} {chain} iifname \"ovgw*\" accept' and "
                f"'nft insert rule {family} {table} {chain} oifname \"ovgw*\" accept'"
            )
            found.append(f"{where} {how}{who}: containers' egress and published ports are blocked; accept them: {fix}")
        if (
            bridge_nf_call_iptables == "1"
            and family in ("ip", "inet")
            and not tables.accepts(key, BRIDGE_DEVICE, BRIDGE_DEVICE, set())
        ):
            accept = (
                f"'{tool} -I {chain} -i ovbr+ -o ovbr+ -j ACCEPT'"
                if tool is not None
                else f'\'nft insert rule {family} {table} {chain} iifname "ovbr*" oifname "ovbr*" accept\''
            )
            found.append(
                f"br_netfilter is loaded with net.bridge.bridge-nf-call-iptables=1 and {where} {how}: frames between "
                f"containers on one host's bridge pass it and are dropped; turn it off: "
                f"'sysctl -w net.bridge.bridge-nf-call-iptables=0', or accept them: {accept}"
            )
    return found
