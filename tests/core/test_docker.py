"""Docker's remote network and IPAM drivers as decisions: every request typed, bad input refused
with a line a user can act on, which overlay network a Docker network is, pools, addresses,
endpoints, Join's answer and the state kept across restarts."""

from __future__ import annotations

import ipaddress

import msgspec
import pytest

from overlay.core import docker as d
from overlay.core.docker import DockerError
from overlay.core.ports import PortSpec
from overlay.core.registry import Network

BLUE = Network(42, "blue", "198.19.42.0/24", None, "198.19.42.1")
SUBNET = ipaddress.IPv4Network("198.19.42.0/24")


def create(
    vni: str | None = "42", pool: str = "198.19.42.0/24", gateway: str = "198.19.42.1/24", **opts: str
) -> object:
    generic = {**({"vni": vni} if vni else {}), **opts}
    return {
        "NetworkID": "n1",
        "Options": {d.GENERIC: generic, "com.docker.network.enable_ipv6": False},
        "IPv4Data": [{"AddressSpace": "overlay", "Pool": pool, "Gateway": gateway, "AuxAddresses": {}}],
        "IPv6Data": [],
    }


def state_with_blue() -> d.DockerState:
    s = d.DockerState()
    s.networks["n1"] = d.DockerNetwork("n1", 42, "blue", "198.19.42.0/24", "198.19.42.1")
    return s


def refused(call: object, *args: object) -> str:
    with pytest.raises(DockerError) as e:
        call(*args)  # type: ignore[operator]
    assert "\n" not in str(e.value)
    return str(e.value)


# --- requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ([], "must be a JSON object"),
        ({}, "give --subnet"),
        ({"Pool": "198.19.42.0/33"}, "not an IPv4 subnet"),
        ({"Pool": "198.19.42.5/24"}, "not an IPv4 subnet"),
        ({"Pool": "198.19.42.0/24", "V6": True}, "IPv6"),
        ({"Pool": "198.19.42.0/24", "SubPool": "198.19.42.0/25"}, "--ip-range"),
        ({"Pool": 42}, "Pool must be a string"),
    ],
)
def test_a_bad_pool_request_is_refused_with_what_to_give(body: object, says: str) -> None:
    assert says in refused(d.PoolRequest.from_json, body)


def test_the_pool_is_the_subnet_with_the_registry_networks_gateway() -> None:
    answer = d.pool(
        d.PoolRequest.from_json({"Pool": "198.19.42.0/24"}),
        {42: msgspec.structs.replace(BLUE, gateway="198.19.42.254")},
    )
    assert answer == {
        "PoolID": "198.19.42.0_24",
        "Pool": "198.19.42.0/24",
        "Data": {d.GATEWAY_TYPE: "198.19.42.254/24"},
    }


def test_a_new_subnets_pool_offers_its_first_address_as_the_gateway() -> None:
    answer = d.pool(d.PoolRequest.from_json({"Pool": "198.19.50.0/24"}), {42: BLUE})
    assert answer["Data"] == {d.GATEWAY_TYPE: "198.19.50.1/24"}
    assert "too small" in refused(d.pool, d.PoolRequest(ipaddress.IPv4Network("198.19.50.0/31")), {})


def test_address_requests_are_typed_and_the_pool_id_is_checked() -> None:
    r = d.AddressRequest.from_json({"PoolID": "198.19.42.0_24", "Address": "198.19.42.9", "Options": {}})
    assert (r.pool, r.address, r.gateway) == (SUBNET, ipaddress.IPv4Address("198.19.42.9"), False)
    g = d.AddressRequest.from_json({"PoolID": "198.19.42.0_24", "Options": {d.ADDRESS_TYPE: d.GATEWAY_TYPE}})
    assert g.gateway and g.address is None
    assert "missing PoolID" in refused(d.AddressRequest.from_json, {})
    assert "not an IPv4 subnet" in refused(d.AddressRequest.from_json, {"PoolID": "nonsense"})
    assert "--ip 'x' is not an IPv4 address" in refused(
        d.AddressRequest.from_json, {"PoolID": "198.19.42.0_24", "Address": "x"}
    )
    assert "missing Address" in refused(d.ReleaseAddressRequest.from_json, {"PoolID": "198.19.42.0_24"})


