"""The control socket's typed requests (overlay.core.control): what a JSON request means, and
what it is refused for. Pure: no socket, no agent, no root."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from overlay.core.control import KINDS, AttachRequest, CheckRequest, DetachRequest, Refused


def refused(make: Callable[[], object]) -> Refused:
    with pytest.raises(Refused) as e:
        make()
    assert e.value.kind in KINDS
    return e.value


def test_a_refusal_carries_its_message_and_kind() -> None:
    e = Refused("network 'green' is unknown", "network")
    assert (str(e), e.kind) == ("network 'green' is unknown", "network")
    assert Refused("no kind").kind is None


def test_the_refusal_kinds_are_those_clients_map_to_codes() -> None:
    assert KINDS == {"netns", "network", "address", "invalid", "unknown", "broken", "etcd", "permission"}


# --- attach ----------------------------------------------------------------------------------------


def test_an_attach_request_takes_every_parameter() -> None:
    params: dict[str, object] = {
        "netns": "/run/netns/a",
        "net": "blue",
        "ifname": "net0",
        "id": "cni/c1/net0",
        "ip": "198.19.42.7/24",
        "mac": "02:42:00:00:00:07",
        "gateway": "198.19.42.1",
    }
    assert AttachRequest.from_params(params) == AttachRequest(
        "/run/netns/a",
        "blue",
        "net0",
        id="cni/c1/net0",
        ip="198.19.42.7/24",
        mac="02:42:00:00:00:07",
        gateway="198.19.42.1",
    )


def test_an_attach_request_needs_only_netns_and_net_and_names_the_interface_eth0() -> None:
    req = AttachRequest.from_params({"netns": "/run/netns/a", "net": "blue"})
    assert req == AttachRequest("/run/netns/a", "blue", "eth0", None, None, None, None)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"net": "blue"}, "missing netns"),
        ({"netns": "/run/netns/a"}, "missing net"),
        ({}, "missing netns"),  # netns is read first
        ({"netns": "", "net": "blue"}, "missing netns"),
        ({"netns": None, "net": "blue"}, "missing netns"),
        ({"netns": "/run/netns/a", "net": ""}, "missing net"),
    ],
)
def test_an_attach_request_without_netns_or_net_is_invalid(params: dict[str, object], message: str) -> None:
    e = refused(lambda: AttachRequest.from_params(params))
    assert (str(e), e.kind) == (message, "invalid")


def test_integers_are_taken_as_their_text_a_pid_as_netns_and_a_vni_as_net() -> None:
    req = AttachRequest.from_params({"netns": 4242, "net": 42, "id": 7})
    assert (req.netns, req.net, req.id) == ("4242", "42", "7")


@pytest.mark.parametrize(
    "name, value, typename",
    [
        ("netns", True, "bool"),
        ("net", 4.2, "float"),
        ("ifname", ["eth0"], "list"),
        ("id", {"a": 1}, "dict"),
        ("ip", 1.5, "float"),
        ("mac", False, "bool"),
        ("gateway", [1], "list"),
        ("ip6", 6.0, "float"),
        ("gateway6", True, "bool"),
    ],
)
def test_a_parameter_that_is_not_text_is_invalid_and_says_its_type(name: str, value: object, typename: str) -> None:
    params: dict[str, object] = {"netns": "/run/netns/a", "net": "blue", name: value}
    e = refused(lambda: AttachRequest.from_params(params))
    assert (str(e), e.kind) == (f"{name} must be a string, not {typename}", "invalid")


def test_an_attach_request_carries_the_ipv6_address_and_gateway_as_given() -> None:
    params = {"netns": "n", "net": "blue", "ip6": "2001:2:0:42::7/64", "gateway6": "2001:2:0:42::1"}
    assert AttachRequest.from_params(params) == AttachRequest(
        "n", "blue", ip6="2001:2:0:42::7/64", gateway6="2001:2:0:42::1"
    )
    assert AttachRequest.from_params({"netns": "n", "net": "blue", "ip6": "none"}).ip6 == "none"  # attach judges it
    assert (AttachRequest("n", "blue").ip6, AttachRequest("n", "blue").gateway6) == (None, None)  # older clients


def test_empty_and_null_optional_parameters_are_absent() -> None:
    req = AttachRequest.from_params(
        {
            "netns": "n",
            "net": "blue",
            "ifname": "",
            "id": None,
            "ip": "",
            "mac": "",
            "gateway": None,
            "ip6": "",
            "gateway6": None,
        }
    )
    assert req == AttachRequest("n", "blue")


def test_parameters_an_attach_request_does_not_know_are_ignored() -> None:
    assert AttachRequest.from_params({"netns": "n", "net": "blue", "colour": 3}) == AttachRequest("n", "blue")


def test_the_parameters_are_judged_in_the_order_they_always_were() -> None:
    e = refused(lambda: AttachRequest.from_params({"netns": "n", "net": 1.0, "ifname": 2.0}))
    assert str(e) == "ifname must be a string, not float"  # netns, ifname, net, id, gateway, mac, ip
    e = refused(lambda: AttachRequest.from_params({"netns": "n", "net": "b", "ip": 1.0, "gateway": 2.0}))
    assert str(e) == "gateway must be a string, not float"


# --- detach and check --------------------------------------------------------------------------------


def test_a_detach_request_by_id_or_by_namespace_and_interface() -> None:
    assert DetachRequest.from_params({"id": "cni/c1/eth0"}) == DetachRequest("cni/c1/eth0", None, None)
    assert DetachRequest.from_params({"netns": "/run/netns/a", "ifname": "net0"}) == DetachRequest(
        None, "/run/netns/a", "net0"
    )
    assert DetachRequest.from_params({"netns": 4242}).netns == "4242"


@pytest.mark.parametrize("params", [{}, {"ifname": "eth0"}, {"id": "", "netns": None}])
def test_a_detach_request_naming_nothing_is_invalid(params: dict[str, object]) -> None:
    e = refused(lambda: DetachRequest.from_params(params))
    assert (str(e), e.kind) == ("say what to detach: a namespace (netns) or an attachment id", "invalid")


def test_a_detach_request_made_in_code_must_name_something_too() -> None:
    assert refused(lambda: DetachRequest()).kind == "invalid"


def test_a_detach_parameter_that_is_not_text_is_invalid_before_anything_else() -> None:
    e = refused(lambda: DetachRequest.from_params({"ifname": 1.0}))
    assert (str(e), e.kind) == ("ifname must be a string, not float", "invalid")


def test_a_check_request_needs_the_attachment_id() -> None:
    assert CheckRequest.from_params({"id": "cni/c1/eth0", "netns": "x"}) == CheckRequest("cni/c1/eth0")
    assert CheckRequest.from_params({"id": 12}) == CheckRequest("12")
    e = refused(lambda: CheckRequest.from_params({"id": ""}))
    assert (str(e), e.kind) == ("missing id", "invalid")
    assert str(refused(lambda: CheckRequest.from_params({"id": True}))) == "id must be a string, not bool"


def test_requests_are_frozen_values() -> None:
    req = CheckRequest("a")
    with pytest.raises(AttributeError):
        req.id = "b"  # type: ignore[misc]
    assert {AttachRequest("n", "blue"), AttachRequest("n", "blue")} == {AttachRequest("n", "blue")}
