"""The DNS responder's answers and name index (overlay/core/dns.py): every rule of its docstring,
queries built and replies read back with dnspython; the shell is tests/io/test_dns.py."""

from __future__ import annotations

import ipaddress
import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
from hypothesis import example, given
from hypothesis import strategies as st

from overlay.core.dns import (
    MAX_UDP_QUERY,
    SERVICES,
    TTL,
    Drop,
    Forward,
    Names,
    Reply,
    answer,
    failure,
    matches,
    upstreams,
)
from overlay.core.registry import DNS_LABEL, Deleted, Endpoint, EndpointKey, Event, Network, NetworkKey, Put

BLUE, RED = 42, 43
V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
ASKER = V4("198.19.42.100")


def blue() -> Network:
    return Network(BLUE, "blue", "198.19.42.0/24", gateway="198.19.42.1", subnet6="2001:2:0:42::/64")


def red() -> Network:
    return Network(RED, "red", "198.19.43.0/24", gateway="198.19.43.1")


def ep(name: str | None, *addresses: str, host: str = "h1", ports: tuple[str, ...] = ()) -> Endpoint:
    v4 = [a for a in addresses if ":" not in a]
    v6 = [a for a in addresses if ":" in a]
    return Endpoint(host, v4, v6, name, list(ports))


WEB_PORTS = ("80/tcp", "8080/tcp", "53/udp")


def world() -> Names:
    names = Names()
    names.apply(
        [
            Put(NetworkKey(BLUE), blue()),
            Put(NetworkKey(RED), red()),
            Put(EndpointKey(BLUE, 1), ep("web", "198.19.42.5", "2001:2:0:42::5", ports=WEB_PORTS)),
            Put(EndpointKey(BLUE, 2), ep("only6", "2001:2:0:42::6")),
            Put(EndpointKey(BLUE, 3), ep(None, "198.19.42.7")),  # unnamed
            Put(EndpointKey(RED, 4), ep("db", "198.19.43.5", ports=("5432/tcp",))),
        ]
    )
    return names


def query(qname: str, rdtype: str = "A", *, edns: int | None = None, payload: int = 1232, rdclass: str = "IN") -> bytes:
    q = dns.message.make_query(qname, rdtype, rdclass, use_edns=edns if edns is not None else False, payload=payload)
    return q.to_wire()


def ask(
    names: Names,
    qname: str,
    rdtype: str = "A",
    *,
    vni: int = BLUE,
    upstream: bool = True,
    source: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ASKER,
    tcp: bool = False,
    **kw: object,
) -> tuple[Reply, dns.message.Message]:
    out = answer(query(qname, rdtype, **kw), vni, names, upstream, source=source, tcp=tcp)  # type: ignore[arg-type]
    assert isinstance(out, Reply), out
    return out, dns.message.from_wire(out.wire)


def records(m: dns.message.Message) -> set[str]:
    return {rd.to_text() for rrset in m.answer for rd in rrset}


def additional(m: dns.message.Message) -> set[str]:
    """The additional section but the OPT: "owner TYPE address" each."""
    return {
        f"{rrset.name.to_text().lower()} {dns.rdatatype.to_text(rrset.rdtype)} {rd.to_text()}"
        for rrset in m.additional
        for rd in rrset
    }


# --- names of this network ------------------------------------------------------------------


def test_a_single_label_name_is_answered_with_its_ipv4_address_authoritatively_for_5_seconds() -> None:
    out, m = ask(world(), "web")
    assert out.rcode == "NOERROR" and out.answers == 1
    assert m.rcode() == dns.rcode.NOERROR and m.flags & dns.flags.AA and m.flags & dns.flags.QR
    assert records(m) == {"198.19.42.5"}
    assert m.answer[0].ttl == TTL == 5 and m.answer[0].name == dns.name.from_text("web")


def test_name_dot_network_is_answered_too_case_insensitively_with_the_askers_spelling() -> None:
    _, m = ask(world(), "WeB.BLue")
    assert records(m) == {"198.19.42.5"}
    assert m.answer[0].name.to_text() == "WeB.BLue."  # echoed as asked (0x20 randomisation survives)
    assert m.question[0].name.to_text() == "WeB.BLue."


def test_aaaa_gives_the_ipv6_addresses_and_any_gives_both() -> None:
    names = world()
    assert records(ask(names, "web.blue", "AAAA")[1]) == {"2001:2:0:42::5"}
    assert records(ask(names, "web", "ANY")[1]) == {"198.19.42.5", "2001:2:0:42::5"}


def test_a_known_name_asked_for_another_type_is_nodata() -> None:
    names = world()
    for qname, rdtype in (("web", "MX"), ("web.blue", "TXT"), ("only6", "A"), ("web", "PTR")):
        out, m = ask(names, qname, rdtype)
        assert out.rcode == "NOERROR" and out.answers == 0 and not m.answer, (qname, rdtype)
        assert m.flags & dns.flags.AA


def test_an_unknown_name_of_the_overlay_is_nxdomain() -> None:
    names = world()
    for qname in ("nope", "nope.blue", "a.b.blue", "web.web.blue"):
        out, m = ask(names, qname)
        assert out.rcode == "NXDOMAIN" and m.rcode() == dns.rcode.NXDOMAIN and m.flags & dns.flags.AA, qname


def test_unnamed_endpoints_are_not_in_the_index_and_have_no_ptr() -> None:
    names = world()
    assert len(names) == 3  # web, only6, db
    assert ask(names, "7.42.19.198.in-addr.arpa", "PTR")[0].rcode == "NXDOMAIN"


def test_networks_are_isolated_another_networks_names_are_nxdomain() -> None:
    names = world()
    assert ask(names, "db.red")[0].rcode == "NXDOMAIN"  # red's endpoint, asked from blue
    assert ask(names, "db")[0].rcode == "NXDOMAIN"
    assert ask(names, "web.red")[0].rcode == "NXDOMAIN"
    assert records(ask(names, "db.red", vni=RED, source=V4("198.19.43.9"))[1]) == {"198.19.43.5"}
    assert ask(names, "web", vni=RED, source=V4("198.19.43.9"))[0].rcode == "NXDOMAIN"


