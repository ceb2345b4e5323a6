"""Containers on the overlay: `overlay attach`/`detach` on a lab with a real etcd, IPAM races,
isolation between networks, migration between hosts, lease expiry and agent restarts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

from overlay.lab import Lab, wait_for
from overlay.lab import etcd as etcdlab
from tests.labkit import new_lab_with_etcd, start_agent, status

pytestmark = [pytest.mark.root, pytest.mark.etcd]
OVERLAY = [sys.executable, "-m", "overlay"]
P = "/overlay/v1"
TTL = 3
BLUE, RED = 42, 43
TAP = f"ovl0-{BLUE}"  # the control socket is named after the first network's TAP


class World:
    """Three hosts, etcd, networks blue (42, 198.19.42.0/24) and red (43, 198.19.43.0/24), an
    agent on both networks on every host."""

    def __init__(self, lab: Lab, etcd: etcdlab.EtcdServer, tmp: Path, vnis: tuple[int, ...] = (BLUE, RED)) -> None:
        self.lab, self.etcd, self.tmp, self.vnis = lab, etcd, tmp, vnis
        self.agents: dict[int, subprocess.Popen[Any]] = {}

    def start(self, host: int, ttl: int = TTL) -> subprocess.Popen[Any]:
        argv = [
            *OVERLAY,
            "agent",
            "--etcd",
            self.etcd.endpoint,
            "--host-id",
            f"h{host}",
            "--local",
            str(self.lab.address(host)),
            *(arg for vni in self.vnis for arg in ("--network", str(vni))),
            "--lease-ttl",
            str(ttl),
            "--state-dir",
            str(self.tmp / "state"),
        ]
        self.agents[host] = start_agent(self.lab, host, [], log_dir=self.tmp, argv=argv, tap=TAP)
        return self.agents[host]

    def overlay(self, host: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = self.lab.run(host, [*OVERLAY, *args], check=False)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def attach(self, host: int, container: str, net: str, *args: str) -> dict[str, Any]:
        ns = self.lab.container_ns(container)
        if ns not in self.lab.namespaces():
            self.lab.add_container(container)
        return json.loads(self.overlay(host, "attach", ns, "--net", net, "--json", *args).stdout)

    def ping(self, container: str, address: str, count: int = 1, wait: float = 1) -> bool:
        argv = ["ping", "-6" if ":" in address else "-4", "-n", "-c", str(count), "-i", "0.1", "-W", str(wait), address]
        return self.lab.run(self.lab.container_ns(container), argv, check=False).returncode == 0

    def etcd_keys(self, prefix: str) -> list[str]:
        return etcdlab.etcdctl(self.etcd, "get", "--prefix", "--keys-only", prefix, check=True).stdout.split()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with new_lab_with_etcd(hosts=3, prefix="k") as (lab, etcd):
        w = World(lab, etcd, tmp_path)
        for vni, name in ((BLUE, "blue"), (RED, "red")):
            w.overlay(
                1, "net", "create", str(vni), "--name", name, "--subnet", f"198.19.{vni}.0/24", "--etcd", etcd.endpoint
            )
        for h in (1, 2, 3):
            w.start(h)
        yield w


def ip(attachment: dict[str, Any]) -> str:
    return attachment["address"].split("/")[0]


def test_attach_gives_a_working_interface_registered_in_etcd_and_detach_undoes_it(world: World) -> None:
    lab = world.lab
    a = world.attach(1, "a", "blue", "--gateway", "198.19.42.254")
    b = world.attach(2, "b", "blue", "--ip", "198.19.42.77/24", "--mac", "02:42:00:00:00:77", "--ifname", "net0")
    assert (a["vni"], a["network"], a["ifname"], a["mtu"]) == (
        BLUE,
        "blue",
        "eth0",
        1418,
    )  # 1500 - 50 - 32: room for sealing (etcd mode)
    assert (b["address"], b["mac"], b["ifname"]) == ("198.19.42.77/24", "02:42:00:00:00:77", "net0")
    links = json.loads(lab.run(lab.container_ns("b"), ["ip", "-j", "addr", "show", "net0"]).stdout)[0]
    assert links["address"] == "02:42:00:00:00:77" and links["mtu"] == 1418
    assert {(x["local"], x["prefixlen"]) for x in links["addr_info"] if x["family"] == "inet"} == {("198.19.42.77", 24)}
    routes = lab.run(lab.container_ns("a"), ["ip", "route", "show", "default"]).stdout
    assert "via 198.19.42.254 dev eth0" in routes
    assert world.ping("a", "198.19.42.77", count=3)  # across hosts, h1 -> h2
    assert world.ping("b", ip(a))
    keys = world.etcd_keys(f"{P}/networks/{BLUE}/")
    assert (
        f"{P}/networks/{BLUE}/ipam/198.19.42.77" in keys and f"{P}/networks/{BLUE}/endpoints/02:42:00:00:00:77" in keys
    )
    endpoint = json.loads(
        etcdlab.etcdctl(
            world.etcd, "get", f"{P}/networks/{BLUE}/endpoints/02:42:00:00:00:77", "--print-value-only", check=True
        ).stdout
    )
    assert endpoint == {"host": "h2", "ipv4": ["198.19.42.77"], "ipv6": []}
    assert [x["id"] for x in status(lab, 2, TAP)["attachments"]] == [b["id"]]

    detached = json.loads(world.overlay(2, "detach", lab.container_ns("b"), "--json").stdout)["detached"]
    assert [d["address"] for d in detached] == ["198.19.42.77/24"]
    assert "net0" not in lab.run(lab.container_ns("b"), ["ip", "-br", "link"]).stdout
    assert b["host_ifname"] not in lab.run(2, ["ip", "-br", "link"]).stdout
    # b's two keys, exactly: a random MAC elsewhere (a bridge's, container a's) may well contain "77"
    b_keys = {f"{P}/networks/{BLUE}/ipam/198.19.42.77", f"{P}/networks/{BLUE}/endpoints/02:42:00:00:00:77"}
    left: list[str] = []

    def gone() -> bool:
        left[:] = sorted(b_keys & set(world.etcd_keys(f"{P}/networks/{BLUE}/")))
        return not left

    try:
        wait_for(gone, 5, "b's keys to go")
    except TimeoutError as e:
        raise AssertionError(f"{e}: still there: {left}") from None
    assert status(lab, 2, TAP)["attachments"] == []
    again = world.overlay(2, "detach", lab.container_ns("b"))
    assert "nothing attached" in again.stdout  # detaching twice is not an error


def test_clear_errors_for_what_a_user_gets_wrong(world: World) -> None:
    lab = world.lab
    lab.add_container("e")
    ns = lab.container_ns("e")
    world.attach(1, "taken", "blue", "--ip", "198.19.42.10/24")
    cases = [
        (["attach", "nosuch", "--net", "blue"], "no network namespace nosuch"),
        (["attach", "999999999", "--net", "blue"], "no process 999999999"),
        (["attach", ns, "--net", "green"], "network 'green' is not in the registry"),
        (["attach", ns, "--net", "blue", "--ip", "198.19.43.5/24"], "outside network blue's subnet"),
        (["attach", ns, "--net", "blue", "--ip", "198.19.42.10/24"], "198.19.42.10 is in use"),
        (["attach", ns, "--net", "blue", "--ip", "198.19.42.255/24"], "reserved"),
        (["attach", ns, "--net", "blue", "--mac", "01:00:5e:00:00:01"], "multicast"),
        (["attach", ns, "--net", "blue", "--mac", "nonsense"], "not a MAC address"),
        (["attach", ns, "--net", "blue", "--gateway", "198.19.43.1"], "outside the container's subnet"),
        (["attach", ns, "--net", "blue", "--ifname", "a-very-long-interface-name"], "not a valid interface name"),
        (["attach", ns, "--net", "blue", "--ip", "198.19.42.20/16"], "prefix length must be /24"),
        (["attach", ns, "--net", "blue", "--gateway", "198.19.42.255"], "network or broadcast address"),
        (["attach", "/tmp", "--net", "blue"], "/tmp is not a network namespace"),
    ]
    for args, message in cases:
        result = world.overlay(1, *args, check=False)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    # Nothing was left behind by the refusals: the namespace is bare, only one address is taken.
    assert lab.run(ns, ["ip", "-br", "link"]).stdout.split()[0] == "lo"
    assert [k for k in world.etcd_keys(f"{P}/networks/{BLUE}/ipam/")] == [f"{P}/networks/{BLUE}/ipam/198.19.42.10"]
    # A gateway given on the command line is never handed out as a container's address.
    routed = world.attach(1, "routed", "blue", "--gateway", "198.19.42.1")
    assert routed["address"] != "198.19.42.1/24" and routed["gateway"] == "198.19.42.1"
    no_agent = lab.run(ns, [*OVERLAY, "attach", ns, "--net", "blue"], check=False)  # no agent in that namespace
    assert no_agent.returncode == 1 and "no overlay agent is running" in no_agent.stderr


def test_two_hosts_attaching_at_once_never_get_the_same_address(world: World) -> None:
    jobs = [(h, f"r{h}{i}") for i in range(4) for h in (1, 2, 3)]
    for _, c in jobs:
        world.lab.add_container(c)
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: world.attach(job[0], job[1], "blue"), jobs))
    addresses = [a["address"] for a in got]
    assert len(set(addresses)) == len(jobs), addresses
    assert all(a.startswith("198.19.42.") and a.endswith("/24") for a in addresses)
    held = {k.rsplit("/", 1)[1] for k in world.etcd_keys(f"{P}/networks/{BLUE}/ipam/")}
    assert held == {ip(a) for a in got}
    assert world.ping("r10", ip(got[1]))  # r10 on h1 reaches r20 on h2


def test_networks_are_isolated_even_with_the_same_subnet(world: World) -> None:
    """Tenants blue and red both use 198.19.42.0/24 here: a red container with a blue
    container's address is never reached from blue, and blue's broadcasts never reach red."""
    lab = world.lab
    world.overlay(
        1, "net", "create", "44", "--name", "green", "--subnet", "198.19.42.0/24", "--etcd", world.etcd.endpoint
    )  # not joined by the agents: attach joins it on demand
    green = world.attach(1, "g", "green")
    assert green["vni"] == 44 and green["address"] == "198.19.42.1/24"
    blue1 = world.attach(1, "b1", "blue", "--ip", "198.19.42.11/24")
    world.attach(2, "b2", "blue", "--ip", "198.19.42.12/24")
    red = world.attach(2, "r2", "red", "--ip", "198.19.43.12/24")
    lab.run(lab.container_ns("r2"), ["ip", "addr", "add", "198.19.42.13/24", "dev", "eth0"])  # blue's subnet
    assert world.ping("b1", "198.19.42.12", count=2)
    assert not world.ping("b1", "198.19.42.13", count=3)  # ARP for it floods blue, never red
    assert not world.ping("b1", ip(red), count=1)
    assert not world.ping("b1", ip(green), count=1)  # blue's 198.19.42.1 is nobody: green's is not reached
    # Had blue's ARP requests for .13 reached red's container, it would have answered them and
    # noted the asker: it knows nothing of blue1.
    assert "198.19.42.11" not in lab.run(lab.container_ns("r2"), ["ip", "neigh", "show"]).stdout
    assert blue1["vni"] != red["vni"]


def test_an_endpoint_that_moves_to_another_host_is_followed_within_a_second(world: World) -> None:
    lab = world.lab
    mac, address = "02:42:00:00:01:01", "198.19.42.101/24"
    world.attach(1, "mover", "blue", "--ip", address, "--mac", mac)
    world.attach(3, "client", "blue")
    assert world.ping("client", "198.19.42.101", count=2)
    world.overlay(1, "detach", lab.container_ns("mover"))
    lab.add_container("moved")
    world.attach(2, "moved", "blue", "--ip", address, "--mac", mac)
    moved_at = time.monotonic()
    wait_for(lambda: world.ping("client", "198.19.42.101", wait=0.2), 1.0, "traffic to follow the endpoint to h2")
    took = time.monotonic() - moved_at
    fdb = {e["mac"]: e for e in status(lab, 3, TAP, cmd="fdb")}
    assert fdb[mac]["vtep"] == f"{lab.address(2)}:4789"
    print(f"traffic followed the move in {took * 1000:.0f} ms")


def test_a_dead_hosts_addresses_come_back_when_its_lease_expires(world: World) -> None:
    world.attach(3, "doomed", "blue", "--ip", "198.19.42.50/24")
    world.agents[3].send_signal(signal.SIGKILL)
    world.agents[3].wait(timeout=10)
    key = f"{P}/networks/{BLUE}/ipam/198.19.42.50"
    wait_for(lambda: key not in world.etcd_keys(key), TTL + 5, "the dead host's address to be released")
    again = world.attach(1, "heir", "blue", "--ip", "198.19.42.50/24")
    assert again["address"] == "198.19.42.50/24"


def test_a_restarted_agent_takes_its_containers_back_and_a_vanished_one_is_released(world: World) -> None:
    lab = world.lab
    kept = world.attach(1, "kept", "blue")
    gone = world.attach(1, "gone", "blue")
    dead = world.attach(1, "dead", "blue")
    world.attach(2, "peer", "blue")
    assert world.ping("peer", ip(kept))
    world.agents[1].terminate()
    assert world.agents[1].wait(timeout=15) == 0
    assert f"ovbr{BLUE}" in lab.run(1, ["ip", "-br", "link"]).stdout  # containers still plugged: bridge stays
    # The lease was left alive for the next agent: the addresses stay claimed across the restart.
    claims = {f"{P}/networks/{BLUE}/ipam/{ip(kept)}", f"{P}/networks/{BLUE}/ipam/{ip(gone)}"}
    assert claims <= set(world.etcd_keys(f"{P}/networks/{BLUE}/ipam/"))
    lab.run(1, ["ip", "netns", "delete", lab.container_ns("dead")])  # dies while no agent runs
    world.start(1)
    log = (world.tmp / f"agent-{lab.name}-h1-{TAP}.log").read_text()
    assert "resumed the lease of this host's previous agent" in log
    assert claims <= set(world.etcd_keys(f"{P}/networks/{BLUE}/ipam/"))
    attached = {a["id"] for a in status(lab, 1, TAP)["attachments"]}
    assert attached == {kept["id"], gone["id"]}
    # What the previous agent held for the dead container went with the resumed lease's sweep.
    assert f"{P}/networks/{BLUE}/ipam/{ip(dead)}" not in world.etcd_keys(f"{P}/networks/{BLUE}/ipam/")
    assert f"{P}/networks/{BLUE}/endpoints/{dead['mac']}" not in world.etcd_keys(f"{P}/networks/{BLUE}/endpoints/")
    wait_for(lambda: world.ping("peer", ip(kept), wait=0.5), 10, "the adopted container to be reachable again")
    lab.run(1, ["ip", "netns", "delete", lab.container_ns("gone")])  # the container dies without a detach
    wait_for(
        lambda: [a["id"] for a in status(lab, 1, TAP)["attachments"]] == [kept["id"]],
        10,
        "the agent to notice the container is gone",
    )
    wait_for(
        lambda: f"{P}/networks/{BLUE}/ipam/{ip(gone)}" not in world.etcd_keys(f"{P}/networks/{BLUE}/ipam/"),
        5,
        "its address to be released",
    )


def scrape(lab: Lab, host: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The agent's Prometheus metrics, fetched inside ``host`` (its loopback) and parsed."""
    code = (
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9465/metrics', timeout=5)"
        ".read().decode())"
    )
    text = lab.run(host, [sys.executable, "-c", code]).stdout
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_and_peer_probes_show_a_peer_that_stops_answering(world: World) -> None:
    lab = world.lab
    world.agents[2].terminate()
    world.agents[2].wait(timeout=15)
    world.start(2, ttl=60)  # its registration outlives the pause below
    world.attach(1, "m1", "blue")
    b = world.attach(2, "m2", "blue")
    assert world.ping("m1", ip(b), count=3)

    def probe(host: int, peer: str) -> dict[str, Any]:
        return status(lab, host, TAP)["probes"].get(peer) or {}

    wait_for(lambda: probe(1, "h2").get("reachable") and probe(1, "h3").get("reachable"), 10, "h1 to hear h2 and h3")
    metrics = scrape(lab, 1)
    assert metrics[("overlay_peer_reachable", (("peer", "h2"),))] == 1
    assert 0 < metrics[("overlay_peer_rtt_seconds", (("peer", "h2"),))] < 0.5
    assert metrics[("overlay_registry_connected", ())] == 1
    assert metrics[("overlay_vtep_tx_frames_total", (("vtep", f"{lab.address(2)}:4789"),))] >= 3
    assert ("overlay_fdb_entries", (("source", "registry"),)) in metrics
    assert "RTT" in world.overlay(1, "host", "ls", "--etcd", world.etcd.endpoint).stdout

    world.agents[2].send_signal(signal.SIGSTOP)  # alive in etcd (its lease has 60 s), silent on the wire
    try:
        wait_for(lambda: probe(1, "h2").get("reachable") is False, 10, "h1 to mark h2 unreachable")
        assert probe(1, "h3")["reachable"] and probe(1, "h2")["loss"] > 0
        assert scrape(lab, 1)[("overlay_peer_reachable", (("peer", "h2"),))] == 0
        assert "UNREACHABLE" in world.overlay(1, "status").stdout
        fdb = {e["mac"]: e for e in status(lab, 1, TAP, cmd="fdb")}
        assert fdb[b["mac"]]["source"] == "registry"  # forwarding stays registry-driven
    finally:
        world.agents[2].send_signal(signal.SIGCONT)
    wait_for(lambda: probe(1, "h2").get("reachable"), 10, "h2 to be reachable again")


