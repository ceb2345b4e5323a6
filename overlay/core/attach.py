"""Attaching containers to this host's networks: every decision of attach, detach and check, and
the steps that carry them out, as data. Pure: no netlink, no etcd, no files, no clock (``now``
is a parameter), no random numbers (a random MAC is a parameter). The shell that executes the
plans, one step at a time, is ``overlay.io.containers.Containers``.

Attach, in the order a request is judged (the first thing wrong is the one refused):
- ``--net`` is a VNI or a network name. Digits naming a network in the registry or one this
  host serves are that VNI (names are for people and need not be unique); a name shared by
  several networks is refused ("give the VNI"); an unknown one is refused with the list of the
  registry's networks; a network this host's agent does not serve is refused (kind "network").
- The agent's own namespace (the host's) is refused (kind "netns"). The attachment's id is the
  request's, else "netns/<namespace id>/<ifname>".
- ``--gateway`` (else the network's) is an IPv4 address, inside the network's subnet and
  neither its network nor its broadcast address, when the network has a subnet. ``--gateway6``
  (else the network's gateway6) is an IPv6 address inside the network's subnet6 and not its
  subnet-router anycast address. A gateway of a family the container gets no address of is
  refused when the request gives it, dropped when it is the network's (``gateways``).
- The registry must be reachable (kind "etcd").
- An id attached already gets the same answer again if it is on the same network and its veth
  is still there, and is refused otherwise (kind "invalid").
- ``--mac`` (else the random MAC the shell drew) is unicast, not another host's endpoint on
  that network and not attached here on it already.
- ``--ip`` needs a prefix length unless the network has a subnet to take it from, and then
  must fit the subnet and be free (``ipam.check``); without ``--ip`` the lowest free address
  of the subnet is taken (``ipam.pick``), never the gateway. ``AddressChoice`` says which
  address to claim next: an explicit one once, else the lowest free one, the next one after
  each claim lost to another host, at most ``CLAIM_TRIES`` times.
- IPv6 (dual stack): ``--ip6`` explicit must fit the network's subnet6 (with its prefix
  length, which a bare address takes) and be free; "none" gives no IPv6 address; without it the
  lowest free address of the subnet6 is taken, when the network has one (no IPv6 otherwise). A
  network with a subnet6 and no IPv4 subnet gives IPv6-only containers unless ``--ip`` is
  given. ``Candidates`` pairs the two families' choices: both addresses are claimed in one
  transaction, and a claim lost for either family moves only that family on.
- The MTU is the network's, never above the agent's (the TAP's: the bridge would drop more).

The attach of one candidate pair of addresses is an ``AttachPlan``: ``ClaimAddress`` (one etcd
transaction: create the IPAM key of each address, IPv4 and IPv6, if none exists), ``PlugVeth``,
``PublishEndpoint``, ``SaveAttached``. A claim
lost to another host ends the plan (nothing to undo) and the next candidate gets a new plan.
A gateway outside an explicit address's network (possible only when the network has no
subnet) is known once the address is ours: the plan is then ``ClaimAddress``, ``Refuse``. When
step k fails, ``undo(k)`` says what to do, newest first: the undo of every step before k, and of
whatever step k may have done before failing (a half-made veth; an endpoint written before etcd
stopped answering, which must also never be written later: released, then forgotten).

Detach selects by id, else by namespace (the attachments named after its id, or given by that
path if it is gone) and ifname; nothing selected is not an error (CNI DEL is idempotent). Each
selected attachment's ``DetachPlan``: ``Unplug`` (not when the veth is gone already),
``ForgetLocal`` (first: its late frames must not publish it again), ``ReleaseEndpoint``,
``ReleaseAddress`` (one per address, IPv4 then IPv6), ``SaveDetached``. A detach is never undone: what fails stays held until the
reaper tries again.

A (VNI, MAC) is ``owns``-ed while it is being attached or is attached, and for
``DETACH_GRACE`` seconds after its detach (frames it sent before, read from the TAP after).

The state file (``encode_state``/``decode_state``) is ``{"lease": int | null, "attachments":
[Attachment.to_json()]}``; a bare list is the first format (attachments, no lease). Records
written before dual stack have no ``address6``/``gateway6``: they load as IPv4-only.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Union

from overlay.core import ipam
from overlay.core.addresses import IPAddress
from overlay.core.control import AttachRequest, DetachRequest, Refused
from overlay.core.ports import PortSpec, exposed_spec, parse_exposed
from overlay.core.registry import AddressKey, Allocation, Endpoint, EndpointKey, Network, Registry
from overlay.core.wire import mac_to_int, mac_to_str, unicast_mac

CLAIM_TRIES = 64
NO_IPV6 = "none"  # --ip6 none: no IPv6 address, even on a network with a subnet6
DETACH_GRACE = 10.0  # seconds a detached MAC's late frames are not taken for a new local endpoint


@dataclass(frozen=True)
class Attachment:
    """One container's interface on one network, as the agent remembers it (and answers it)."""

    id: str  # who asked: "cni/<container id>/<ifname>", or "netns/<inode>/<ifname>" for overlay attach
    vni: int
    network: str
    netns: str
    ifname: str
    host_ifname: str
    mac: str
    address: str | None  # A.B.C.D/len; None: no IPv4 address (an IPv6-only network)
    gateway: str | None
    mtu: int
    address6: str | None = None  # V6/len; None: no IPv6 address
    gateway6: str | None = None
    name: str | None = None  # its DNS name on the network (a label)
    published: tuple[PortSpec, ...] = ()  # host ports published onto it (each with its host port chosen)
    exposed: tuple[str, ...] = ()  # the ports it serves, "80/tcp" (its endpoint's "ports")

    @property
    def interface(self) -> ipaddress.IPv4Interface | None:
        return ipaddress.IPv4Interface(self.address) if self.address else None

    @property
    def interface6(self) -> ipaddress.IPv6Interface | None:
        return ipaddress.IPv6Interface(self.address6) if self.address6 else None

    @property
    def router(self) -> ipaddress.IPv4Address | None:
        """The gateway as an address: the container's default route, if it has one."""
        return ipaddress.IPv4Address(self.gateway) if self.gateway else None

    @property
    def router6(self) -> ipaddress.IPv6Address | None:
        """The IPv6 default route, if it has one."""
        return ipaddress.IPv6Address(self.gateway6) if self.gateway6 else None

    @property
    def endpoint_key(self) -> EndpointKey:
        return EndpointKey(self.vni, mac_to_int(self.mac))

    @property
    def address_keys(self) -> tuple[AddressKey, ...]:
        """The IPAM keys of its addresses, IPv4 first."""
        return tuple(AddressKey(self.vni, i.ip) for i in (self.interface, self.interface6) if i is not None)

    @property
    def addresses(self) -> str:
        """Its addresses, for people and logs: "A.B.C.D/len V6/len"."""
        return " ".join(a for a in (self.address, self.address6) if a)

    def endpoint(self, host: str) -> Endpoint:
        """The endpoint it is published as, on ``host``."""
        v4, v6 = self.interface, self.interface6
        return Endpoint(host, [str(v4.ip)] if v4 else [], [str(v6.ip)] if v6 else [], self.name, list(self.exposed))

    def target(self, spec: PortSpec) -> IPAddress | None:
        """The address of this container that ``spec`` forwards to: of the host address's
        family, IPv4 first when the spec has no host address; None if it has none of that family."""
        v4, v6 = self.interface, self.interface6
        if spec.host_ip is not None:
            chosen = v4 if spec.host_ip.version == 4 else v6
        else:
            chosen = v4 or v6
        return chosen.ip if chosen is not None else None

    def to_json(self) -> dict[str, object]:
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["published"] = [p.to_json() for p in self.published]
        record["exposed"] = list(self.exposed)
        return record

    @classmethod
    def from_json(cls, record: object) -> Attachment:
        """The attachment ``to_json`` gave; TypeError naming what is missing, unknown or mistyped."""
        if not isinstance(record, dict):
            raise TypeError(f"an attachment is a JSON object, not {type(record).__name__}")
        names = [f.name for f in fields(cls)]
        optional = ("address6", "gateway6", "name", "published", "exposed")  # added later: older records lack them
        missing = [n for n in names if n not in record and n not in optional]
        unknown = sorted(str(k) for k in record if k not in names)
        if missing or unknown:
            raise TypeError(f"an attachment with fields missing {missing} or unknown {unknown}")

        def text(name: str) -> str:
            value = record[name]
            if not isinstance(value, str):
                raise TypeError(f"attachment field {name} must be a string, not {type(value).__name__}")
            return value

        def maybe(name: str) -> str | None:
            return None if record.get(name) is None else text(name)

        def published() -> tuple[PortSpec, ...]:
            value = record.get("published") or []
            if not isinstance(value, list):
                raise TypeError(f"attachment field published must be a list, not {type(value).__name__}")
            try:
                return tuple(PortSpec.from_json(p) for p in value)
            except ValueError as e:
                raise TypeError(f"attachment field published: {e}") from None

        def exposed() -> tuple[str, ...]:
            value = record.get("exposed") or []
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise TypeError("attachment field exposed must be a list of strings")
            try:
                return tuple(parse_exposed(p) for p in value)
            except ValueError as e:
                raise TypeError(f"attachment field exposed: {e}") from None

        def number(name: str) -> int:
            value = record[name]
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"attachment field {name} must be an integer, not {type(value).__name__}")
            return value

        return cls(
            text("id"),
            number("vni"),
            text("network"),
            text("netns"),
            text("ifname"),
            text("host_ifname"),
            text("mac"),
            maybe("address"),
            maybe("gateway"),
            number("mtu"),
            maybe("address6"),
            maybe("gateway6"),
            maybe("name"),
            published(),
            exposed(),
        )