def test_the_networks_own_name_as_a_single_label_is_nodata_an_empty_non_terminal() -> None:
    out, m = ask(world(), "blue")
    assert out.rcode == "NOERROR" and not m.answer
    assert ask(world(), "red")[0].rcode == "NXDOMAIN"  # another network's name: nothing of it is seen


def test_two_endpoints_of_one_name_are_answered_with_all_their_addresses() -> None:
    names = world()
    names.apply([Put(EndpointKey(BLUE, 9), ep("WEB", "198.19.42.9", "198.19.42.5", host="h2"))])
    assert records(ask(names, "web")[1]) == {"198.19.42.5", "198.19.42.9"}
    assert len(ask(names, "web")[1].answer[0]) == 2  # each address once
    names.apply([Deleted(EndpointKey(BLUE, 1), ep("web"))])
    assert records(ask(names, "web")[1]) == {"198.19.42.5", "198.19.42.9"}  # the other holds both
    names.apply([Deleted(EndpointKey(BLUE, 9), ep("web"))])
    assert ask(names, "web")[0].rcode == "NXDOMAIN"


def test_a_rename_a_move_and_a_network_rename_are_answered_at_once() -> None:
    names = world()
    names.apply([Put(EndpointKey(BLUE, 1), ep("web", "198.19.42.50"))])  # moved
    assert records(ask(names, "web")[1]) == {"198.19.42.50"}
    assert ask(names, "5.42.19.198.in-addr.arpa", "PTR")[0].rcode == "NXDOMAIN"
    names.apply([Put(EndpointKey(BLUE, 1), ep("api", "198.19.42.50"))])  # renamed
    assert ask(names, "web")[0].rcode == "NXDOMAIN" and records(ask(names, "api")[1]) == {"198.19.42.50"}
    names.apply([Put(NetworkKey(BLUE), Network(BLUE, "navy", "198.19.42.0/24"))])
    assert records(ask(names, "api.navy")[1]) == {"198.19.42.50"}
    assert isinstance(answer(query("api.blue"), BLUE, names, True), Forward)  # blue is no network's name now
    assert records(ask(names, "50.42.19.198.in-addr.arpa", "PTR")[1]) == {"api.navy."}
    names.apply([Put(EndpointKey(BLUE, 1), ep(None, "198.19.42.50"))])  # the name taken away
    assert ask(names, "api")[0].rcode == "NXDOMAIN"


# --- reverse names --------------------------------------------------------------------------


def test_ptr_of_an_address_in_the_subnet_names_the_endpoint_under_its_network() -> None:
    names = world()
    out, m = ask(names, "5.42.19.198.in-addr.arpa", "PTR")
    assert out.rcode == "NOERROR" and records(m) == {"web.blue."} and m.flags & dns.flags.AA
    assert m.answer[0].ttl == 5
    name6 = dns.reversename.from_address("2001:2:0:42::5").to_text()
    assert records(ask(names, name6, "PTR")[1]) == {"web.blue."}
    assert records(ask(names, name6.upper(), "PTR")[1]) == {"web.blue."}  # case-insensitive


def test_ptr_of_an_address_in_the_subnet_without_a_named_endpoint_is_nxdomain() -> None:
    names = world()
    assert ask(names, "99.42.19.198.in-addr.arpa", "PTR")[0].rcode == "NXDOMAIN"
    assert ask(names, dns.reversename.from_address("2001:2:0:42::99").to_text(), "PTR")[0].rcode == "NXDOMAIN"
    assert ask(names, "5.42.19.198.in-addr.arpa", "A")[0].rcode == "NOERROR"  # exists: NODATA


def test_reverse_names_outside_the_subnet_or_not_an_address_are_forwarded() -> None:
    names = world()
    for qname in (
        "5.43.19.198.in-addr.arpa",  # red's subnet: not ours from blue
        "1.0.0.10.in-addr.arpa",
        "42.19.198.in-addr.arpa",  # a zone, not an address
        "05.42.19.198.in-addr.arpa",  # not canonical
        "256.42.19.198.in-addr.arpa",
        dns.reversename.from_address("2001:2:0:43::5").to_text(),
    ):
        assert isinstance(answer(query(qname, "PTR"), BLUE, names, True, source=ASKER), Forward), qname


def test_ptr_of_a_network_whose_name_is_not_a_label_is_the_bare_name() -> None:
    names = world()
    names.apply([Put(NetworkKey(BLUE), Network(BLUE, "my blue.net", "198.19.42.0/24"))])
    assert records(ask(names, "5.42.19.198.in-addr.arpa", "PTR")[1]) == {"web."}
    assert records(ask(names, "web")[1]) == {"198.19.42.5"}


def test_two_endpoints_on_one_address_give_one_ptr_each() -> None:
    names = world()
    names.apply([Put(EndpointKey(BLUE, 8), ep("alias", "198.19.42.5"))])
    assert records(ask(names, "5.42.19.198.in-addr.arpa", "PTR")[1]) == {"web.blue.", "alias.blue."}


# --- SRV: a service's port by name ---------------------------------------------------------

WEB_ADDITIONAL = {"web.blue. A 198.19.42.5", "web.blue. AAAA 2001:2:0:42::5"}


def test_srv_by_service_name_gives_the_exposed_port_and_the_targets_addresses() -> None:
    out, m = ask(world(), "_http._tcp.web", "SRV")
    assert out.rcode == "NOERROR" and out.answers == 1 and not out.truncated
    assert m.flags & dns.flags.AA and records(m) == {"0 0 80 web.blue."}
    assert m.answer[0].ttl == TTL == 5 and m.answer[0].rdtype == dns.rdatatype.SRV
    assert additional(m) == WEB_ADDITIONAL and all(rrset.ttl == 5 for rrset in m.additional)
    _, m = ask(world(), "_http._tcp.web.blue", "SRV", edns=0)
    assert records(m) == {"0 0 80 web.blue."} and additional(m) == WEB_ADDITIONAL and m.edns == 0