# --- dual stack -----------------------------------------------------------------------------------

SIX = 44  # IPv6 only: a subnet6 and no IPv4 subnet


@pytest.fixture
def dual(tmp_path: Path) -> Iterator[World]:
    """Two hosts: blue (42) dual stack (198.19.42.0/24, 2001:2:0:42::/64, gateway6 ::1), red (43)
    IPv4 only, six (44) IPv6 only (2001:2:0:44::/64); an agent on all three on each host."""
    with new_lab_with_etcd(hosts=2, prefix="k6") as (lab, etcd):
        w = World(lab, etcd, tmp_path, vnis=(BLUE, RED, SIX))
        for vni, extra in (
            (BLUE, ["--subnet", "198.19.42.0/24", "--subnet6", "2001:2:0:42::/64", "--gateway6", "2001:2:0:42::1"]),
            (RED, ["--subnet", "198.19.43.0/24"]),
            (SIX, ["--subnet6", "2001:2:0:44::/64"]),
        ):
            w.overlay(
                1,
                "net",
                "create",
                str(vni),
                "--name",
                {BLUE: "blue", RED: "red", SIX: "six"}[vni],
                *extra,
                "--etcd",
                etcd.endpoint,
            )
        for h in (1, 2):
            w.start(h)
        yield w