# --- the steps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimAddress:
    """Create the IPAM key of each address (IPv4 first, then IPv6) under the lease, all in one
    transaction, unless one of them exists; the shell answers which are another host's (none:
    all are ours now; some: none was written)."""

    keys: tuple[AddressKey, ...]
    allocation: Allocation


@dataclass(frozen=True)
class Refuse:
    """Stop with this refusal (known only once the step before it is done)."""

    message: str
    kind: str


@dataclass(frozen=True)
class PlugVeth:
    """Make the veth pair: the container end configured in its namespace, the host end on the
    network's bridge."""

    attachment: Attachment


@dataclass(frozen=True)
class PublishEndpoint:
    """Hold the container's endpoint (its MAC on this host, its address) under the lease."""

    key: EndpointKey
    endpoint: Endpoint


@dataclass(frozen=True)
class SaveAttached:
    """Write the state file with the attachment in it, then remember it as attached."""

    attachment: Attachment


@dataclass(frozen=True)
class Unplug:
    """Delete the host end of the veth (the container end goes with it); none is no error."""

    host_ifname: str


@dataclass(frozen=True)
class ForgetLocal:
    """Note the MAC detached (now), then drop it from the fast path's MACs seen behind the TAP."""

    vni: int
    mac: int


@dataclass(frozen=True)
class ReleaseEndpoint:
    """Delete the endpoint if it is still this host's, and stop holding it."""

    key: EndpointKey