def test_srv_by_port_number_and_over_udp_and_case_insensitively_with_the_askers_spelling() -> None:
    names = world()
    assert records(ask(names, "_8080._tcp.web", "SRV")[1]) == {"0 0 8080 web.blue."}
    assert records(ask(names, "_80._tcp.web.blue", "SRV")[1]) == {"0 0 80 web.blue."}
    assert records(ask(names, "_domain._udp.web", "SRV")[1]) == {"0 0 53 web.blue."}
    assert records(ask(names, "_53._udp.web", "SRV")[1]) == {"0 0 53 web.blue."}
    _, m = ask(names, "_HTTP._Tcp.WeB.BLUE", "SRV")
    assert records(m) == {"0 0 80 web.blue."} and m.answer[0].name.to_text() == "_HTTP._Tcp.WeB.BLUE."
    assert additional(m) == WEB_ADDITIONAL
    assert records(ask(names, "_http-alt._tcp.web", "SRV")[1]) == {"0 0 8080 web.blue."}  # 8080's IANA name


def test_srv_target_is_bare_when_the_networks_name_is_not_a_label() -> None:
    names = world()
    names.apply([Put(NetworkKey(BLUE), Network(BLUE, "my blue.net", "198.19.42.0/24", subnet6="2001:2:0:42::/64"))])
    _, m = ask(names, "_http._tcp.web", "SRV")
    assert records(m) == {"0 0 80 web."}
    assert additional(m) == {"web. A 198.19.42.5", "web. AAAA 2001:2:0:42::5"}
    assert isinstance(answer(query("_http._tcp.web.blue", "SRV"), BLUE, names, True, source=ASKER), Forward)


def test_srv_for_a_port_not_exposed_an_unknown_service_or_an_unknown_name_is_nxdomain() -> None:
    names = world()
    names.apply([Put(EndpointKey(BLUE, 7), ep("ghost", ports=("80/tcp",)))])  # exposes, holds no address
    for qname in (
        "_ssh._tcp.web",  # a known name, the port not exposed
        "_http._udp.web",  # exposed over TCP only
        "_domain._tcp.web.blue",  # over UDP only
        "_9999._tcp.web",
        "_nope._tcp.web",  # not in the table
        "_dns._udp.web",  # the IANA name is "domain"
        "_080._tcp.web",  # not canonical
        "_0._tcp.web",
        "_65536._tcp.web",
        "__http._tcp.web",
        "_._tcp.web",
        "_http._tcp.nope",
        "_http._tcp.nope.blue",
        "_http._tcp.ghost",  # nothing to point at
        "_postgresql._tcp.db",  # red's: networks are isolated
        "_postgresql._tcp.db.red",
        "_http._tcp.web.red",
    ):
        for rdtype in ("SRV", "A", "ANY"):
            out, m = ask(names, qname, rdtype)
            assert out.rcode == "NXDOMAIN" and m.flags & dns.flags.AA and not m.additional, (qname, rdtype)
    _, m = ask(names, "_postgresql._tcp.db.red", "SRV", vni=RED, source=V4("198.19.43.9"))
    assert records(m) == {"0 0 5432 db.red."} and additional(m) == {"db.red. A 198.19.43.5"}


def test_another_type_of_an_srv_name_is_nodata_and_any_gives_the_srv() -> None:
    names = world()
    for rdtype in ("A", "AAAA", "TXT", "PTR", "MX"):
        out, m = ask(names, "_http._tcp.web", rdtype)
        assert out.rcode == "NOERROR" and out.answers == 0 and not m.answer and not m.additional, rdtype
    _, m = ask(names, "_http._tcp.web", "ANY")
    assert records(m) == {"0 0 80 web.blue."} and additional(m) == WEB_ADDITIONAL
    assert ask(names, "web", "SRV")[0].answers == 0  # the name itself has no SRV: NODATA


def test_the_protocol_label_is_an_empty_non_terminal_when_the_name_offers_a_port_over_it() -> None:
    names = world()
    for qname in ("_tcp.web", "_tcp.web.blue", "_udp.WEB", "_udp.web.blue"):
        out, m = ask(names, qname, "SRV")
        assert out.rcode == "NOERROR" and not m.answer and m.flags & dns.flags.AA, qname
    names.apply([Put(EndpointKey(BLUE, 1), ep("web", "198.19.42.5", ports=("80/tcp",)))])
    for qname in ("_udp.web", "_udp.web.blue", "_tcp.nope", "_tcp.nope.blue", "_tcp.only6", "_tcp.db.red"):
        assert ask(names, qname, "SRV")[0].rcode == "NXDOMAIN", qname


def test_names_that_only_look_like_srv_names_follow_the_other_rules() -> None:
    names = world()
    for qname in ("_sctp.web", "_http._sctp.web", "http._tcp.web", "_http._tcp.web.example", "_http._tcp.a.web"):
        assert isinstance(answer(query(qname, "SRV"), BLUE, names, True, source=ASKER), Forward), qname
    for qname in ("_tcp._x.blue", "x._tcp.web.blue", "_http._tcp.web.x.blue"):
        assert ask(names, qname, "SRV")[0].rcode == "NXDOMAIN", qname
    out, m = ask(names, "_http._tcp.web", "SRV", upstream=False)
    assert out.rcode == "NOERROR" and records(m) == {"0 0 80 web.blue."}  # ours: answered without upstreams


def test_every_service_of_the_table_is_found_by_its_iana_name() -> None:
    assert all(k == k.lower() and DNS_LABEL.match(k) for k in SERVICES)
    assert SERVICES["http"] == 80 and SERVICES["postgresql"] == 5432 and SERVICES["domain"] == 53
    names = world()
    names.apply(
        [Put(EndpointKey(BLUE, 5), ep("all", "198.19.42.20", ports=tuple(f"{p}/tcp" for p in SERVICES.values())))]
    )
    for service, port in SERVICES.items():
        assert records(ask(names, f"_{service}._tcp.all", "SRV")[1]) == {f"0 0 {port} all.blue."}, service


