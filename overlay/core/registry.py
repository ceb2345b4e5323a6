"""The etcd registry: schema, value types and event logic. Pure: no etcd client, no asyncio.

Keys under a prefix (default ``/overlay/v1``), values JSON objects (DESIGN.md). The value types
are msgspec Structs untracked by the cyclic garbage collector (``gc=False``: they hold no
cycles), so a registry of 300k keys does not make every collection walk it.

    <prefix>/networks/<vni>                      {"name": str, "vni": int, "subnet": "A.B.C.D/len", "mtu": int,
                                                  "gateway": "A.B.C.D", "subnet6": "V6/len",
                                                  "gateway6": "V6", "encrypted": true, "nat": bool}
                                                                     (gateway, subnet6, gateway6, encrypted, nat optional;
                                                                      nat: egress NAT, default on with a gateway)
    <prefix>/hosts/<host-id>                     {"address": "A.B.C.D" or "V6", "port": int,
                                                  "probe_port": int, "address6": "V6",
                                                  "pubkey": base64}  (host's lease; address6: a dual-stack host;
                                                                      pubkey: its X25519 key, overlay/core/keys.py)
    <prefix>/networks/<vni>/members/<host-id>    {}                                             (host's lease)
    <prefix>/networks/<vni>/endpoints/<mac>      {"host": str, "ipv4": [str], "ipv6": [str],   (owner's lease,
                                                  "name": str (a DNS label, optional),
                                                  "ports": ["80/tcp", ...] (exposed, optional)}
                                                                                                  or none if written by an operator)
    <prefix>/networks/<vni>/ipam/<address>       {"host": str, "mac": str, "owner": str}        (IPAM: an address taken,
                                                                                                  under the holder's lease)

``Registry`` holds what etcd holds, keyed and typed, and turns what the client reads (a
snapshot at a revision, then watch events) into typed events. A resync after a reconnect or
a compaction hands it a fresh snapshot; it diffs by key and mod_revision and emits exactly
the puts and deletes that happened meanwhile. A value that does not decode is reported once
per (key, mod_revision) in ``rejected`` and otherwise ignored: a hostile or mistyped value is
never fatal, and a key that held a good value keeps it until a good value or a delete comes
(so one bad write cannot take a host or an endpoint off the overlay).

The fields added for encrypted networks, a network's ``encrypted`` and a host's ``pubkey``, are
left out of the JSON at their defaults (false, none): a plaintext network and a host without a
key encode exactly as before, byte for byte, for agents and tools that predate them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Union

import msgspec

from overlay.core.addresses import ipv4, is_ipv4
from overlay.core.keys import parse_public
from overlay.core.wire import MTU_MAX, MTU_MIN, VNI_MAX, mac_to_str

DEFAULT_PREFIX = "/overlay/v1"
HOST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MAC_KEY = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}\Z")  # one spelling only: aliases would collide
HOST_ID_FORM = "1-63 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
# A container's name (DNS, RFC 1123 label): what `<name>` and `<name>.<network>` resolve.
DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
DNS_LABEL_FORM = "1-63 of A-Z a-z 0-9 -, not starting or ending with -"
_EXPOSED = re.compile(r"^[1-9][0-9]{0,4}/(tcp|udp)\Z")  # an endpoint's exposed port, one spelling
MAX_PORTS = 256  # exposed ports per endpoint


class Network(msgspec.Struct, forbid_unknown_fields=False, frozen=True, gc=False):
    vni: int
    name: str = ""
    subnet: str | None = None
    mtu: int | None = None
    gateway: str | None = None  # containers' default route when attached without --gateway
    subnet6: str | None = None  # dual-stack: the IPv6 subnet (a /64 to /120) addresses come from too
    gateway6: str | None = None  # containers' IPv6 default route
    encrypted: bool = False  # every datagram between member hosts sealed (left out of the JSON when false)
    nat: bool | None = None  # egress NAT through the gateway; None: on when the network has a gateway

    @property
    def masquerades(self) -> bool:
        """Whether traffic from the subnet leaving the host is masqueraded (``nat``, else on
        when there is a gateway: Docker's bridge default)."""
        return self.nat if self.nat is not None else (self.gateway is not None or self.gateway6 is not None)


class Host(msgspec.Struct, forbid_unknown_fields=False, frozen=True, gc=False):
    address: str
    port: int = 4789
    probe_port: int | None = None  # UDP port answering peer probes (overlay/io/prober.py); None: not probed
    address6: str | None = None  # a dual-stack host's IPv6 underlay address (``address`` is then IPv4)
    underlay_family: int | None = None  # 4: a dual-stack host that wants IPv4 with dual-stack peers
    pubkey: str | None = None  # base64 X25519 public key (encrypted networks); left out of the JSON when None

    def addresses(self) -> tuple[ipaddress.IPv4Address | None, ipaddress.IPv6Address | None]:
        """(IPv4, IPv6) underlay addresses of this host; either may be None (checked values
        have at least one)."""
        return underlay_addresses(self.address, self.address6)


class Member(msgspec.Struct, forbid_unknown_fields=False, frozen=True, gc=False):
    pass


class Endpoint(msgspec.Struct, forbid_unknown_fields=False, frozen=True, gc=False):
    host: str
    ipv4: list[str] = []
    ipv6: list[str] = []
    name: str | None = None  # a DNS label: the container's name on its network (left out of the JSON when None)
    ports: list[str] = []  # exposed ports, "80/tcp" (DNS SRV; left out of the JSON when empty)


class Allocation(msgspec.Struct, forbid_unknown_fields=False, frozen=True, gc=False):
    """An address taken from a network's subnet (IPAM): by which host, for which MAC and
    attachment (``owner``: the attachment id, e.g. a CNI container id)."""

    host: str
    mac: str = ""
    owner: str = ""


# --- typed keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkKey:
    vni: int


@dataclass(frozen=True)
class HostKey:
    host: str


@dataclass(frozen=True)
class MemberKey:
    vni: int
    host: str


@dataclass(frozen=True)
class EndpointKey:
    vni: int
    mac: int


@dataclass(frozen=True)
class AddressKey:
    vni: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address


Key = Union[NetworkKey, HostKey, MemberKey, EndpointKey, AddressKey]
Value = Union[Network, Host, Member, Endpoint, Allocation]


class Schema:
    """Keys and values under one prefix: parse and build them."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = "/" + prefix.strip("/")
        self._under = self.prefix + "/"

    def key(self, k: Key) -> str:
        p = self.prefix
        if isinstance(k, NetworkKey):
            return f"{p}/networks/{k.vni}"
        if isinstance(k, HostKey):
            return f"{p}/hosts/{k.host}"
        if isinstance(k, MemberKey):
            return f"{p}/networks/{k.vni}/members/{k.host}"
        if isinstance(k, AddressKey):
            return f"{p}/networks/{k.vni}/ipam/{k.address}"
        return f"{p}/networks/{k.vni}/endpoints/{mac_to_str(k.mac)}"

    def parse_key(self, raw: str) -> Key | None:
        """The typed key for ``raw``, or None for a key outside the schema (one spelling of
        each: decimal VNIs without leading zeros, lower-case MACs with colons, canonical
        addresses; aliases would collide)."""
        if not raw.startswith(self._under):
            return None
        parts = raw[len(self._under) :].split("/")
        n = len(parts)
        if parts[0] == "hosts":
            return HostKey(parts[1]) if n == 2 and HOST_ID.match(parts[1]) else None
        if parts[0] != "networks" or (n != 2 and n != 4):
            return None
        v = parts[1]
        if not (v.isascii() and v.isdigit()) or (v[0] == "0" and len(v) > 1) or int(v) > VNI_MAX:
            return None
        vni = int(v)
        if n == 2:
            return NetworkKey(vni)
        kind, name = parts[2], parts[3]
        if kind == "endpoints":
            return EndpointKey(vni, int(name.replace(":", ""), 16)) if _MAC_KEY.match(name) else None
        if kind == "members":
            return MemberKey(vni, name) if HOST_ID.match(name) else None
        if kind == "ipam":
            try:
                return AddressKey(vni, ipv4(name))  # canonical only: ipv4 takes no other form
            except ValueError:
                pass
            try:
                a6 = ipaddress.IPv6Address(name)
            except ValueError:
                return None
            return AddressKey(vni, a6) if str(a6) == name else None  # canonical (RFC 5952) only
        return None

    def decode(self, k: Key, raw: bytes) -> Value:
        """The typed value of ``raw`` at ``k``; ValueError saying what is wrong."""
        kind: type[Value] = _VALUE_TYPES[type(k)]
        try:
            value: Value = msgspec.json.decode(raw, type=kind)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ValueError(str(e)) from None
        check(k, value)
        return value

    def encode(self, value: Value) -> bytes:
        """The JSON of ``value``; the encryption fields only when set (``_OPTIONAL``)."""
        left_out = _OPTIONAL.get(type(value))
        if left_out is not None:
            fields = msgspec.structs.asdict(value)
            for name in left_out:
                if fields[name] == _DEFAULTS[name]:
                    del fields[name]
            return msgspec.json.encode(fields)
        return msgspec.json.encode(value)


# Fields written only when not at their default, so values without them encode as before.
_OPTIONAL: dict[type, tuple[str, ...]] = {
    Network: ("encrypted", "nat"),
    Host: ("pubkey",),
    Endpoint: ("name", "ports"),
}
_DEFAULTS: dict[str, object] = {"encrypted": False, "pubkey": None, "nat": None, "name": None, "ports": []}


_VALUE_TYPES: dict[type, type[Value]] = {
    NetworkKey: Network,
    HostKey: Host,
    MemberKey: Member,
    EndpointKey: Endpoint,
    AddressKey: Allocation,
}


def check(k: Key, value: Value) -> None:
    """Semantic checks msgspec's types cannot express; ValueError saying what is wrong."""
    if isinstance(value, Network):
        if value.vni != k.vni:  # type: ignore[union-attr]
            raise ValueError(f"vni {value.vni} differs from the key's {k.vni}")  # type: ignore[union-attr]
        if value.subnet is not None:
            ipaddress.IPv4Network(value.subnet)
        if value.mtu is not None and not MTU_MIN <= value.mtu <= MTU_MAX:
            raise ValueError(f"mtu {value.mtu} is not {MTU_MIN} to {MTU_MAX}")
        if value.gateway is not None:
            gateway = ipaddress.IPv4Address(value.gateway)
            if value.subnet is not None:
                subnet = ipaddress.IPv4Network(value.subnet)
                if gateway not in subnet or gateway in (subnet.network_address, subnet.broadcast_address):
                    raise ValueError(f"gateway {gateway} is not a host address of subnet {subnet}")
        if value.subnet6 is not None:
            check_subnet6(value.subnet6)
        if value.gateway6 is not None:
            gateway6 = ipaddress.IPv6Address(value.gateway6)
            if value.subnet6 is not None:
                subnet6 = ipaddress.IPv6Network(value.subnet6)
                if gateway6 not in subnet6 or gateway6 == subnet6.network_address:
                    raise ValueError(f"gateway6 {gateway6} is not a host address of subnet6 {subnet6}")
    elif isinstance(value, Host):
        underlay_addresses(value.address, value.address6)
        if value.underlay_family not in (None, 4, 6):
            raise ValueError(f"underlay_family {value.underlay_family!r} is not 4 or 6")
        for port in (value.port, value.probe_port):
            if port is not None and not 1 <= port <= 65535:
                raise ValueError(f"port {port} is not 1 to 65535")
        if value.pubkey is not None:
            try:
                parse_public(value.pubkey)
            except ValueError as e:
                raise ValueError(f"pubkey: {e}") from None
    elif isinstance(value, Allocation):
        if not HOST_ID.match(value.host):
            raise ValueError(f"host {value.host!r} is not a host id")
    elif isinstance(value, Endpoint):
        if not HOST_ID.match(value.host):
            raise ValueError(f"host {value.host!r} is not a host id")
        for a in value.ipv4:
            if not is_ipv4(a):
                raise ValueError(f"ipv4 {a!r} is not an IPv4 address")
        for a in value.ipv6:
            ipaddress.IPv6Address(a)
        if value.name is not None and not DNS_LABEL.match(value.name):
            raise ValueError(f"name {value.name!r} is not a DNS label ({DNS_LABEL_FORM})")
        if len(value.ports) > MAX_PORTS:
            raise ValueError(f"{len(value.ports)} ports: at most {MAX_PORTS}")
        for exposed in value.ports:
            if not _EXPOSED.match(exposed) or not 1 <= int(exposed.split("/")[0]) <= 65535:
                raise ValueError(f"port {exposed!r} is not PORT/tcp or PORT/udp with PORT 1 to 65535")


SUBNET6_PREFIXES = (64, 120)  # a network's subnet6: a /64 (SLAAC-sized) down to a /120


def check_subnet6(text: str) -> ipaddress.IPv6Network:
    """A network's ``subnet6``: an IPv6 network of /64 to /120; ValueError saying the form."""
    try:
        net = ipaddress.IPv6Network(text)
    except ValueError:
        raise ValueError(f"subnet6 {text!r} is not an IPv6 network like 2001:2:0:42::/64") from None
    lo, hi = SUBNET6_PREFIXES
    if not lo <= net.prefixlen <= hi:
        raise ValueError(f"subnet6 {text!r} is a /{net.prefixlen}: use a /{lo} to /{hi}, like 2001:2:0:42::/64")
    return net


def underlay_addresses(
    address: str, address6: str | None
) -> tuple[ipaddress.IPv4Address | None, ipaddress.IPv6Address | None]:
    """A host value's (IPv4, IPv6) underlay addresses: ``address`` of either family, ``address6``
    IPv6 beside an IPv4 ``address``; ValueError saying what is wrong."""
    if is_ipv4(address):
        v4: ipaddress.IPv4Address | None = ipv4(address)
        v6 = None
    else:
        try:
            v6 = ipaddress.IPv6Address(address)
        except ValueError:
            raise ValueError(f"address {address!r} is not an IPv4 or IPv6 address") from None
        v4 = None
    if address6 is not None:
        if v6 is not None:
            raise ValueError(f"address6 {address6!r} beside an IPv6 address {address!r}: address6 is for an IPv4 host")
        try:
            v6 = ipaddress.IPv6Address(address6)
        except ValueError:
            raise ValueError(f"address6 {address6!r} is not an IPv6 address") from None
    for a in (v4, v6):
        if a is not None and (a.is_unspecified or a.is_multicast):
            raise ValueError(f"underlay address {a} is not a unicast address")
    return v4, v6


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Put:
    key: Key
    value: Value
    old: Value | None = field(default=None, compare=False)  # what it replaced: topology undoes it


@dataclass(frozen=True)
class Deleted:
    key: Key
    value: Value  # what it was


Event = Union[Put, Deleted]

MAX_VALUE = 64 * 1024  # bytes: a registry value larger than this is refused (and counted), not held
_SEEN_BAD_MAX = 10_000  # (key, revision) pairs remembered so a bad value is logged once


@dataclass(frozen=True)
class Scope:
    """The part of the registry an agent follows: ``hosts/`` (if ``hosts``) and the networks in
    ``vnis`` (each ``networks/<vni>`` with everything under it); ``vnis`` None: every network."""

    hosts: bool = True
    vnis: frozenset[int] | None = None

    def __contains__(self, k: object) -> bool:
        if isinstance(k, HostKey):
            return self.hosts
        vni = getattr(k, "vni", None)
        return vni is not None and (self.vnis is None or vni in self.vnis)


EVERYTHING = Scope()


class _Entry:
    __slots__ = ("value", "mod_revision", "mark")

    def __init__(self, value: Value, mod_revision: int, mark: int = 0) -> None:
        self.value, self.mod_revision, self.mark = value, mod_revision, mark

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Entry) and (self.value, self.mod_revision) == (other.value, other.mod_revision)

    def __repr__(self) -> str:
        return f"_Entry({self.value!r}, {self.mod_revision})"