@dataclass(frozen=True)
class ForgetEndpoint:
    """Stop holding the endpoint without touching etcd: it must never be written later."""

    key: EndpointKey


@dataclass(frozen=True)
class ReleaseAddress:
    """Delete the address's IPAM key if it is still this host's, and stop holding it."""

    key: AddressKey


@dataclass(frozen=True)
class SaveDetached:
    """Forget the attachment and write the state file without it."""

    attachment: Attachment


AttachStep = Union[ClaimAddress, Refuse, PlugVeth, PublishEndpoint, SaveAttached]
UndoStep = Union[Unplug, ReleaseEndpoint, ForgetEndpoint, ReleaseAddress]
DetachStep = Union[Unplug, ForgetLocal, ReleaseEndpoint, ReleaseAddress, SaveDetached]


@dataclass(frozen=True)
class AttachPlan:
    """Attaching ``attachment``: its steps in order, and what undoes a failure at each."""

    attachment: Attachment
    steps: tuple[AttachStep, ...]

    def undo(self, failed: int) -> tuple[UndoStep, ...]:
        """What to do, in this order, when step ``failed`` raised (or its claim was lost): the
        failed step's possible partial effect, then every earlier step's, newest first."""
        out: list[UndoStep] = []
        for index in range(failed, -1, -1):
            out.extend(_undo_of(self.steps[index], done=index < failed))
        return tuple(out)


def _undo_of(step: AttachStep, done: bool) -> tuple[UndoStep, ...]:
    if isinstance(step, ClaimAddress):
        # A claim that raised or was lost holds nothing: the keys are held only once etcd said yes.
        return tuple(ReleaseAddress(k) for k in step.keys) if done else ()
    if isinstance(step, PlugVeth):
        return (Unplug(step.attachment.host_ifname),)  # done, or half made
    if isinstance(step, PublishEndpoint):
        return ReleaseEndpoint(step.key), ForgetEndpoint(step.key)  # it may be written before a failure
    return ()  # Refuse does nothing; SaveAttached is the last step and remembers only once written


@dataclass(frozen=True)
class DetachPlan:
    """Detaching ``attachment``: its steps in order; none is undone."""

    attachment: Attachment
    steps: tuple[DetachStep, ...]


# --- the decisions --------------------------------------------------------------------------------


