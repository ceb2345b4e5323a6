"""Docker's libnetwork remote drivers (NetworkDriver and IpamDriver), as decisions. Pure: the
server (overlay.io.docker) moves HTTP and JSON and executes; this module types every request,
refuses bad ones with a line a user can act on, and says what each request means for the
overlay. Docker calls, in this order (libnetwork docs/remote.md and docs/ipam.md):

    docker network create -d NAME --ipam-driver NAME --subnet S [-o vni=N | -o network=NAME] net
        IpamDriver.RequestPool      our pool id is the subnet; the gateway (the network's
                                    distributed gateway, else the subnet's first address) in Data
        [IpamDriver.RequestAddress] only with --gateway: it must be the network's gateway
        NetworkDriver.CreateNetwork which overlay network it is (``resolve_network``): created in
                                    the registry when new, else checked against its definition
    docker run --network net [--ip A] [--mac-address M]
        IpamDriver.RequestAddress   --ip, else the lowest free address (never the gateway):
                                    claimed in etcd before the endpoint exists
        NetworkDriver.CreateEndpoint the MAC (Docker's, else ours, answered), the address checked
                                    to be one claimed here for this network
        NetworkDriver.Join          the veth (host end on the bridge, the other left in the
                                    host's namespace for Docker to move, address and MAC it),
                                    the gateway, no docker_gwbridge
        NetworkDriver.ProgramExternalConnectivity  -p: our published ports
    and back: RevokeExternalConnectivity, Leave, DeleteEndpoint, ReleaseAddress, DeleteNetwork.

Rules for requests (``DockerError``, answered ``{"Err": message}``): the body is a JSON object;
an id is a non-empty string of at most 128 characters from [A-Za-z0-9_.-]; an address is of the
form Docker sends (A.B.C.D/len for interfaces, A.B.C.D for a bare address); fields we do not
know are ignored (a newer Docker may send more). ``-o`` options: ``vni`` (1 to 16777215),
``network`` (a registry network's name), ``name`` (the name a new network gets in the registry;
Docker does not tell a driver its network's name), ``encrypted`` (a new network is encrypted;
an existing one must be). Any other key without a dot is refused; dotted keys
(``com.docker.*``, labels) are Docker's own and ignored.

What the agent keeps (``DockerState``, JSON in ``<state_dir>/<host-id>.docker.json``): Docker's
network ids and what they are (Docker never resends CreateNetwork to a restarted plugin), its
endpoints, and the addresses claimed for it not yet released.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

from overlay.core.addresses import IPAddress
from overlay.core.attach import AddressChoice, Attachment
from overlay.core.control import Refused
from overlay.core.ports import PortSpec
from overlay.core.registry import DNS_LABEL, Network
from overlay.core.wire import VNI_MAX, mac_to_str, unicast_mac

GENERIC = "com.docker.network.generic"  # the -o options of docker network create
ADDRESS_TYPE = "RequestAddressType"
GATEWAY_TYPE = "com.docker.network.gateway"
PORTMAP = "com.docker.network.portmap"
EXPOSED = "com.docker.network.endpoint.exposedports"
NAME_OPTION = "overlay.name"  # an endpoint's DNS name, in CreateEndpoint's or Join's options
ADDRESS_SPACE = "overlay"
OPTIONS = ("vni", "network", "name", "encrypted")
ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
PROTOCOLS = {6: "tcp", 17: "udp"}
DST_PREFIX = "eth"  # Docker names the container's interface eth<n>


class DockerError(Exception):
    """A request refused: the message is one line the docker CLI shows."""


# --- reading requests ---------------------------------------------------------------------------


def _object(body: object, what: str) -> Mapping[str, object]:
    if not isinstance(body, dict):
        raise DockerError(f"{what}: the request must be a JSON object, not {type(body).__name__}")
    return body


def _id(body: Mapping[str, object], name: str, what: str) -> str:
    value = body.get(name)
    if value is None or value == "":
        raise DockerError(f"{what}: missing {name}")
    if not isinstance(value, str) or not ID.match(value):
        raise DockerError(f"{what}: {name} must be an id of letters, digits, '_', '.' and '-', not {value!r}")
    return value


def _str(body: Mapping[str, object], name: str, what: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DockerError(f"{what}: {name} must be a string, not {type(value).__name__}")
    return value


def _map(body: Mapping[str, object], name: str, what: str) -> Mapping[str, object]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DockerError(f"{what}: {name} must be an object, not {type(value).__name__}")
    return value


def _subnet(text: str, what: str, name: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text)
    except ValueError:
        raise DockerError(f"{what}: {name} {text!r} is not an IPv4 subnet like 198.19.42.0/24") from None


def _interface(text: str, what: str, name: str) -> ipaddress.IPv4Interface:
    if "/" not in text:
        raise DockerError(f"{what}: {name} {text!r} needs its prefix length, like 198.19.42.2/24")
    try:
        return ipaddress.IPv4Interface(text)
    except ValueError:
        raise DockerError(f"{what}: {name} {text!r} is not an IPv4 address like 198.19.42.2/24") from None


def _address(text: str, what: str, name: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text.split("/")[0])
    except ValueError:
        raise DockerError(f"{what}: {name} {text!r} is not an IPv4 address") from None


def _name_option(options: Mapping[str, object], what: str) -> str | None:
    value = options.get(NAME_OPTION)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not DNS_LABEL.match(value):
        raise DockerError(f"{what}: {NAME_OPTION} {value!r} is not a DNS label (letters, digits and '-', 1 to 63)")
    return value.lower()


@dataclass(frozen=True)
class PoolRequest:
    """IpamDriver.RequestPool: ``--subnet`` (required), IPv4 only, no ``--ip-range``."""

    subnet: ipaddress.IPv4Network

    @classmethod
    def from_json(cls, body: object) -> PoolRequest:
        what = "RequestPool"
        b = _object(body, what)
        if b.get("V6") is True:
            raise DockerError(
                "IPv6 on overlay's Docker networks is not supported yet: create the network without --ipv6"
            )
        if _str(b, "SubPool", what):
            raise DockerError("--ip-range is not supported: overlay's IPAM hands out the whole --subnet")
        pool = _str(b, "Pool", what)
        if not pool:
            raise DockerError(
                "give --subnet: the overlay network's subnet, e.g. --subnet 198.19.42.0/24 (Docker asks for the "
                "address pool before it says which network it is for)"
            )
        return cls(_subnet(pool, what, "--subnet"))


@dataclass(frozen=True)
class PoolIdRequest:
    """IpamDriver.ReleasePool."""

    pool: ipaddress.IPv4Network

    @classmethod
    def from_json(cls, body: object) -> PoolIdRequest:
        b = _object(body, "ReleasePool")
        return cls(_subnet(_id(b, "PoolID", "ReleasePool").replace("_", "/"), "ReleasePool", "PoolID"))


def pool_id(subnet: ipaddress.IPv4Network) -> str:
    """Our pool id: the subnet, its '/' spelled '_' (an id)."""
    return str(subnet).replace("/", "_")


@dataclass(frozen=True)
class AddressRequest:
    """IpamDriver.RequestAddress: the gateway (``gateway``: Docker's own request for it), an
    explicit address (``--ip``), or any free one (``address`` None)."""

    pool: ipaddress.IPv4Network
    address: ipaddress.IPv4Address | None
    gateway: bool

    @classmethod
    def from_json(cls, body: object) -> AddressRequest:
        what = "RequestAddress"
        b = _object(body, what)
        pool = _subnet(_id(b, "PoolID", what).replace("_", "/"), what, "PoolID")
        text = _str(b, "Address", what)
        address = _address(text, what, "--ip") if text else None
        options = _map(b, "Options", what)
        return cls(pool, address, options.get(ADDRESS_TYPE) == GATEWAY_TYPE)


@dataclass(frozen=True)
class ReleaseAddressRequest:
    pool: ipaddress.IPv4Network
    address: ipaddress.IPv4Address

    @classmethod
    def from_json(cls, body: object) -> ReleaseAddressRequest:
        what = "ReleaseAddress"
        b = _object(body, what)
        pool = _subnet(_id(b, "PoolID", what).replace("_", "/"), what, "PoolID")
        text = _str(b, "Address", what)
        if not text:
            raise DockerError(f"{what}: missing Address")
        return cls(pool, _address(text, what, "Address"))


@dataclass(frozen=True)
class NetworkOptions:
    """The ``-o`` options of docker network create that are ours."""

    vni: int | None = None
    network: str | None = None
    name: str | None = None
    encrypted: bool = False

    @classmethod
    def parse(cls, generic: Mapping[str, object]) -> NetworkOptions:
        unknown = sorted(k for k in generic if "." not in k and k not in OPTIONS)
        if unknown:
            raise DockerError(f"unknown option -o {unknown[0]}: overlay knows -o {', -o '.join(OPTIONS)}")
        values: dict[str, str] = {}
        for key in OPTIONS:
            value = generic.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise DockerError(f"-o {key} must be a string, not {type(value).__name__}")
            values[key] = value
        vni = None
        if "vni" in values:
            text = values["vni"]
            if not text.isdigit() or not 1 <= int(text) <= VNI_MAX:
                raise DockerError(f"-o vni={text}: a VNI is a number from 1 to {VNI_MAX}")
            vni = int(text)
        network = values.get("network") or None
        name = values.get("name") or None
        if name is not None and not DNS_LABEL.match(name):
            raise DockerError(f"-o name={name}: a network's name is a DNS label (letters, digits and '-', 1 to 63)")
        encrypted = values.get("encrypted")
        if encrypted not in (None, "", "true", "false"):
            raise DockerError(f"-o encrypted={encrypted}: give -o encrypted (or =true, =false)")
        return cls(vni, network, name, encrypted in ("", "true"))


@dataclass(frozen=True)
class CreateNetworkRequest:
    network_id: str
    options: NetworkOptions
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None

    @classmethod
    def from_json(cls, body: object) -> CreateNetworkRequest:
        what = "CreateNetwork"
        b = _object(body, what)
        network_id = _id(b, "NetworkID", what)
        options = NetworkOptions.parse(_map(_map(b, "Options", what), GENERIC, what))
        v6 = b.get("IPv6Data")
        if v6:
            raise DockerError(
                "IPv6 on overlay's Docker networks is not supported yet: create the network without --ipv6"
            )
        v4 = b.get("IPv4Data")
        if not isinstance(v4, list) or len(v4) != 1 or not isinstance(v4[0], dict):
            raise DockerError(
                "give exactly one --subnet, and --ipam-driver the same plugin (overlay's IPAM hands out the addresses)"
            )
        data = v4[0]
        subnet = _subnet(_str(data, "Pool", what), what, "--subnet")
        gateway_text = _str(data, "Gateway", what)
        gateway = _address(gateway_text, what, "--gateway") if gateway_text else None
        return cls(network_id, options, subnet, gateway)


@dataclass(frozen=True)
class NetworkIdRequest:
    network_id: str

    @classmethod
    def from_json(cls, body: object, what: str = "DeleteNetwork") -> NetworkIdRequest:
        return cls(_id(_object(body, what), "NetworkID", what))


@dataclass(frozen=True)
class EndpointRequest:
    """DeleteEndpoint, EndpointOperInfo, Leave, RevokeExternalConnectivity."""

    network_id: str
    endpoint_id: str

    @classmethod
    def from_json(cls, body: object, what: str) -> EndpointRequest:
        b = _object(body, what)
        return cls(_id(b, "NetworkID", what), _id(b, "EndpointID", what))


@dataclass(frozen=True)
class CreateEndpointRequest:
    network_id: str
    endpoint_id: str
    address: ipaddress.IPv4Interface
    mac: str | None  # Docker's (--mac-address), checked; None: ours
    name: str | None

    @classmethod
    def from_json(cls, body: object) -> CreateEndpointRequest:
        what = "CreateEndpoint"
        b = _object(body, what)
        network_id, endpoint_id = _id(b, "NetworkID", what), _id(b, "EndpointID", what)
        interface = _map(b, "Interface", what)
        if _str(interface, "AddressIPv6", what):
            raise DockerError("IPv6 on overlay's Docker networks is not supported yet")
        text = _str(interface, "Address", what)
        if not text:
            raise DockerError(f"{what}: no address: create the network with --ipam-driver the same plugin")
        address = _interface(text, what, "Address")
        mac_text = _str(interface, "MacAddress", what)
        mac = None
        if mac_text:
            try:
                mac = mac_to_str(unicast_mac(mac_text))
            except ValueError as e:
                raise DockerError(f"--mac-address {e}") from None
        return cls(network_id, endpoint_id, address, mac, _name_option(_map(b, "Options", what), what))


@dataclass(frozen=True)
class JoinRequest:
    network_id: str
    endpoint_id: str
    sandbox: str  # the container's namespace file, as Docker names it
    name: str | None

    @classmethod
    def from_json(cls, body: object) -> JoinRequest:
        what = "Join"
        b = _object(body, what)
        return cls(
            _id(b, "NetworkID", what),
            _id(b, "EndpointID", what),
            _str(b, "SandboxKey", what),
            _name_option(_map(b, "Options", what), what),
        )


@dataclass(frozen=True)
class ConnectivityRequest:
    """ProgramExternalConnectivity: the container's port bindings (``-p``) and exposed ports."""

    network_id: str
    endpoint_id: str
    publish: tuple[PortSpec, ...]
    exposed: tuple[str, ...]

    @classmethod
    def from_json(cls, body: object) -> ConnectivityRequest:
        what = "ProgramExternalConnectivity"
        b = _object(body, what)
        options = _map(b, "Options", what)
        return cls(
            _id(b, "NetworkID", what),
            _id(b, "EndpointID", what),
            tuple(_binding(p) for p in _list(options, PORTMAP)),
            tuple(dict.fromkeys(_exposed(p) for p in _list(options, EXPOSED))),
        )


def _list(options: Mapping[str, object], name: str) -> list[Mapping[str, object]]:
    value = options.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise DockerError(f"{name} must be a list of objects")
    return value


def _proto(entry: Mapping[str, object]) -> str:
    proto = entry.get("Proto")
    if not isinstance(proto, int) or proto not in PROTOCOLS:
        raise DockerError(f"port protocol {proto!r}: overlay publishes tcp (6) and udp (17)")
    return PROTOCOLS[proto]


def _port(entry: Mapping[str, object], name: str, zero: bool = False) -> int:
    value = entry.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool) or not (0 if zero else 1) <= value <= 65535:
        raise DockerError(f"port {name} {value!r} is not a port number (1 to 65535)")
    return value