def test_the_gateway_docker_asks_for_must_be_the_networks() -> None:
    req = d.AddressRequest(SUBNET, ipaddress.IPv4Address("198.19.42.1"), True)
    assert d.gateway_address(req, {42: BLUE}) == {"Address": "198.19.42.1/24", "Data": {}}
    other = d.AddressRequest(SUBNET, ipaddress.IPv4Address("198.19.42.9"), True)
    assert "has gateway 198.19.42.1" in refused(d.gateway_address, other, {42: BLUE})
    assert d.gateway_address(other, {})["Address"] == "198.19.42.9/24"  # a new network takes it
    broadcast = d.AddressRequest(SUBNET, ipaddress.IPv4Address("198.19.42.255"), True)
    assert "not a host address" in refused(d.gateway_address, broadcast, {})


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"Options": {d.GENERIC: {"vni": "42"}}}, "missing NetworkID"),
        ({**create(), "NetworkID": "a b"}, "NetworkID must be an id"),  # type: ignore[dict-item]
        (create(vni="0"), "a VNI is a number from 1"),
        (create(vni="x"), "a VNI is a number from 1"),
        (create(colour="red"), "unknown option -o colour"),
        (create(encrypted="maybe"), "-o encrypted"),
        (create(name="not a label"), "DNS label"),
        ({**create(), "IPv4Data": []}, "exactly one --subnet"),  # type: ignore[dict-item]
        ({**create(), "IPv6Data": [{"Pool": "2001:2::/64"}]}, "IPv6"),  # type: ignore[dict-item]
        (create(pool="198.19.42.0/99"), "not an IPv4 subnet"),
        ({**create(), "Options": []}, "Options must be an object"),  # type: ignore[dict-item]
    ],
)
def test_a_bad_create_network_is_refused_in_one_line(body: object, says: str) -> None:
    assert says in refused(d.CreateNetworkRequest.from_json, body)


def test_dotted_options_are_dockers_own_and_ignored() -> None:
    req = d.CreateNetworkRequest.from_json(create(**{"com.docker.network.driver.mtu": "1400", "my.label": "x"}))
    assert req.options == d.NetworkOptions(vni=42)


# --- which overlay network ----------------------------------------------------------------------


def test_a_new_vni_is_created_in_the_registry_with_the_given_name() -> None:
    choice = d.resolve_network(d.CreateNetworkRequest.from_json(create(name="blue")), {}, d.DockerState())
    assert choice.create == Network(42, "blue", "198.19.42.0/24", None, "198.19.42.1")
    assert choice.network == d.DockerNetwork("n1", 42, "blue", "198.19.42.0/24", "198.19.42.1")
    unnamed = d.resolve_network(d.CreateNetworkRequest.from_json(create(encrypted="")), {}, d.DockerState())
    assert unnamed.create is not None and unnamed.create.name == "net42" and unnamed.create.encrypted


def test_an_existing_network_is_joined_when_everything_matches() -> None:
    for body in (create(), create(vni=None, network="blue"), create(vni=None), create(name="blue")):
        choice = d.resolve_network(d.CreateNetworkRequest.from_json(body), {42: BLUE}, d.DockerState())
        assert choice.create is None and choice.network.vni == 42 and choice.network.gateway == "198.19.42.1"


@pytest.mark.parametrize(
    ("body", "networks", "says"),
    [
        (
            create(pool="198.19.43.0/24", gateway="198.19.43.1/24"),
            {42: BLUE},
            "has subnet 198.19.42.0/24: give that one",
        ),
        (create(gateway="198.19.42.9/24"), {42: BLUE}, "has gateway 198.19.42.1"),
        (create(vni=None, network="green"), {42: BLUE}, "no such network in the registry (known: blue (42))"),
        (create(vni="43", network="blue"), {42: BLUE}, "is VNI 42, not -o vni=43"),
        (create(vni=None), {}, "say which overlay network"),
        (create(vni="43", name="blue"), {42: BLUE}, "network blue is VNI 42, not 43"),
        (create(vni="43", name="red"), {42: BLUE}, "overlaps network blue (VNI 42)'s subnet 198.19.42.0/24"),
        (create(name="red"), {42: BLUE}, "VNI 42 is network blue"),
        (create(encrypted="true"), {42: BLUE}, "is not encrypted"),
        (create(), {42: Network(42, "blue")}, "has no subnet in the registry"),
        (create(), {42: Network(42, "blue", "198.19.42.0/24")}, "has no gateway in the registry"),
    ],
)
def test_a_docker_network_that_disagrees_with_the_registry_is_refused(
    body: object, networks: dict[int, Network], says: str
) -> None:
    assert says in refused(d.resolve_network, d.CreateNetworkRequest.from_json(body), networks, d.DockerState())