def test_two_endpoints_of_one_name_give_one_srv_and_all_the_names_addresses() -> None:
    names = world()
    names.apply([Put(EndpointKey(BLUE, 9), ep("web", "198.19.42.9", host="h2", ports=("80/tcp",)))])
    _, m = ask(names, "_http._tcp.web", "SRV")
    assert records(m) == {"0 0 80 web.blue."} and len(m.answer[0]) == 1
    assert additional(m) == WEB_ADDITIONAL | {"web.blue. A 198.19.42.9"}
    assert additional(ask(names, "_8080._tcp.web", "SRV")[1]) == WEB_ADDITIONAL | {"web.blue. A 198.19.42.9"}
    names.apply([Deleted(EndpointKey(BLUE, 1), ep("web"))])
    assert ask(names, "_8080._tcp.web", "SRV")[0].rcode == "NXDOMAIN"  # the one that exposed it went
    assert additional(ask(names, "_http._tcp.web", "SRV")[1]) == {"web.blue. A 198.19.42.9"}
    assert names.services(BLUE, "WEB") == ["80/tcp"]


def test_port_changes_renames_moves_and_deletes_are_answered_at_once() -> None:
    names = world()
    assert names.services(BLUE, "web") == ["80/tcp", "8080/tcp", "53/udp"]
    names.apply([Put(EndpointKey(BLUE, 1), ep("web", "198.19.42.5", "2001:2:0:42::5", ports=("443/tcp",)))])
    assert ask(names, "_http._tcp.web", "SRV")[0].rcode == "NXDOMAIN"
    assert ask(names, "_udp.web", "SRV")[0].rcode == "NXDOMAIN"
    assert records(ask(names, "_https._tcp.web", "SRV")[1]) == {"0 0 443 web.blue."}
    names.apply([Put(EndpointKey(BLUE, 1), ep("web", "198.19.42.50", ports=("443/tcp",)))])  # moved
    assert additional(ask(names, "_https._tcp.web", "SRV")[1]) == {"web.blue. A 198.19.42.50"}
    names.apply([Put(EndpointKey(BLUE, 1), ep("api", "198.19.42.50", ports=("443/tcp",)))])  # renamed
    assert ask(names, "_https._tcp.web", "SRV")[0].rcode == "NXDOMAIN" and names.services(BLUE, "web") == []
    assert records(ask(names, "_https._tcp.api", "SRV")[1]) == {"0 0 443 api.blue."}
    names.apply([Put(NetworkKey(BLUE), Network(BLUE, "Navy", "198.19.42.0/24"))])  # the target follows
    _, m = ask(names, "_https._tcp.api.navy", "SRV")
    assert records(m) == {"0 0 443 api.navy."} and additional(m) == {"api.navy. A 198.19.42.50"}
    names.apply([Put(EndpointKey(BLUE, 1), ep("api", ports=("443/tcp",)))])  # its addresses gone
    assert ask(names, "_https._tcp.api", "SRV")[0].rcode == "NXDOMAIN" and names.services(BLUE, "api") == []
    names.apply([Put(EndpointKey(BLUE, 1), ep("api", "198.19.42.51", ports=("443/tcp",)))])
    names.apply([Deleted(EndpointKey(BLUE, 1), ep("api"))])
    assert ask(names, "_https._tcp.api", "SRV")[0].rcode == "NXDOMAIN" and ask(names, "_tcp.api")[0].rcode == "NXDOMAIN"
    assert all(k[0] == RED for k in names._by_service) and all(k[0] == RED for k in names._by_proto)


def test_ports_that_do_not_parse_are_left_out() -> None:
    names = world()
    bad = ("80", "80/sctp", "080/tcp", "0/tcp", "65536/tcp", "99999999/tcp", "/tcp", "８０/tcp", "80/TCP", "7" * 5000)
    names.apply([Put(EndpointKey(BLUE, 1), ep("web", "198.19.42.5", ports=(*bad, "81/tcp", "81/tcp")))])
    assert names.services(BLUE, "web") == ["81/tcp"]
    assert records(ask(names, "_81._tcp.web", "SRV")[1]) == {"0 0 81 web.blue."}


def many_serving(count: int, *, v6: bool = False) -> Names:
    names = world()
    names.apply(
        [
            Put(EndpointKey(BLUE, 100 + i), ep("web", f"198.19.42.{10 + i}", host="h2", ports=("80/tcp",)))
            for i in range(count)
        ]
    )
    return names


def test_srv_additional_records_go_in_by_whole_rrsets_while_they_fit_and_never_truncate() -> None:
    names = many_serving(40)  # 41 A records, 16 bytes each: over 512
    out, m = ask(names, "_http._tcp.web", "SRV")
    assert not out.truncated and not m.flags & dns.flags.TC and records(m) == {"0 0 80 web.blue."}
    assert additional(m) == {"web.blue. AAAA 2001:2:0:42::5"} and len(out.wire) <= 512  # the A RRset left out
    out, m = ask(names, "_http._tcp.web", "SRV", edns=0, payload=1232)
    assert len([a for a in additional(m) if " A " in a]) == 41 and len(out.wire) <= 1232
    names = many_serving(100)  # 101 A records: over 1232
    out, m = ask(names, "_http._tcp.web", "SRV", edns=0, payload=4096)
    assert not out.truncated and additional(m) == {"web.blue. AAAA 2001:2:0:42::5"} and m.edns == 0
    assert len(out.wire) <= 1232
    out, m = ask(many_serving(1000), "_http._tcp.web", "SRV", tcp=True)
    assert len(additional(m)) == 248  # 247 A (.5 and .10 .. .255) and the AAAA
    names = world()
    names.apply(
        [Put(EndpointKey(BLUE, 1), ep("web", *(f"2001:2:0:42::{i:x}" for i in range(1, 40)), ports=("80/tcp",)))]
    )
    out, m = ask(names, "_http._tcp.web", "SRV")
    assert records(m) == {"0 0 80 web.blue."} and not m.additional and not out.truncated  # 39 AAAA: none fit


