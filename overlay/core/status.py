"""The agent's status as typed values: what `overlay status` prints, the metrics export and a
fleet view will read. Pure: the producers (the agent, the dataplane, the prober) fill these in;
no clock is read here (``uptime_s`` comes computed).

The JSON form is a contract (README.md, "overlay status --json"): ``Status.to_json()`` gives
exactly its keys, nesting, types and order, and ``Status.from_json()`` reads it back:

    {"agent": AgentInfo, "registry": RegistryStatus | null,
     "wakeups", "peers", "totals", "drops", "fdb", "coalesced_frames", "arp_suppressed", "nd_suppressed",   (DataplaneStatus, flat)
     "attachments": [Attachment.to_json()], "probes": {host id: ProbeStatus},
     "probe_counters": ProbeCounters | {}, "encryption": EncryptionStatus | null,
     "egress": Egress, "dns": Dns}                                       (the last two only when present)

Rules of the JSON form:
- The dataplane's keys sit at the top level, not under a key of their own (``DataplaneStatus``
  is one value in ``Status`` because one producer fills it in).
- ``encryption`` is null on a host without a static key (static mode without --encrypt).
- ``registry`` is null in static mode; ``probes`` and ``probe_counters`` are ``{}`` when probing
  is off (``probe_counters`` is then ``None`` in the typed form).
- Decoding is tolerant where the CLI always was: ``registry``, ``networks``, a network's
  ``bridge``, ``coalesced_frames``, ``arp_suppressed``, ``attachments``, ``probes``,
  ``probe_counters`` and the RTTs may be missing (null, empty or 0 then). Every other key is
  required, unknown keys are ignored (a newer agent may say more), and a wrong type is a
  ValueError naming the key.
- Attachments are kept as the JSON objects ``Attachment.to_json()`` gives: the attachment's
  own type owns its fields.
- Added for containers reaching out and being reached (the distributed gateway, egress NAT,
  published ports, DNS), and left out of the JSON where absent, so an agent without them says
  exactly what it said before, byte for byte: ``egress`` (the agent's nftables table) and
  ``dns`` (its DNS responder) at the top level, only when the agent has them; a network's
  ``name``, ``gateway``, ``gateway6``, ``nat`` and ``pinned`` only when set (not null, not
  false). ``name`` is null when the agent has no definition of the network (static mode).
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

T = TypeVar("T")


class NetworkInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A network (VNI) the agent serves: its TAP, the TAP's MAC, and its bridge if any; in etcd
    mode also its definition (name, the distributed gateway's addresses, whether traffic leaving
    through the gateway is masqueraded) and how it came to be served."""

    vni: int
    tap: str
    mac: str
    bridge: str | None = None
    name: str | None = None  # networks/<vni>'s name; None: no definition (static mode, an older agent)
    gateway: str | None = None  # the gateway address on this host's bridge (every member host has it)
    gateway6: str | None = None
    nat: bool = False  # egress NAT on (Network.masquerades)
    pinned: bool = False  # named with --network at start (not joined on demand, never left by itself)


NETWORK_OPTIONAL = ("name", "gateway", "gateway6", "nat", "pinned")  # left out of the JSON at their defaults


class AgentInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The agent itself: the first network's TAP and VNI, its VTEP, and every network."""

    tap: str
    vni: int
    local: str  # the VTEP's address (IPv4 or IPv6)
    port: int
    peers: list[str]  # static peers' VTEP addresses (empty in etcd mode)
    mtu: int
    mac: str
    address: str | None  # the TAP's A.B.C.D/len, if given
    source_check: bool
    uptime_s: float
    networks: list[NetworkInfo] = []
    local6: str | None = None  # a dual-stack host's IPv6 VTEP address
    unreachable: list[str] = []  # hosts in the registry sharing no underlay family with this one


LAG_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Lag:
    """A histogram of seconds (apply lag: an event's arrival to its application in the
    forwarding table) in fixed buckets, Prometheus-style: ``counts[i]`` are the observations
    up to ``LAG_BOUNDS[i]`` (not cumulative), the last one those above every bound."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LAG_BOUNDS) + 1)
        self.sum = 0.0
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        i = 0
        while i < len(LAG_BOUNDS) and seconds > LAG_BOUNDS[i]:
            i += 1
        self.counts[i] += 1
        self.sum += seconds
        if seconds > self.max:
            self.max = seconds

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding quantile ``q`` (the max for the last one)."""
        n = sum(self.counts)
        if n == 0:
            return 0.0
        rank, seen = q * n, 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return LAG_BOUNDS[i] if i < len(LAG_BOUNDS) else self.max
        return self.max

    def status(self) -> ApplyLag:
        return ApplyLag(
            count=sum(self.counts),
            sum_s=round(self.sum, 6),
            p50_ms=round(self.quantile(0.5) * 1000, 3),
            p99_ms=round(self.quantile(0.99) * 1000, 3),
            max_ms=round(self.max * 1000, 3),
            buckets=[[b, c] for b, c in zip((*LAG_BOUNDS, None), self.counts)],
        )