def test_two_docker_networks_here_may_not_share_an_overlay_network_or_a_subnet() -> None:
    state = state_with_blue()
    again = d.CreateNetworkRequest.from_json({**create(), "NetworkID": "n2"})  # type: ignore[dict-item]
    assert "is overlay network blue (VNI 42) already" in refused(d.resolve_network, again, {42: BLUE}, state)
    other = d.CreateNetworkRequest.from_json({**create(vni="43"), "NetworkID": "n2"})  # type: ignore[dict-item]
    red = {43: Network(43, "red", "198.19.42.0/24", None, "198.19.42.1")}  # the registry allows it: isolated
    assert "give each overlay network its own subnet" in refused(d.resolve_network, other, red, state)
    wider = d.CreateNetworkRequest.from_json(
        {**create(vni="43", pool="198.19.42.0/23", gateway="198.19.43.1/23"), "NetworkID": "n2"}  # type: ignore[dict-item]
    )
    assert "overlaps Docker network n1's 198.19.42.0/24" in refused(d.resolve_network, wider, {}, state)
    same = d.resolve_network(d.CreateNetworkRequest.from_json(create()), {42: BLUE}, state)  # asked twice
    assert same.network == state.networks["n1"]


# --- addresses ----------------------------------------------------------------------------------


def test_an_address_is_the_lowest_free_never_the_gateway_and_ip_is_honoured() -> None:
    net = state_with_blue().networks["n1"]
    any_free = d.AddressRequest(SUBNET, None, False)
    choice = d.address_choice(any_free, net, {ipaddress.IPv4Address("198.19.42.2")})
    assert str(d.next_address(choice)) == "198.19.42.3/24"
    wanted = d.AddressRequest(SUBNET, ipaddress.IPv4Address("198.19.42.77"), False)
    assert str(d.next_address(d.address_choice(wanted, net, set()))) == "198.19.42.77/24"
    gateway = d.AddressRequest(SUBNET, ipaddress.IPv4Address("198.19.42.1"), False)
    assert "198.19.42.1" in refused(d.address_choice, gateway, net, set())
    outside = d.AddressRequest(SUBNET, ipaddress.IPv4Address("198.19.43.7"), False)
    assert "outside" in refused(d.address_choice, outside, net, set())
    taken = d.AddressRequest(SUBNET, ipaddress.IPv4Address("198.19.42.2"), False)
    assert "in use" in refused(d.address_choice, taken, net, {ipaddress.IPv4Address("198.19.42.2")})


def test_a_full_subnet_is_refused() -> None:
    net = d.DockerNetwork("n1", 42, "blue", "198.19.42.0/30", "198.19.42.1")
    choice = d.address_choice(d.AddressRequest(ipaddress.IPv4Network("198.19.42.0/30"), None, False), net, set())
    assert str(d.next_address(choice)) == "198.19.42.2/30"
    choice.lost(ipaddress.IPv4Interface("198.19.42.2/30"))
    assert refused(d.next_address, choice)


# --- endpoints and Join -------------------------------------------------------------------------


def endpoint_body(address: str = "198.19.42.2/24", mac: str = "", **extra: object) -> dict[str, object]:
    return {
        "NetworkID": "n1",
        "EndpointID": "e1",
        "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": mac},
        "Options": {},
        **extra,
    }


def test_an_endpoint_takes_a_claimed_address_and_our_mac_unless_docker_gives_one() -> None:
    state = state_with_blue()
    state.claims.append(d.Claim(42, "198.19.42.2"))
    req = d.CreateEndpointRequest.from_json(endpoint_body())
    e = d.endpoint(req, state, "02:00:00:00:00:01", [])
    assert e == d.DockerEndpoint("e1", "n1", 42, "198.19.42.2/24", "02:00:00:00:00:01")
    assert d.endpoint_answer(req, e) == {"Interface": {"MacAddress": "02:00:00:00:00:01"}}
    given = d.CreateEndpointRequest.from_json(endpoint_body(mac="02:42:00:00:00:07"))
    assert d.endpoint(given, state, "02:00:00:00:00:01", []).mac == "02:42:00:00:00:07"
    assert d.endpoint_answer(given, d.endpoint(given, state, "x", [])) == {"Interface": {}}  # nothing to add