def _exposed(entry: Mapping[str, object]) -> str:
    return f"{_port(entry, 'Port')}/{_proto(entry)}"


def _binding(entry: Mapping[str, object]) -> PortSpec:
    proto, port, host_port = _proto(entry), _port(entry, "Port"), _port(entry, "HostPort", zero=True)
    end = _port(entry, "HostPortEnd", zero=True)
    if end and end != host_port:
        raise DockerError(f"-p with a range of host ports ({host_port}-{end}) is not supported: publish one port")
    host_ip: IPAddress | None = None
    text = entry.get("HostIP")
    if text not in (None, "", "0.0.0.0", "::"):
        if not isinstance(text, str):
            raise DockerError(f"port HostIP {text!r} is not an address")
        try:
            host_ip = ipaddress.ip_address(text)
        except ValueError:
            raise DockerError(f"port HostIP {text!r} is not an address") from None
    return PortSpec(proto, host_port, port, host_ip)


# --- what the agent keeps -----------------------------------------------------------------------


@dataclass(frozen=True)
class DockerNetwork:
    """A Docker network on this host, and the overlay network it is."""

    network_id: str
    vni: int
    name: str  # the registry network's name
    subnet: str
    gateway: str


@dataclass(frozen=True)
class DockerEndpoint:
    endpoint_id: str
    network_id: str
    vni: int
    address: str  # A.B.C.D/len
    mac: str
    name: str | None = None

    @property
    def attachment_id(self) -> str:
        return attachment_id(self.endpoint_id)