def test_the_srv_target_is_uncompressed_and_the_additional_owner_points_at_it() -> None:
    out, _ = ask(world(), "_http._tcp.web", "SRV")
    target = b"\x03web\x04blue\x00"
    at = out.wire.index(b"\x00\x00\x00\x00\x00\x50" + target)  # priority, weight, port 80, the name in full
    assert out.wire.count(struct.pack("!H", 0xC000 | (at + 6))) == 2  # the A and the AAAA records' owners


# --- everything else ------------------------------------------------------------------------


def test_other_names_are_forwarded_or_refused_without_upstreams() -> None:
    names = world()
    for qname in ("example.com", "web.example", ".", "198.19.42.7"):
        out = answer(query(qname), BLUE, names, True, source=ASKER)
        assert isinstance(out, Forward), qname
    out, m = ask(names, "example.com", upstream=False)
    assert out.rcode == "REFUSED" and not m.flags & dns.flags.AA and not m.flags & dns.flags.RA


def test_ra_says_whether_there_are_upstreams() -> None:
    assert ask(world(), "web")[1].flags & dns.flags.RA
    assert not ask(world(), "web", upstream=False)[1].flags & dns.flags.RA


def test_a_forward_carries_the_id_flags_and_question_of_the_query() -> None:
    wire = query("Example.COM", "AAAA")
    out = answer(wire, BLUE, world(), True)
    assert isinstance(out, Forward)
    assert out.id == struct.unpack("!H", wire[:2])[0] and out.flags == struct.unpack("!H", wire[2:4])[0]
    assert out.question == wire[12:]  # name as spelt, type, class


def test_other_classes_and_zone_transfers_are_refused() -> None:
    names = world()
    assert ask(names, "version.bind", "TXT", rdclass="CH")[0].rcode == "REFUSED"
    assert ask(names, "blue", "AXFR")[0].rcode == "REFUSED"
    assert ask(names, "example.com", "IXFR")[0].rcode == "REFUSED"
    assert records(ask(names, "web", rdclass="ANY")[1]) == {"198.19.42.5"}


# --- who may ask ----------------------------------------------------------------------------


def test_queries_from_outside_the_networks_subnets_are_dropped() -> None:
    names = world()
    wire = query("web")
    assert answer(wire, BLUE, names, True, source=V4("198.19.43.9")) == Drop("foreign_source")  # red's container
    assert answer(wire, BLUE, names, True, source=V4("198.18.0.1")) == Drop("foreign_source")
    assert answer(wire, BLUE, names, True, source=V6("2001:2:0:43::9")) == Drop("foreign_source")
    assert isinstance(answer(wire, BLUE, names, True, source=V6("2001:2:0:42::9")), Reply)
    assert isinstance(answer(wire, RED, names, True, source=V6("2001:2:0:43::9")), Drop)  # red has no subnet6


def test_a_network_not_in_the_registry_answers_nothing_and_one_without_subnets_answers_anyone() -> None:
    names = world()
    assert answer(query("web"), 99, names, True, source=ASKER) == Drop("unknown_network")
    names.apply([Put(NetworkKey(99), Network(99, "open"))])
    assert isinstance(answer(query("x"), 99, names, True, source=V4("198.18.0.7")), Reply)
    names.apply([Deleted(NetworkKey(BLUE), blue())])
    assert answer(query("web"), BLUE, names, True, source=ASKER) == Drop("unknown_network")


# --- malformed and hostile queries ----------------------------------------------------------


def test_responses_short_and_oversized_queries_are_dropped() -> None:
    names = world()
    wire = bytearray(query("web"))
    wire[2] |= 0x80
    assert answer(bytes(wire), BLUE, names, True) == Drop("response")
    assert answer(b"\x00" * 11, BLUE, names, True) == Drop("short")
    assert answer(b"", BLUE, names, True) == Drop("short")
    big = dns.message.make_query("web", "A", use_edns=0, options=[dns.edns.GenericOption(65001, b"x" * 4100)])
    wire = big.to_wire(max_size=65535)
    assert len(wire) > MAX_UDP_QUERY
    assert answer(wire, BLUE, names, True) == Drop("oversize")
    out = answer(wire, BLUE, names, True, tcp=True)  # TCP takes up to 65535 bytes
    assert isinstance(out, Reply) and out.rcode == "NOERROR" and out.answers == 1


def test_other_opcodes_are_notimp_with_a_bare_header() -> None:
    for opcode in (dns.opcode.NOTIFY, dns.opcode.UPDATE, dns.opcode.STATUS, dns.opcode.IQUERY):
        q = dns.message.make_query("web", "A")
        q.set_opcode(opcode)
        out = answer(q.to_wire(), BLUE, world(), True)
        assert isinstance(out, Reply) and out.rcode == "NOTIMP" and len(out.wire) == 12
        m = dns.message.from_wire(out.wire)
        assert m.rcode() == dns.rcode.NOTIMP and m.opcode() == opcode and m.id == q.id


def test_not_exactly_one_question_is_formerr() -> None:
    q = dns.message.make_query("web", "A")
    two = dns.message.make_query("web", "A")
    two.question.append(dns.message.make_query("db", "A").question[0])
    none = bytearray(q.to_wire())[:12]
    none[5] = 0
    for wire in (two.to_wire(), bytes(none)):
        out = answer(wire, BLUE, world(), True)
        assert isinstance(out, Reply) and out.rcode == "FORMERR" and len(out.wire) == 12