class _EndpointEntry:
    """An endpoint as the registry holds it: compact, for there may be a million (the owning
    host's id shared, addresses in tuples, no empty list of its own); ``value`` makes the
    Endpoint when asked."""

    __slots__ = ("host", "ipv4", "ipv6", "mod_revision", "mark", "name", "ports")

    def __init__(
        self,
        host: str,
        ipv4: tuple[str, ...],
        ipv6: tuple[str, ...],
        mod_revision: int,
        mark: int,
        name: str | None = None,
        ports: tuple[str, ...] = (),
    ) -> None:
        self.host, self.ipv4, self.ipv6, self.mod_revision, self.mark = host, ipv4, ipv6, mod_revision, mark
        self.name, self.ports = name, ports

    @property
    def value(self) -> Endpoint:
        return Endpoint(self.host, list(self.ipv4), list(self.ipv6), self.name, list(self.ports))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (_Entry, _EndpointEntry)) and (self.value, self.mod_revision) == (
            other.value,
            other.mod_revision,
        )

    def __repr__(self) -> str:
        return f"_Entry({self.value!r}, {self.mod_revision})"


class _Net:
    """One VNI's keys, indexed: members by host, endpoints by MAC, allocations by address."""

    __slots__ = ("members", "endpoints", "allocations")

    def __init__(self) -> None:
        self.members: dict[str, _Entry] = {}
        self.endpoints: dict[int, _EndpointEntry] = {}
        self.allocations: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, _Entry] = {}

    def __bool__(self) -> bool:
        return bool(self.members or self.endpoints or self.allocations)