def ip6(attachment: dict[str, Any]) -> str:
    return attachment["address6"].split("/")[0]


def mod_revision(world: World, key: str) -> int:
    out = json.loads(etcdlab.etcdctl(world.etcd, "get", key, "-w", "json", check=True).stdout)
    return int(out["kvs"][0]["mod_revision"])


def sysctl(world: World, container: str, name: str) -> str:
    return world.lab.run(
        world.lab.container_ns(container), ["cat", f"/proc/sys/net/ipv6/conf/eth0/{name}"]
    ).stdout.strip()


def test_dual_stack_containers_on_one_host_ping6_each_other_and_detach_releases_both_addresses(dual: World) -> None:
    lab = dual.lab
    a = dual.attach(1, "a", "blue")
    b = dual.attach(1, "b", "blue", "--ip6", "2001:2:0:42::77/64", "--mac", "02:42:00:00:00:77")
    assert (a["address"], a["address6"], a["gateway6"]) == ("198.19.42.1/24", "2001:2:0:42::2/64", "2001:2:0:42::1")
    assert (b["address"], b["address6"]) == ("198.19.42.2/24", "2001:2:0:42::77/64")
    # In the container: the address usable at once (no DAD), the IPv6 default route, no RAs acted on.
    info = json.loads(
        lab.run(lab.container_ns("b"), ["ip", "-j", "-6", "addr", "show", "eth0", "scope", "global"]).stdout
    )
    (global6,) = [x for x in info[0]["addr_info"] if x.get("family") == "inet6" and x.get("scope") == "global"]
    assert (global6["local"], global6["prefixlen"], global6.get("nodad"), global6.get("tentative")) == (
        "2001:2:0:42::77",
        64,
        True,
        None,
    )
    assert (
        "default via 2001:2:0:42::1 dev eth0"
        in lab.run(lab.container_ns("a"), ["ip", "-6", "route", "show", "default"]).stdout
    )
    assert (sysctl(dual, "a", "accept_ra"), sysctl(dual, "a", "autoconf")) == ("0", "0")
    assert dual.ping("a", ip6(b), count=3)  # kernel-local: both on h1's bridge
    assert dual.ping("b", ip6(a)) and dual.ping("a", ip(b))
    # Both addresses claimed by one transaction (one revision), the endpoint carries both.
    v4_key, v6_key = f"{P}/networks/{BLUE}/ipam/{ip(b)}", f"{P}/networks/{BLUE}/ipam/2001:2:0:42::77"
    assert mod_revision(dual, v4_key) == mod_revision(dual, v6_key)
    endpoint = json.loads(
        etcdlab.etcdctl(
            dual.etcd, "get", f"{P}/networks/{BLUE}/endpoints/02:42:00:00:00:77", "--print-value-only", check=True
        ).stdout
    )
    assert endpoint == {"host": "h1", "ipv4": [ip(b)], "ipv6": ["2001:2:0:42::77"]}
    (shown,) = [x for x in status(lab, 1, TAP)["attachments"] if x["id"] == b["id"]]
    assert (shown["address6"], shown["gateway6"]) == ("2001:2:0:42::77/64", "2001:2:0:42::1")
    # An IPv4-only network's attachment says so with nulls.
    r = dual.attach(1, "r", "red")
    assert (r["address6"], r["gateway6"]) == (None, None)

    dual.overlay(1, "detach", lab.container_ns("b"))
    b_keys = {v4_key, v6_key, f"{P}/networks/{BLUE}/endpoints/02:42:00:00:00:77"}
    wait_for(lambda: not b_keys & set(dual.etcd_keys(f"{P}/networks/{BLUE}/")), 5, "b's three keys to go")
    assert {f"{P}/networks/{BLUE}/ipam/{ip(a)}", f"{P}/networks/{BLUE}/ipam/{ip6(a)}"} <= set(
        dual.etcd_keys(f"{P}/networks/{BLUE}/ipam/")
    )