def resolve_network(name: str, networks: Mapping[int, Network], served: Collection[int]) -> tuple[int, Network]:
    """The VNI and definition of the network ``name`` (a VNI or a name) among the registry's
    ``networks``, if this host serves it (``served``); a network served but not in the
    registry is bare (named after its VNI)."""
    named = [v for v, n in networks.items() if n.name == name]
    vni: int | None
    if name.isdigit() and (int(name) in networks or int(name) in served):
        vni = int(name)  # a VNI first: names are for people, and need not be unique
    elif len(named) > 1:
        raise Refused(
            f"several networks are named {name!r} (VNIs {', '.join(map(str, sorted(named)))}): give the VNI", "network"
        )
    else:
        vni = named[0] if named else (int(name) if name.isdigit() else None)
    if vni is None or (vni not in networks and vni not in served):
        known = ", ".join(f"{n.name or v} ({v})" for v, n in sorted(networks.items())) or "none"
        raise Refused(
            f"network {name!r} is not in the registry (networks known here: {known}): create it with "
            f"'overlay net create', or give its VNI",
            "network",
        )
    if vni not in served:
        raise Refused(
            f"this host's agent is not on network {name} (VNI {vni}): join it with 'overlay net join {vni}'",
            "network",
        )
    return vni, networks.get(vni) or Network(vni, str(vni))


def attachment_id(req: AttachRequest, netns: str, own: str) -> str:
    """The id of what ``req`` attaches, given the id of its namespace (``netns``) and of the
    agent's own (``own``); the host's namespace is refused."""
    if netns == own:
        raise Refused(
            f"{req.netns} is the agent's own network namespace (the host's): attach containers, not the host", "netns"
        )
    return req.id or f"{netns_prefix(netns)}{req.ifname}"


def netns_prefix(netns: str) -> str:
    """How the ids of what was attached to the namespace with id ``netns`` begin (without an
    id of their own)."""
    return f"netns/{netns}/"


def _check_gateway(text: str | None, subnet_text: str | None, version: int) -> IPAddress | None:
    """A container's gateway of ``version`` from ``text``, checked against its subnet."""
    flag, kind, name = (
        ("--gateway", "subnet", "network or broadcast")
        if version == 4
        else ("--gateway6", "subnet6", "subnet-router anycast")
    )
    if text is None:
        return None
    try:
        gateway = ipaddress.ip_address(text)
        if gateway.version != version:
            raise ValueError(text)
    except ValueError:
        raise Refused(f"{flag} {text!r} is not an IPv{version} address", "invalid") from None
    if subnet_text is not None:
        subnet = ipaddress.ip_network(subnet_text)
        if gateway not in subnet:
            raise Refused(f"{flag} {gateway} is outside the container's {kind} {subnet}", "address")
        if gateway == subnet.network_address or (version == 4 and gateway == subnet.broadcast_address):
            raise Refused(f"{flag} {gateway} is the {name} address of {subnet}", "address")
    return gateway


def check_gateway(text: str | None, network: Network) -> ipaddress.IPv4Address | None:
    """The container's gateway from ``text`` (the request's, else the network's), if any."""
    return _check_gateway(text, network.subnet, 4)  # type: ignore[return-value]


def check_gateway6(text: str | None, network: Network) -> ipaddress.IPv6Address | None:
    """The container's IPv6 gateway from ``text`` (the request's, else the network's), if any."""
    return _check_gateway(text, network.subnet6, 6)  # type: ignore[return-value]


def wants_ipv4(wanted: str | None, network: Network) -> bool:
    """Whether the container gets an IPv4 address: always, but on a network with a subnet6 and
    no IPv4 subnet unless ``--ip`` asks for one (IPv6-only containers)."""
    return wanted is not None or network.subnet is not None or network.subnet6 is None


def wants_ipv6(wanted6: str | None, network: Network) -> bool:
    """Whether the container gets an IPv6 address: ``--ip6`` given (not "none"), or the
    network has a subnet6 to take one from."""
    return wanted6 != NO_IPV6 and (wanted6 is not None or network.subnet6 is not None)


def gateways(req: AttachRequest, network: Network) -> tuple[ipaddress.IPv4Address | None, ipaddress.IPv6Address | None]:
    """The container's (IPv4, IPv6) default routes: the request's, else the network's, each
    checked (``check_gateway``, ``check_gateway6``). For a family the container gets no address
    of, the network's is dropped and the request's refused."""
    v4, v6 = wants_ipv4(req.ip, network), wants_ipv6(req.ip6, network)
    name = network.name or network.vni
    if req.gateway is not None and not v4:
        raise Refused(
            f"--gateway {req.gateway}: the container gets no IPv4 address (network {name} has only a subnet6): "
            f"leave out --gateway, or give --ip",
            "invalid",
        )
    if req.gateway6 is not None and not v6:
        why = "--ip6 none" if req.ip6 == NO_IPV6 else f"network {name} has no subnet6"
        raise Refused(f"--gateway6 {req.gateway6}: the container gets no IPv6 address ({why})", "invalid")
    gateway = check_gateway(req.gateway or network.gateway, network) if v4 else None
    gateway6 = check_gateway6(req.gateway6 or network.gateway6, network) if v6 else None
    return gateway, gateway6