_DECODERS = {kind: msgspec.json.Decoder(value_type) for kind, value_type in _VALUE_TYPES.items()}


class Registry:
    """What etcd holds under the prefix (or the part of it in a ``Scope``), as typed values
    indexed by kind, VNI and host, and the events that change it. Every event costs the same
    whatever the size of the registry: an update touches its key and the indexes of it, and no
    view used per event walks the registry."""

    def __init__(self, schema: Schema | None = None) -> None:
        self.schema = schema if schema is not None else Schema()
        self.revision = 0  # the store revision this state is at
        self.rejected: list[tuple[str, str]] = []  # (key, why), for the shell to log (and clear)
        self.refused = 0  # values refused (bad or too large), each (key, revision) once
        self.too_large = 0  # of them: larger than MAX_VALUE
        self.scope = EVERYTHING  # what is followed: an event outside it is counted and ignored
        self.out_of_scope = 0
        self._seen_bad: set[tuple[str, int]] = set()
        self._hosts: dict[str, _Entry] = {}
        self._networks: dict[int, _Entry] = {}
        self._nets: dict[int, _Net] = {}
        self._of_host: dict[str, dict[int, set[int]]] = {}  # host -> vni -> MACs of its endpoints
        self._names: dict[str, str] = {}  # one string per host id, shared by its endpoints
        self._mark = 0

    # --- a snapshot, in one call or in pages -----------------------------------------------------

    def snapshot(self, kvs: Iterable[tuple[str, bytes, int]], revision: int, scope: Scope = EVERYTHING) -> list[Event]:
        """Replace the state within ``scope`` with a consistent read of it at ``revision``
        ((key, value, mod_revision) each); return what changed since the state we had (nothing
        lost in a gap)."""
        resync = self.resync(scope)
        events = resync.feed(kvs)
        events += resync.finish(revision)
        return events

    def resync(self, scope: Scope = EVERYTHING) -> Resync:
        """A snapshot read in pages: ``feed`` each page, then ``finish`` at the read's revision."""
        self._mark += 1
        return Resync(self, scope, self._mark)

    def drop(self, scope: Scope) -> None:
        """Forget everything within ``scope`` (a network no longer served), without events."""
        for k, _ in list(self._items(scope)):
            self._remove(k)

    # --- watch events ------------------------------------------------------------------------------

    def put(self, raw_key: str, raw_value: bytes, mod_revision: int) -> list[Event]:
        """A watched PUT. A value that does not decode is ignored: the last good value stays."""
        if mod_revision > self.revision:
            self.revision = mod_revision
        k = self.schema.parse_key(raw_key)
        if k is not None and self.scope is not EVERYTHING and k not in self.scope:
            self.out_of_scope += 1
            return []
        decoded = self._decode(raw_key, raw_value, mod_revision, k)
        if decoded is None:
            return []
        k, value = decoded
        old = self._set(k, value, mod_revision, self._mark)  # newer than any resync in progress
        if old is not None and not isinstance(k, EndpointKey) and old.value == value:
            return []  # the same value again: nothing to do (an endpoint's revision orders its addresses)
        return [Put(k, value, old.value if old is not None else None)]

    def delete(self, raw_key: str, mod_revision: int) -> list[Event]:
        """A watched DELETE."""
        if mod_revision > self.revision:
            self.revision = mod_revision
        k = self.schema.parse_key(raw_key)
        if k is None:
            return []
        if self.scope is not EVERYTHING and k not in self.scope:
            self.out_of_scope += 1
            return []
        old = self._remove(k)
        return [Deleted(k, old.value)] if old is not None else []

    # --- views ----------------------------------------------------------------------------------

    def revision_of(self, k: Key) -> int:
        entry = self._entry(k)
        return entry.mod_revision if entry else 0

    def get(self, k: Key) -> Value | None:
        entry = self._entry(k)
        return entry.value if entry else None

    def host(self, host: str) -> Host | None:
        entry = self._hosts.get(host)
        return entry.value if entry is not None else None  # type: ignore[return-value]

    def hosts(self) -> dict[str, Host]:
        return {h: e.value for h, e in self._hosts.items()}  # type: ignore[misc]

    def is_member(self, vni: int, host: str) -> bool:
        net = self._nets.get(vni)
        return net is not None and host in net.members

    def members(self, vni: int) -> list[str]:
        net = self._nets.get(vni)
        return sorted(net.members) if net is not None else []

    def endpoint(self, vni: int, mac: int) -> Endpoint | None:
        net = self._nets.get(vni)
        entry = net.endpoints.get(mac) if net is not None else None
        return entry.value if entry is not None else None

    def endpoint_entries(self, vni: int) -> Iterable[tuple[int, Endpoint, int]]:
        """(MAC, endpoint, mod_revision) of every endpoint of ``vni``."""
        net = self._nets.get(vni)
        if net is not None:
            for mac, e in list(net.endpoints.items()):
                yield mac, e.value, e.mod_revision

    def endpoints_of(self, host: str, vni: int) -> list[int]:
        """The MACs of ``host``'s endpoints on ``vni`` (index: no walk of the VNI)."""
        return list(self._of_host.get(host, {}).get(vni, ()))

    def count(self, vni: int) -> int:
        """How many endpoints ``vni`` has."""
        net = self._nets.get(vni)
        return len(net.endpoints) if net is not None else 0

    def endpoints(self, vni: int | None = None) -> dict[EndpointKey, Endpoint]:
        vnis = [vni] if vni is not None else list(self._nets)
        return {
            EndpointKey(v, mac): e.value
            for v in vnis
            if (net := self._nets.get(v)) is not None
            for mac, e in net.endpoints.items()
        }

    def allocations(self, vni: int) -> dict[ipaddress.IPv4Address | ipaddress.IPv6Address, Allocation]:
        """The addresses taken from ``vni``'s subnet (IPAM keys)."""
        net = self._nets.get(vni)
        return {a: e.value for a, e in net.allocations.items()} if net is not None else {}  # type: ignore[misc]

    def networks(self) -> dict[int, Network]:
        return {v: e.value for v, e in self._networks.items()}  # type: ignore[misc]

    def vnis(self) -> list[int]:
        """The VNIs the registry holds anything of."""
        return sorted(set(self._networks) | set(self._nets))

    @property
    def entries(self) -> dict[Key, _Entry | _EndpointEntry]:
        """Every key held, with its value and mod_revision (a copy: walks the whole registry)."""
        return dict(self._items(EVERYTHING))

    def __len__(self) -> int:
        return (
            len(self._hosts)
            + len(self._networks)
            + sum(len(n.members) + len(n.endpoints) + len(n.allocations) for n in self._nets.values())
        )

    # --- internals ------------------------------------------------------------------------------

    def _items(self, scope: Scope, below: int | None = None) -> Iterable[tuple[Key, _Entry | _EndpointEntry]]:
        """The entries of ``scope`` with their keys; with ``below``, only those marked lower: what
        neither the resync of mark ``below`` nor anything after it (a later resync, a watched put)
        saw, as marks only grow. Keys are made only for what is yielded."""

        def kept(entries: dict[Any, Any]) -> Iterable[tuple[Any, Any]]:
            if below is None:
                return entries.items()
            return ((name, e) for name, e in entries.items() if e.mark < below)

        if scope.hosts:
            yield from ((HostKey(h), e) for h, e in kept(self._hosts))
        vnis = sorted(set(self._networks) | set(self._nets)) if scope.vnis is None else sorted(scope.vnis)
        for v in vnis:
            network = self._networks.get(v)
            if network is not None and (below is None or network.mark < below):
                yield NetworkKey(v), network
            net = self._nets.get(v)
            if net is None:
                continue
            yield from ((MemberKey(v, h), e) for h, e in kept(net.members))
            yield from ((EndpointKey(v, m), e) for m, e in kept(net.endpoints))
            yield from ((AddressKey(v, a), e) for a, e in kept(net.allocations))

    def _entry(self, k: Key) -> _Entry | _EndpointEntry | None:
        if isinstance(k, EndpointKey):
            net = self._nets.get(k.vni)
            return net.endpoints.get(k.mac) if net is not None else None
        if isinstance(k, HostKey):
            return self._hosts.get(k.host)
        if isinstance(k, NetworkKey):
            return self._networks.get(k.vni)
        net = self._nets.get(k.vni)
        if net is None:
            return None
        if isinstance(k, MemberKey):
            return net.members.get(k.host)
        return net.allocations.get(k.address)

    def _set(self, k: Key, value: Value, mod_revision: int, mark: int = 0) -> _Entry | _EndpointEntry | None:
        """Hold ``value`` at ``k``; the entry it replaced, if any."""
        old: _Entry | _EndpointEntry | None
        if isinstance(k, EndpointKey):
            assert isinstance(value, Endpoint)
            net = self._nets.get(k.vni)
            if net is None:
                net = self._nets[k.vni] = _Net()
            host = self._names.setdefault(value.host, value.host)
            old = net.endpoints.get(k.mac)
            net.endpoints[k.mac] = _EndpointEntry(
                host,
                tuple(value.ipv4) if value.ipv4 else (),
                tuple(value.ipv6) if value.ipv6 else (),
                mod_revision,
                mark,
                value.name,
                tuple(value.ports) if value.ports else (),
            )
            if old is None or old.host != host:
                if old is not None:
                    self._unindex(old.host, k.vni, k.mac)
                self._of_host.setdefault(host, {}).setdefault(k.vni, set()).add(k.mac)
            return old
        entry = _Entry(value, mod_revision, mark)
        if isinstance(k, HostKey):
            old = self._hosts.get(k.host)
            self._hosts[k.host] = entry
            return old
        if isinstance(k, NetworkKey):
            old = self._networks.get(k.vni)
            self._networks[k.vni] = entry
            return old
        net = self._nets.get(k.vni)
        if net is None:
            net = self._nets[k.vni] = _Net()
        if isinstance(k, MemberKey):
            old = net.members.get(k.host)
            net.members[k.host] = entry
        else:
            old = net.allocations.get(k.address)
            net.allocations[k.address] = entry
        return old

    def _remove(self, k: Key) -> _Entry | _EndpointEntry | None:
        old: _Entry | _EndpointEntry | None
        if isinstance(k, HostKey):
            return self._hosts.pop(k.host, None)
        if isinstance(k, NetworkKey):
            return self._networks.pop(k.vni, None)
        net = self._nets.get(k.vni)
        if net is None:
            return None
        if isinstance(k, EndpointKey):
            old = net.endpoints.pop(k.mac, None)
            if old is not None:
                self._unindex(old.host, k.vni, k.mac)
        elif isinstance(k, MemberKey):
            old = net.members.pop(k.host, None)
        else:
            old = net.allocations.pop(k.address, None)
        if not net:
            del self._nets[k.vni]
        return old

    def _unindex(self, host: str, vni: int, mac: int) -> None:
        by_vni = self._of_host.get(host)
        macs = by_vni.get(vni) if by_vni is not None else None
        if by_vni is None or macs is None:
            return
        macs.discard(mac)
        if not macs:
            del by_vni[vni]
            if not by_vni:
                del self._of_host[host]
                self._names.pop(host, None)

    def _decode(self, raw_key: str, raw_value: bytes, mod: int, k: Key | None = None) -> tuple[Key, Value] | None:
        if k is None:
            k = self.schema.parse_key(raw_key)
        if k is None:
            self._reject(raw_key, mod, "not a key of the schema")
            return None
        if len(raw_value) > MAX_VALUE:
            if self._reject(raw_key, mod, f"a value of {len(raw_value)} bytes (at most {MAX_VALUE} are taken)"):
                self.too_large += 1
            return None
        try:
            value: Value = _DECODERS[type(k)].decode(raw_value)
            check(k, value)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            self._reject(raw_key, mod, str(e))
            return None
        return k, value

    def _reject(self, raw_key: str, mod: int, why: str) -> bool:
        """Report a refused value once per (key, revision); True the first time."""
        if (raw_key, mod) in self._seen_bad:
            return False
        if len(self._seen_bad) >= _SEEN_BAD_MAX:
            self._seen_bad.clear()
        self._seen_bad.add((raw_key, mod))
        self.rejected.append((raw_key, why))
        self.refused += 1
        return True