class ApplyLag(msgspec.Struct, frozen=True, kw_only=True):
    """The apply-lag histogram as status shows it: quantiles are bucket upper bounds."""

    count: int = 0
    sum_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    buckets: list[list[float | int | None]] = []  # [upper bound in s (None: above all), count]


class RegistryStatus(msgspec.Struct, frozen=True, kw_only=True):
    """etcd mode: where the registry is and how the connection to it fares."""

    endpoints: list[str]
    host_id: str
    connected: bool
    revision: int  # the newest etcd revision seen
    reconnects: int
    resyncs: int  # full re-reads after a compaction
    applied_revision: int = 0  # the newest revision whose events are in the forwarding table
    events: int = 0  # watch events received
    out_of_scope: int = 0  # of them, of a network this agent does not serve (watch scoping: 0)
    refused: int = 0  # values refused (undecodable, out of the schema, or too large)
    too_large: int = 0  # of them, larger than the 64 KiB a value may have
    keys: int = 0  # keys held (hosts and the served networks' keys)
    watches: list[str] = []  # the key ranges watched
    resync_s: float = 0.0  # how long the last snapshot (or resync) took, reading and applying
    resync_keys: int = 0  # how many keys it read
    apply_lag: ApplyLag = ApplyLag()


class Wakeups(msgspec.Struct, frozen=True, kw_only=True):
    """Event-loop calls into the fast path, per direction, and the frames they moved."""

    tx: int
    tx_frames: int
    rx: int
    rx_frames: int


class PeerTraffic(msgspec.Struct, frozen=True, kw_only=True):
    """Inner frames and bytes exchanged with one peer VTEP ("ip:port")."""

    vtep: str
    rx_frames: int
    rx_bytes: int
    tx_frames: int
    tx_bytes: int


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    """Inner frames and bytes exchanged with all peer VTEPs."""

    rx_frames: int
    rx_bytes: int
    tx_frames: int
    tx_bytes: int


class FdbStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The forwarding table: entries by source (the first three fields), then its events."""

    static: int
    registry: int
    learned: int
    refused_cap: int
    moves: int
    expired: int
    evicted: int
    refused_table_full: int
    learn_overflow: int


FDB_SOURCES = ("static", "registry", "learned")  # FdbStatus fields that count entries; the rest count events


class DataplaneStatus(msgspec.Struct, frozen=True, kw_only=True):
    """What the data path counts (``Dataplane.status()``); flat at the top of the JSON form."""

    wakeups: Wakeups
    peers: list[PeerTraffic]
    totals: Totals
    drops: dict[str, int]  # reason (a wire.Drop name, lower case) -> frames, every reason listed
    fdb: FdbStatus
    coalesced_frames: int = 0  # received frames written to the TAP inside TCP super-frames
    arp_suppressed: int = 0  # ARP requests answered from the registry
    nd_suppressed: int = 0  # IPv6 neighbour solicitations answered from the registry


class ProbeStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The underlay path to one peer host, as ``probing.Probes`` measures it."""

    address: str  # the peer's probe address, "ip:port" ("[ip]:port" for IPv6)
    rtt_ms: float | None = None  # the last round trip; None until a reply came
    srtt_ms: float | None = None  # smoothed (RFC 6298)
    loss: float  # lost fraction of the decided probes in the window
    reachable: bool
    sent: int
    received: int


class ProbeCounters(msgspec.Struct, frozen=True, kw_only=True):
    """The prober's datagram counters: ignored as bad, requests answered, socket errors."""

    bad: int
    answered: int
    errors: int


class SessionStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The session with one peer of encrypted networks (``sessions.Sessions.status``), and the
    fast path's counters on it."""

    peer: str  # its VTEP, "ip:port"
    key: str  # keys.fingerprint of its static key
    state: str  # "none", "handshaking" or "established"
    age_s: float | None  # of the current session
    rekeys: int
    handshakes_sent: int
    handshakes_received: int
    tx_messages: int  # sealed on the current session
    rx_messages: int  # opened, on every session with the peer still installed


class EncryptionStatus(msgspec.Struct, frozen=True, kw_only=True):
    """This host's identity and its sessions."""

    pubkey: str  # base64 X25519 public key (as in hosts/<id>)
    fingerprint: str
    networks: list[int]  # the encrypted networks this host serves
    sessions: list[SessionStatus]
    without_key: list[str] = []  # hosts that publish no key: nothing is sent to them on encrypted networks
    handshakes: dict[str, int] = {}  # sessions.Counters: sent, received, completed, rejected, limited, ...