def test_unparseable_queries_are_formerr_never_larger_than_the_query() -> None:
    good = query("web", edns=0)
    cases = [
        good + b"\x00",  # trailing byte
        good[:-3],  # cut in the OPT
        query("web")[:-2],  # cut in the question
        good[:12] + b"\x3fabc",  # label runs past the end
        good[:12] + b"\xc0\x0c\x00\x01\x00\x01",  # pointer loop
    ]
    two_opt = bytearray(good + good[-11:])
    two_opt[11] = 2
    cases.append(bytes(two_opt))
    not_root = bytearray(query("web", edns=0))
    not_root[-11:] = b"\x01x" + bytes(not_root[-10:])  # an OPT owned by x.
    cases.append(bytes(not_root))
    for wire in cases:
        out = answer(wire, BLUE, world(), True)
        assert isinstance(out, Reply) and out.rcode == "FORMERR", wire.hex()
        assert len(out.wire) <= len(wire)


def test_meta_types_as_the_question_are_formerr() -> None:
    for rdtype in ("OPT", "TSIG", "TKEY", "NONE"):
        wire = query("web", rdtype)
        out = answer(wire, BLUE, world(), True)
        assert isinstance(out, Reply) and out.rcode == "FORMERR", rdtype


def test_an_edns_version_above_zero_is_badvers_with_an_opt() -> None:
    out, m = ask(world(), "web", edns=1)
    assert out.rcode == "BADVERS" and m.rcode() == dns.rcode.BADVERS and m.edns == 0


@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    out = answer(data, BLUE, world(), True, source=ASKER)
    assert out != Drop("internal_error")
    assert isinstance(out, (Reply, Forward, Drop))
    if isinstance(out, Reply):
        assert len(out.wire) <= max(len(data), 512)  # no amplification of junk
        dns.message.from_wire(out.wire)  # what we send parses


@given(st.data())
def test_a_valid_query_with_bytes_changed_never_raises(data: st.DataObject) -> None:
    wire = bytearray(
        query(
            data.draw(st.sampled_from(["web", "web.blue", "5.42.19.198.in-addr.arpa", "x.com", "_http._tcp.web.blue"])),
            data.draw(st.sampled_from(["A", "SRV"])),
            edns=0,
        )
    )
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    tail = data.draw(st.binary(max_size=8))
    for tcp in (False, True):
        out = answer(bytes(wire) + tail, BLUE, world(), data.draw(st.booleans()), source=ASKER, tcp=tcp)
        assert out != Drop("internal_error")
        if isinstance(out, Reply):
            dns.message.from_wire(out.wire)


# --- EDNS and sizes -------------------------------------------------------------------------


def test_an_opt_is_echoed_when_the_query_had_one_and_only_then() -> None:
    _, m = ask(world(), "web", edns=0, payload=4096)
    assert m.edns == 0 and m.payload == 1232 and not m.options
    _, m = ask(world(), "web")
    assert m.edns == -1


def many(count: int) -> Names:
    names = world()
    names.apply([Put(EndpointKey(BLUE, 100 + i), ep("web", f"198.19.42.{10 + i}")) for i in range(count)])
    return names


def test_udp_answers_over_512_bytes_without_edns_are_truncated() -> None:
    names = many(40)  # 41 addresses: 12 + 9 + 41 * 16 bytes
    out, m = ask(names, "web")
    assert out.truncated and m.flags & dns.flags.TC and not m.answer and out.answers == 0
    assert len(out.wire) <= 512 and m.question[0].name.to_text() == "web."
    out, m = ask(names, "web", edns=0, payload=1232)
    assert not out.truncated and len(records(m)) == 41


def test_udp_answers_are_held_to_the_clients_payload_clamped_to_1232() -> None:
    names = many(100)  # 101 addresses: over 1232 bytes
    assert ask(names, "web", edns=0, payload=4096)[0].truncated
    assert ask(names, "web", edns=0, payload=100)[0].truncated  # taken as 512
    names = many(28)
    assert not ask(names, "web", edns=0, payload=100)[0].truncated  # 12 + 9 + 29 * 16 + 11 <= 512
    out, m = ask(many(1000), "web", tcp=True)
    assert not out.truncated and len(records(m)) == 247  # .5 and .10 .. .255 (the rest do not parse)


# --- forwarding helpers ---------------------------------------------------------------------


def forwarded(qname: str = "Example.com", rdtype: str = "A") -> tuple[Forward, dns.message.Message]:
    q = dns.message.make_query(qname, rdtype, use_edns=0)
    out = answer(q.to_wire(), BLUE, world(), True)
    assert isinstance(out, Forward)
    return out, q


def test_an_upstreams_reply_matches_only_its_query() -> None:
    fwd, q = forwarded()
    r = dns.message.make_response(q)
    assert matches(fwd, r.to_wire())
    r.question[0].name = dns.name.from_text("eXAMPLE.COM")  # resolvers echo 0x20 spellings
    assert matches(fwd, r.to_wire())
    other = dns.message.make_response(q)
    other.id = (q.id + 1) % 65536
    assert not matches(fwd, other.to_wire())
    assert not matches(fwd, q.to_wire())  # no QR bit
    assert not matches(fwd, dns.message.make_response(dns.message.make_query("example.org", "A", id=q.id)).to_wire())
    assert not matches(fwd, dns.message.make_response(dns.message.make_query("example.com", "AAAA", id=q.id)).to_wire())
    assert not matches(fwd, r.to_wire()[:20])


def test_failure_replies_echo_the_question() -> None:
    fwd, q = forwarded()
    for rcode in ("SERVFAIL", "REFUSED"):
        m = dns.message.from_wire(failure(fwd, rcode))
        assert m.rcode() == dns.rcode.from_text(rcode) and m.id == q.id and m.question == q.question
        assert m.flags & dns.flags.RA and m.flags & dns.flags.RD and not m.flags & dns.flags.AA


# --- the upstream resolvers -----------------------------------------------------------------