def test_ipv6_only_containers_get_no_ipv4_address_and_ping6_each_other(dual: World) -> None:
    lab = dual.lab
    x = dual.attach(1, "x", "six")
    y = dual.attach(1, "y", "six")
    assert (x["address"], x["address6"], y["address6"]) == (None, "2001:2:0:44::1/64", "2001:2:0:44::2/64")
    assert "inet " not in lab.run(lab.container_ns("x"), ["ip", "addr", "show", "eth0"]).stdout
    assert dual.ping("x", ip6(y), count=2)
    assert dual.etcd_keys(f"{P}/networks/{SIX}/ipam/") == [
        f"{P}/networks/{SIX}/ipam/2001:2:0:44::1",
        f"{P}/networks/{SIX}/ipam/2001:2:0:44::2",
    ]
    dual.overlay(1, "detach", lab.container_ns("x"))
    wait_for(lambda: len(dual.etcd_keys(f"{P}/networks/{SIX}/ipam/")) == 1, 5, "x's address to go")


def test_bad_ipv6_requests_are_refused_in_one_line_and_leave_nothing_behind(dual: World) -> None:
    lab = dual.lab
    dual.attach(1, "taken", "blue", "--ip6", "2001:2:0:42::10/64")
    ns = lab.add_container("e")
    cases = [
        (["--net", "blue", "--ip6", "2001:2:0:43::5/64"], "outside network blue's subnet6 2001:2:0:42::/64"),
        (["--net", "blue", "--ip6", "2001:2:0:42::10/64"], "2001:2:0:42::10 is in use on network blue"),
        (["--net", "blue", "--ip6", "2001:2:0:42::5/80"], "prefix length must be /64"),
        (["--net", "blue", "--ip6", "2001:2:0:42::1/64"], "reserved"),
        (["--net", "blue", "--ip6", "nonsense"], "is not an IPv6 address"),
        (["--net", "blue", "--gateway6", "2001:2:0:43::1"], "outside the container's subnet6"),
        (["--net", "red", "--ip6", "2001:2:0:43::5/64"], "network red has no subnet6"),
        (["--net", "red", "--gateway6", "2001:2:0:43::1"], "gets no IPv6 address"),
    ]
    for args, message in cases:
        result = dual.overlay(1, "attach", ns, *args, check=False)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert lab.run(ns, ["ip", "-br", "link"]).stdout.split()[0] == "lo"  # no veth left in the container
    assert dual.etcd_keys(f"{P}/networks/{BLUE}/ipam/") == [
        f"{P}/networks/{BLUE}/ipam/198.19.42.1",
        f"{P}/networks/{BLUE}/ipam/2001:2:0:42::10",
    ]
    assert dual.etcd_keys(f"{P}/networks/{RED}/ipam/") == []
    host_ends = [
        line.split()[0] for line in lab.run(1, ["ip", "-br", "link"]).stdout.splitlines() if line.startswith("ov")
    ]
    others = ("ovbr", "ovl", "ovgw", "ovgp")  # bridges, TAPs, the gateway's veth pair
    assert len([h for h in host_ends if not h.startswith(others)]) == 1  # "taken"'s only