class Resync:
    """One snapshot of a scope, fed in pages (``Registry.resync``). Each page is applied as it
    comes (a key unchanged since we read it, same mod_revision, is not even decoded); ``finish``
    deletes what the scope held and the read did not return."""

    def __init__(self, registry: Registry, scope: Scope, mark: int) -> None:
        self.registry, self.scope, self.mark = registry, scope, mark

    def feed(self, kvs: Iterable[tuple[str, bytes, int]]) -> list[Event]:
        r, scope, mark = self.registry, self.scope, self.mark
        parse = r.schema.parse_key
        everything = scope == EVERYTHING
        events: list[Event] = []
        for raw_key, raw_value, mod in kvs:
            k = parse(raw_key)
            if k is not None and not everything and k not in scope:
                continue
            was = r._entry(k) if k is not None else None
            if was is not None and was.mod_revision >= mod:
                was.mark = max(was.mark, mark)  # unchanged, or newer by a watch meanwhile: kept as it is
                continue
            decoded = r._decode(raw_key, raw_value, mod, k)
            if decoded is None:
                if was is not None:
                    was.mark = max(was.mark, mark)  # a bad value is ignored: the last good one stays
                continue
            k, value = decoded
            r._set(k, value, mod, mark)
            events.append(Put(k, value, was.value if was is not None else None))
        return events

    def finish(self, revision: int) -> list[Event]:
        r = self.registry
        gone = list(r._items(self.scope, below=self.mark))
        for k, _ in gone:
            r._remove(k)
        r.revision = max(r.revision, revision)
        return [Deleted(k, e.value) for k, e in gone]