def require_registry(connected: bool) -> None:
    """Attach writes addresses and endpoints: refused while etcd is unreachable."""
    if not connected:
        raise Refused(
            "the registry (etcd) is unreachable from this agent, so addresses and endpoints "
            "cannot be written: try again when 'overlay status' shows it connected",
            "etcd",
        )


class AddressChoice:
    """Which address of ``vni`` of one family (``version``) to claim next: the explicit one
    (``wanted``) once; else the lowest one not ``used``, then after each ``lost`` one the lowest
    left, at most ``tries`` addresses in all. ``next`` refuses when there is nothing (more) to
    try."""

    def __init__(
        self,
        vni: int,
        network: Network,
        wanted: ipam.Interface | None,
        used: Iterable[IPAddress],
        tries: int = CLAIM_TRIES,
        version: ipam.Version = 4,
    ) -> None:
        self.vni, self.network, self.wanted, self.tries, self.version = vni, network, wanted, tries, version
        self.used = set(used)
        self.losses: set[IPAddress] = set()
        self.offered = 0

    @classmethod
    def parse(
        cls, vni: int, network: Network, wanted: str | None, used: Iterable[IPAddress], version: ipam.Version = 4
    ) -> AddressChoice:
        """From the request's ``--ip`` (``--ip6`` for ``version`` 6; None: the agent picks): its
        prefix length filled in from the network's subnet when missing, and checked against the
        subnet and ``used``."""
        used = set(used)
        if wanted is None:
            return cls(vni, network, None, used, version=version)
        if version == 6:
            return cls(vni, network, _parse_ip6(wanted, network, used), used, version=6)
        try:
            address = ipaddress.IPv4Interface(wanted)
        except ValueError:
            raise Refused(
                f"--ip {wanted!r} is not an address with a prefix length like 198.19.1.5/24", "invalid"
            ) from None
        if "/" not in wanted:
            if not network.subnet:
                raise Refused(
                    f"--ip {wanted}: give the prefix length too (network {network.name or vni} "
                    f"has no subnet to take it from)",
                    "invalid",
                )
            address = ipaddress.IPv4Interface(f"{address.ip}/{ipaddress.IPv4Network(network.subnet).prefixlen}")
        if network.subnet is not None:
            try:
                ipam.check(network, address, used)
            except ipam.IpamError as e:
                raise Refused(str(e), e.kind) from None
        return cls(vni, network, address, used)

    def next(self) -> ipam.Interface:
        name = self.network.name or self.vni
        if self.wanted is not None:
            if self.losses:
                raise Refused(
                    f"address {self.wanted.ip} is in use on network {name}: pick another, "
                    f"or leave out {'--ip' if self.version == 4 else '--ip6'} to get a free one",
                    "address",
                )
            return self.wanted
        if self.offered >= self.tries:
            raise Refused(
                f"could not claim an address on network {name} after {self.tries} tries "
                f"(many hosts allocating at once?): try again",
                "address",
            )
        try:
            address = ipam.pick(self.network, self.used | self.losses, self.version)
        except ipam.IpamError as e:
            raise Refused(str(e), e.kind) from None
        self.offered += 1
        return address

    def lost(self, address: ipam.Interface) -> None:
        """Another host claimed ``address`` first."""
        self.losses.add(address.ip)


def _parse_ip6(wanted: str, network: Network, used: set[IPAddress]) -> ipaddress.IPv6Interface:
    """An explicit ``--ip6``: V6/len, or V6 with the subnet6's length; checked by ``ipam.check``."""
    try:
        address = ipaddress.IPv6Interface(wanted)
    except ValueError:
        raise Refused(
            f"--ip6 {wanted!r} is not an IPv6 address with a prefix length like 2001:2:0:42::5/64 (or 'none')",
            "invalid",
        ) from None
    if "/" not in wanted and network.subnet6 is not None:
        address = ipaddress.IPv6Interface(f"{address.ip}/{ipaddress.IPv6Network(network.subnet6).prefixlen}")
    try:
        ipam.check(network, address, used)
    except ipam.IpamError as e:
        raise Refused(str(e), e.kind) from None
    return address