def test_a_restarted_agent_takes_back_a_dual_stack_container_with_both_addresses(dual: World) -> None:
    kept = dual.attach(1, "kept", "blue")
    dual.attach(2, "peer", "blue")
    dual.agents[1].terminate()
    assert dual.agents[1].wait(timeout=15) == 0
    dual.start(1)
    (back,) = status(dual.lab, 1, TAP)["attachments"]
    assert (back["id"], back["address6"]) == (kept["id"], kept["address6"])
    keys = set(dual.etcd_keys(f"{P}/networks/{BLUE}/ipam/"))
    assert {f"{P}/networks/{BLUE}/ipam/{ip(kept)}", f"{P}/networks/{BLUE}/ipam/{ip6(kept)}"} <= keys
    wait_for(lambda: dual.ping("peer", ip6(kept), wait=0.5), 10, "the adopted container to answer over IPv6")


ASK_NS = """
import ipaddress, sys, threading
from scapy.all import AsyncSniffer, Ether, IPv6, ICMPv6ND_NS, ICMPv6ND_NA, ICMPv6NDOptSrcLLAddr, get_if_hwaddr, sendp, conf
conf.verb = 0
me, src, target = get_if_hwaddr("eth0"), sys.argv[1], sys.argv[2]
low = ipaddress.IPv6Address(target).packed[13:]
group, mac = "ff02::1:ff%02x:%02x%02x" % tuple(low), "33:33:ff:%02x:%02x:%02x" % tuple(low)
ns = Ether(src=me, dst=mac) / IPv6(src=src, dst=group, hlim=255) / ICMPv6ND_NS(tgt=target) / ICMPv6NDOptSrcLLAddr(lladdr=me)
ready = threading.Event()
sniffer = AsyncSniffer(iface="eth0", count=1, started_callback=ready.set,
                       lfilter=lambda p: ICMPv6ND_NA in p and p[ICMPv6ND_NA].tgt == target)
sniffer.start()
ready.wait(5)
sendp(ns, iface="eth0")
sniffer.join(timeout=5)
if sniffer.running:
    sniffer.stop()
print(sniffer.results[0][Ether].src if sniffer.results else "none")
"""


