"""overlay/core/nat.py: the table inet overlay as text, and the firewalls that stand in its way."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import pytest

from overlay.core import nat
from overlay.core.ports import PortSpec, parse

BLUE = nat.GatewayNet(42, IPv4Network("198.19.42.0/24"), IPv4Address("198.19.42.1"))
RED = nat.GatewayNet(43, IPv4Network("198.19.43.0/24"), IPv4Address("198.19.43.1"))
DUAL = nat.GatewayNet(
    44,
    IPv4Network("198.19.44.0/24"),
    IPv4Address("198.19.44.1"),
    IPv6Network("2001:2:0:44::/64"),
    IPv6Address("2001:2:0:44::1"),
)


def pub(spec: str, address: str, vni: int = 42, owner: str = "att-1") -> nat.Published:
    return nat.Published(parse(spec), ip_address(address), vni, owner)


def chain(script: str, name: str) -> list[str]:
    """The lines of chain ``name`` in ``script`` (its type line first)."""
    lines = script.splitlines()
    start = lines.index(f"\tchain {name} {{")
    end = lines.index("\t}", start)
    return [line.strip() for line in lines[start + 1 : end]]


def rules(script: str, name: str) -> list[str]:
    return chain(script, name)[1:]


# --- the script's frame ------------------------------------------------------------------------


def test_the_script_replaces_the_table_whether_or_not_it_exists():
    script = nat.ruleset([BLUE], [])
    lines = [line for line in script.splitlines() if not line.startswith("#")]
    assert lines[:3] == ["table inet overlay {}", "delete table inet overlay", "table inet overlay {"]
    assert script.endswith("}\n")
    assert script.count("table inet overlay {\n") == 1  # the add, the delete, then the one table


def test_the_table_has_five_base_chains_on_the_right_hooks():
    script = nat.ruleset([BLUE], [])
    assert chain(script, "bridged")[0] == "type filter hook prerouting priority raw; policy accept;"
    assert chain(script, "postrouting")[0] == "type nat hook postrouting priority srcnat; policy accept;"
    assert chain(script, "prerouting")[0] == "type nat hook prerouting priority dstnat; policy accept;"
    assert chain(script, "output")[0] == "type nat hook output priority -100; policy accept;"
    assert chain(script, "forward")[0] == "type filter hook forward priority filter; policy accept;"


def test_removal_deletes_the_table_only_if_it_exists_without_failing():
    assert nat.removal() == "table inet overlay {}\ndelete table inet overlay\n"
    assert (nat.FAMILY, nat.TABLE) == ("inet", "overlay")


def test_the_device_of_a_network_is_its_gateway_veth():
    assert BLUE.device == "ovgw42"
    assert nat.GatewayNet(16777215, None, None).device == "ovgw16777215"  # fits IFNAMSIZ


# --- egress NAT ----------------------------------------------------------------------------------


def test_a_network_with_a_gateway_masquerades_what_leaves_its_subnet_through_the_underlay():
    assert rules(nat.ruleset([BLUE], []), "postrouting") == [
        'ip saddr 198.19.42.0/24 ip daddr != 198.19.42.0/24 oifname != { "ovgw*", "ovbr*" } counter masquerade'
    ]


def test_a_network_without_nat_is_routed_but_not_masqueraded():
    off = nat.GatewayNet(42, BLUE.subnet, BLUE.gateway, nat=False)
    script = nat.ruleset([off], [])
    assert rules(script, "postrouting") == []
    assert any("ovgw42" in r for r in rules(script, "forward"))  # still isolated from the others


def test_a_network_without_a_gateway_has_no_rules_at_all():
    script = nat.ruleset([nat.GatewayNet(42, BLUE.subnet, None)], [])
    assert rules(script, "postrouting") == []
    assert rules(script, "forward") == ["ct status dnat accept"]
    assert rules(script, "bridged") == []


def test_gateway6_masquerades_the_ipv6_subnet_too():
    assert rules(nat.ruleset([DUAL], []), "postrouting") == [
        'ip saddr 198.19.44.0/24 ip daddr != 198.19.44.0/24 oifname != { "ovgw*", "ovbr*" } counter masquerade',
        'ip6 saddr 2001:2:0:44::/64 ip6 daddr != 2001:2:0:44::/64 oifname != { "ovgw*", "ovbr*" } counter masquerade',
    ]


def test_an_ipv6_only_network_masquerades_ipv6_only():
    v6 = nat.GatewayNet(45, None, None, IPv6Network("2001:2:0:45::/64"), IPv6Address("2001:2:0:45::1"))
    assert rules(nat.ruleset([v6], []), "postrouting") == [
        'ip6 saddr 2001:2:0:45::/64 ip6 daddr != 2001:2:0:45::/64 oifname != { "ovgw*", "ovbr*" } counter masquerade'
    ]


def test_traffic_between_containers_is_never_natted():
    for rule in rules(nat.ruleset([BLUE, RED, DUAL], []), "postrouting"):
        assert 'oifname != { "ovgw*", "ovbr*" }' in rule  # nothing that leaves towards a container


# --- published ports -------------------------------------------------------------------------------


def test_a_publication_without_host_ip_dnats_every_local_address_in_prerouting_and_output():
    script = nat.ruleset([BLUE], [pub("8080:80", "198.19.42.2")])
    assert rules(script, "prerouting") == [
        "meta nfproto ipv4 fib daddr type local ip daddr != { 198.19.42.1 } tcp dport 8080 counter "
        'dnat ip to 198.19.42.2:80 comment "att-1"'
    ]  # never what is sent to a gateway (its DNS on 53, for one)
    assert rules(script, "output") == [
        "fib daddr type local ip daddr != 127.0.0.0/8 ip daddr != { 198.19.42.1 } tcp dport 8080 counter "
        'dnat ip to 198.19.42.2:80 comment "att-1"'
    ]


def test_a_publication_with_host_ip_dnats_that_address_only():
    script = nat.ruleset([BLUE], [pub("198.18.0.1:5353:53/udp", "198.19.42.2")])
    expected = 'ip daddr 198.18.0.1 udp dport 5353 counter dnat ip to 198.19.42.2:53 comment "att-1"'
    assert rules(script, "prerouting") == [expected]
    assert rules(script, "output") == [expected]


def test_an_ipv6_publication_dnats_to_the_bracketed_address():
    script = nat.ruleset([DUAL], [pub("[2001:2:0:1::1]:8443:443", "2001:2:0:44::2", 44)])
    assert rules(script, "prerouting") == [
        'ip6 daddr 2001:2:0:1::1 tcp dport 8443 counter dnat ip6 to [2001:2:0:44::2]:443 comment "att-1"'
    ]
    wildcard = nat.ruleset([DUAL], [pub("8443:443", "2001:2:0:44::2", 44)])
    assert rules(wildcard, "prerouting") == [
        "meta nfproto ipv6 fib daddr type local ip6 daddr != { 2001:2:0:44::1 } tcp dport 8443 counter "
        'dnat ip6 to [2001:2:0:44::2]:443 comment "att-1"'
    ]
    assert "ip6 daddr != ::1" in rules(wildcard, "output")[0]


def test_a_host_ip_of_the_other_family_than_the_container_is_left_out():
    script = nat.ruleset(
        [DUAL], [pub("[2001:2:0:1::1]:8080:80", "198.19.44.2", 44), pub("198.18.0.1:8081:80", "2001:2:0:44::2", 44)]
    )
    assert rules(script, "prerouting") == []
    assert rules(script, "output") == []
    assert rules(script, "postrouting") == [r for r in rules(nat.ruleset([DUAL], []), "postrouting")]


def test_a_publication_must_have_its_host_port_chosen():
    with pytest.raises(ValueError, match="no host port yet"):
        nat.Published(PortSpec("tcp", 0, 80), IPv4Address("198.19.42.2"), 42, "att-1")


def test_the_owner_in_a_comment_cannot_break_out_of_its_quotes():
    script = nat.ruleset([BLUE], [pub("8080:80", "198.19.42.2", owner='evil" drop; \\ x\n' + "y" * 300)])
    rule = rules(script, "prerouting")[0]
    text = rule.split('comment "', 1)[1]
    assert text.endswith('"') and '"' not in text[:-1] and "\\" not in text
    assert len(text) - 1 <= nat.COMMENT_MAX
    assert text.startswith("evil_ drop_ _ x_y")


def test_every_masquerade_and_dnat_rule_has_a_counter():
    script = nat.ruleset([BLUE, DUAL], [pub("8080:80", "198.19.42.2"), pub("8443:443", "2001:2:0:44::2", 44)])
    natting = [r for r in script.splitlines() if "masquerade" in r or "dnat ip" in r]
    assert len(natting) == 9  # 3 egress + 2 hairpin + 2 x (prerouting, output)
    assert all(" counter " in r for r in natting)


# --- hairpin ---------------------------------------------------------------------------------------


def test_a_network_with_a_publication_masquerades_its_own_dnatted_connections_back_into_it():
    script = nat.ruleset([BLUE, RED], [pub("8080:80", "198.19.42.2")])
    hairpin = [r for r in rules(script, "postrouting") if r.startswith("ct status dnat")]
    assert hairpin == ['ct status dnat ip saddr 198.19.42.0/24 oifname { "ovgw42", "ovbr42" } counter masquerade']


def test_hairpin_is_per_family_of_the_publications_and_kept_without_nat():
    off = nat.GatewayNet(44, DUAL.subnet, DUAL.gateway, DUAL.subnet6, DUAL.gateway6, nat=False)
    script = nat.ruleset([off], [pub("8443:443", "2001:2:0:44::2", 44)])
    assert rules(script, "postrouting") == [
        'ct status dnat ip6 saddr 2001:2:0:44::/64 oifname { "ovgw44", "ovbr44" } counter masquerade'
    ]


def test_a_publication_on_a_network_without_a_gateway_has_its_dnat_but_no_hairpin():
    script = nat.ruleset([], [pub("8080:80", "198.19.42.2")])
    assert len(rules(script, "prerouting")) == 1
    assert rules(script, "postrouting") == []


# --- forwarding ------------------------------------------------------------------------------------


def test_frames_bridged_to_and_from_the_gateway_are_not_tracked():
    assert rules(nat.ruleset([RED, BLUE], []), "bridged") == [
        'iifname "ovbr42" ether daddr 02:6f:76:00:00:2a notrack',
        'iifname "ovbr42" ether saddr 02:6f:76:00:00:2a notrack',
        'iifname "ovbr43" ether daddr 02:6f:76:00:00:2b notrack',
        'iifname "ovbr43" ether saddr 02:6f:76:00:00:2b notrack',
    ]


def test_dnatted_connections_are_accepted_before_the_isolation_drops():
    script = nat.ruleset([RED, BLUE], [])
    assert rules(script, "forward") == [
        "ct status dnat accept",
        'iifname { "ovgw42", "ovbr42" } oifname { "ovgw*", "ovbr*" } oifname != { "ovgw42", "ovbr42" } drop',
        'iifname { "ovgw43", "ovbr43" } oifname { "ovgw*", "ovbr*" } oifname != { "ovgw43", "ovbr43" } drop',
    ]


def test_forward_only_ours_drops_forwarding_that_is_not_the_overlays():
    assert rules(nat.ruleset([BLUE], [], forward_only_ours=True), "forward")[-1] == (
        'iifname != { "ovgw*", "ovbr*" } oifname != { "ovgw*", "ovbr*" } drop'
    )
    assert "iifname !=" not in nat.ruleset([BLUE], [])


# --- determinism and counting ------------------------------------------------------------------------


def test_the_script_is_the_same_whatever_the_order_of_its_inputs():
    pubs = [
        pub("8080:80", "198.19.42.2", owner="b"),
        pub("8081:80/udp", "198.19.42.3", owner="a"),
        pub("8443:443", "2001:2:0:44::2", 44),
        pub("198.18.0.1:9000:90", "198.19.44.9", 44),
    ]
    first = nat.ruleset([BLUE, RED, DUAL], pubs, True)
    assert nat.ruleset([DUAL, BLUE, RED], list(reversed(pubs)), True) == first
    assert nat.ruleset((n for n in [RED, DUAL, BLUE]), iter(pubs[2:] + pubs[:2]), True) == first
    prerouting = rules(first, "prerouting")
    assert [r.split(" dport ")[1].split()[0] for r in prerouting] == ["8080", "8081", "8443", "9000"]


def test_count_rules_counts_the_rules_not_the_chains():
    script = nat.ruleset([BLUE, RED], [pub("8080:80", "198.19.42.2")], forward_only_ours=True)
    # 4 bridged, 2 masquerade + 1 hairpin, 1 prerouting, 1 output, ct accept + 2 isolation + 1 ours
    assert nat.count_rules(script) == 13
    assert nat.count_rules(nat.ruleset([], [])) == 1
    assert nat.count_rules(nat.removal()) == 0


# --- firewall_problems ---------------------------------------------------------------------------------

META = {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}


def table(family: str, name: str) -> dict[str, object]:
    return {"table": {"family": family, "name": name, "handle": 1}}


def base(family: str, tbl: str, name: str, policy: str = "accept", hook: str = "forward") -> dict[str, object]:
    return {
        "chain": {
            "family": family,
            "table": tbl,
            "name": name,
            "handle": 1,
            "type": "filter",
            "hook": hook,
            "prio": 0,
            "policy": policy,
        }
    }


def rule(family: str, tbl: str, chn: str, *expr: object) -> dict[str, object]:
    return {"rule": {"family": family, "table": tbl, "chain": chn, "handle": 9, "expr": list(expr)}}


def ifname(key: str, name: str) -> dict[str, object]:
    return {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": name}}


COUNTER = {"counter": {"packets": 0, "bytes": 0}}
ACCEPT = {"accept": None}


def docker(*user_rules: dict[str, object]) -> dict[str, object]:
    """What Docker leaves with iptables-nft: ip filter FORWARD policy drop, jumping to
    DOCKER-USER (where an operator's own rules go) and accepting docker0's traffic."""
    return {
        "nftables": [
            META,
            table("ip", "filter"),
            base("ip", "filter", "FORWARD", "drop"),
            {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER", "handle": 2}},
            {"chain": {"family": "ip", "table": "filter", "name": "DOCKER", "handle": 3}},
            rule("ip", "filter", "FORWARD", COUNTER, {"jump": {"target": "DOCKER-USER"}}),
            rule(
                "ip",
                "filter",
                "FORWARD",
                ifname("oifname", "docker0"),
                {"xt": {"type": "match", "name": "conntrack"}},
                ACCEPT,
            ),
            rule("ip", "filter", "FORWARD", ifname("iifname", "docker0"), COUNTER, ACCEPT),
            *user_rules,
            rule("ip", "filter", "DOCKER-USER", COUNTER, {"return": None}),
        ]
    }


def firewalld() -> dict[str, object]:
    """firewalld's shape: inet firewalld filter_FORWARD, policy accept but a final reject."""
    return {
        "nftables": [
            META,
            table("inet", "firewalld"),
            {"chain": {**base("inet", "firewalld", "filter_FORWARD")["chain"], "prio": 10}},
            rule(
                "inet",
                "firewalld",
                "filter_FORWARD",
                {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
                ACCEPT,
            ),
            rule("inet", "firewalld", "filter_FORWARD", ifname("iifname", "lo"), ACCEPT),
            rule("inet", "firewalld", "filter_FORWARD", {"jump": {"target": "filter_FORWARD_ZONES"}}),
            rule("inet", "firewalld", "filter_FORWARD", {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}),
        ]
    }


def test_dockers_forward_policy_drop_is_reported_with_the_iptables_fix():
    assert nat.firewall_problems(docker(), None) == [
        "table ip filter chain FORWARD drops forwarded traffic by default (Docker sets this): containers' egress "
        "and published ports are blocked; accept them: 'iptables -I FORWARD -i ovgw+ -j ACCEPT' and "
        "'iptables -I FORWARD -o ovgw+ -j ACCEPT' (or the nft equivalent)"
    ]


def test_a_drop_policy_forward_chain_that_accepts_our_gateways_is_not_reported():
    accepted = docker(
        rule("ip", "filter", "DOCKER-USER", ifname("iifname", "ovgw*"), COUNTER, ACCEPT),
        rule("ip", "filter", "DOCKER-USER", ifname("oifname", "ovgw*"), COUNTER, ACCEPT),
    )
    assert nat.firewall_problems(accepted, None) == []
    half = docker(rule("ip", "filter", "DOCKER-USER", ifname("iifname", "ovgw*"), ACCEPT))
    assert len(nat.firewall_problems(half, None)) == 1  # replies to the outside are still dropped


def test_br_netfilter_with_a_drop_policy_is_reported_with_the_sysctl_fix():
    problems = nat.firewall_problems(docker(), "1")
    assert len(problems) == 2
    assert problems[1] == (
        "br_netfilter is loaded with net.bridge.bridge-nf-call-iptables=1 and table ip filter chain FORWARD "
        "drops forwarded traffic by default: frames between containers on one host's bridge pass it and are "
        "dropped; turn it off: 'sysctl -w net.bridge.bridge-nf-call-iptables=0', or accept them: "
        "'iptables -I FORWARD -i ovbr+ -o ovbr+ -j ACCEPT'"
    )
    assert len(nat.firewall_problems(docker(), "0")) == 1
    bridged = docker(rule("ip", "filter", "FORWARD", ifname("iifname", "ovbr*"), ifname("oifname", "ovbr*"), ACCEPT))
    assert len(nat.firewall_problems(bridged, "1")) == 1  # the bridge's frames are accepted already


def test_firewalld_final_reject_is_reported_with_the_nft_fix():
    (problem,) = nat.firewall_problems(firewalld(), None)
    assert problem.startswith(
        "table inet firewalld chain filter_FORWARD rejects forwarded traffic it does not accept (firewalld does "
        "this): containers' egress and published ports are blocked; accept them: "
    )
    assert "'nft insert rule inet firewalld filter_FORWARD iifname \"ovgw*\" accept'" in problem


def test_a_bridge_family_drop_policy_is_reported():
    ruleset = {"nftables": [META, table("bridge", "filter"), base("bridge", "filter", "forward", "drop")]}
    (problem,) = nat.firewall_problems(ruleset, None)
    assert problem.startswith("table bridge filter chain forward drops bridged frames by default")
    assert 'meta ibrname "ovbr*" accept' in problem


def test_harmless_tables_and_our_own_table_are_not_reported():
    ruleset = {
        "nftables": [
            META,
            table("inet", "overlay"),
            base("inet", "overlay", "forward", "drop"),  # ours, whatever it holds
            table("ip", "nat"),
            base("ip", "nat", "POSTROUTING", "accept", hook="postrouting"),
            table("inet", "filter"),
            base("inet", "filter", "input", "drop", hook="input"),  # input, not forward
            base("inet", "filter", "forward", "accept"),
            rule("inet", "filter", "forward", ifname("iifname", "eth9"), {"drop": None}),  # a conditional drop
            table("netdev", "x"),
        ]
    }
    assert nat.firewall_problems(ruleset, "1") == []


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        [],
        "nftables",
        {"nftables": None},
        {"nftables": [None, 1, "x", [], {}, {"a": 1, "b": 2}]},
        {"nftables": [{"chain": None}, {"chain": {"family": 4, "table": [], "hook": "forward"}}]},
        {"nftables": [{"chain": {"family": "ip", "table": "t", "name": "c", "hook": "forward", "policy": 7}}]},
        {"nftables": [base("ip", "t", "c"), {"rule": {"family": "ip", "table": "t", "chain": "c", "expr": "x"}}]},
        {"nftables": [base("ip", "t", "c"), rule("ip", "t", "c", None, 5, {"jump": None}, {"reject": None})]},
        {"nftables": [base("ip", "t", "c", "drop"), rule("ip", "t", "c", {"jump": {"target": "c"}})]},  # a loop
        {"nftables": [base("ip", "t", "c", "drop"), rule("ip", "t", "c", {"match": {"left": 1, "right": {}}}, ACCEPT)]},
    ],
)
def test_firewall_problems_never_crash_on_an_unexpected_shape(garbage):
    problems = nat.firewall_problems(garbage, "1")
    assert isinstance(problems, list) and all(isinstance(p, str) and "\n" not in p for p in problems)


def test_firewall_problems_reads_the_json_nft_prints():
    text = json.dumps(docker())
    assert nat.firewall_problems(json.loads(text), None) == nat.firewall_problems(docker(), None)


def test_guards_keep_containers_off_the_underlays_vxlan_probe_and_etcd_ports():
    from ipaddress import ip_address

    guards = [nat.Guard("udp", 4789), nat.Guard("udp", 4799), nat.Guard("tcp", 2379, ip_address("198.18.0.250"))]
    forward = rules(nat.ruleset([BLUE], [], guards=guards), "forward")
    assert forward[:3] == [
        'iifname { "ovgw*", "ovbr*" } ip daddr 198.18.0.250 tcp dport 2379 counter drop',
        'iifname { "ovgw*", "ovbr*" } udp dport 4789 counter drop',
        'iifname { "ovgw*", "ovbr*" } udp dport 4799 counter drop',
    ]
    assert forward[3] == "ct status dnat accept"