class Candidates:
    """The addresses one attach claims together: an IPv4 choice and an IPv6 choice, either
    None when the container gets no address of that family (never both)."""

    def __init__(self, v4: AddressChoice | None, v6: AddressChoice | None) -> None:
        self.v4, self.v6 = v4, v6
        self.offered: tuple[ipaddress.IPv4Interface | None, ipaddress.IPv6Interface | None] = (None, None)

    def next(self) -> tuple[ipaddress.IPv4Interface | None, ipaddress.IPv6Interface | None]:
        """The next pair to claim (refused when a family has nothing more to try)."""
        v4 = self.v4.next() if self.v4 is not None else None
        v6 = self.v6.next() if self.v6 is not None else None
        assert not isinstance(v4, ipaddress.IPv6Interface) and not isinstance(v6, ipaddress.IPv4Interface)
        self.offered = (v4, v6)
        return self.offered

    def lost(self, taken: Iterable[IPAddress]) -> None:
        """The claim of the last pair failed: ``taken`` are the addresses another host had (an
        address not among them was free, and is offered again)."""
        others = set(taken)
        for address, choice in zip(self.offered, (self.v4, self.v6)):
            if address is not None and choice is not None and address.ip in others:
                choice.lost(address)


class Attachments:
    """This host's attachments (``attached``, by id), the (VNI, MAC)s being attached and those
    just detached, and the decisions that read them; see the module docstring for the rules."""

    def __init__(self, host_id: str, served: Collection[int], mtu: int) -> None:
        self.host_id, self.served, self.mtu = host_id, served, mtu
        self.attached: dict[str, Attachment] = {}
        self.attaching: set[tuple[int, int]] = set()  # (vni, MAC) plugged but not yet recorded
        self.detached: dict[tuple[int, int], float] = {}  # (vni, MAC) -> when: its frames may still be queued

    # --- attach ---------------------------------------------------------------------------------

    def network(self, name: str, networks: Mapping[int, Network]) -> tuple[int, Network]:
        return resolve_network(name, networks, self.served)

    def again(self, existing: Attachment, vni: int, plugged: bool) -> Attachment:
        """Attach asked for ``existing``'s id again: the same answer if it is on network ``vni``
        and its veth is still there (``plugged``); refused otherwise."""
        if existing.vni == vni and plugged:
            return existing
        raise Refused(f"{existing.id} is already attached to network {existing.network}: detach it first", "invalid")

    def mac(self, wanted: str | None, vni: int, random_mac: int, registry: Registry) -> str:
        """The container's MAC: ``wanted``, checked, else ``random_mac`` (drawn by the shell)."""
        if wanted is None:
            return mac_to_str(random_mac)
        try:
            mac = unicast_mac(wanted)
        except ValueError as e:
            raise Refused(f"--mac {e}", "invalid") from None
        owner = registry.get(EndpointKey(vni, mac))
        if isinstance(owner, Endpoint) and owner.host != self.host_id:
            raise Refused(
                f"MAC {mac_to_str(mac)} is in use on network {vni} by host {owner.host}: detach it there "
                f"first, or choose another --mac",
                "address",
            )
        if any(a.vni == vni and a.mac == mac_to_str(mac) for a in self.attached.values()):
            raise Refused(f"MAC {mac_to_str(mac)} is already attached here on network {vni}", "address")
        return mac_to_str(mac)

    def addresses(
        self,
        vni: int,
        network: Network,
        wanted: str | None,
        gateway: ipaddress.IPv4Address | None,
        registry: Registry,
        wanted6: str | None = None,
        gateway6: ipaddress.IPv6Address | None = None,
    ) -> Candidates:
        """Which addresses to claim, of each family the container gets (``wants_ipv4``,
        ``wants_ipv6``): never one in use (claimed or announced), nor a gateway."""
        used: set[IPAddress] = ipam.taken(registry, vni) | {g for g in (gateway, gateway6) if g}  # never the route out
        v6 = AddressChoice.parse(vni, network, wanted6, used, 6) if wants_ipv6(wanted6, network) else None
        v4 = AddressChoice.parse(vni, network, wanted, used) if wants_ipv4(wanted, network) or v6 is None else None
        return Candidates(v4, v6)

    def plan_attach(
        self,
        *,
        req: AttachRequest,
        attachment_id: str,
        host_ifname: str,
        vni: int,
        network: Network,
        mac: str,
        gateway: ipaddress.IPv4Address | None,
        address: ipaddress.IPv4Interface | None,
        gateway6: ipaddress.IPv6Address | None = None,
        address6: ipaddress.IPv6Interface | None = None,
        published: Iterable[PortSpec] = (),
    ) -> AttachPlan:
        """Attaching ``req`` as ``attachment_id`` with the candidate ``address`` and ``address6``
        (at least one of them)."""
        a = Attachment(
            attachment_id,
            vni,
            network.name or str(vni),
            req.netns,
            req.ifname,
            host_ifname,
            mac,
            str(address) if address else None,
            str(gateway) if gateway and address else None,
            min(network.mtu or self.mtu, self.mtu),  # never above the TAP's: the bridge would drop
            str(address6) if address6 else None,
            str(gateway6) if gateway6 and address6 else None,
            req.name,
            tuple(published),
            tuple(dict.fromkeys([*req.expose, *(f"{p.port}/{p.proto}" for p in req.publish)])),
        )
        claim = ClaimAddress(a.address_keys, Allocation(self.host_id, mac, attachment_id))
        if address is not None and gateway is not None and gateway not in address.network:
            return AttachPlan(
                a,
                (claim, Refuse(f"--gateway {gateway} is outside the container's subnet {address.network}", "address")),
            )
        endpoint = PublishEndpoint(a.endpoint_key, a.endpoint(self.host_id))
        return AttachPlan(a, (claim, PlugVeth(a), endpoint, SaveAttached(a)))

    # --- published ports ------------------------------------------------------------------------

    def target(self, text: str, netns: str | None) -> Attachment:
        """The attachment ``overlay publish``/``unpublish`` names: an attachment id, a container
        name, or a namespace (``netns``: its id, None if ``text`` is not one) holding exactly one
        attachment; refused (kind "unknown", or "invalid" when several match) otherwise."""
        if text in self.attached:
            return self.attached[text]
        found = [a for a in self.attached.values() if a.name is not None and a.name == text.lower()]
        if not found and netns is not None:
            prefix = netns_prefix(netns)
            found = [a for a in self.attached.values() if a.id.startswith(prefix) or a.netns == text]
        if len(found) == 1:
            return found[0]
        if found:
            raise Refused(
                f"{text} names {len(found)} attachments ({', '.join(sorted(a.id for a in found))}): give the "
                f"attachment id (overlay status lists them)",
                "invalid",
            )
        raise Refused(f"no container {text!r} is attached on this host (an id, a --name or a namespace)", "unknown")

    def publications(self) -> list[tuple[Attachment, PortSpec]]:
        """Every published port on this host, with the attachment it goes to."""
        return [(a, p) for a in self.attached.values() for p in a.published]

    def check_publish(self, a: Attachment, specs: Iterable[PortSpec]) -> None:
        """Refuse (one line) ``specs`` for ``a``: a host port published here already (by any
        container, or twice in ``specs``), or a container without an address of the spec's
        family. A spec without a host port (random) conflicts with nothing here."""
        taken = {p.key: other for other, p in self.publications()}
        for spec in specs:
            target = a.target(spec)
            if target is None:
                family = "IPv6" if spec.host_ip is not None and spec.host_ip.version == 6 else "IPv4"
                raise Refused(f"publish {spec}: {a.id} has no {family} address to forward to", "invalid")
            if (a.gateway if target.version == 4 else a.gateway6) is None:
                raise Refused(
                    f"publish {spec}: {a.id} has no {'IPv4' if target.version == 4 else 'IPv6'} gateway, so its "
                    f"answers could not come back through the host: create network {a.network} with a gateway "
                    f"(overlay net create --gateway), or attach with --gateway",
                    "invalid",
                )
            if spec.host_port:
                other = taken.get(spec.key)
                if other is not None:
                    who = f"{other.name} ({other.id})" if other.name else other.id
                    raise Refused(
                        f"host port {spec.host_port}/{spec.proto} is already published here, for {who}: "
                        f"unpublish it first, or choose another",
                        "address",
                    )
                taken[spec.key] = a

    def unpublished_exposed(self, a: Attachment) -> list[PortSpec]:
        """``publish --all``: a random-host-port publication for each port ``a`` exposes that is
        not published yet; refused (one line) when it exposes none, or all are published."""
        if not a.exposed:
            raise Refused(
                f"{a.id} exposes no ports: attach it with --expose PORT[/proto] (or publish one port by hand)",
                "invalid",
            )
        done = {f"{p.port}/{p.proto}" for p in a.published}
        todo = [exposed_spec(e) for e in a.exposed if e not in done]
        if not todo:
            raise Refused(f"every port {a.id} exposes is published already ({', '.join(a.exposed)})", "invalid")
        return todo

    def with_published(self, a: Attachment, specs: Iterable[PortSpec]) -> Attachment:
        """``a`` with ``specs`` (host ports chosen) added."""
        return replace(a, published=(*a.published, *specs))

    def unpublished(self, a: Attachment, spec: PortSpec | None) -> tuple[Attachment, list[PortSpec]]:
        """``a`` without the publication ``spec`` names (by protocol and host port; None: all of
        them), and what was removed; refused (kind "unknown") if nothing matches."""
        gone = [p for p in a.published if spec is None or p.key == spec.key]
        if not gone and spec is not None:
            shown = ", ".join(str(p) for p in a.published) or "none"
            raise Refused(
                f"{a.id} has no host port {spec.host_port}/{spec.proto} published (its publications: {shown})",
                "unknown",
            )
        return replace(a, published=tuple(p for p in a.published if p not in gone)), gone

    # --- detach and check -----------------------------------------------------------------------

    def select(self, req: DetachRequest, netns: str | None) -> list[Attachment]:
        """What ``req`` detaches. ``netns``: the id of the request's namespace, None if it is gone
        (or the request names an id)."""
        if req.id is not None:
            return [self.attached[req.id]] if req.id in self.attached else []
        prefix = netns_prefix(netns) if netns is not None else None
        return [
            a
            for a in self.attached.values()
            if ((prefix is not None and a.id.startswith(prefix)) or a.netns == req.netns)
            and (req.ifname is None or a.ifname == req.ifname)
        ]

    def plan_detach(self, a: Attachment, unplug: bool) -> DetachPlan:
        """Detaching ``a``; without ``unplug`` when its veth is gone already (the reaper)."""
        key = a.endpoint_key
        steps: tuple[DetachStep, ...] = (
            ForgetLocal(a.vni, key.mac),
            ReleaseEndpoint(key),
            *(ReleaseAddress(k) for k in a.address_keys),
            SaveDetached(a),
        )
        return DetachPlan(a, ((Unplug(a.host_ifname), *steps) if unplug else steps))

    def checked(self, attachment_id: str) -> Attachment:
        """The attachment CHECK asks about; refused if there is none."""
        a = self.attached.get(attachment_id)
        if a is None:
            raise Refused(f"{attachment_id} is not attached on this host", "unknown")
        return a

    def verify(self, a: Attachment, plumbing: list[str], registry: Registry) -> None:
        """Refuse (kind "broken") if ``a`` has problems: those of its plumbing (found by the
        shell), or its endpoint or address not this host's in the registry."""
        problems = list(plumbing)
        endpoint = registry.get(a.endpoint_key)
        if not isinstance(endpoint, Endpoint) or endpoint.host != self.host_id:
            problems.append(f"the registry does not have endpoint {a.mac} on this host")
        for address, key in zip([x for x in (a.address, a.address6) if x], a.address_keys):
            allocation = registry.get(key)
            if not isinstance(allocation, Allocation) or allocation.host != self.host_id:
                problems.append(f"address {address} is not held by this host in the registry")
        if problems:
            raise Refused(f"{a.id} is broken: " + "; ".join(problems), "broken")

    # --- whose MAC ------------------------------------------------------------------------------

    def owns(self, vni: int, mac: int, now: float) -> bool:
        """Whether ``mac`` on ``vni`` is (or just was) an attached container's: attach publishes
        its endpoint, and a frame it sent before a detach, read from the TAP after it, must not
        publish it again."""
        if (vni, mac) in self.attaching or any(
            a.vni == vni and mac_to_int(a.mac) == mac for a in self.attached.values()
        ):
            return True
        when = self.detached.get((vni, mac))
        return when is not None and now - when < DETACH_GRACE

    def note_detached(self, vni: int, mac: int, now: float) -> None:
        """``mac`` on ``vni`` was detached at ``now`` (and the notes older than the grace go)."""
        self.detached = {k: t for k, t in self.detached.items() if now - t < DETACH_GRACE}
        self.detached[vni, mac] = now


# --- the state file -------------------------------------------------------------------------------


def encode_state(lease: int | None, attachments: Iterable[Attachment]) -> str:
    """The state file's text: the attachments, and the lease a successor may resume."""
    return json.dumps({"lease": lease, "attachments": [a.to_json() for a in attachments]}, indent=1)


def decode_state(text: str) -> tuple[int | None, list[object]]:
    """(lease to resume, attachment records) from a state file's text; ValueError if it is not
    a state file. A lease that is not an integer is none; the records are for
    ``Attachment.from_json``."""
    data: object = json.loads(text)
    if isinstance(data, list):  # the first format: attachments only
        return None, list(data)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    lease = data.get("lease")
    records = data.get("attachments") or []
    if not isinstance(records, list):
        raise ValueError(f"attachments must be a list, not {type(records).__name__}")
    return (lease if isinstance(lease, int) else None), list(records)