def test_a_bad_endpoint_is_refused() -> None:
    state = state_with_blue()
    state.claims.append(d.Claim(42, "198.19.42.2"))

    def judged(body: dict[str, object], macs: tuple[str, ...] = ()) -> str:
        return refused(lambda: d.endpoint(d.CreateEndpointRequest.from_json(body), state, "02:00:00:00:00:01", macs))

    assert "not handed out by overlay's IPAM" in judged(endpoint_body("198.19.42.9/24"))
    assert "outside network blue's subnet" in judged(endpoint_body("198.19.43.2/24"))
    assert "unknown to overlay on this host" in judged({**endpoint_body(), "NetworkID": "n9"})
    assert "in use on network blue" in judged(endpoint_body(mac="02:42:00:00:00:07"), ("02:42:00:00:00:07",))
    assert "--mac-address" in judged(endpoint_body(mac="01:00:5e:00:00:01"))
    assert "needs its prefix length" in judged(endpoint_body("198.19.42.2"))
    assert "no address" in judged(endpoint_body(""))
    assert "IPv6" in judged(
        {**endpoint_body(), "Interface": {"Address": "198.19.42.2/24", "AddressIPv6": "2001:2::5/64"}}
    )
    assert "DNS label" in judged({**endpoint_body(), "Options": {d.NAME_OPTION: "no way"}})


def test_join_answers_the_veth_end_the_gateway_and_no_gateway_bridge() -> None:
    state = state_with_blue()
    e = d.DockerEndpoint("e1", "n1", 42, "198.19.42.2/24", "02:00:00:00:00:01", "web")
    req = d.JoinRequest.from_json({"NetworkID": "n1", "EndpointID": "e1", "SandboxKey": "/var/run/docker/netns/x"})
    a = d.attachment(e, state.networks["n1"], req.sandbox, "ov123", 1418, req.name)
    assert (a.id, a.vni, a.network, a.ifname, a.address, a.gateway, a.name) == (
        "docker/e1",
        42,
        "blue",
        d.container_ifname("e1"),
        "198.19.42.2/24",
        "198.19.42.1",
        "web",
    )
    assert len(a.ifname) <= 15 and a.ifname.startswith("ovx")
    assert d.join_answer(a) == {
        "InterfaceName": {"SrcName": a.ifname, "DstPrefix": "eth"},
        "Gateway": "198.19.42.1",
        "GatewayIPv6": "",
        "StaticRoutes": [],
        "DisableGatewayService": True,
    }
    assert "missing EndpointID" in refused(d.JoinRequest.from_json, {"NetworkID": "n1"})


def test_port_bindings_become_published_ports_and_ranges_are_refused() -> None:
    body = {
        "NetworkID": "n1",
        "EndpointID": "e1",
        "Options": {
            d.PORTMAP: [
                {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080},
                {"Proto": 17, "Port": 53, "HostIP": "198.18.0.1", "HostPort": 0},
            ],
            d.EXPOSED: [{"Proto": 6, "Port": 80}, {"Proto": 6, "Port": 80}],
        },
    }
    req = d.ConnectivityRequest.from_json(body)
    assert req.publish == (PortSpec("tcp", 8080, 80), PortSpec("udp", 0, 53, ipaddress.ip_address("198.18.0.1")))
    assert req.exposed == ("80/tcp",)
    ranged = {**body, "Options": {d.PORTMAP: [{"Proto": 6, "Port": 80, "HostPort": 8080, "HostPortEnd": 8090}]}}
    assert "range" in refused(d.ConnectivityRequest.from_json, ranged)
    sctp = {**body, "Options": {d.PORTMAP: [{"Proto": 132, "Port": 80}]}}
    assert "tcp (6) and udp (17)" in refused(d.ConnectivityRequest.from_json, sctp)
    zero = {**body, "Options": {d.PORTMAP: [{"Proto": 6, "Port": 0}]}}
    assert "not a port number" in refused(d.ConnectivityRequest.from_json, zero)


# --- the state ----------------------------------------------------------------------------------


def test_the_state_survives_a_round_trip_and_a_bad_file_says_so() -> None:
    state = state_with_blue()
    state.endpoints["e1"] = d.DockerEndpoint("e1", "n1", 42, "198.19.42.2/24", "02:00:00:00:00:01", "web")
    state.claims.append(d.Claim(42, "198.19.42.2"))
    again = d.DockerState.decode(state.encode())
    assert again == state and again.uses(42) and not again.uses(43)
    assert again.for_pool(SUBNET) == state.networks["n1"]
    assert d.taken_addresses(again, 42) == {ipaddress.IPv4Address("198.19.42.2")}
    for bad in ("[]", '{"networks": [{"vni": 1}]}', "nope"):
        with pytest.raises(ValueError):
            d.DockerState.decode(bad)


def test_a_body_that_is_not_json_is_refused_and_an_empty_one_is_an_empty_object() -> None:
    assert d.decode_body(b"") == {}
    assert "not JSON" in refused(d.decode_body, b"{nope")
