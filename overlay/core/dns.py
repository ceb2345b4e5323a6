"""Answers of the DNS responder on each network's gateway: the name index and the rules. Pure:
no sockets, no event loop, no clock (overlay/io/dns.py is the shell that moves the bytes).

``Names`` follows the registry (``apply`` its events, O(1) per event whatever the size of the
fleet): networks give a name and subnets, endpoints with a ``name`` give that name's
addresses and exposed ports. ``answer(query, vni, names, have_upstream, ...)`` decides what a query that arrived
on network ``vni``'s gateway (the asker's network) gets: a ``Reply`` (its wire bytes), a
``Forward`` (the io sends the query as it is to the host's upstream resolvers) or a ``Drop``
(counted by reason, never answered).

The rules, in the order they are applied:
- Who: a query is dropped (``oversize``) over 4096 bytes on UDP (65535 on TCP), ``short``
  under a 12-byte header, ``response`` with the QR bit set (never answer an answer: no loops,
  no reflection), ``unknown_network`` when ``vni`` is not a network of the registry, and
  ``foreign_source`` when ``source`` is given and lies outside the network's ``subnet`` and
  ``subnet6`` (a network with neither admits any source). The host routes between its
  bridges, so a container of another network can reach this gateway: it is not answered.
- Form: opcode other than QUERY: NOTIMP; not exactly one question, a message that does not
  parse (RFC 1035 4.1: names by dnspython, records walked to the end; trailing bytes, an OPT
  outside the additional section, two OPTs or an OPT not owned by the root) or a meta type as
  the question (OPT, TSIG, TKEY, type 0): FORMERR. These replies are a bare 12-byte header
  (never larger than the query). EDNS version above 0: BADVERS with an OPT. Class other than
  IN or ANY, and AXFR/IXFR: REFUSED (nothing is transferred, nor forwarded).
- The overlay's names (authoritative, AA set, TTL 5 s), names compared case-insensitively,
  the question's spelling echoed:
  * a single label ``<name>``, and ``<name>.<network>`` where ``<network>`` is this network's
    name: the endpoint of that name on this network: A (its IPv4 addresses), AAAA (IPv6), ANY
    (both); any other type: NOERROR without answers (NODATA). Two endpoints of one name on one
    network: the answer holds all their addresses (the union, each once). Unknown: NXDOMAIN,
    except the single label that is this network's own name (an empty non-terminal: NODATA).
  * any other name whose last label is the name of any network of the registry (another
    network's names included: networks are isolated; ``a.b.<network>`` too): NXDOMAIN.
    Beware: a network named like a top-level domain ("com") hides that domain from every
    network's containers.
  * PTR: ``d.c.b.a.in-addr.arpa`` (canonical decimal octets) and the 32-nibble ``ip6.arpa``
    names of addresses inside this network's ``subnet``/``subnet6``: ``<name>.<network>.`` of
    each named endpoint holding the address (``<name>.`` when the network's name is not a
    label); none: NXDOMAIN; another type of a name that has a PTR: NODATA. Partial reverse
    names (a zone, not an address) are not ours.
  * SRV (RFC 2782): ``_<service>._<proto>.<name>`` and ``_<service>._<proto>.<name>.<network>``
    (this network's name), ``<proto>`` tcp or udp, ``<service>`` a service name of ``SERVICES``
    (a small fixed table that follows the IANA service names: ``_http``, ``_postgresql``,
    ``_domain``, ``_memcache``; software without an IANA name, Kafka, NATS, gRPC, is asked by
    number) or the port number itself (``_8080._tcp.web``, canonical decimal 1-65535). The name
    exists when an endpoint of ``<name>`` on this network holding an address exposes that port
    (the registry's ``ports``, ``"8080/tcp"``): SRV (or ANY) gets one record, priority 0, weight
    0, that port, target ``<name>.<network>.`` in lower case (``<name>.`` when the network's name
    is not a label; two endpoints of one name give one target, so one record), and the target's A
    and AAAA records (all of ``<name>``'s addresses, as an A query gets them) in the additional
    section; another type: NODATA. When no such endpoint exposes that port over that protocol
    (``<name>`` known or not), or the service is not in the table, the SRV name does not exist:
    NXDOMAIN (an SRV owner is a name of its own; a container that does not offer the service has
    no such name, whatever its other names). ``_<proto>.<name>`` and
    ``_<proto>.<name>.<network>`` are empty non-terminals (NODATA) when ``<name>`` offers a port
    over ``<proto>``, else NXDOMAIN (so a resolver minimising names, RFC 9156, goes on to the SRV
    name). These forms are ours, answered and never forwarded, whatever ``<name>``.
  A network's name is its DNS domain when it is a label of 1-63 of A-Z a-z 0-9 _ -; any other
  name (empty, dotted, spaces) gives no ``<name>.<network>`` form. An endpoint name that is not
  a DNS label (registry.DNS_LABEL) and addresses that do not parse are left out.
- Anything else (the root, multi-label names outside the overlay): ``Forward`` when the host
  has upstream resolvers, else REFUSED. RA is set when there are upstreams.
- Size: with EDNS the reply carries an OPT (version 0, payload 1232, no options, no DO) and
  fits the client's payload clamped to 512..1232 (no IP fragments); without, 512 bytes. A UDP
  answer that does not fit is sent without answers and with the TC bit (the client asks again
  over TCP); over TCP the limit is 65535. Additional records (an SRV target's addresses) go in
  by whole RRsets, A then AAAA, each only if it still fits; one left out sets no TC (RFC 2181
  9: the client asks the target's addresses itself).

Replies are built by hand (the layout is RFC 1035 4.1, a dozen lines): dnspython's message
parser and renderer cost ~180 us a query on the bench machine, this ~10 us; names are parsed
by dnspython, and the tests read every reply back with dnspython.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence, TypeVar

import dns.exception
import dns.name

from overlay.core.addresses import IPAddress, is_ipv4
from overlay.core.registry import DNS_LABEL, Deleted, Endpoint, EndpointKey, Event, Network, NetworkKey

TTL = 5  # seconds: containers come and go
MAX_UDP_QUERY = 4096
MAX_TCP_QUERY = 65535
OUR_PAYLOAD = 1232  # the EDNS payload we advertise and the most a UDP reply carries (DNS flag day 2020)
CLASSIC_UDP = 512
MAX_UPSTREAMS = 3  # as glibc's MAXNS

# Header flag bits and codes (RFC 1035 4.1.1, RFC 6891)
QR, AA, TC, RD, RA, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0010
RCODES = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5, "BADVERS": 16}
T_A, T_NS, T_PTR, T_AAAA, T_SRV, T_OPT, T_IXFR, T_AXFR, T_ANY = 1, 2, 12, 28, 33, 41, 251, 252, 255
T_META = frozenset({0, T_OPT, 249, 250})  # none, OPT, TKEY, TSIG: never a question
C_IN, C_ANY = 1, 255

_NETWORK_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}\Z")
_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")  # type, class, ttl, rdlength after an owner name
_IN_ADDR, _IP6, _ARPA = b"in-addr", b"ip6", b"arpa"
_HEX = frozenset(b"0123456789abcdef")

# Well-known services of SRV names, by their IANA service names (the Service Name and Transport
# Protocol Port Number Registry, RFC 6335), lower case; any other port is asked by number.
SERVICES: dict[str, int] = {
    "ssh": 22,
    "smtp": 25,
    "domain": 53,
    "http": 80,
    "kerberos": 88,
    "pop3": 110,
    "ntp": 123,
    "imap": 143,
    "ldap": 389,
    "https": 443,
    "submission": 587,
    "ldaps": 636,
    "imaps": 993,
    "pop3s": 995,
    "ms-sql-s": 1433,
    "mqtt": 1883,
    "nfs": 2049,
    "etcd-client": 2379,
    "etcd-server": 2380,
    "mysql": 3306,
    "sip": 5060,
    "xmpp-client": 5222,
    "postgresql": 5432,
    "amqps": 5671,
    "amqp": 5672,
    "redis": 6379,
    "http-alt": 8080,
    "memcache": 11211,
    "mongodb": 27017,
}
_SERVICES = {b"_" + k.encode(): v for k, v in SERVICES.items()}
_PROTOS = {b"_tcp": b"tcp", b"_udp": b"udp"}


# --- outcomes ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``wire`` back to the asker. ``rcode``: NOERROR, NXDOMAIN, REFUSED, FORMERR, NOTIMP
    or BADVERS; ``answers``: records in the answer section (NOERROR with none: NODATA);
    ``truncated``: the TC bit is set (the answers did not fit)."""

    wire: bytes
    rcode: str
    answers: int = 0
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the query as it came to the upstream resolvers; ``id``, ``flags`` and ``question``
    (its wire form) are what ``matches`` checks replies against and ``failure`` answers with."""

    id: int
    flags: int
    question: bytes


@dataclass(frozen=True, slots=True)
class Drop:
    """Do not answer; count ``reason``."""

    reason: str


Outcome = Reply | Forward | Drop


# --- the name index ------------------------------------------------------------------------------


class _Net:
    __slots__ = ("name", "domain", "subnet", "subnet6")

    def __init__(self, value: Network) -> None:
        self.name = value.name
        self.domain: bytes | None = value.name.lower().encode() if _NETWORK_LABEL.match(value.name) else None
        self.subnet = _network(ipaddress.IPv4Network, value.subnet)
        self.subnet6 = _network(ipaddress.IPv6Network, value.subnet6)


def _network(kind: type[ipaddress.IPv4Network] | type[ipaddress.IPv6Network], text: str | None) -> _Subnet:
    if text is None:
        return None
    try:
        net = kind(text)
    except ValueError:
        return None
    return int(net.network_address), net.max_prefixlen - net.prefixlen


_Subnet = tuple[int, int] | None  # (network address, host bits) of a subnet, as integers


class _Named:
    """One named endpoint as the index holds it: its name (as written and lower-cased), its
    addresses packed (4 or 16 bytes, what an A or AAAA record carries) and the ports it offers
    by SRV, (b"tcp" or b"udp", port) each once (none without an address: nothing to point at)."""

    __slots__ = ("name", "key", "v4", "v6", "services")

    def __init__(
        self, name: str, v4: tuple[bytes, ...], v6: tuple[bytes, ...], services: tuple[tuple[bytes, int], ...] = ()
    ) -> None:
        self.name, self.key, self.v4, self.v6 = name, name.lower().encode(), v4, v6
        self.services = services if v4 or v6 else ()


class Names:
    """The names of the registry's endpoints by network, kept from its events (``apply``).

    Only endpoints with a name are held. Per network a name maps to the endpoints that carry it
    (by MAC), each address to the endpoints holding it and each (name, protocol, port) and
    (name, protocol) to the endpoints offering it, so a put, a delete, a rename, a move or a
    change of ports costs the endpoint's own addresses and ports and nothing more; a network's
    rename costs O(1) (reverse answers and SRV targets read the network's current name)."""

    def __init__(self) -> None:
        self._nets: dict[int, _Net] = {}
        self._domains: dict[bytes, set[int]] = {}  # a network name (lower case) -> the VNIs carrying it
        self._endpoints: dict[tuple[int, int], _Named] = {}  # (vni, mac) -> the named endpoint
        self._by_name: dict[tuple[int, bytes], dict[int, _Named]] = {}  # (vni, name) -> mac -> endpoint
        self._by_address: dict[tuple[int, bytes], dict[int, _Named]] = {}  # (vni, packed address) -> ...
        self._by_service: dict[tuple[int, bytes, bytes, int], dict[int, _Named]] = {}  # (vni, name, proto, port)
        self._by_proto: dict[tuple[int, bytes, bytes], dict[int, _Named]] = {}  # (vni, name, proto) -> ...

    def __len__(self) -> int:
        """Named endpoints held."""
        return len(self._endpoints)

    def apply(self, events: Iterable[Event]) -> None:
        for event in events:
            key = event.key
            if isinstance(key, NetworkKey):
                if isinstance(event, Deleted):
                    self._drop_network(key.vni)
                elif isinstance(event.value, Network):
                    self._put_network(key.vni, event.value)
            elif isinstance(key, EndpointKey):
                self._drop_endpoint(key.vni, key.mac)
                if not isinstance(event, Deleted) and isinstance(event.value, Endpoint):
                    self._put_endpoint(key.vni, key.mac, event.value)

    # --- what the rules read (and the tests) --------------------------------------------------

    def network(self, vni: int) -> str | None:
        """Network ``vni``'s name ("" when it has none), None for a network not in the registry."""
        net = self._nets.get(vni)
        return net.name if net is not None else None

    def addresses(self, vni: int, name: str) -> tuple[list[ipaddress.IPv4Address], list[ipaddress.IPv6Address]] | None:
        """The IPv4 and IPv6 addresses ``name`` has on network ``vni`` (case-insensitive), None
        when no endpoint of that network carries it."""
        packed = self._packed(vni, name.lower().encode())
        if packed is None:
            return None
        v4, v6 = packed
        return [ipaddress.IPv4Address(a) for a in v4], [ipaddress.IPv6Address(a) for a in v6]

    def services(self, vni: int, name: str) -> list[str]:
        """The ports ``name`` offers by SRV on network ``vni`` ("80/tcp", sorted by protocol and
        port): those its endpoints that hold an address expose."""
        owners = self._by_name.get((vni, name.lower().encode()), {})
        found = {(proto, port) for e in owners.values() for proto, port in e.services}
        return [f"{port}/{proto.decode()}" for proto, port in sorted(found)]

    def pointers(self, vni: int, address: IPAddress) -> list[str]:
        """The names (``<name>.<network>.``) of the named endpoints of network ``vni`` holding
        ``address``, sorted; any address, in the subnet or not."""
        return sorted(dns.name.from_wire(t, 0)[0].to_text() for t in self._targets(vni, address.packed))

    def accepts(self, vni: int, source: IPAddress) -> bool:
        """Whether a query from ``source`` is one of network ``vni``'s own: inside its subnet or
        subnet6 (any source for a network with neither; none for a network not in the registry)."""
        net = self._nets.get(vni)
        if net is None:
            return False
        if net.subnet is None and net.subnet6 is None:
            return True
        return _inside(net.subnet6 if source.version == 6 else net.subnet, int(source))

    # --- internals ------------------------------------------------------------------------------

    def _packed(self, vni: int, key: bytes) -> tuple[list[bytes], list[bytes]] | None:
        owners = self._by_name.get((vni, key))
        if not owners:
            return None
        if len(owners) == 1:
            (one,) = owners.values()
            return list(one.v4), list(one.v6)
        v4: dict[bytes, None] = {}
        v6: dict[bytes, None] = {}
        for e in owners.values():
            v4.update(dict.fromkeys(e.v4))
            v6.update(dict.fromkeys(e.v6))
        return list(v4), list(v6)

    def _targets(self, vni: int, packed: bytes) -> list[bytes]:
        """The PTR targets (wire form) for a packed address on ``vni``: one per distinct name."""
        owners = self._by_address.get((vni, packed))
        if not owners:
            return []
        net = self._nets.get(vni)
        suffix = _label(net.name) if net is not None and net.domain is not None else b""
        names = sorted({e.name.lower(): e.name for e in owners.values()}.items())
        return [_label(name) + suffix + b"\x00" for _, name in names]

    def _put_network(self, vni: int, value: Network) -> None:
        self._drop_network(vni)
        net = self._nets[vni] = _Net(value)
        if net.domain is not None:
            self._domains.setdefault(net.domain, set()).add(vni)

    def _drop_network(self, vni: int) -> None:
        net = self._nets.pop(vni, None)
        if net is not None and net.domain is not None:
            vnis = self._domains[net.domain]
            vnis.discard(vni)
            if not vnis:
                del self._domains[net.domain]

    def _put_endpoint(self, vni: int, mac: int, value: Endpoint) -> None:
        if value.name is None or not DNS_LABEL.match(value.name):
            return  # unnamed endpoints have no DNS name (and no PTR)
        v4 = tuple(dict.fromkeys(ipaddress.IPv4Address(a).packed for a in value.ipv4 if is_ipv4(a)))
        v6 = tuple(dict.fromkeys(p for p in map(_packed6, value.ipv6) if p is not None))
        services = tuple(dict.fromkeys(p for p in map(_exposed, value.ports) if p is not None))
        named = self._endpoints[vni, mac] = _Named(value.name, v4, v6, services)
        self._by_name.setdefault((vni, named.key), {})[mac] = named
        for a in (*v4, *v6):
            self._by_address.setdefault((vni, a), {})[mac] = named
        for proto, port in named.services:
            self._by_service.setdefault((vni, named.key, proto, port), {})[mac] = named
            self._by_proto.setdefault((vni, named.key, proto), {})[mac] = named

    def _drop_endpoint(self, vni: int, mac: int) -> None:
        named = self._endpoints.pop((vni, mac), None)
        if named is None:
            return
        _unlink(self._by_name, (vni, named.key), mac)
        for a in (*named.v4, *named.v6):
            _unlink(self._by_address, (vni, a), mac)
        for proto, port in named.services:
            _unlink(self._by_service, (vni, named.key, proto, port), mac)
            owners = self._by_proto.get((vni, named.key, proto))
            if owners is not None and mac in owners:  # once per protocol: several ports share it
                _unlink(self._by_proto, (vni, named.key, proto), mac)


_K = TypeVar("_K")


def _unlink(index: dict[_K, dict[int, _Named]], key: _K, mac: int) -> None:
    owners = index[key]
    del owners[mac]
    if not owners:
        del index[key]


def _exposed(text: str) -> tuple[bytes, int] | None:
    """(b"tcp" or b"udp", port) of an exposed port as the registry writes it ("80/tcp"), None
    for one that does not parse (the registry checks them; the index does not rely on it)."""
    number, _, proto = text.partition("/")
    if (
        proto not in ("tcp", "udp")
        or not (number.isascii() and number.isdigit())
        or number[0] == "0"
        or len(number) > 5
    ):
        return None
    port = int(number)
    return (proto.encode(), port) if port <= 65535 else None


def _packed6(text: str) -> bytes | None:
    try:
        return ipaddress.IPv6Address(text).packed
    except ValueError:
        return None


def _label(text: str) -> bytes:
    raw = text.encode()
    return bytes((len(raw),)) + raw


def _inside(subnet: _Subnet, address: int) -> bool:
    return subnet is not None and address >> subnet[1] == subnet[0] >> subnet[1]


# --- the rules -----------------------------------------------------------------------------------


class _Malformed(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Query:
    id: int
    flags: int
    name: dns.name.Name
    qtype: int
    qclass: int
    question: bytes  # the question section (name as the asker spelt it, type, class)
    edns: int  # EDNS version, -1: no OPT
    payload: int  # the client's UDP payload size (512 without EDNS)


def answer(
    query: bytes, vni: int, names: Names, have_upstream: bool, *, source: IPAddress | None = None, tcp: bool = False
) -> Outcome:
    """What a query that arrived on network ``vni``'s gateway gets (the module's rules).
    ``source``: the asker's address (checked against the network's subnets when given);
    ``tcp``: it came over TCP (larger limits, never truncated below 65535). Never raises."""
    try:
        return _answer(query, vni, names, have_upstream, source, tcp)
    except Exception:  # a bug must not take the responder down; the io counts this reason
        return Drop("internal_error")


def _answer(query: bytes, vni: int, names: Names, have_upstream: bool, source: IPAddress | None, tcp: bool) -> Outcome:
    if len(query) > (MAX_TCP_QUERY if tcp else MAX_UDP_QUERY):
        return Drop("oversize")
    if len(query) < _HEADER.size:
        return Drop("short")
    qid, flags, qdcount = _HEADER.unpack_from(query)[:3]
    if flags & QR:
        return Drop("response")
    net = names._nets.get(vni)
    if net is None:
        return Drop("unknown_network")
    if source is not None and not names.accepts(vni, source):
        return Drop("foreign_source")
    if (flags >> 11) & 0xF:
        return _bare(qid, flags, "NOTIMP")
    if qdcount != 1:
        return _bare(qid, flags, "FORMERR")
    try:
        q = _parse(query)
    except Exception:  # dnspython's name errors, struct errors, ours: all a malformed query
        return _bare(qid, flags, "FORMERR")
    if q.qtype in T_META:
        return _bare(qid, flags, "FORMERR")
    limit = MAX_TCP_QUERY if tcp else max(CLASSIC_UDP, min(q.payload, OUR_PAYLOAD))
    if q.edns > 0:
        return _reply(q, "BADVERS", have_upstream, limit, authoritative=False)
    if q.qclass not in (C_IN, C_ANY) or q.qtype in (T_AXFR, T_IXFR):
        return _reply(q, "REFUSED", have_upstream, limit, authoritative=False)
    labels = [label.lower() for label in q.name.labels[:-1]]
    n = len(labels)
    service = _service(labels, net.domain)
    if service is not None:
        return _srv(q, vni, names, net, have_upstream, limit, *service)
    if n == 1:
        packed = names._packed(vni, labels[0])
        if packed is None:
            rcode = "NOERROR" if labels[0] == net.domain else "NXDOMAIN"
            return _reply(q, rcode, have_upstream, limit)
        return _reply(q, "NOERROR", have_upstream, limit, _addresses(q.qtype, *packed))
    if n >= 2:
        address = _reverse(labels, net)
        if address is not None:
            targets = names._targets(vni, address)
            if not targets:
                return _reply(q, "NXDOMAIN", have_upstream, limit)
            records = [(T_PTR, t) for t in targets] if q.qtype in (T_PTR, T_ANY) else []
            return _reply(q, "NOERROR", have_upstream, limit, records)
        if n == 2 and net.domain is not None and labels[1] == net.domain:
            packed = names._packed(vni, labels[0])
            if packed is None:
                return _reply(q, "NXDOMAIN", have_upstream, limit)
            return _reply(q, "NOERROR", have_upstream, limit, _addresses(q.qtype, *packed))
        if labels[-1] in names._domains:
            return _reply(q, "NXDOMAIN", have_upstream, limit)
    if not have_upstream:
        return _reply(q, "REFUSED", have_upstream, limit, authoritative=False)
    return Forward(q.id, q.flags, q.question)


def _service(labels: list[bytes], domain: bytes | None) -> tuple[bytes, bytes, int | None] | None:
    """(name, protocol, port) of an SRV name ``_<service>._<proto>.<name>[.<network>]`` (labels
    lower-cased, root left out; port 0: a service not in the table), (name, protocol, None) of
    ``_<proto>.<name>[.<network>]``; None for any other name."""
    n = len(labels)
    if n == 4 and domain is not None and labels[3] == domain:
        labels = labels[:3]
    elif n == 3 and labels[1] not in _PROTOS and domain is not None and labels[2] == domain:
        labels = labels[:2]  # _<proto>.<name>.<network> (_<service>._<proto>.<name> has the protocol second)
    elif n not in (2, 3):
        return None
    if len(labels) == 3 and labels[1] in _PROTOS and labels[0][:1] == b"_":
        return labels[2], _PROTOS[labels[1]], _port(labels[0])
    if len(labels) == 2 and labels[0] in _PROTOS and labels[1][:1] != b"_":
        return labels[1], _PROTOS[labels[0]], None
    return None


def _port(label: bytes) -> int:
    """The port an SRV service label (``_http``, ``_8080``) stands for; 0 when none."""
    digits = label[1:]
    if digits.isdigit() and len(digits) <= 5 and digits[:1] != b"0":
        port = int(digits)
        return port if port <= 65535 else 0
    return _SERVICES.get(label, 0)


def _srv(
    q: _Query,
    vni: int,
    names: Names,
    net: _Net,
    have_upstream: bool,
    limit: int,
    name: bytes,
    proto: bytes,
    port: int | None,
) -> Reply:
    if port is None:  # _<proto>.<name>: there when the name offers a port over the protocol
        return _reply(q, "NOERROR" if (vni, name, proto) in names._by_proto else "NXDOMAIN", have_upstream, limit)
    if (vni, name, proto, port) not in names._by_service:
        return _reply(q, "NXDOMAIN", have_upstream, limit)
    if q.qtype not in (T_SRV, T_ANY):
        return _reply(q, "NOERROR", have_upstream, limit)
    target = bytes((len(name),)) + name + (bytes((len(net.domain),)) + net.domain if net.domain is not None else b"")
    rdata = struct.pack("!HHH", 0, 0, port) + target + b"\x00"
    # The additional records are owned by the target: a pointer to it in the SRV's rdata (RFC 1035 4.1.4).
    owner = struct.pack("!H", 0xC000 | (_HEADER.size + len(q.question) + 2 + _RR.size + 6))
    additional = []
    packed = names._packed(vni, name)
    assert packed is not None  # an endpoint offering a service holds the name
    for rtype, rrset in zip((T_A, T_AAAA), packed):
        if rrset:
            blob = b"".join(owner + _RR.pack(rtype, C_IN, TTL, len(a)) + a for a in rrset)
            additional.append((len(rrset), blob))
    return _reply(q, "NOERROR", have_upstream, limit, [(T_SRV, rdata)], additional=additional)


def _addresses(qtype: int, v4: list[bytes], v6: list[bytes]) -> list[tuple[int, bytes]]:
    if qtype == T_A:
        return [(T_A, a) for a in v4]
    if qtype == T_AAAA:
        return [(T_AAAA, a) for a in v6]
    if qtype == T_ANY:
        return [(T_A, a) for a in v4] + [(T_AAAA, a) for a in v6]
    return []


def _reverse(labels: list[bytes], net: _Net) -> bytes | None:
    """The packed address a reverse name (labels lower-cased, root left out) stands for, when
    it is one inside the network's subnet (IPv4) or subnet6; None otherwise."""
    if len(labels) == 6 and labels[4] == _IN_ADDR and labels[5] == _ARPA and net.subnet is not None:
        octets = labels[3::-1]
        if all(o.isdigit() and len(o) <= 3 and (o == b"0" or o[0] != 0x30) and int(o) <= 255 for o in octets):
            packed = bytes(int(o) for o in octets)
            return packed if _inside(net.subnet, int.from_bytes(packed, "big")) else None
        return None
    if len(labels) == 34 and labels[32] == _IP6 and labels[33] == _ARPA and net.subnet6 is not None:
        nibbles = labels[31::-1]
        if all(len(x) == 1 and x[0] in _HEX for x in nibbles):
            packed = bytes.fromhex(b"".join(nibbles).decode())
            return packed if _inside(net.subnet6, int.from_bytes(packed, "big")) else None
    return None


def _parse(wire: bytes) -> _Query:
    """The question and the EDNS of a query whose header was checked (one question, opcode
    QUERY): RFC 1035 4.1 walked to the last byte; _Malformed (or dnspython's errors) if not."""
    qid, flags, _, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    name, used = dns.name.from_wire(wire, 12)
    end = 12 + used + 4
    if end > len(wire):
        raise _Malformed("short question")
    qtype, qclass = struct.unpack_from("!HH", wire, end - 4)
    spelt = name.to_wire()  # not wire[12:]: a (pathological) compression pointer would not survive a copy
    assert spelt is not None
    question = spelt + wire[end - 4 : end]
    edns, payload = -1, CLASSIC_UDP
    offset = end
    for section, count in enumerate((ancount, nscount, arcount)):
        for _ in range(count):
            owner, used = dns.name.from_wire(wire, offset)
            offset += used
            if offset + _RR.size > len(wire):
                raise _Malformed("short record")
            rtype, rclass, ttl, rdlength = _RR.unpack_from(wire, offset)
            offset += _RR.size + rdlength
            if offset > len(wire):
                raise _Malformed("short rdata")
            if rtype == T_OPT:
                if section != 2 or edns >= 0 or owner != dns.name.root:
                    raise _Malformed("misplaced OPT")
                edns, payload = (ttl >> 16) & 0xFF, max(CLASSIC_UDP, rclass)
    if offset != len(wire):
        raise _Malformed("trailing bytes")
    return _Query(qid, flags, name, qtype, qclass, question, edns, payload)


def _bare(qid: int, flags: int, rcode: str) -> Reply:
    """A reply that is a header only: for queries too broken to echo (never larger than they)."""
    out = QR | (flags & (0x7800 | RD | CD)) | RCODES[rcode]
    return Reply(_HEADER.pack(qid, out, 0, 0, 0, 0), rcode)


def _reply(
    q: _Query,
    rcode: str,
    have_upstream: bool,
    limit: int,
    records: Sequence[tuple[int, bytes]] = (),
    *,
    authoritative: bool = True,
    additional: Sequence[tuple[int, bytes]] = (),
) -> Reply:
    """``records``: (type, rdata) owned by the question's name; ``additional``: whole RRsets,
    (records, their wire form), each put in only if it still fits."""
    code = RCODES[rcode]
    flags = QR | (q.flags & (RD | CD)) | (code & 0xF) | (AA if authoritative else 0) | (RA if have_upstream else 0)
    opt = b"\x00" + struct.pack("!HHBBHH", T_OPT, OUR_PAYLOAD, code >> 4, 0, 0, 0) if q.edns >= 0 else b""
    body = b"".join(b"\xc0\x0c" + _RR.pack(t, C_IN, TTL, len(rdata)) + rdata for t, rdata in records)
    size = _HEADER.size + len(q.question) + len(body) + len(opt)
    extra, arcount = [], 1 if opt else 0
    for count, rrset in additional:
        if size + len(rrset) <= limit:
            extra.append(rrset)
            size += len(rrset)
            arcount += count
    if size <= limit:
        head = _HEADER.pack(q.id, flags, 1, len(records), 0, arcount)
        return Reply(head + q.question + body + b"".join(extra) + opt, rcode, len(records))
    head = _HEADER.pack(q.id, flags | TC, 1, 0, 0, 1 if opt else 0)
    return Reply(head + q.question + opt, rcode, 0, truncated=True)


# --- forwarding ----------------------------------------------------------------------------------


def matches(forward: Forward, reply: bytes) -> bool:
    """Whether ``reply`` (from the upstream the query went to) answers the forwarded query: the
    same id, the QR bit, one question and that question (the name case-insensitively, as
    resolvers echo it under 0x20 randomisation). Anything else is ignored (spoofing, strays)."""
    q = forward.question
    return (
        len(reply) >= 12 + len(q)
        and reply[0] == forward.id >> 8
        and reply[1] == forward.id & 0xFF
        and reply[2] & 0x80 != 0
        and reply[4:6] == b"\x00\x01"
        and reply[12 : 8 + len(q)].lower() == q[:-4].lower()
        and reply[8 + len(q) : 12 + len(q)] == q[-4:]
    )


def failure(forward: Forward, rcode: str) -> bytes:
    """The reply to a forwarded query that gets no answer: SERVFAIL (the upstreams did not
    answer) or REFUSED (too many queries in flight); the question echoed, RA set."""
    flags = QR | (forward.flags & (RD | CD)) | RA | RCODES[rcode]
    return _HEADER.pack(forward.id, flags, 1, 0, 0, 0) + forward.question


# --- upstreams -----------------------------------------------------------------------------------


def upstreams(resolv_conf_text: str) -> list[IPAddress]:
    """The upstream resolvers in a resolv.conf: its ``nameserver`` lines in order, each once, at
    most 3 (glibc's MAXNS), skipping loopback addresses (127.0.0.0/8 with systemd-resolved's
    127.0.0.53, ::1, IPv4-mapped loopback), the unspecified and multicast addresses and lines
    that do not parse. IPv6 link-local addresses keep their zone (``fe80::1%eth0``)."""
    found: list[IPAddress] = []
    for line in resolv_conf_text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(words[1])
        except ValueError:
            continue
        plain = address.ipv4_mapped or address if isinstance(address, ipaddress.IPv6Address) else address
        if plain.is_loopback or plain.is_unspecified or plain.is_multicast or address in found:
            continue
        found.append(address)
        if len(found) == MAX_UPSTREAMS:
            break
    return found
