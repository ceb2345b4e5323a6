"""The etcd registry: schema, value types and event logic. Pure: no etcd client, no asyncio.

Keys under a prefix (default ``/overlay/v1``), values JSON objects (DESIGN.md):

    <prefix>/networks/<vni>                      {"name": str, "vni": int, "subnet": "A.B.C.D/len", "mtu": int,
                                                  "gateway": "A.B.C.D"}                          (gateway optional)
    <prefix>/hosts/<host-id>                     {"address": "A.B.C.D", "port": int,
                                                  "probe_port": int}                             (host's lease)
    <prefix>/networks/<vni>/members/<host-id>    {}                                             (host's lease)
    <prefix>/networks/<vni>/endpoints/<mac>      {"host": str, "ipv4": [str], "ipv6": [str]}   (owner's lease,
                                                                                                  or none if written by an operator)
    <prefix>/networks/<vni>/ipam/<A.B.C.D>       {"host": str, "mac": str, "owner": str}        (IPAM: an address taken,
                                                                                                  under the holder's lease)

``Registry`` holds what etcd holds, keyed and typed, and turns what the client reads (a
snapshot at a revision, then watch events) into typed events. A resync after a reconnect or
a compaction hands it a fresh snapshot; it diffs by key and mod_revision and emits exactly
the puts and deletes that happened meanwhile. A value that does not decode is reported once
per (key, mod_revision) in ``rejected`` and otherwise ignored: a hostile or mistyped value is
never fatal, and a key that held a good value keeps it until a good value or a delete comes
(so one bad write cannot take a host or an endpoint off the overlay).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable, Union

import msgspec

from overlay.core.wire import MTU_MAX, MTU_MIN, VNI_MAX, mac_to_int, mac_to_str

DEFAULT_PREFIX = "/overlay/v1"
HOST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HOST_ID_FORM = "1-63 of A-Z a-z 0-9 _ . -, starting with a letter or digit"


class Network(msgspec.Struct, forbid_unknown_fields=False, frozen=True):
    vni: int
    name: str = ""
    subnet: str | None = None
    mtu: int | None = None
    gateway: str | None = None  # containers' default route when attached without --gateway


class Host(msgspec.Struct, forbid_unknown_fields=False, frozen=True):
    address: str
    port: int = 4789
    probe_port: int | None = None  # UDP port answering peer probes (overlay/io/prober.py); None: not probed


class Member(msgspec.Struct, forbid_unknown_fields=False, frozen=True):
    pass


class Endpoint(msgspec.Struct, forbid_unknown_fields=False, frozen=True):
    host: str
    ipv4: list[str] = []
    ipv6: list[str] = []


class Allocation(msgspec.Struct, forbid_unknown_fields=False, frozen=True):
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
    address: ipaddress.IPv4Address


Key = Union[NetworkKey, HostKey, MemberKey, EndpointKey, AddressKey]
Value = Union[Network, Host, Member, Endpoint, Allocation]


class Schema:
    """Keys and values under one prefix: parse and build them."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = "/" + prefix.strip("/")

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
        """The typed key for ``raw``, or None for a key outside the schema."""
        if not raw.startswith(self.prefix + "/"):
            return None
        parts = raw[len(self.prefix) + 1 :].split("/")
        try:
            if parts[0] == "hosts" and len(parts) == 2 and HOST_ID.match(parts[1]):
                return HostKey(parts[1])
            if parts[0] != "networks" or len(parts) not in (2, 4):
                return None
            vni = int(parts[1])
            if not 0 <= vni <= VNI_MAX or parts[1] != str(vni):
                return None
            if len(parts) == 2:
                return NetworkKey(vni)
            if parts[2] == "members" and HOST_ID.match(parts[3]):
                return MemberKey(vni, parts[3])
            if parts[2] == "endpoints":
                mac = mac_to_int(parts[3])
                if parts[3] != mac_to_str(mac):
                    return None  # one spelling only (lower case, colons): aliases would collide
                return EndpointKey(vni, mac)
            if parts[2] == "ipam":
                address = ipaddress.IPv4Address(parts[3])
                return AddressKey(vni, address) if parts[3] == str(address) else None
        except ValueError:
            return None
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
        return msgspec.json.encode(value)


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
    elif isinstance(value, Host):
        ipaddress.IPv4Address(value.address)
        for port in (value.port, value.probe_port):
            if port is not None and not 1 <= port <= 65535:
                raise ValueError(f"port {port} is not 1 to 65535")
    elif isinstance(value, Allocation):
        if not HOST_ID.match(value.host):
            raise ValueError(f"host {value.host!r} is not a host id")
    elif isinstance(value, Endpoint):
        if not HOST_ID.match(value.host):
            raise ValueError(f"host {value.host!r} is not a host id")
        for a in value.ipv4:
            ipaddress.IPv4Address(a)
        for a in value.ipv6:
            ipaddress.IPv6Address(a)


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Put:
    key: Key
    value: Value