SNIFF_NS = """
import sys, threading
from scapy.all import AsyncSniffer, ICMPv6ND_NS
ready = threading.Event()
sniffer = AsyncSniffer(iface="eth0", started_callback=ready.set,
                       lfilter=lambda p: ICMPv6ND_NS in p and p[ICMPv6ND_NS].tgt == sys.argv[1])
sniffer.start()
ready.wait(5)
print("ready", flush=True)
sys.stdin.readline()  # until told the solicitation was sent (and answered)
sniffer.stop()
print(len(sniffer.results), flush=True)
"""


def test_neighbour_solicitations_for_remote_containers_are_answered_on_their_host_not_flooded(dual: World) -> None:
    """Dual-stack containers on two hosts ping6 each other; a solicitation for the remote one's
    IPv6 address is answered by the local agent from the registry (counted), and nothing of it
    reaches the other host."""
    a = dual.attach(1, "na", "blue")
    b = dual.attach(2, "nb", "blue", "--mac", "02:42:00:00:00:b2")
    assert dual.ping("na", ip6(b), count=3) and dual.ping("nb", ip6(a), count=3)

    sniff = dual.lab.spawn(
        dual.lab.container_ns("nb"),
        [sys.executable, "-c", SNIFF_NS, ip6(b)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sniff.stdout is not None and sniff.stdin is not None
    assert sniff.stdout.readline().strip() == "ready"
    before = status(dual.lab, 1, TAP)["nd_suppressed"]
    out = dual.lab.run(
        dual.lab.container_ns("na"), [sys.executable, "-c", ASK_NS, ip6(a), ip6(b)], timeout=30
    ).stdout.strip()
    assert out == "02:42:00:00:00:b2"  # the remote container's MAC, answered on h1
    assert status(dual.lab, 1, TAP)["nd_suppressed"] == before + 1
    seen, _ = sniff.communicate("done\n", timeout=30)
    assert seen.strip() == "0"  # the solicitation never reached nb's host
