"""The status types: their JSON form is the README's contract, key for key and in order; JSON
decodes back tolerating the optional parts; `overlay status` formats the typed form."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from overlay.cmd.cli import format_status
from overlay.core.status import ApplyLag, Dns, Egress, NetworkInfo, ProbeCounters, RegistryStatus, Status

README = Path(__file__).resolve().parents[2] / "README.md"

# An etcd-mode agent with two networks, a container, two probed peers (one never answered).
FULL: dict[str, object] = {
    "agent": {
        "tap": "ovl-42",
        "vni": 42,
        "local": "198.18.0.1",
        "port": 4789,
        "peers": [],
        "mtu": 1450,
        "mac": "02:00:00:00:00:01",
        "address": "198.19.42.1/24",
        "source_check": True,
        "uptime_s": 12.5,
        "networks": [
            {"vni": 42, "tap": "ovl-42", "mac": "02:00:00:00:00:01", "bridge": "ovbr42"},
            {"vni": 43, "tap": "ovl-43", "mac": "02:00:00:00:00:02", "bridge": "ovbr43"},
        ],
        "local6": "2001:2:0:1::1",
        "unreachable": ["h9"],
    },
    "registry": {
        "endpoints": ["http://198.18.0.250:2379", "http://198.18.0.251:2379"],
        "host_id": "h1",
        "connected": False,
        "revision": 17,
        "reconnects": 2,
        "resyncs": 1,
        "applied_revision": 16,
        "events": 30,
        "out_of_scope": 0,
        "refused": 1,
        "too_large": 1,
        "keys": 12,
        "watches": ["/overlay/v1/hosts/", "/overlay/v1/networks/42"],
        "resync_s": 0.004,
        "resync_keys": 10,
        "apply_lag": {
            "count": 2,
            "sum_s": 0.0006,
            "p50_ms": 0.25,
            "p99_ms": 0.5,
            "max_ms": 0.4,
            "buckets": [[0.0001, 0], [0.00025, 1], [0.0005, 1], [None, 0]],
        },
    },
    "wakeups": {"tx": 10, "tx_frames": 250, "rx": 9, "rx_frames": 240},
    "peers": [
        {"vtep": "198.18.0.2:4789", "rx_frames": 3, "rx_bytes": 300, "tx_frames": 4, "tx_bytes": 400},
        {"vtep": "198.18.0.3:4789", "rx_frames": 5, "rx_bytes": 500, "tx_frames": 6, "tx_bytes": 600},
    ],
    "totals": {"rx_frames": 8, "rx_bytes": 800, "tx_frames": 10, "tx_bytes": 1000},
    "drops": {"too_short": 1, "no_i_flag": 0, "not_member": 2},
    "fdb": {
        "static": 0,
        "registry": 2,
        "learned": 1,
        "refused_cap": 0,
        "moves": 3,
        "expired": 4,
        "evicted": 0,
        "refused_table_full": 0,
        "learn_overflow": 0,
    },
    "coalesced_frames": 7,
    "arp_suppressed": 11,
    "nd_suppressed": 3,
    "attachments": [
        {
            "id": "netns/4026532567/eth0",
            "vni": 42,
            "network": "blue",
            "netns": "/run/netns/web1",
            "ifname": "eth0",
            "host_ifname": "ovh1a2b3c4d5e6",
            "mac": "02:42:00:00:00:10",
            "address": "198.19.42.10/24",
            "gateway": None,
            "mtu": 1450,
            "address6": "2001:2:0:42::10/64",
            "gateway6": None,
            "name": None,
            "published": [],
            "exposed": [],
        }
    ],
    "probes": {
        "h3": {
            "address": "198.18.0.3:4788",
            "rtt_ms": None,
            "srtt_ms": None,
            "loss": 1.0,
            "reachable": False,
            "sent": 5,
            "received": 0,
        },
        "h2": {
            "address": "198.18.0.2:4788",
            "rtt_ms": 0.25,
            "srtt_ms": 0.5,
            "loss": 0.1,
            "reachable": True,
            "sent": 20,
            "received": 18,
        },
    },
    "probe_counters": {"bad": 3, "answered": 40, "errors": 1},
    "encryption": {
        "pubkey": "SooY1+KUOx05kpsJTHKmEucjvk/d7KZKcO1LWtHrlwA=",
        "fingerprint": "Bg+I8vIq",
        "networks": [42],
        "sessions": [
            {
                "peer": "198.18.0.2:4789",
                "key": "6hzgkHf0",
                "state": "established",
                "age_s": 0.9,
                "rekeys": 0,
                "handshakes_sent": 2,
                "handshakes_received": 1,
                "tx_messages": 7,
                "rx_messages": 10,
            }
        ],
        "without_key": ["h9"],
        "handshakes": {"handshakes_sent": 2, "completed": 1},
    },
}


def readme_contract() -> tuple[dict[str, object], dict[str, list[str]]]:
    """README.md's `overlay status --json` example (comments stripped), and for each top-level
    key whose comment lists keys (the etcd-mode registry, attachments, probes, counters), those."""
    text = README.read_text()
    block = text[text.index("`overlay status --json`:") :]
    block = block[block.index("```\n") + 4 :]
    block = block[: block.index("```")]
    body, comments, key = [], {}, ""
    for line in block.splitlines():
        code, _, comment = line.partition("#")
        if m := re.match(r'\s*"(\w+)":', code):
            key = m.group(1)
        comments[key] = comments.get(key, "") + comment
        body.append(code)
    listed = {}
    for k, comment in comments.items():
        names = re.findall(r'"(\w+)":', comment) or re.findall(r'"(\w+)"', comment)
        if names:
            listed[k] = names
    return json.loads("\n".join(body)), listed


def keys_in_order(value: object) -> object:
    """The nesting of ``value`` with each object's keys in order (lists by their items)."""
    if isinstance(value, dict):
        return [(k, keys_in_order(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [keys_in_order(v) for v in value]
    return type(value).__name__


def test_the_readme_example_round_trips_exactly_key_for_key_and_type_for_type() -> None:
    example, _ = readme_contract()
    again = Status.from_json(example).to_json()
    assert again == example
    assert keys_in_order(again) == keys_in_order(example)


def test_the_optional_parts_have_exactly_the_keys_the_readme_lists_in_its_order() -> None:
    _, listed = readme_contract()
    out = Status.from_json(FULL).to_json()
    registry, attachments, probes, counters = out["registry"], out["attachments"], out["probes"], out["probe_counters"]
    assert isinstance(registry, dict) and isinstance(attachments, list) and isinstance(probes, dict)
    assert isinstance(counters, dict)
    assert (
        list(registry)
        == listed["registry"]
        == [
            *["endpoints", "host_id", "connected", "revision", "reconnects", "resyncs", "applied_revision"],
            *["events", "out_of_scope", "refused", "too_large", "keys", "watches", "resync_s", "resync_keys"],
            "apply_lag",
        ]
    )
    assert list(attachments[0]) == listed["attachments"]
    assert all(list(p) == listed["probes"] for p in probes.values())
    assert list(counters) == listed["probe_counters"] == ["bad", "answered", "errors"]
    assert list(out) == list(readme_contract()[0])


def test_a_full_status_round_trips_through_json_text() -> None:
    status = Status.from_json(FULL)
    assert status.to_json() == FULL and keys_in_order(status.to_json()) == keys_in_order(FULL)
    assert Status.from_json(json.loads(json.dumps(status.to_json()))) == status
    assert json.dumps(status.to_json()) == json.dumps(FULL)  # the bytes the control socket sends


def test_the_typed_form_reads_as_the_json_says() -> None:
    s = Status.from_json(FULL)
    assert s.agent.networks[1].bridge == "ovbr43" and s.agent.uptime_s == 12.5
    assert s.registry == RegistryStatus(
        endpoints=["http://198.18.0.250:2379", "http://198.18.0.251:2379"],
        host_id="h1",
        connected=False,
        revision=17,
        reconnects=2,
        resyncs=1,
        applied_revision=16,
        events=30,
        refused=1,
        too_large=1,
        keys=12,
        watches=["/overlay/v1/hosts/", "/overlay/v1/networks/42"],
        resync_s=0.004,
        resync_keys=10,
        apply_lag=ApplyLag(
            count=2,
            sum_s=0.0006,
            p50_ms=0.25,
            p99_ms=0.5,
            max_ms=0.4,
            buckets=[[0.0001, 0], [0.00025, 1], [0.0005, 1], [None, 0]],
        ),
    )
    assert s.dataplane.totals.tx_bytes == 1000 and s.dataplane.peers[1].vtep == "198.18.0.3:4789"
    assert s.dataplane.fdb.moves == 3 and s.dataplane.drops["not_member"] == 2
    assert list(s.probes) == ["h3", "h2"] and s.probes["h3"].rtt_ms is None and s.probes["h2"].srtt_ms == 0.5
    assert s.probe_counters == ProbeCounters(bad=3, answered=40, errors=1)
    assert s.attachments[0]["network"] == "blue"


def without(obj: dict[str, object], *keys: str) -> dict[str, object]:
    out = copy.deepcopy(obj)
    for path in keys:
        *parents, last = path.split(".")
        target: object = out
        for p in parents:
            assert isinstance(target, dict)
            target = target[p]
        assert isinstance(target, dict)
        del target[last]
    return out


def test_decoding_tolerates_the_optional_parts_missing_as_the_cli_always_did() -> None:
    old = without(
        FULL,
        "registry",
        "attachments",
        "probes",
        "probe_counters",
        "encryption",
        "coalesced_frames",
        "arp_suppressed",
        "nd_suppressed",
        "agent.networks",
        "agent.local6",
        "agent.unreachable",
    )
    s = Status.from_json(old)
    assert s.registry is None and s.attachments == [] and s.probes == {} and s.probe_counters is None
    assert s.dataplane.coalesced_frames == 0 and s.dataplane.arp_suppressed == 0 and s.agent.networks == []
    out = s.to_json()  # and says so in the contract's form
    assert out["registry"] is None and out["probes"] == {} and out["probe_counters"] == {} and out["attachments"] == []
    assert list(out) == list(FULL)


def test_decoding_takes_null_and_empty_for_the_parts_a_static_agent_lacks() -> None:
    static = {**FULL, "registry": None, "probes": {}, "probe_counters": {}, "attachments": [], "encryption": None}
    s = Status.from_json(static)
    assert s.registry is None and s.probes == {} and s.probe_counters is None
    assert s.to_json() == static


def test_a_network_without_bridge_and_a_peer_without_rtt_decode() -> None:
    obj = copy.deepcopy(FULL)
    agent, probes = obj["agent"], obj["probes"]
    assert isinstance(agent, dict) and isinstance(probes, dict)
    del agent["networks"][0]["bridge"]
    del probes["h3"]["rtt_ms"], probes["h3"]["srtt_ms"]
    s = Status.from_json(obj)
    assert s.agent.networks[0].bridge is None and s.probes["h3"].rtt_ms is None and s.probes["h3"].srtt_ms is None


def test_unknown_keys_are_ignored_so_a_newer_agent_may_say_more() -> None:
    newer = copy.deepcopy(FULL)
    newer["nat"] = {"rules": 3}
    agent = newer["agent"]
    assert isinstance(agent, dict)
    agent["kernel"] = "6.8"
    assert Status.from_json(newer) == Status.from_json(FULL)


@pytest.mark.parametrize(
    "obj, where",
    [
        ([], "JSON object"),
        ({}, "$.agent"),
        (without(FULL, "agent.local"), "`local` - at `$.agent`"),
        (without(FULL, "fdb"), "`fdb`"),
        ({**FULL, "peers": [{"rx_frames": 1}, "junk"]}, "$.peers[0]"),
        ({**FULL, "totals": []}, "$.totals"),
        ({**FULL, "drops": {"x": "many"}}, "$.drops[...]"),  # msgspec's path: a mapping's value is [...]
        ({**FULL, "registry": "?"}, "$.registry"),
        ({**FULL, "probes": {"h": None}}, "$.probes[...]"),
        (
            {
                **FULL,
                "probes": {
                    "h2": {"address": "a:1", "rtt_ms": "fast", "loss": 0, "reachable": None, "sent": 0, "received": 0}
                },
            },
            "$.probes[...].rtt_ms",
        ),
        ({**FULL, "agent": {**FULL["agent"], "port": "4789"}}, "$.agent.port"),  # type: ignore[dict-item]
        ({**FULL, "probe_counters": {"bad": True, "answered": 0, "errors": 0}}, "$.probe_counters.bad"),
    ],
)
def test_a_status_that_is_not_one_is_a_value_error_naming_the_key(obj: object, where: str) -> None:
    with pytest.raises(ValueError, match=re.escape(where)):
        Status.from_json(obj)


def test_format_status_prints_the_typed_status() -> None:
    assert format_status(Status.from_json(FULL)).split("\n") == [
        "agent  vtep 198.18.0.1:4789  vtep6 [2001:2:0:1::1]:4789  mtu 1450  198.19.42.1/24  up 12.5 s  source check on",
        "  UNREACHABLE (no shared underlay family): h9",
        "  vni 42       tap ovl-42          bridge ovbr42   mac 02:00:00:00:00:01",
        "  vni 43       tap ovl-43          bridge ovbr43   mac 02:00:00:00:00:02",
        "registry  etcd http://198.18.0.250:2379, http://198.18.0.251:2379  host h1  "
        "DISCONNECTED (forwarding with what it knew)  revision 17  reconnects 2  resyncs 1",
        "  applied revision 16  keys 12  events 30  apply lag p50 0.25 ms p99 0.5 ms max 0.4 ms  "
        "last read 10 keys in 0.004 s  refused 1",
        "",
        "peer                        rx frames       rx bytes    tx frames       tx bytes",
        "198.18.0.2:4789                     3            300            4            400",
        "198.18.0.3:4789                     5            500            6            600",
        "total                               8            800           10           1000",
        "",
        "drops  too_short 1  not_member 2",
        "fdb    static 0  registry 2  learned 1  (refused at cap 0, moves 3, expired 4)",
        "arp    answered locally 11   nd (IPv6) answered locally 3   tcp segments coalesced on receive 7",
        "",
        "peer host        underlay path            rtt ms  srtt ms   loss  state",
        "h2               198.18.0.2:4788           0.250    0.500    10%  ok",
        "h3               198.18.0.3:4788               -        -   100%  UNREACHABLE",
        "",
        "encryption  key Bg+I8vIq  encrypted networks 42  handshakes completed 1 rejected 0 rate-limited 0",
        "  NO KEY (nothing is sent to them on encrypted networks): h9",
        "  peer                     key       state          age s  rekeys     sealed     opened",
        "  198.18.0.2:4789          6hzgkHf0  established      0.9       0          7         10",
        "",
        "container                          network      if     mac               address            host end     ",
        "netns/4026532567/eth0              blue         eth0   02:42:00:00:00:10 198.19.42.10/24    ovh1a2b3c4d5e6",
    ]


def test_format_status_of_a_static_agent_leaves_out_registry_probes_and_containers() -> None:
    example, _ = readme_contract()
    text = format_status(Status.from_json(example))
    assert text.split("\n")[0] == "agent  vtep 198.18.0.1:4789  mtu 1450  198.19.0.1/24  up 12.5 s  source check on"
    assert "drops  none" in text
    assert "registry" not in text.split("\n")[2] and "peer host" not in text and "container" not in text


# --- reaching out and being reached: networks' definitions, published ports, egress, DNS ----------


def reaching() -> dict[str, object]:
    """FULL from an agent with the distributed gateway: networks with their definitions, a named
    container with published ports, the nftables table and the DNS responder."""
    obj = copy.deepcopy(FULL)
    agent, attachments = obj["agent"], obj["attachments"]
    assert isinstance(agent, dict) and isinstance(attachments, list)
    blue, red = agent["networks"]
    blue.update(name="blue", gateway="198.19.42.1", gateway6="2001:2:0:42::1", nat=True, pinned=True)
    red.update(name="red")  # no gateway, NAT off, joined on demand: those keys are left out
    attachments[0].update(
        name="web",
        published=[
            {"host_ip": None, "host_port": 8080, "port": 80, "proto": "tcp"},
            {"host_ip": "198.18.0.1", "host_port": 5353, "port": 53, "proto": "udp"},
        ],
    )
    obj["egress"] = {
        "table": "inet overlay",
        "applied": True,
        "rules": 5,
        "error": None,
        "forwarding": ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"],
        "problems": ["iptables filter FORWARD policy is DROP: forwarded container traffic may be dropped"],
    }
    obj["dns"] = {
        "listening": ["198.19.42.1:53", "[2001:2:0:42::1]:53"],
        "upstreams": ["198.18.0.53:53"],
        "counters": {"queries": 12, "answered": 9, "nxdomain": 2, "forwarded": 1},
    }
    return obj


def test_a_status_with_egress_dns_and_network_definitions_round_trips_exactly() -> None:
    obj = reaching()
    status = Status.from_json(obj)
    assert status.to_json() == obj and keys_in_order(status.to_json()) == keys_in_order(obj)
    assert json.dumps(status.to_json()) == json.dumps(obj)
    assert list(status.to_json())[-2:] == ["egress", "dns"]
    assert Status.from_json(json.loads(json.dumps(status.to_json()))) == status


def test_the_new_parts_read_as_the_json_says() -> None:
    s = Status.from_json(reaching())
    blue, red = s.agent.networks
    assert blue == NetworkInfo(
        vni=42,
        tap="ovl-42",
        mac="02:00:00:00:00:01",
        bridge="ovbr42",
        name="blue",
        gateway="198.19.42.1",
        gateway6="2001:2:0:42::1",
        nat=True,
        pinned=True,
    )
    assert (red.name, red.gateway, red.gateway6, red.nat, red.pinned) == ("red", None, None, False, False)
    assert s.egress == Egress(
        applied=True,
        rules=5,
        forwarding=["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"],
        problems=["iptables filter FORWARD policy is DROP: forwarded container traffic may be dropped"],
    )
    assert s.egress.table == "inet overlay" and s.egress.error is None
    assert s.dns is not None and s.dns.counters["queries"] == 12 and s.dns.upstreams == ["198.18.0.53:53"]
    assert s.attachments[0]["name"] == "web"


def test_an_agent_without_them_says_exactly_what_it_said_before() -> None:
    s = Status.from_json(FULL)  # an older agent's status (or one with no gateway anywhere)
    assert s.egress is None and s.dns is None and s.agent.networks[0].name is None
    assert not s.agent.networks[0].nat and not s.agent.networks[0].pinned
    out = s.to_json()
    assert "egress" not in out and "dns" not in out
    agent = out["agent"]
    assert isinstance(agent, dict) and [list(n) for n in agent["networks"]] == [["vni", "tap", "mac", "bridge"]] * 2
    assert json.dumps(out) == json.dumps(FULL)
    assert Status.from_json({**FULL, "egress": None, "dns": None}) == s  # null as absent


def test_egress_and_dns_need_only_their_key_facts() -> None:
    s = Status.from_json(
        {**FULL, "egress": {"applied": False, "error": "nft: command not found"}, "dns": {"listening": []}}
    )
    assert s.egress == Egress(applied=False, error="nft: command not found")
    assert s.dns == Dns(listening=[])


@pytest.mark.parametrize(
    "change, where",
    [
        ({"egress": {"rules": 1}}, "`applied` - at `$.egress`"),
        ({"egress": {"applied": "yes"}}, "$.egress.applied"),
        ({"egress": {"applied": True, "problems": "none"}}, "$.egress.problems"),
        ({"dns": {"listening": "198.19.42.1:53"}}, "$.dns.listening"),
        ({"dns": {"listening": [], "counters": {"queries": "many"}}}, "$.dns.counters[...]"),
        ({"egress": []}, "$.egress"),
    ],
)
def test_a_bad_egress_or_dns_part_is_a_value_error_naming_the_key(change: dict[str, object], where: str) -> None:
    with pytest.raises(ValueError, match=re.escape(where)):
        Status.from_json({**FULL, **change})


def test_a_bad_network_definition_is_a_value_error_naming_the_key() -> None:
    obj = reaching()
    agent = obj["agent"]
    assert isinstance(agent, dict)
    agent["networks"][1]["nat"] = "on"
    with pytest.raises(ValueError, match=re.escape("$.agent.networks[1].nat")):
        Status.from_json(obj)


def test_format_status_shows_networks_published_ports_egress_and_dns() -> None:
    lines = format_status(Status.from_json(reaching())).split("\n")
    at = lines.index("network               vni  gateway                            nat  joined")
    assert lines[at - 1] == "" and lines[at - 2].startswith("  applied revision 16")  # after the registry
    assert lines[at + 1 : at + 4] == [
        "blue                   42  198.19.42.1 2001:2:0:42::1         on   at start (--network)",
        "red                    43  -                                  off  on demand",
        "",  # then the peers, as before
    ]
    assert lines[at + 4].startswith("peer ")
    container = next(i for i, line in enumerate(lines) if line.startswith("netns/4026532567/eth0"))
    assert lines[container + 1] == "  name web  published 0.0.0.0:8080 -> 80/tcp, 198.18.0.1:5353 -> 53/udp"
    assert lines[container + 2 :] == [
        "",
        "egress  nft table inet overlay  applied, 5 rules",
        "  ip forwarding turned on: net.ipv4.ip_forward, net.ipv6.conf.all.forwarding",
        "  PROBLEM: iptables filter FORWARD policy is DROP: forwarded container traffic may be dropped",
        "",
        "dns     listening 198.19.42.1:53, [2001:2:0:42::1]:53  upstreams 198.18.0.53:53",
        "  queries 12  answered 9  nxdomain 2  forwarded 1",
    ]


def test_format_status_says_when_the_egress_rules_are_not_in_force() -> None:
    failed = {**FULL, "egress": {"applied": False, "error": "nft -f: Error: Could not process rule"}}
    assert "egress  nft table inet overlay  NOT APPLIED: nft -f: Error: Could not process rule" in format_status(
        Status.from_json(failed)
    )
    stale = {**FULL, "egress": {"applied": True, "rules": 3, "error": "nft -f: Operation not permitted"}}
    text = format_status(Status.from_json(stale)).split("\n")
    assert text[-2:] == [
        "egress  nft table inet overlay  applied, 3 rules",
        "  last change failed: nft -f: Operation not permitted",
    ]
    quiet = format_status(Status.from_json({**FULL, "dns": {"listening": ["198.19.42.1:53"]}})).split("\n")
    assert quiet[-1] == "dns     listening 198.19.42.1:53  upstreams none"