def test_upstreams_are_the_nameserver_lines_without_loopback_or_junk() -> None:
    text = """
# generated
nameserver 127.0.0.53
options edns0 trust-ad
search example.net
nameserver 198.18.0.53   # a comment after it
nameserver ::1
nameserver not-an-address
nameserver
nameserver 127.1.2.3
nameserver ::ffff:127.0.0.1
nameserver 0.0.0.0
nameserver 198.18.0.53
;nameserver 198.18.0.54
 nameserver 2001:2:0:1::53
nameserver fe80::1%eth0
nameserver 198.18.0.55
"""
    assert upstreams(text) == [
        ipaddress.ip_address("198.18.0.53"),
        ipaddress.ip_address("2001:2:0:1::53"),
        ipaddress.ip_address("fe80::1%eth0"),
    ]  # at most 3, as glibc


def test_a_systemd_resolved_stub_only_resolv_conf_has_no_upstreams() -> None:
    assert upstreams("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n") == []
    assert upstreams("") == []
    assert upstreams("\x00\xff garbage\nnameserver\tnameserver\n") == []


@given(st.text(max_size=300))
def test_upstreams_never_raises(text: str) -> None:
    for a in upstreams(text):
        assert not a.is_loopback


# --- the index against a brute-force oracle -------------------------------------------------

MACS = [1, 2, 3, 4]
ENDPOINT_NAMES = ["web", "WEB", "db", "x-1", None, "bad_name", "blue"]
NETWORK_NAMES = ["blue", "Blue", "red", "", "my net", "web"]
ADDRESSES4 = ["198.19.42.5", "198.19.42.6", "198.19.43.5", "10.0.0.1"]
ADDRESSES6 = ["2001:2:0:42::5", "2001:2:0:43::5"]
PORTS = ["80/tcp", "80/udp", "8080/tcp", "53/udp", "5432/tcp"]
SUBNETS = {BLUE: ("198.19.42.0/24", "2001:2:0:42::/64"), RED: ("198.19.43.0/24", None)}

events_strategy = st.lists(
    st.one_of(
        st.builds(
            lambda vni, name: Put(NetworkKey(vni), Network(vni, name, *SUBNETS[vni][:1], subnet6=SUBNETS[vni][1])),
            st.sampled_from([BLUE, RED]),
            st.sampled_from(NETWORK_NAMES),
        ),
        st.builds(lambda vni: Deleted(NetworkKey(vni), Network(vni)), st.sampled_from([BLUE, RED])),
        st.builds(
            lambda vni, mac, name, v4, v6, ports: Put(EndpointKey(vni, mac), Endpoint("h1", v4, v6, name, ports)),
            st.sampled_from([BLUE, RED]),
            st.sampled_from(MACS),
            st.sampled_from(ENDPOINT_NAMES),
            st.lists(st.sampled_from(ADDRESSES4), max_size=3),
            st.lists(st.sampled_from(ADDRESSES6), max_size=2),
            st.lists(st.sampled_from(PORTS), max_size=3),
        ),
        st.builds(
            lambda vni, mac: Deleted(EndpointKey(vni, mac), Endpoint("h1")),
            st.sampled_from([BLUE, RED]),
            st.sampled_from(MACS),
        ),
    ),
    max_size=30,
)


class Oracle:
    """What the registry holds now, searched by brute force."""

    def __init__(self) -> None:
        self.networks: dict[int, Network] = {}
        self.endpoints: dict[tuple[int, int], Endpoint] = {}

    def apply(self, events: list[Event]) -> None:
        for e in events:
            store: dict = self.networks if isinstance(e.key, NetworkKey) else self.endpoints  # type: ignore[type-arg]
            k = e.key.vni if isinstance(e.key, NetworkKey) else (e.key.vni, e.key.mac)  # type: ignore[union-attr]
            if isinstance(e, Deleted):
                store.pop(k, None)
            else:
                store[k] = e.value

    def named(self, vni: int) -> list[Endpoint]:
        return [e for (v, _), e in self.endpoints.items() if v == vni and e.name and DNS_LABEL.match(e.name)]

    def addresses(self, vni: int, name: str) -> tuple[set[str], set[str]] | None:
        found = [e for e in self.named(vni) if e.name.lower() == name.lower()]  # type: ignore[union-attr]
        if not found:
            return None
        return {a for e in found for a in e.ipv4}, {str(V6(a)) for e in found for a in e.ipv6}

    def pointers(self, vni: int, address: str) -> set[str]:
        net = self.networks.get(vni)
        label = net is not None and net.name and " " not in net.name
        suffix = f"{net.name.lower()}." if label else ""  # type: ignore[union-attr]
        return {
            f"{e.name}.{suffix}".lower()  # type: ignore[union-attr]
            for e in self.named(vni)
            if address in e.ipv4 or address in [str(V6(a)) for a in e.ipv6]
        }

    def rcode(self, vni: int, qname: str) -> str:
        """The rcode of an A query for ``qname`` (a single label or label.network) from ``vni``."""
        labels = qname.lower().split(".")
        net = self.networks.get(vni)
        domain = net.name.lower() if net is not None and net.name and " " not in net.name else None
        domains = {n.name.lower() for n in self.networks.values() if n.name and " " not in n.name}
        if len(labels) == 1 or (len(labels) == 2 and labels[1] == domain):
            if self.addresses(vni, labels[0]) is not None:
                return "NOERROR"
            return "NOERROR" if len(labels) == 1 and labels[0] == domain else "NXDOMAIN"
        return "NXDOMAIN" if labels[-1] in domains else "forward"

    def offers(self, vni: int, name: str, proto: str, port: int | None) -> bool:
        """Whether an endpoint of ``name`` holding an address exposes ``port`` (None: any) over ``proto``."""
        return any(
            e.name.lower() == name  # type: ignore[union-attr]
            and (e.ipv4 or e.ipv6)
            and any(p.split("/")[1] == proto and port in (None, int(p.split("/")[0])) for p in e.ports)
            for e in self.named(vni)
        )

    def services(self, vni: int, name: str) -> list[str]:
        found = {p for e in self.named(vni) if e.name.lower() == name and (e.ipv4 or e.ipv6) for p in e.ports}  # type: ignore[union-attr]
        return sorted(found, key=lambda p: (p.split("/")[1], int(p.split("/")[0])))

    def srv(
        self, vni: int, name: str, proto: str, port: int | None, suffix: str | None
    ) -> tuple[str, set[str], set[str]]:
        """rcode, answers and additional records of an SRV query for ``_<port>._<proto>.<name>[.<suffix>]``
        (port None: ``_<proto>.<name>[.<suffix>]``) from ``vni``."""
        net = self.networks[vni]
        domain = net.name.lower() if net.name and " " not in net.name else None
        if suffix is not None and suffix != domain:
            domains = {n.name.lower() for n in self.networks.values() if n.name and " " not in n.name}
            return "NXDOMAIN" if suffix in domains else "forward", set(), set()
        if not self.offers(vni, name, proto, port):
            return "NXDOMAIN", set(), set()
        if port is None:
            return "NOERROR", set(), set()
        target = f"{name}.{domain}." if domain is not None else f"{name}."
        found = self.addresses(vni, name)
        assert found is not None
        extra = {f"{target} A {a}" for a in found[0]} | {f"{target} AAAA {a}" for a in found[1]}
        return "NOERROR", {f"0 0 {port} {target}"}, extra