@dataclass(frozen=True)
class Claim:
    """An address claimed in etcd for Docker (RequestAddress), not yet released."""

    vni: int
    address: str  # A.B.C.D

    @property
    def owner(self) -> str:
        return f"docker/pool/{self.vni}/{self.address}"


@dataclass
class DockerState:
    networks: dict[str, DockerNetwork] = field(default_factory=dict)
    endpoints: dict[str, DockerEndpoint] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)

    def encode(self) -> str:
        return json.dumps(
            {
                "networks": [asdict(n) for n in self.networks.values()],
                "endpoints": [asdict(e) for e in self.endpoints.values()],
                "claims": [asdict(c) for c in self.claims],
            },
            indent=1,
        )

    @classmethod
    def decode(cls, text: str) -> DockerState:
        """The state ``encode`` wrote; ValueError saying what is wrong."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, found {type(data).__name__}")
            networks = [DockerNetwork(**n) for n in data.get("networks", [])]
            endpoints = [DockerEndpoint(**e) for e in data.get("endpoints", [])]
            claims = [Claim(**c) for c in data.get("claims", [])]
        except (TypeError, AttributeError) as e:
            raise ValueError(f"not a Docker state file ({e})") from None
        return cls({n.network_id: n for n in networks}, {e.endpoint_id: e for e in endpoints}, claims)

    def network(self, network_id: str) -> DockerNetwork:
        found = self.networks.get(network_id)
        if found is None:
            raise DockerError(
                f"Docker network {network_id[:12]} is unknown to overlay on this host (created before this agent "
                f"kept its state?): remove it with 'docker network rm' and create it again"
            )
        return found

    def endpoint(self, endpoint_id: str) -> DockerEndpoint:
        found = self.endpoints.get(endpoint_id)
        if found is None:
            raise DockerError(f"endpoint {endpoint_id[:12]} is unknown to overlay on this host")
        return found

    def uses(self, vni: int) -> bool:
        """Whether a Docker network here is overlay network ``vni`` (the agent stays on it)."""
        return any(n.vni == vni for n in self.networks.values())

    def for_pool(self, pool: ipaddress.IPv4Network) -> DockerNetwork | None:
        for n in self.networks.values():
            if n.subnet == str(pool):
                return n
        return None


def attachment_id(endpoint_id: str) -> str:
    return f"docker/{endpoint_id}"


def container_ifname(endpoint_id: str) -> str:
    """The veth end Docker moves into the container, until it does: <= 15 characters, never
    an ``ov<hex>`` host end (``x`` is not a hex digit)."""
    return "ovx" + hashlib.sha256(endpoint_id.encode()).hexdigest()[:11]


# --- the decisions ------------------------------------------------------------------------------


def _gateway_of(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The gateway a new network gets without --gateway: the subnet's first address."""
    return subnet.network_address + 1