class Egress(msgspec.Struct, frozen=True, kw_only=True):
    """The agent's nftables table for egress NAT and published ports, and the host settings
    they need."""

    table: str = "inet overlay"  # family and name, as `nft list table inet overlay` takes them
    applied: bool  # the last ruleset was loaded (nft -f)
    rules: int = 0  # rules in it
    error: str | None = None  # why the last ruleset was not applied
    forwarding: list[str] = []  # sysctls the agent turned on (e.g. net.ipv4.ip_forward)
    problems: list[str] = []  # what on this host may stop it working (another firewall's drop policy, ...)


class Dns(msgspec.Struct, frozen=True, kw_only=True):
    """The agent's DNS responder on the gateway addresses: names from the registry."""

    listening: list[str]  # "198.19.42.1:53", "[2001:2:0:42::1]:53"
    upstreams: list[str] = []  # where names outside the overlay are asked
    counters: dict[str, int] = {}  # queries, answered, nxdomain, forwarded, ...


class Status(msgspec.Struct, frozen=True, kw_only=True):
    """One agent's whole status; see the module docstring for its JSON form."""

    agent: AgentInfo
    dataplane: DataplaneStatus
    registry: RegistryStatus | None = None  # static mode: none
    attachments: list[dict[str, object]] = []  # Attachment.to_json() of each container attached
    probes: dict[str, ProbeStatus] = {}  # peer host id -> its path
    probe_counters: ProbeCounters | None = None  # probing off: none
    encryption: EncryptionStatus | None = None  # no static key: none
    egress: Egress | None = None  # no nftables table (static mode, nothing to masquerade or publish)
    dns: Dns | None = None  # no DNS responder

    def to_json(self) -> dict[str, object]:
        """The contract's dict (README.md), key for key and in its order."""
        agent = _builtins(self.agent)
        agent["networks"] = [_network_json(n) for n in self.agent.networks]
        out: dict[str, object] = {
            "agent": agent,
            "registry": None if self.registry is None else _builtins(self.registry),
            **_builtins(self.dataplane),
            "attachments": [dict(a) for a in self.attachments],
            "probes": {host: _builtins(p) for host, p in self.probes.items()},
            "probe_counters": {} if self.probe_counters is None else _builtins(self.probe_counters),
            "encryption": None if self.encryption is None else _builtins(self.encryption),
        }
        if self.egress is not None:
            out["egress"] = _builtins(self.egress)
        if self.dns is not None:
            out["dns"] = _builtins(self.dns)
        return out

    @classmethod
    def from_json(cls, obj: object) -> Status:
        """The typed status of a JSON one (what the control socket answers); ValueError saying
        which key is missing or wrong."""
        if not isinstance(obj, dict):
            raise ValueError(f"a status is a JSON object, not {type(obj).__name__}")
        registry, counters, encryption = obj.get("registry"), obj.get("probe_counters"), obj.get("encryption")
        egress, dns = obj.get("egress"), obj.get("dns")
        return cls(
            agent=_part(obj.get("agent"), AgentInfo, "agent"),
            dataplane=_part(obj, DataplaneStatus, ""),  # its keys are the top level's
            registry=None if registry is None else _part(registry, RegistryStatus, "registry"),
            attachments=_part(obj.get("attachments") or [], list[dict[str, object]], "attachments"),
            probes=_part(obj.get("probes") or {}, dict[str, ProbeStatus], "probes"),
            probe_counters=_part(counters, ProbeCounters, "probe_counters") if counters else None,
            encryption=None if encryption is None else _part(encryption, EncryptionStatus, "encryption"),
            egress=None if egress is None else _part(egress, Egress, "egress"),
            dns=None if dns is None else _part(dns, Dns, "dns"),
        )


def _builtins(value: msgspec.Struct) -> dict[str, object]:
    """A Struct as a JSON object, its fields in declaration order."""
    out: object = msgspec.to_builtins(value)
    assert isinstance(out, dict)
    return out


def _network_json(n: NetworkInfo) -> dict[str, object]:
    """A network as JSON: the fields added later only when set (NETWORK_OPTIONAL)."""
    out = _builtins(n)
    for name in NETWORK_OPTIONAL:
        if out[name] in (None, False):
            del out[name]
    return out


def _part(obj: object, kind: type[T], key: str) -> T:
    """``obj``, the value at top-level ``key`` ("" for the top level itself), as ``kind``;
    ValueError naming the path of what is missing or wrong."""
    try:
        return msgspec.convert(obj, kind)
    except msgspec.ValidationError as e:
        message = str(e)
        if not key:
            raise ValueError(message) from None
        if "`$" in message:  # "... - at `$.networks[0]`": the path within the part
            raise ValueError(message.replace("`$", f"`$.{key}", 1)) from None
        raise ValueError(f"{message} - at `$.{key}`") from None