@dataclass(frozen=True)
class Deleted:
    key: Key
    value: Value  # what it was


Event = Union[Put, Deleted]


@dataclass
class _Entry:
    value: Value
    mod_revision: int


@dataclass
class Registry:
    """What etcd holds under the prefix, as typed values, and the events that change it."""

    schema: Schema = field(default_factory=Schema)
    revision: int = 0  # the store revision this state is at
    entries: dict[Key, _Entry] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (key, why), for the shell to log
    _seen_bad: set[tuple[str, int]] = field(default_factory=set)

    def snapshot(self, kvs: Iterable[tuple[str, bytes, int]], revision: int) -> list[Event]:
        """Replace the state with a consistent read at ``revision`` ((key, value, mod_revision)
        each); return what changed since the state we had (nothing lost in a gap)."""
        fresh: dict[Key, _Entry] = {}
        for raw_key, raw_value, mod in kvs:
            decoded = self._decode(raw_key, raw_value, mod)
            if decoded is not None:
                fresh[decoded[0]] = _Entry(decoded[1], mod)
            elif (k := self.schema.parse_key(raw_key)) is not None and k in self.entries:
                fresh[k] = self.entries[k]  # a bad value is ignored: the last good one stays
        events: list[Event] = []
        for k, old in self.entries.items():
            if k not in fresh:
                events.append(Deleted(k, old.value))
        for k, new in fresh.items():
            was = self.entries.get(k)
            if was is None or was.mod_revision != new.mod_revision:
                events.append(Put(k, new.value))
        self.entries = fresh
        self.revision = revision
        return events

    def put(self, raw_key: str, raw_value: bytes, mod_revision: int) -> list[Event]:
        """A watched PUT. A value that does not decode is ignored: the last good value stays."""
        self.revision = max(self.revision, mod_revision)
        decoded = self._decode(raw_key, raw_value, mod_revision)
        if decoded is None:
            return []
        k, value = decoded
        old = self.entries.get(k)
        self.entries[k] = _Entry(value, mod_revision)
        return [] if old is not None and old.value == value else [Put(k, value)]

    def delete(self, raw_key: str, mod_revision: int) -> list[Event]:
        """A watched DELETE."""
        self.revision = max(self.revision, mod_revision)
        k = self.schema.parse_key(raw_key)
        return self._delete(k) if k is not None else []

    def _delete(self, k: Key) -> list[Event]:
        old = self.entries.pop(k, None)
        return [Deleted(k, old.value)] if old is not None else []

    def _decode(self, raw_key: str, raw_value: bytes, mod: int) -> tuple[Key, Value] | None:
        k = self.schema.parse_key(raw_key)
        if k is None:
            self._reject(raw_key, mod, "not a key of the schema")
            return None
        try:
            return k, self.schema.decode(k, raw_value)
        except ValueError as e:
            self._reject(raw_key, mod, str(e))
            return None

    def _reject(self, raw_key: str, mod: int, why: str) -> None:
        if (raw_key, mod) not in self._seen_bad:
            self._seen_bad.add((raw_key, mod))
            self.rejected.append((raw_key, why))

    # --- views ----------------------------------------------------------------------------------

    def revision_of(self, k: Key) -> int:
        entry = self.entries.get(k)
        return entry.mod_revision if entry else 0

    def get(self, k: Key) -> Value | None:
        entry = self.entries.get(k)
        return entry.value if entry else None

    def hosts(self) -> dict[str, Host]:
        return {k.host: e.value for k, e in self.entries.items() if isinstance(k, HostKey)}  # type: ignore[misc]

    def members(self, vni: int) -> list[str]:
        return sorted(k.host for k in self.entries if isinstance(k, MemberKey) and k.vni == vni)

    def endpoints(self, vni: int | None = None) -> dict[EndpointKey, Endpoint]:
        return {
            k: e.value  # type: ignore[misc]
            for k, e in self.entries.items()
            if isinstance(k, EndpointKey) and (vni is None or k.vni == vni)
        }

    def allocations(self, vni: int) -> dict[ipaddress.IPv4Address, Allocation]:
        """The addresses taken from ``vni``'s subnet (IPAM keys)."""
        return {
            k.address: e.value  # type: ignore[misc]
            for k, e in self.entries.items()
            if isinstance(k, AddressKey) and k.vni == vni
        }

    def networks(self) -> dict[int, Network]:
        return {k.vni: e.value for k, e in self.entries.items() if isinstance(k, NetworkKey)}  # type: ignore[misc]