def _overlaps(subnet: str, other: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.ip_network(subnet).overlaps(other)
    except ValueError:
        return False


def pool(req: PoolRequest, networks: Mapping[int, Network]) -> dict[str, object]:
    """RequestPool's answer: the subnet as the pool, and the gateway of the registry network with
    that subnet (the only one; else the subnet's first address, what a new network gets)."""
    same = [n for n in networks.values() if n.subnet == str(req.subnet) and n.gateway]
    gateway = ipaddress.IPv4Address(same[0].gateway) if len(same) == 1 else _gateway_of(req.subnet)
    if req.subnet.num_addresses < 4:
        raise DockerError(f"--subnet {req.subnet} is too small for containers and a gateway: give a /30 or larger")
    return {
        "PoolID": pool_id(req.subnet),
        "Pool": str(req.subnet),
        "Data": {GATEWAY_TYPE: f"{gateway}/{req.subnet.prefixlen}"},
    }


def gateway_address(req: AddressRequest, networks: Mapping[int, Network]) -> dict[str, object]:
    """RequestAddress for the gateway (docker network create --gateway): any host address of the
    pool for a new network; the registry network's gateway for an existing one."""
    subnet = req.pool
    address = req.address or _gateway_of(subnet)
    if address not in subnet or address in (subnet.network_address, subnet.broadcast_address):
        raise DockerError(f"--gateway {address} is not a host address of --subnet {subnet}")
    same = [n for n in networks.values() if n.subnet == str(subnet) and n.gateway]
    if len(same) == 1 and same[0].gateway != str(address):
        n = same[0]
        raise DockerError(
            f"--gateway {address}: network {n.name or n.vni} (VNI {n.vni}) has gateway {n.gateway}: leave out "
            f"--gateway, or give that one"
        )
    return {"Address": f"{address}/{subnet.prefixlen}", "Data": {}}


@dataclass(frozen=True)
class NetworkChoice:
    """Which overlay network a Docker network is: ``create`` it in the registry first (None:
    it is there already), then it is ``network``."""

    network: DockerNetwork
    create: Network | None


def resolve_network(req: CreateNetworkRequest, networks: Mapping[int, Network], state: DockerState) -> NetworkChoice:
    """CreateNetwork: ``-o network=NAME`` (a registry network), ``-o vni=N`` (created with
    ``-o name`` when it is not in the registry), or the one registry network with the subnet;
    the subnet must be the registry network's, the gateway too, and no other Docker network
    here may be the same overlay network or share its subnet (Docker's pools are subnets)."""
    o = req.options
    by_name = [v for v, n in networks.items() if o.network is not None and n.name == o.network]
    vni: int | None = o.vni
    if o.network is not None:
        if not by_name:
            known = ", ".join(f"{n.name or v} ({v})" for v, n in sorted(networks.items())) or "none"
            raise DockerError(
                f"-o network={o.network}: no such network in the registry (known: {known}): create it with "
                f"'overlay net create', or give -o vni=N"
            )
        if len(by_name) > 1:
            raise DockerError(f"-o network={o.network} names several networks ({by_name}): give -o vni=N instead")
        if vni is not None and vni != by_name[0]:
            raise DockerError(f"-o network={o.network} is VNI {by_name[0]}, not -o vni={vni}: give one of them")
        vni = by_name[0]
    if vni is None:
        same = [v for v, n in networks.items() if n.subnet == str(req.subnet)]
        if len(same) != 1:
            raise DockerError(
                "say which overlay network this is: -o vni=N (created in the registry if new, with -o name=NAME) "
                "or -o network=NAME (one defined with 'overlay net create')"
            )
        vni = same[0]
    gateway = req.gateway or _gateway_of(req.subnet)
    existing = networks.get(vni)
    create = None
    if existing is None:
        name = o.name or f"net{vni}"
        clash = [v for v, n in networks.items() if n.name == name]
        if clash:
            raise DockerError(f"-o name={name}: the registry's network {name} is VNI {clash[0]}, not {vni}")
        for v, n in sorted(networks.items()):
            if n.subnet is not None and _overlaps(n.subnet, req.subnet):
                raise DockerError(
                    f"--subnet {req.subnet} overlaps network {n.name or v} (VNI {v})'s subnet {n.subnet}: give "
                    f"another subnet, or -o vni={v} to use that network"
                )
        create = Network(vni, name, str(req.subnet), None, str(gateway), encrypted=o.encrypted)
        existing = create
    else:
        label = f"network {existing.name or vni} (VNI {vni})"
        if o.name is not None and existing.name != o.name:
            raise DockerError(f"-o name={o.name}: VNI {vni} is network {existing.name or vni} in the registry")
        if existing.subnet is None:
            raise DockerError(f"{label} has no subnet in the registry: set one with 'overlay net set {vni} --subnet'")
        if existing.subnet != str(req.subnet):
            raise DockerError(f"--subnet {req.subnet}: {label} has subnet {existing.subnet}: give that one")
        if existing.gateway is None:
            raise DockerError(
                f"{label} has no gateway in the registry, and Docker's containers need one: "
                f"'overlay net set {vni} --gateway ADDRESS'"
            )
        if req.gateway is not None and str(req.gateway) != existing.gateway:
            raise DockerError(f"--gateway {req.gateway}: {label} has gateway {existing.gateway}: leave out --gateway")
        if o.encrypted and not existing.encrypted:
            raise DockerError(f"-o encrypted: {label} is not encrypted: 'overlay net set {vni} --encrypted' first")
    for other in state.networks.values():
        if other.network_id == req.network_id:
            continue
        if other.vni == vni:
            raise DockerError(
                f"Docker network {other.network_id[:12]} on this host is overlay network {other.name} (VNI {vni}) "
                f"already: use that one"
            )
        if _overlaps(other.subnet, req.subnet):
            raise DockerError(
                f"--subnet {req.subnet} overlaps Docker network {other.network_id[:12]}'s {other.subnet} (VNI "
                f"{other.vni}) on this host: give each overlay network its own subnet"
            )
    assert existing.subnet is not None and existing.gateway is not None
    chosen = DockerNetwork(req.network_id, vni, existing.name or str(vni), existing.subnet, existing.gateway)
    return NetworkChoice(chosen, create)


def address_choice(req: AddressRequest, network: DockerNetwork, used: Iterable[IPAddress]) -> AddressChoice:
    """RequestAddress for a container: ``--ip`` (checked: in the subnet, free), else the lowest
    free addresses in turn (``AddressChoice``); never the gateway."""
    definition = Network(network.vni, network.name, network.subnet, None, network.gateway)
    taken = set(used) | {ipaddress.IPv4Address(network.gateway)}
    wanted = str(req.address) if req.address is not None else None
    try:
        return AddressChoice.parse(network.vni, definition, wanted, taken)
    except Refused as e:
        raise DockerError(str(e)) from None


def next_address(choice: AddressChoice) -> ipaddress.IPv4Interface:
    try:
        address = choice.next()
    except Refused as e:
        raise DockerError(str(e)) from None
    assert isinstance(address, ipaddress.IPv4Interface)
    return address


def endpoint(
    req: CreateEndpointRequest, state: DockerState, random_mac: str, macs_in_use: Iterable[str]
) -> DockerEndpoint:
    """CreateEndpoint: the address must be one RequestAddress claimed here for this network; the
    MAC is Docker's (not in use on the network) or ``random_mac``."""
    network = state.network(req.network_id)
    if (existing := state.endpoints.get(req.endpoint_id)) is not None:
        if existing.network_id != req.network_id or existing.address != str(req.address):
            raise DockerError(f"endpoint {req.endpoint_id[:12]} exists already with another network or address")
        return existing
    if str(req.address.network) != network.subnet:
        raise DockerError(f"address {req.address} is outside network {network.name}'s subnet {network.subnet}")
    if Claim(network.vni, str(req.address.ip)) not in state.claims:
        raise DockerError(
            f"address {req.address.ip} was not handed out by overlay's IPAM on this host: create the network "
            f"with --ipam-driver the same plugin"
        )
    if any(e.address == str(req.address) and e.vni == network.vni for e in state.endpoints.values()):
        raise DockerError(f"address {req.address.ip} is another endpoint's here already")
    mac = req.mac or random_mac
    if req.mac is not None and req.mac in set(macs_in_use):
        raise DockerError(f"--mac-address {req.mac} is in use on network {network.name}: choose another")
    return DockerEndpoint(req.endpoint_id, req.network_id, network.vni, str(req.address), mac, req.name)


def endpoint_answer(req: CreateEndpointRequest, e: DockerEndpoint) -> dict[str, object]:
    """CreateEndpoint's answer: only what Docker did not give (the MAC we chose)."""
    return {"Interface": {"MacAddress": e.mac}} if req.mac is None else {"Interface": {}}


def attachment(
    e: DockerEndpoint, network: DockerNetwork, sandbox: str, host_ifname: str, mtu: int, name: str | None
) -> Attachment:
    """The attachment Join makes: no namespace of ours (Docker's sandbox is recorded, for
    people), its interface the veth end Docker takes."""
    return Attachment(
        e.attachment_id,
        e.vni,
        network.name,
        sandbox,
        container_ifname(e.endpoint_id),
        host_ifname,
        e.mac,
        e.address,
        network.gateway,
        mtu,
        name=name or e.name,
    )


def join_answer(a: Attachment) -> dict[str, object]:
    """Join's answer: the veth end to move, the distributed gateway, and no docker_gwbridge."""
    return {
        "InterfaceName": {"SrcName": a.ifname, "DstPrefix": DST_PREFIX},
        "Gateway": a.gateway or "",
        "GatewayIPv6": "",
        "StaticRoutes": [],
        "DisableGatewayService": True,
    }


def with_exposed(a: Attachment, exposed: Iterable[str]) -> Attachment:
    return replace(a, exposed=tuple(dict.fromkeys([*a.exposed, *exposed])))


ACTIVATE: dict[str, object] = {"Implements": ["NetworkDriver", "IpamDriver"]}
CAPABILITIES: dict[str, object] = {"Scope": "local", "ConnectivityScope": "global"}
IPAM_CAPABILITIES: dict[str, object] = {"RequiresMACAddress": False, "RequiresRequestReplay": False}
ADDRESS_SPACES: dict[str, object] = {
    "LocalDefaultAddressSpace": ADDRESS_SPACE,
    "GlobalDefaultAddressSpace": ADDRESS_SPACE,
}


def decode_body(data: bytes) -> object:
    """A request's JSON; an empty body is an empty object (Activate has none)."""
    if not data.strip():
        return {}
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise DockerError(f"the request is not JSON ({e.__class__.__name__})") from None


def error(message: str) -> dict[str, object]:
    return {"Err": message}


def taken_addresses(state: DockerState, vni: int) -> set[IPAddress]:
    """The addresses claimed here for Docker on ``vni`` (also before the registry shows them)."""
    return {ipaddress.IPv4Address(c.address) for c in state.claims if c.vni == vni}