SRV_QUERIES = [  # (qname, name, proto, port or None for _<proto>.<name>, the network label or None)
    ("_http._tcp.web", "web", "tcp", 80, None),
    ("_80._udp.WEB", "web", "udp", 80, None),
    ("_http._tcp.web.blue", "web", "tcp", 80, "blue"),
    ("_8080._tcp.db.red", "db", "tcp", 8080, "red"),
    ("_domain._udp.x-1.blue", "x-1", "udp", 53, "blue"),
    ("_postgresql._tcp.blue", "blue", "tcp", 5432, None),
    ("_ssh._tcp.web.web", "web", "tcp", 22, "web"),
    ("_tcp.web", "web", "tcp", None, None),
    ("_udp.db.red", "db", "udp", None, "red"),
    ("_tcp.x-1.blue", "x-1", "tcp", None, "blue"),
]


@given(events_strategy, st.integers(1, 5))
@example(  # a port change, then the addresses taken away, then a rename (what random runs may miss)
    [
        Put(NetworkKey(BLUE), blue()),
        Put(EndpointKey(BLUE, 1), Endpoint("h1", ["198.19.42.5"], [], "web", ["80/tcp", "53/udp"])),
        Put(EndpointKey(BLUE, 1), Endpoint("h1", ["198.19.42.5"], [], "web", ["8080/tcp"])),
        Put(EndpointKey(BLUE, 2), Endpoint("h1", [], [], "web", ["80/tcp", "53/udp"])),
        Put(EndpointKey(BLUE, 1), Endpoint("h1", ["198.19.42.5"], [], "db", ["8080/tcp"])),
    ],
    5,
)
def test_the_index_equals_a_brute_force_search_after_any_events(events: list[Event], batches: int) -> None:
    names, oracle = Names(), Oracle()
    step = max(1, len(events) // batches)
    for i in range(0, max(len(events), 1), step):
        names.apply(events[i : i + step])
        oracle.apply(events[i : i + step])
    for vni in (BLUE, RED):
        for name in {n.lower() for n in ENDPOINT_NAMES if n} | {"nope"}:
            got = names.addresses(vni, name)
            want = oracle.addresses(vni, name)
            assert (got is None) == (want is None), (vni, name)
            if got is not None and want is not None:
                assert ({str(a) for a in got[0]}, {str(a) for a in got[1]}) == want
                assert len(got[0]) == len(want[0]) and len(got[1]) == len(want[1])  # each once
        for address in ADDRESSES4 + ADDRESSES6:
            got_ptr = {p.lower() for p in names.pointers(vni, ipaddress.ip_address(address))}
            assert got_ptr == oracle.pointers(vni, address), (vni, address)
        if vni not in oracle.networks:
            assert answer(query("web"), vni, names, True) == Drop("unknown_network")
            continue
        for qname in ["web", "db", "nope", "blue", "red", "web.blue", "db.red", "web.web", "x-1.blue", "a.b"]:
            out = answer(query(qname), vni, names, True)
            got_rcode = "forward" if isinstance(out, Forward) else out.rcode  # type: ignore[union-attr]
            assert got_rcode == oracle.rcode(vni, qname), (vni, qname)
        for name in {n.lower() for n in ENDPOINT_NAMES if n}:
            assert names.services(vni, name) == oracle.services(vni, name), (vni, name)
        for qname, name, proto, port, suffix in SRV_QUERIES:
            rcode, want_records, want_additional = oracle.srv(vni, name, proto, port, suffix)
            out = answer(query(qname, "SRV"), vni, names, True)
            if rcode == "forward":
                assert isinstance(out, Forward), (vni, qname)
                continue
            assert isinstance(out, Reply) and out.rcode == rcode, (vni, qname)
            m = dns.message.from_wire(out.wire)
            assert records(m) == want_records and additional(m) == want_additional, (vni, qname)
            a = answer(query(qname, "A"), vni, names, True)
            assert isinstance(a, Reply) and a.rcode == rcode and a.answers == 0, (vni, qname)
    assert len(names) == sum(len(oracle.named(v)) for v in (BLUE, RED))


def test_a_network_rename_touches_no_endpoint() -> None:
    """O(1) per event: reverse answers read the network's current name, nothing is rewritten."""
    names = world()
    names.apply([Put(EndpointKey(BLUE, 1000 + i), ep(f"n{i}", f"198.19.42.{i % 250 + 2}")) for i in range(5000)])
    before = {k: v for k, v in names._by_name.items()}
    names.apply([Put(NetworkKey(BLUE), Network(BLUE, "navy", "198.19.42.0/24"))])
    assert names._by_name == before
    names.apply([Put(EndpointKey(BLUE, 1), ep("web", "198.19.42.77"))])
    assert records(ask(names, "web.navy")[1]) == {"198.19.42.77"}
    assert records(ask(names, "n7.navy")[1]) == {"198.19.42.9"}
