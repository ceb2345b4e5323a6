"""Attaching containers (overlay.core.attach): every decision of attach, detach and check, the
plans and their undo, the claim loop, the state file and whose MAC is whose. Pure: no netlink,
no etcd, no root; time is a parameter."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable

import pytest

from overlay.core.attach import (
    CLAIM_TRIES,
    DETACH_GRACE,
    AddressChoice,
    Attachment,
    Attachments,
    AttachPlan,
    AttachStep,
    Candidates,
    ClaimAddress,
    ForgetEndpoint,
    ForgetLocal,
    PlugVeth,
    PublishEndpoint,
    Refuse,
    ReleaseAddress,
    ReleaseEndpoint,
    SaveAttached,
    SaveDetached,
    UndoStep,
    Unplug,
    attachment_id,
    check_gateway,
    check_gateway6,
    decode_state,
    encode_state,
    gateways,
    require_registry,
    resolve_network,
)
from overlay.core.control import KINDS, AttachRequest, DetachRequest, Refused
from overlay.core.registry import (
    AddressKey,
    Allocation,
    Endpoint,
    EndpointKey,
    Key,
    Network,
    NetworkKey,
    Registry,
    Value,
)
from overlay.core.wire import mac_to_int

HOST = "h1"
BLUE = Network(42, "blue", "198.19.42.0/24", 1400, None)
RED = Network(43, "red", "198.19.43.0/24")
BARE = Network(44, "bare")  # no subnet
MAC = "02:42:00:00:00:07"
IP4 = ipaddress.IPv4Address
IF4 = ipaddress.IPv4Interface


def registry(*entries: tuple[Key, Value]) -> Registry:
    r = Registry()
    r.snapshot([(r.schema.key(k), r.schema.encode(v), i + 1) for i, (k, v) in enumerate(entries)], len(entries))
    return r


def networks(*nets: Network) -> list[tuple[Key, Value]]:
    return [(NetworkKey(n.vni), n) for n in nets]


def refused(make: Callable[[], object], kind: str) -> str:
    """The message of the refusal ``make`` raises, checking its kind."""
    with pytest.raises(Refused) as e:
        make()
    assert e.value.kind == kind and kind in KINDS, (e.value.kind, str(e.value))
    return str(e.value)


def attachment(
    id: str = "netns/4:1/eth0",
    vni: int = 42,
    mac: str = MAC,
    address: str = "198.19.42.7/24",
    netns: str = "/run/netns/a",
    ifname: str = "eth0",
    gateway: str | None = "198.19.42.1",
) -> Attachment:
    return Attachment(id, vni, "blue", netns, ifname, "ov0123456789a", mac, address, gateway, 1400)


def book(*attached: Attachment, served: tuple[int, ...] = (42, 43, 44), mtu: int = 1450) -> Attachments:
    b = Attachments(HOST, served, mtu)
    for a in attached:
        b.attached[a.id] = a
    return b


# --- which network ------------------------------------------------------------------------------


def test_a_network_is_found_by_its_name() -> None:
    assert resolve_network("blue", {42: BLUE, 43: RED}, [42, 43]) == (42, BLUE)


def test_digits_are_a_vni_first_even_when_another_network_is_named_so() -> None:
    decoy = Network(7, "42")
    assert resolve_network("42", {7: decoy, 42: BLUE}, [7, 42]) == (42, BLUE)


def test_digits_naming_no_vni_may_still_be_a_networks_name() -> None:
    numbered = Network(7, "1234")
    assert resolve_network("1234", {7: numbered}, [7]) == (7, numbered)


def test_a_served_vni_missing_from_the_registry_is_a_bare_network_named_after_it() -> None:
    assert resolve_network("45", {42: BLUE}, [42, 45]) == (45, Network(45, "45"))


def test_a_name_shared_by_several_networks_is_refused_asking_for_the_vni() -> None:
    message = refused(lambda: resolve_network("blue", {42: BLUE, 46: Network(46, "blue")}, [42, 46]), "network")
    assert message == "several networks are named 'blue' (VNIs 42, 46): give the VNI"


def test_an_unknown_network_is_refused_with_the_agents_networks() -> None:
    message = refused(lambda: resolve_network("green", {43: RED, 44: Network(44)}, [43]), "network")
    assert message == (
        "network 'green' is not in the registry (networks known here: red (43), 44 (44)): create it with "
        "'overlay net create', or give its VNI"
    )
    assert "known here: none)" in refused(lambda: resolve_network("9", {}, [42]), "network")


def test_a_network_this_host_does_not_serve_is_refused_with_the_command_to_join_it() -> None:
    message = refused(lambda: resolve_network("red", {42: BLUE, 43: RED}, [42]), "network")
    assert message == "this host's agent is not on network red (VNI 43): join it with 'overlay net join 43'"
    assert refused(lambda: resolve_network("43", {43: RED}, [42]), "network").endswith("'overlay net join 43'")


def test_the_attachments_resolve_against_the_vnis_they_serve() -> None:
    assert book(served=(43,)).network("red", {42: BLUE, 43: RED}) == (43, RED)
    refused(lambda: book(served=(43,)).network("blue", {42: BLUE, 43: RED}), "network")


# --- the id, the gateway, the registry ----------------------------------------------------------


def test_the_agents_own_namespace_is_refused() -> None:
    req = AttachRequest("/proc/1/ns/net", "blue")
    message = refused(lambda: attachment_id(req, "4:100", "4:100"), "netns")
    assert (
        message == "/proc/1/ns/net is the agent's own network namespace (the host's): attach containers, not the host"
    )


def test_an_attachment_is_named_by_the_request_or_else_after_its_namespace_and_interface() -> None:
    assert attachment_id(AttachRequest("n", "blue", id="cni/c1/eth0"), "4:7", "4:1") == "cni/c1/eth0"
    assert attachment_id(AttachRequest("n", "blue", ifname="net0"), "4:7", "4:1") == "netns/4:7/net0"


def test_no_gateway_is_none() -> None:
    assert check_gateway(None, BLUE) is None


def test_a_gateway_inside_the_subnet_is_taken() -> None:
    assert check_gateway("198.19.42.1", BLUE) == IP4("198.19.42.1")


def test_any_gateway_is_taken_on_a_network_without_a_subnet() -> None:
    assert check_gateway("10.0.0.1", BARE) == IP4("10.0.0.1")


@pytest.mark.parametrize(
    "text, kind, message",
    [
        ("gw", "invalid", "--gateway 'gw' is not an IPv4 address"),
        ("2001:2::1", "invalid", "--gateway '2001:2::1' is not an IPv4 address"),
        ("198.19.43.1", "address", "--gateway 198.19.43.1 is outside the container's subnet 198.19.42.0/24"),
        ("198.19.42.0", "address", "--gateway 198.19.42.0 is the network or broadcast address of 198.19.42.0/24"),
        ("198.19.42.255", "address", "--gateway 198.19.42.255 is the network or broadcast address of 198.19.42.0/24"),
    ],
)
def test_a_bad_gateway_is_refused(text: str, kind: str, message: str) -> None:
    assert refused(lambda: check_gateway(text, BLUE), kind) == message


def test_attach_is_refused_while_the_registry_is_unreachable() -> None:
    require_registry(True)
    assert refused(lambda: require_registry(False), "etcd").startswith("the registry (etcd) is unreachable")


# --- asked again --------------------------------------------------------------------------------


def test_an_attachment_asked_for_again_gets_the_same_answer_while_its_veth_is_there() -> None:
    a = attachment()
    assert book(a).again(a, 42, plugged=True) is a


@pytest.mark.parametrize("vni, plugged", [(43, True), (43, False), (42, False)])
def test_an_attachment_asked_for_again_on_another_network_or_without_its_veth_is_refused(
    vni: int, plugged: bool
) -> None:
    a = attachment()
    message = refused(lambda: book(a).again(a, vni, plugged), "invalid")
    assert message == "netns/4:1/eth0 is already attached to network blue: detach it first"


# --- the MAC ------------------------------------------------------------------------------------


def test_without_a_mac_the_random_one_drawn_by_the_shell_is_taken() -> None:
    assert book().mac(None, 42, 0x02AABBCCDDEE, registry()) == "02:aa:bb:cc:dd:ee"


def test_a_wanted_mac_is_taken_in_its_one_spelling() -> None:
    assert book().mac("02-42-00-00-00-AA", 42, 0x020000000001, registry()) == "02:42:00:00:00:aa"


@pytest.mark.parametrize(
    "text, said", [("nonsense", "not a MAC address"), ("01:00:5e:00:00:01", "multicast"), ("00:00:00:00:00:00", "null")]
)
def test_a_mac_that_is_not_unicast_is_invalid(text: str, said: str) -> None:
    message = refused(lambda: book().mac(text, 42, 1, registry()), "invalid")
    assert message.startswith("--mac ") and said in message


def test_a_mac_another_host_has_on_the_network_is_refused() -> None:
    r = registry((EndpointKey(42, mac_to_int(MAC)), Endpoint("h2", ["198.19.42.9"])))
    message = refused(lambda: book().mac(MAC, 42, 1, r), "address")
    assert message == (f"MAC {MAC} is in use on network 42 by host h2: detach it there first, or choose another --mac")
    assert book().mac(MAC, 43, 1, r) == MAC  # another network: another MAC space


def test_a_mac_this_host_publishes_is_not_another_hosts() -> None:
    r = registry((EndpointKey(42, mac_to_int(MAC)), Endpoint(HOST, ["198.19.42.9"])))
    assert book().mac(MAC, 42, 1, r) == MAC


def test_a_mac_attached_here_already_on_the_network_is_refused() -> None:
    b = book(attachment(mac=MAC))
    assert refused(lambda: b.mac(MAC.upper(), 42, 1, registry()), "address") == (
        f"MAC {MAC} is already attached here on network 42"
    )
    assert b.mac(MAC, 43, 1, registry()) == MAC


# --- the address --------------------------------------------------------------------------------


def choice(
    wanted: str | None, network: Network = BLUE, *entries: tuple[Key, Value], gateway: str | None = None
) -> AddressChoice:
    c = (
        book()
        .addresses(
            network.vni, network, wanted, IP4(gateway) if gateway else None, registry(*networks(network), *entries)
        )
        .v4
    )
    assert c is not None
    return c


def test_without_ip_the_lowest_free_address_is_offered() -> None:
    assert choice(None).next() == IF4("198.19.42.1/24")


def test_claimed_and_announced_addresses_and_the_gateway_are_never_offered() -> None:
    c = choice(
        None,
        BLUE,
        (AddressKey(42, IP4("198.19.42.1")), Allocation("h2")),
        (EndpointKey(42, 0x020000000002), Endpoint("h3", ["198.19.42.2"])),
        gateway="198.19.42.3",
    )
    assert c.next() == IF4("198.19.42.4/24")


def test_the_networks_own_gateway_is_never_offered() -> None:
    assert choice(None, Network(42, "blue", "198.19.42.0/24", gateway="198.19.42.1")).next() == IF4("198.19.42.2/24")


def test_the_loser_of_a_claim_is_offered_the_next_address() -> None:
    c = choice(None)
    first = c.next()
    c.lost(first)
    second = c.next()
    c.lost(second)
    assert (first, second, c.next()) == (IF4("198.19.42.1/24"), IF4("198.19.42.2/24"), IF4("198.19.42.3/24"))


def test_after_claim_tries_losses_the_attach_is_refused_to_try_again() -> None:
    c = choice(None)
    offered = []
    for _ in range(CLAIM_TRIES):
        offered.append(c.next())
        c.lost(offered[-1])
    assert len(set(offered)) == CLAIM_TRIES == 64
    assert refused(c.next, "address") == (
        "could not claim an address on network blue after 64 tries (many hosts allocating at once?): try again"
    )


def test_a_full_subnet_is_refused() -> None:
    c = choice(None, Network(42, "tiny", "198.19.42.0/30"))
    c.lost(c.next())
    c.lost(c.next())
    assert "198.19.42.0/30 has no free address left" in refused(c.next, "address")


def test_a_network_without_a_subnet_needs_an_ip() -> None:
    assert "has no subnet to allocate from: give --ip" in refused(choice(None, BARE).next, "network")


def test_an_explicit_ip_is_offered_once_and_refused_once_lost() -> None:
    c = choice("198.19.42.77/24")
    assert c.next() == IF4("198.19.42.77/24")
    c.lost(IF4("198.19.42.77/24"))
    assert refused(c.next, "address") == (
        "address 198.19.42.77 is in use on network blue: pick another, or leave out --ip to get a free one"
    )


def test_an_explicit_ip_without_a_prefix_length_takes_the_subnets() -> None:
    assert choice("198.19.42.77").next() == IF4("198.19.42.77/24")


def test_an_explicit_ip_on_a_network_without_a_subnet_is_taken_as_given() -> None:
    assert choice("10.1.2.3/8", BARE).next() == IF4("10.1.2.3/8")


@pytest.mark.parametrize(
    "wanted, network, kind, said",
    [
        ("x", BLUE, "invalid", "--ip 'x' is not an address with a prefix length like 198.19.1.5/24"),
        ("198.19.42.7/33", BLUE, "invalid", "--ip '198.19.42.7/33' is not an address with a prefix length"),
        (
            "10.1.2.3",
            BARE,
            "invalid",
            "--ip 10.1.2.3: give the prefix length too (network bare has no subnet to take it from)",
        ),
        ("198.19.43.5/24", BLUE, "address", "outside network blue's subnet 198.19.42.0/24"),
        ("198.19.42.20/16", BLUE, "address", "prefix length must be /24"),
        ("198.19.42.255/24", BLUE, "address", "reserved"),
        ("198.19.42.0", BLUE, "address", "reserved"),
    ],
)
def test_a_bad_explicit_ip_is_refused_before_any_claim(wanted: str, network: Network, kind: str, said: str) -> None:
    assert said in refused(lambda: choice(wanted, network), kind)


def test_an_explicit_ip_in_use_is_refused_before_any_claim() -> None:
    taken = (AddressKey(42, IP4("198.19.42.10")), Allocation("h2"))
    assert "198.19.42.10 is in use on network blue" in refused(
        lambda: choice("198.19.42.10/24", BLUE, taken), "address"
    )


def test_the_requests_gateway_is_not_accepted_as_the_containers_address() -> None:
    assert "is in use" in refused(lambda: choice("198.19.42.1/24", gateway="198.19.42.1"), "address")


# --- the attach plan ----------------------------------------------------------------------------


def plan(
    address: str = "198.19.42.7/24",
    network: Network = BLUE,
    gateway: str | None = "198.19.42.1",
    mtu: int = 1450,
    req: AttachRequest | None = None,
) -> AttachPlan:
    return book(mtu=mtu).plan_attach(
        req=req or AttachRequest("/run/netns/a", "blue"),
        attachment_id="netns/4:1/eth0",
        host_ifname="ov0123456789a",
        vni=network.vni,
        network=network,
        mac=MAC,
        gateway=IP4(gateway) if gateway else None,
        address=IF4(address),
    )


def test_an_attach_claims_the_address_plugs_the_veth_publishes_the_endpoint_and_saves() -> None:
    p = plan()
    a = p.attachment
    assert a == Attachment(
        "netns/4:1/eth0",
        42,
        "blue",
        "/run/netns/a",
        "eth0",
        "ov0123456789a",
        MAC,
        "198.19.42.7/24",
        "198.19.42.1",
        1400,
    )
    assert p.steps == (
        ClaimAddress((AddressKey(42, IP4("198.19.42.7")),), Allocation(HOST, MAC, "netns/4:1/eth0")),
        PlugVeth(a),
        PublishEndpoint(EndpointKey(42, mac_to_int(MAC)), Endpoint(HOST, ["198.19.42.7"])),
        SaveAttached(a),
    )


def test_the_attachment_takes_the_requests_namespace_and_interface() -> None:
    a = plan(req=AttachRequest("/proc/77/ns/net", "blue", "net0")).attachment
    assert (a.netns, a.ifname) == ("/proc/77/ns/net", "net0")


def test_the_mtu_is_the_networks_but_never_above_the_agents() -> None:
    assert plan(mtu=1450).attachment.mtu == 1400
    assert plan(mtu=1300).attachment.mtu == 1300
    assert plan(network=RED, address="198.19.43.2/24", gateway=None, mtu=1450).attachment.mtu == 1450


def test_an_unnamed_network_is_called_by_its_vni_and_no_gateway_is_none() -> None:
    a = plan(network=Network(45), address="10.0.0.2/24", gateway=None).attachment
    assert (a.network, a.gateway, a.router) == ("45", None, None)


def test_a_gateway_outside_an_explicit_address_is_refused_once_the_claim_is_won() -> None:
    p = plan(network=BARE, address="10.1.2.3/24", gateway="10.9.9.9")
    assert p.steps == (
        ClaimAddress((AddressKey(44, IP4("10.1.2.3")),), Allocation(HOST, MAC, "netns/4:1/eth0")),
        Refuse("--gateway 10.9.9.9 is outside the container's subnet 10.1.2.0/24", "address"),
    )
    assert p.undo(1) == (ReleaseAddress(AddressKey(44, IP4("10.1.2.3"))),)


def test_a_failed_or_lost_claim_leaves_nothing_to_undo() -> None:
    assert plan().undo(0) == ()


def test_a_failed_plug_unplugs_what_it_may_have_made_and_releases_the_address() -> None:
    assert plan().undo(1) == (Unplug("ov0123456789a"), ReleaseAddress(AddressKey(42, IP4("198.19.42.7"))))


def test_a_failed_publish_releases_then_forgets_the_endpoint_then_unplugs_and_releases_the_address() -> None:
    endpoint = EndpointKey(42, mac_to_int(MAC))
    assert plan().undo(2) == (
        ReleaseEndpoint(endpoint),
        ForgetEndpoint(endpoint),
        Unplug("ov0123456789a"),
        ReleaseAddress(AddressKey(42, IP4("198.19.42.7"))),
    )


def test_a_failed_save_undoes_every_step_before_it_newest_first() -> None:
    endpoint = EndpointKey(42, mac_to_int(MAC))
    assert plan().undo(3) == (
        ReleaseEndpoint(endpoint),
        ForgetEndpoint(endpoint),
        Unplug("ov0123456789a"),
        ReleaseAddress(AddressKey(42, IP4("198.19.42.7"))),
    )


class Shell:
    """An executor like overlay.io.containers, in memory: claims win unless the address is in
    ``others``, ``fail`` names the step type that raises."""

    def __init__(self, others: frozenset[str] = frozenset(), fail: type | None = None) -> None:
        self.others, self.fail = others, fail
        self.done: list[AttachStep | UndoStep] = []

    def run(self, p: AttachPlan) -> bool:
        for index, step in enumerate(p.steps):
            self.done.append(step)
            try:
                if isinstance(step, Refuse):
                    raise Refused(step.message, step.kind)
                if self.fail is not None and isinstance(step, self.fail):
                    raise OSError("injected")
                won = not (isinstance(step, ClaimAddress) and any(str(k.address) in self.others for k in step.keys))
            except Exception:
                self.done.extend(p.undo(index))
                raise
            if not won:
                self.done.extend(p.undo(index))
                return False
        return True

    def attach(self, b: Attachments, c: AddressChoice) -> Attachment:
        while True:
            address = c.next()
            p = b.plan_attach(
                req=AttachRequest("n", "blue"),
                attachment_id="a",
                host_ifname="ova",
                vni=42,
                network=BLUE,
                mac=MAC,
                gateway=None,
                address=address,
            )
            if self.run(p):
                return p.attachment
            c.lost(address)


def test_the_claim_loop_takes_the_lowest_address_no_other_host_won() -> None:
    shell = Shell(others=frozenset({"198.19.42.1", "198.19.42.2"}))
    a = shell.attach(book(), choice(None))
    assert a.address == "198.19.42.3/24"
    assert [s.keys[0].address for s in shell.done if isinstance(s, ClaimAddress)] == [
        IP4("198.19.42.1"),
        IP4("198.19.42.2"),
        IP4("198.19.42.3"),
    ]
    assert not [s for s in shell.done if isinstance(s, (ReleaseAddress, Unplug))]  # a lost claim undoes nothing


@pytest.mark.parametrize(
    "fail, undone",
    [
        (ClaimAddress, []),
        (PlugVeth, [Unplug, ReleaseAddress]),
        (PublishEndpoint, [ReleaseEndpoint, ForgetEndpoint, Unplug, ReleaseAddress]),
        (SaveAttached, [ReleaseEndpoint, ForgetEndpoint, Unplug, ReleaseAddress]),
    ],
)
def test_a_failure_at_each_step_is_followed_by_exactly_its_undo(fail: type, undone: list[type]) -> None:
    shell = Shell(fail=fail)
    with pytest.raises(OSError):
        shell.attach(book(), choice(None))
    kinds = [type(s) for s in shell.done]
    failed_at = kinds.index(fail)
    assert kinds[failed_at + 1 :] == undone


# --- detach -------------------------------------------------------------------------------------


A1 = attachment("netns/4:1/eth0")
A2 = attachment("netns/4:1/net1", mac="02:42:00:00:00:08", address="198.19.42.8/24", ifname="net1")
C1 = attachment("cni/c1/eth0", mac="02:42:00:00:00:09", address="198.19.42.9/24", netns="/run/netns/pod")
OTHER = attachment("netns/4:2/eth0", mac="02:42:00:00:00:0a", address="198.19.42.10/24", netns="/run/netns/b")


def test_a_detach_by_id_selects_that_attachment_whatever_else_it_says() -> None:
    b = book(A1, A2, C1, OTHER)
    assert b.select(DetachRequest("cni/c1/eth0", "/run/netns/b", "net7"), None) == [C1]
    assert b.select(DetachRequest("cni/nope/eth0"), None) == []


def test_a_detach_by_namespace_selects_all_its_attachments_or_the_one_interface() -> None:
    b = book(A1, A2, C1, OTHER)
    assert b.select(DetachRequest(None, "/proc/99/ns/net"), "4:1") == [A1, A2]
    assert b.select(DetachRequest(None, "/proc/99/ns/net", "net1"), "4:1") == [A2]


def test_a_detach_by_namespace_also_selects_what_was_attached_by_that_path() -> None:
    b = book(A1, A2, C1, OTHER)
    assert b.select(DetachRequest(None, "/run/netns/pod"), "4:77") == [C1]


def test_a_detach_of_a_namespace_that_is_gone_selects_what_was_attached_by_its_path() -> None:
    b = book(A1, A2, C1, OTHER)
    assert b.select(DetachRequest(None, "/run/netns/a"), None) == [A1, A2]
    assert b.select(DetachRequest(None, "/run/netns/gone"), None) == []


def test_a_detach_goes_unplug_forget_local_release_endpoint_release_address_save() -> None:
    assert book(A1).plan_detach(A1, unplug=True).steps == (
        Unplug("ov0123456789a"),
        ForgetLocal(42, mac_to_int(MAC)),
        ReleaseEndpoint(EndpointKey(42, mac_to_int(MAC))),
        ReleaseAddress(AddressKey(42, IP4("198.19.42.7"))),
        SaveDetached(A1),
    )


def test_the_reaper_detaches_without_unplugging_a_veth_that_is_gone() -> None:
    steps = book(A1).plan_detach(A1, unplug=False).steps
    assert [type(s) for s in steps] == [ForgetLocal, ReleaseEndpoint, ReleaseAddress, SaveDetached]


# --- check --------------------------------------------------------------------------------------


def whole(a: Attachment) -> Registry:
    return registry((a.endpoint_key, a.endpoint(HOST)), *((k, Allocation(HOST, a.mac, a.id)) for k in a.address_keys))


def test_check_of_an_id_not_attached_is_unknown() -> None:
    assert refused(lambda: book(A1).checked("cni/nope/eth0"), "unknown") == "cni/nope/eth0 is not attached on this host"
    assert book(A1).checked(A1.id) is A1


def test_an_attachment_whole_in_plumbing_and_registry_passes_check() -> None:
    book(A1).verify(A1, [], whole(A1))


def test_check_lists_the_plumbings_problems_then_the_registrys() -> None:
    message = refused(lambda: book(A1).verify(A1, ["veth gone"], registry()), "broken")
    assert message == (
        f"{A1.id} is broken: veth gone; the registry does not have endpoint {MAC} on this host; "
        f"address 198.19.42.7/24 is not held by this host in the registry"
    )


def test_an_endpoint_or_address_held_by_another_host_is_broken() -> None:
    r = registry((A1.endpoint_key, Endpoint("h2")), (A1.address_keys[0], Allocation(HOST)))
    assert refused(lambda: book(A1).verify(A1, [], r), "broken").endswith(f"endpoint {MAC} on this host")
    r = registry((A1.endpoint_key, Endpoint(HOST)), (A1.address_keys[0], Allocation("h2")))
    assert refused(lambda: book(A1).verify(A1, [], r), "broken").endswith("not held by this host in the registry")


# --- whose MAC ----------------------------------------------------------------------------------


def test_an_attached_containers_mac_is_owned_on_its_network_only() -> None:
    b = book(A1)
    assert b.owns(42, mac_to_int(MAC), now=0.0)
    assert not b.owns(43, mac_to_int(MAC), now=0.0)
    assert not b.owns(42, mac_to_int("02:42:00:00:00:99"), now=0.0)


def test_a_mac_being_attached_is_owned() -> None:
    b = book()
    b.attaching.add((42, 0x020000000005))
    assert b.owns(42, 0x020000000005, now=0.0)


def test_a_detached_mac_is_owned_for_the_grace_and_not_after() -> None:
    b = book()
    b.note_detached(42, 0x020000000005, now=100.0)
    assert b.owns(42, 0x020000000005, now=100.0)
    assert b.owns(42, 0x020000000005, now=100.0 + DETACH_GRACE - 0.001)
    assert not b.owns(42, 0x020000000005, now=100.0 + DETACH_GRACE)
    assert DETACH_GRACE == 10.0


def test_noting_a_detach_drops_the_notes_past_their_grace() -> None:
    b = book()
    b.note_detached(42, 1, now=0.0)
    b.note_detached(42, 2, now=5.0)
    b.note_detached(42, 3, now=12.0)
    assert b.detached == {(42, 2): 5.0, (42, 3): 12.0}


# --- the attachment and the state file ------------------------------------------------------------


def test_an_attachment_says_its_interface_route_and_registry_keys() -> None:
    assert (A1.interface, A1.router) == (IF4("198.19.42.7/24"), IP4("198.19.42.1"))
    assert (A1.endpoint_key, A1.address_keys) == (
        EndpointKey(42, mac_to_int(MAC)),
        (AddressKey(42, IP4("198.19.42.7")),),
    )
    assert (A1.interface6, A1.router6, A1.endpoint(HOST)) == (None, None, Endpoint(HOST, ["198.19.42.7"], []))


def test_an_attachments_json_has_its_fields_in_order_and_reads_back() -> None:
    assert list(A1.to_json()) == [
        "id",
        "vni",
        "network",
        "netns",
        "ifname",
        "host_ifname",
        "mac",
        "address",
        "gateway",
        "mtu",
        "address6",
        "gateway6",
        "name",
        "published",
        "exposed",
    ]
    assert Attachment.from_json(A1.to_json()) == A1
    no_gateway = attachment(gateway=None)
    assert Attachment.from_json(json.loads(json.dumps(no_gateway.to_json()))) == no_gateway


@pytest.mark.parametrize(
    "change, said",
    [
        (lambda r: r.pop("mtu"), "missing ['mtu']"),
        (lambda r: r.update(colour="red"), "unknown ['colour']"),
        (lambda r: r.update(vni="42"), "vni must be an integer, not str"),
        (lambda r: r.update(mtu=True), "mtu must be an integer, not bool"),
        (lambda r: r.update(mac=2), "mac must be a string, not int"),
        (lambda r: r.update(gateway=1), "gateway must be a string, not int"),
    ],
)
def test_an_attachment_record_that_is_not_one_is_a_type_error(
    change: Callable[[dict[str, object]], object], said: str
) -> None:
    record = A1.to_json()
    change(record)
    with pytest.raises(TypeError, match=said.replace("[", r"\[").replace("]", r"\]")):
        Attachment.from_json(record)
    with pytest.raises(TypeError, match="an attachment is a JSON object, not list"):
        Attachment.from_json([])


def test_the_state_file_round_trips_the_lease_and_the_attachments() -> None:
    text = encode_state(7587, [A1, C1])
    assert json.loads(text) == {"lease": 7587, "attachments": [A1.to_json(), C1.to_json()]}
    lease, records = decode_state(text)
    assert lease == 7587 and [Attachment.from_json(r) for r in records] == [A1, C1]
    assert decode_state(encode_state(None, [])) == (None, [])


def test_the_state_file_is_written_as_it_always_was() -> None:
    assert encode_state(None, [A1]) == json.dumps({"lease": None, "attachments": [A1.to_json()]}, indent=1)


def test_the_first_state_format_a_bare_list_has_no_lease() -> None:
    assert decode_state(json.dumps([A1.to_json()])) == (None, [A1.to_json()])


@pytest.mark.parametrize(
    "state, lease",
    [
        ({"lease": "7"}, None),
        ({"lease": 1.5}, None),
        ({"lease": None}, None),
        ({}, None),
        ({"lease": 9, "attachments": None}, 9),
    ],
)
def test_a_lease_that_is_not_an_integer_is_none_and_missing_attachments_are_none(
    state: dict[str, object], lease: int | None
) -> None:
    assert decode_state(json.dumps(state)) == (lease, [])


def test_unknown_state_fields_are_ignored() -> None:
    assert decode_state(json.dumps({"lease": 3, "attachments": [], "next": True})) == (3, [])


@pytest.mark.parametrize(
    "text, said",
    [
        ("3", "expected a JSON object, found int"),
        ('"x"', "expected a JSON object, found str"),
        ('{"attachments": 5}', "attachments must be a list, not int"),
        ("{", "Expecting"),
    ],
)
def test_a_state_file_that_is_not_one_is_a_value_error(text: str, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        decode_state(text)


# --- dual stack -----------------------------------------------------------------------------------

IP6 = ipaddress.IPv6Address
IF6 = ipaddress.IPv6Interface
DUAL = Network(46, "dual", "198.19.46.0/24", subnet6="2001:2:0:46::/64", gateway6="2001:2:0:46::1")
V6ONLY = Network(47, "six", subnet6="2001:2:0:47::/64")


def candidates(
    network: Network = DUAL,
    wanted: str | None = None,
    wanted6: str | None = None,
    *entries: tuple[Key, Value],
    gateway6: str | None = "2001:2:0:46::1",
) -> Candidates:
    return book(served=(42, 46, 47)).addresses(
        network.vni,
        network,
        wanted,
        None,
        registry(*networks(network), *entries),
        wanted6,
        IP6(gateway6) if gateway6 else None,
    )


def dual_plan(
    network: Network = DUAL, address: str | None = "198.19.46.2/24", address6: str = "2001:2:0:46::2/64"
) -> AttachPlan:
    return book(served=(42, 46, 47)).plan_attach(
        req=AttachRequest("/run/netns/a", network.name),
        attachment_id="netns/4:1/eth0",
        host_ifname="ov0123456789a",
        vni=network.vni,
        network=network,
        mac=MAC,
        gateway=None,
        address=IF4(address) if address else None,
        gateway6=IP6("2001:2:0:46::1"),
        address6=IF6(address6),
    )


def test_a_network_with_a_subnet6_gives_the_lowest_free_ipv6_address_beside_the_ipv4_one() -> None:
    taken6 = (AddressKey(46, IP6("2001:2:0:46::2")), Allocation("h2"))
    announced6 = (EndpointKey(46, 0x020000000002), Endpoint("h3", [], ["2001:2:0:46::3"]))
    assert candidates(DUAL, None, None, taken6, announced6).next() == (
        IF4("198.19.46.1/24"),
        IF6("2001:2:0:46::4/64"),  # not ::0 (subnet-router anycast), ::1 (gateway6), ::2 and ::3 (in use)
    )


def test_ip6_none_or_a_network_without_subnet6_gives_no_ipv6_address() -> None:
    assert candidates(DUAL, None, "none").next() == (IF4("198.19.46.1/24"), None)
    assert candidates(BLUE, None, None, gateway6=None).next() == (IF4("198.19.42.1/24"), None)


def test_an_explicit_ip6_is_claimed_as_given_and_a_bare_one_takes_the_subnet6_length() -> None:
    assert candidates(DUAL, None, "2001:2:0:46::99/64").next()[1] == IF6("2001:2:0:46::99/64")
    assert candidates(DUAL, None, "2001:2:0:46::99").next()[1] == IF6("2001:2:0:46::99/64")


@pytest.mark.parametrize(
    "network, wanted6, kind, said",
    [
        (DUAL, "2001:2:0:99::5/64", "address", "outside network dual's subnet6 2001:2:0:46::/64"),
        (DUAL, "2001:2:0:46::5/80", "address", "subnet6 is 2001:2:0:46::/64, so the prefix length must be /64"),
        (DUAL, "2001:2:0:46::/64", "address", "reserved"),
        (DUAL, "2001:2:0:46::1/64", "address", "reserved"),  # the gateway6: never a container's
        (DUAL, "x", "invalid", "--ip6 'x' is not an IPv6 address with a prefix length like 2001:2:0:42::5/64"),
        (DUAL, "198.19.46.5/24", "invalid", "is not an IPv6 address"),
        (BLUE, "2001:2:0:42::5/64", "address", "--ip6 2001:2:0:42::5/64: network blue has no subnet6"),
    ],
)
def test_a_bad_explicit_ip6_is_refused_before_any_claim(network: Network, wanted6: str, kind: str, said: str) -> None:
    assert said in refused(lambda: candidates(network, None, wanted6), kind)


def test_an_explicit_ip6_in_use_is_refused_before_any_claim() -> None:
    taken6 = (AddressKey(46, IP6("2001:2:0:46::10")), Allocation("h2"))
    assert "2001:2:0:46::10 is in use on network dual: pick another, or leave out --ip6" in refused(
        lambda: candidates(DUAL, None, "2001:2:0:46::10/64", taken6), "address"
    )


def test_a_lost_claim_moves_on_only_the_family_another_host_had() -> None:
    c = candidates(DUAL)
    first = c.next()
    c.lost([IP6("2001:2:0:46::2")])  # the IPv6 address was taken; the IPv4 one was free
    assert (first, c.next()) == (
        (IF4("198.19.46.1/24"), IF6("2001:2:0:46::2/64")),
        (IF4("198.19.46.1/24"), IF6("2001:2:0:46::3/64")),
    )
    explicit = candidates(DUAL, "198.19.46.9/24")
    explicit.next()
    explicit.lost([IP6("2001:2:0:46::2")])
    assert explicit.next()[0] == IF4("198.19.46.9/24")  # still ours to try: only the IPv6 one was lost
    explicit.lost([IP4("198.19.46.9")])
    assert "198.19.46.9 is in use" in refused(explicit.next, "address")


def test_a_dual_stack_attach_claims_both_addresses_in_one_step_and_publishes_both() -> None:
    p = dual_plan()
    a = p.attachment
    keys = (AddressKey(46, IP4("198.19.46.2")), AddressKey(46, IP6("2001:2:0:46::2")))
    assert (a.address, a.address6, a.gateway6, a.router6) == (
        "198.19.46.2/24",
        "2001:2:0:46::2/64",
        "2001:2:0:46::1",
        IP6("2001:2:0:46::1"),
    )
    assert p.steps == (
        ClaimAddress(keys, Allocation(HOST, MAC, "netns/4:1/eth0")),
        PlugVeth(a),
        PublishEndpoint(EndpointKey(46, mac_to_int(MAC)), Endpoint(HOST, ["198.19.46.2"], ["2001:2:0:46::2"])),
        SaveAttached(a),
    )
    assert p.undo(1) == (Unplug("ov0123456789a"), ReleaseAddress(keys[0]), ReleaseAddress(keys[1]))
    assert book(a).plan_detach(a, unplug=True).steps[3:5] == (ReleaseAddress(keys[0]), ReleaseAddress(keys[1]))


def test_a_network_with_only_a_subnet6_gives_ipv6_only_containers_unless_ip_is_given() -> None:
    assert candidates(V6ONLY, gateway6=None).next() == (None, IF6("2001:2:0:47::1/64"))
    assert candidates(V6ONLY, "198.19.47.5/24", gateway6=None).next() == (
        IF4("198.19.47.5/24"),
        IF6("2001:2:0:47::1/64"),
    )
    assert "no subnet to allocate from" in refused(lambda: candidates(V6ONLY, None, "none").next(), "network")
    p = dual_plan(V6ONLY, None, "2001:2:0:47::1/64")
    a = p.attachment
    assert (a.address, a.gateway, a.interface, a.addresses) == (None, None, None, "2001:2:0:47::1/64")
    assert p.steps[0] == ClaimAddress((AddressKey(47, IP6("2001:2:0:47::1")),), Allocation(HOST, MAC, a.id))
    assert a.endpoint(HOST) == Endpoint(HOST, [], ["2001:2:0:47::1"])
    assert Attachment.from_json(json.loads(json.dumps(a.to_json()))) == a


def test_the_gateway6_is_the_requests_else_the_networks_and_only_with_an_ipv6_address() -> None:
    def req(**kw: str) -> AttachRequest:
        return AttachRequest("/run/netns/a", "dual", **kw)

    assert gateways(req(), DUAL) == (None, IP6("2001:2:0:46::1"))
    assert gateways(req(gateway6="2001:2:0:46::fe"), DUAL) == (None, IP6("2001:2:0:46::fe"))
    assert gateways(req(ip6="none"), DUAL) == (None, None)  # the network's is dropped
    assert gateways(AttachRequest("n", "blue"), Network(42, "blue", "198.19.42.0/24", gateway6="2001:2:0:42::1")) == (
        None,
        None,
    )
    assert "no IPv6 address (--ip6 none)" in refused(
        lambda: gateways(req(ip6="none", gateway6="2001:2:0:46::1"), DUAL), "invalid"
    )
    assert "no IPv6 address (network blue has no subnet6)" in refused(
        lambda: gateways(AttachRequest("n", "blue", gateway6="2001:2:0:42::1"), BLUE), "invalid"
    )
    assert "outside the container's subnet6 2001:2:0:46::/64" in refused(
        lambda: gateways(req(gateway6="2001:2:0:99::1"), DUAL), "address"
    )
    assert "subnet-router anycast" in refused(lambda: gateways(req(gateway6="2001:2:0:46::"), DUAL), "address")
    assert "is not an IPv6 address" in refused(lambda: check_gateway6("198.19.46.1", DUAL), "invalid")
    assert "only a subnet6" in refused(
        lambda: gateways(AttachRequest("n", "six", gateway="198.19.47.1"), V6ONLY), "invalid"
    )


def test_check_finds_a_missing_ipv6_claim() -> None:
    a = dual_plan().attachment
    book(a).verify(a, [], whole(a))
    partial = registry((a.endpoint_key, a.endpoint(HOST)), (a.address_keys[0], Allocation(HOST)))
    assert refused(lambda: book(a).verify(a, [], partial), "broken").endswith(
        "address 2001:2:0:46::2/64 is not held by this host in the registry"
    )


def test_a_record_saved_before_dual_stack_still_loads_as_ipv4_only() -> None:
    old = {k: v for k, v in A1.to_json().items() if k not in ("address6", "gateway6")}
    assert Attachment.from_json(old) == A1 and A1.address6 is None
    assert "address6 must be a string, not int" in str(
        pytest.raises(TypeError, Attachment.from_json, {**old, "address6": 6}).value
    )


def test_publish_all_takes_every_exposed_port_not_published_yet_and_refuses_when_there_is_none() -> None:
    from dataclasses import replace as copy

    from overlay.core.ports import PortSpec

    book = Attachments(HOST, [42], 1450)
    bare = copy(A1, exposed=())
    assert "exposes no ports" in refused(lambda: book.unpublished_exposed(bare), "invalid")
    web = copy(A1, exposed=("80/tcp", "53/udp"), published=(PortSpec("tcp", 8080, 80),))
    assert book.unpublished_exposed(web) == [PortSpec("udp", 0, 53)]
    done = copy(web, published=(PortSpec("tcp", 8080, 80), PortSpec("udp", 5353, 53)))
    assert "published already" in refused(lambda: book.unpublished_exposed(done), "invalid")
    assert Attachment.from_json(web.to_json()) == web
    assert web.endpoint(HOST).ports == ["80/tcp", "53/udp"]
