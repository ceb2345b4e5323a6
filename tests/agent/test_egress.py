"""Containers reach out and are reached, on a lab with a real etcd and a namespace that stands
for the internet (198.18.0.210 on the underlay): networks joined on demand, the distributed
gateway, egress NAT, published ports and names by DNS."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from overlay.core.gateway import gateway_mac
from overlay.core.wire import mac_to_str
from overlay.lab import Lab, wait_for
from overlay.lab import etcd as etcdlab
from tests.labkit import new_lab_with_etcd, start_agent, status, stop_agent, tcp_transfer

pytestmark = [pytest.mark.root, pytest.mark.etcd]
OVERLAY = [sys.executable, "-m", "overlay"]
TTL = 3
BLUE, RED = 42, 43
TAP = "ovl0"  # one network at start: the TAP (and the control socket) is plain ovl0
OUTSIDE = 210  # the internet: 198.18.0.210

# A TCP server that answers each connection with the address it came from, then closes it;
# bounded: 60 s or 50 connections.
WHOAMI = """
import socket, sys, time
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
s.settimeout(1)
print("listening", flush=True)
end, served = time.monotonic() + 60, 0
while time.monotonic() < end and served < 50:
    try:
        c, peer = s.accept()
    except socket.timeout:
        continue
    c.sendall((sys.argv[3] + " " + peer[0] + "\\n").encode())
    c.close()
    served += 1
"""
ASK = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    print(c.recv(200).decode().strip())
except OSError as e:
    print("failed", e.__class__.__name__)
"""
DIG = """
import sys
import dns.message, dns.query, dns.rcode
q = dns.message.make_query(sys.argv[2], sys.argv[3])
try:
    r = dns.query.tcp(q, sys.argv[1], timeout=2) if len(sys.argv) > 4 else dns.query.udp(q, sys.argv[1], timeout=2)
except Exception as e:
    print("failed", e.__class__.__name__)
else:
    print(dns.rcode.to_text(r.rcode()), " ".join(sorted(rr.to_text() for a in r.answer for rr in a)))
"""


class World:
    """Three hosts and etcd; networks blue (42, 198.19.42.0/24, gateway .1) and red (43,
    198.19.43.0/24, gateway .1), NAT on by default; agents started on blue only (red is joined
    on demand); the outside at 198.18.0.210."""

    def __init__(self, lab: Lab, etcd: etcdlab.EtcdServer, tmp: Path) -> None:
        self.lab, self.etcd, self.tmp = lab, etcd, tmp
        self.agents: dict[int, subprocess.Popen[Any]] = {}
        self.outside = lab.add_service("outside", OUTSIDE)
        self.servers: list[subprocess.Popen[Any]] = []

    def start(self, host: int) -> subprocess.Popen[Any]:
        argv = [
            *OVERLAY,
            "agent",
            "--etcd",
            self.etcd.endpoint,
            "--host-id",
            f"h{host}",
            "--local",
            str(self.lab.address(host)),
            "--network",
            str(BLUE),
            "--lease-ttl",
            str(TTL),
            "--state-dir",
            str(self.tmp / "state"),
            "--resolv-conf",
            "/dev/null",  # no upstream resolvers: the lab never sends a query off the machine
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

    def serve(self, where: str | int, address: str, port: int, label: str) -> None:
        """A WHOAMI server in ``where`` (a namespace or host) on ``address``:``port``."""
        proc = self.lab.spawn(
            where, [sys.executable, "-c", WHOAMI, address, str(port), label], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        self.servers.append(proc)

    def ask(self, where: str | int, address: str, port: int) -> str:
        return self.lab.run(where, [sys.executable, "-c", ASK, address, str(port)], timeout=10).stdout.strip()

    def dig(self, where: str, server: str, name: str, rtype: str = "A", tcp: bool = False) -> str:
        argv = [sys.executable, "-c", DIG, server, name, rtype] + (["tcp"] if tcp else [])
        return self.lab.run(where, argv, timeout=10).stdout.strip()

    def ping(self, where: str, address: str, count: int = 1) -> bool:
        argv = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "1", address]
        return self.lab.run(where, argv, check=False).returncode == 0

    def networks(self, host: int) -> dict[int, dict[str, Any]]:
        return {n["vni"]: n for n in status(self.lab, host, TAP)["agent"]["networks"]}

    def close(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with new_lab_with_etcd(hosts=3, prefix="x") as (lab, etcd):
        w = World(lab, etcd, tmp_path)
        try:
            for vni, name in ((BLUE, "blue"), (RED, "red")):
                w.overlay(
                    1,
                    *("net", "create", str(vni), "--name", name, "--subnet", f"198.19.{vni}.0/24"),
                    *("--gateway", f"198.19.{vni}.1", "--etcd", etcd.endpoint),
                )
            for h in (1, 2, 3):
                w.start(h)
            yield w
        finally:
            w.close()


def bare(a: dict[str, Any]) -> str:
    return str(a["address"]).split("/")[0]


def test_a_container_reaches_the_outside_through_its_hosts_gateway_seen_as_the_host(world: World) -> None:
    lab = world.lab
    c2 = world.attach(2, "c2", "blue")
    assert c2["gateway"] == "198.19.42.1" and c2["dns"] == {"nameservers": ["198.19.42.1"], "search": ["blue"]}
    world.serve(world.outside, "198.18.0.210", 7000, "outside")
    ns = lab.container_ns("c2")
    assert world.ping(ns, "198.18.0.210", count=2)
    assert world.ask(ns, "198.18.0.210", 7000) == f"outside {lab.address(2)}"  # masqueraded to h2's address
    # The gateway is the same MAC on every host, answered locally: never learned, never published.
    neigh = lab.run(ns, ["ip", "neigh", "show", "198.19.42.1"]).stdout
    assert mac_to_str(gateway_mac(BLUE)) in neigh
    for h in (1, 2, 3):
        assert all(e["mac"] != mac_to_str(gateway_mac(BLUE)) for e in status(lab, h, TAP, cmd="fdb"))
    keys = etcdlab.etcdctl(world.etcd, "get", "--prefix", "--keys-only", "/overlay/v1/networks/42/endpoints/").stdout
    assert mac_to_str(gateway_mac(BLUE)) not in keys
    egress = status(lab, 2, TAP)["egress"]
    assert egress["applied"] and egress["table"] == "inet overlay" and egress["error"] is None
    # An operator turns NAT off: every host's table follows the registry.
    world.overlay(1, "net", "set", "42", "--no-nat", "--etcd", world.etcd.endpoint)

    def masquerades(host: int) -> bool:
        return "198.19.42.0/24" in lab.run(host, ["nft", "list", "chain", "inet", "overlay", "postrouting"]).stdout

    wait_for(lambda: not masquerades(2) and not masquerades(1), 5, "NAT off on every host")
    assert world.ask(ns, "198.18.0.210", 7000).startswith("failed")  # its own address: no way back


def test_a_published_port_answers_from_outside_the_host_and_its_containers_and_unpublish_closes_it(
    world: World,
) -> None:
    lab = world.lab
    web = world.attach(1, "web", "blue", "--name", "web", "--publish", "8080:80")
    assert web["published"] == [{"host_ip": None, "host_port": 8080, "port": 80, "proto": "tcp"}]
    world.serve(lab.container_ns("web"), "0.0.0.0", 80, "web")
    world.serve(lab.container_ns("web"), "0.0.0.0", 81, "web81")
    h1 = str(lab.address(1))
    assert world.ask(world.outside, h1, 8080) == "web 198.18.0.210"  # from another host of the underlay
    assert world.ask(1, h1, 8080).startswith("web ")  # from the host itself
    world.attach(1, "peer", "blue")
    assert world.ask(lab.container_ns("peer"), h1, 8080) == "web 198.19.42.1"  # hairpin: through the gateway
    red = world.attach(1, "r1", "red")  # another network reaches the published port, not the container
    assert world.ask(lab.container_ns("r1"), h1, 8080).startswith("web ")
    assert not world.ping(lab.container_ns("r1"), bare(web))
    assert red["vni"] == RED

    out = world.overlay(1, "publish", "web", "81").stdout  # a random high port, printed
    port = int(out.split()[1].rsplit(":", 1)[1])
    assert port >= 1024 and world.ask(world.outside, h1, port) == "web81 198.18.0.210"
    taken = world.overlay(1, "publish", lab.container_ns("peer"), "8080:80", check=False)
    assert taken.returncode == 2 and len(taken.stderr.strip().splitlines()) == 1 and "8080" in taken.stderr
    listed = {a["id"]: a for a in status(lab, 1, TAP)["attachments"]}
    assert {p["host_port"] for a in listed.values() for p in a["published"]} == {8080, port}

    world.overlay(1, "unpublish", "web", "8080")
    assert world.ask(world.outside, h1, 8080).startswith("failed")
    assert world.ask(world.outside, h1, port) == "web81 198.18.0.210"  # the other one stays


def test_publications_survive_an_agent_restart(world: World) -> None:
    lab = world.lab
    world.attach(1, "web", "blue", "--publish", "8081:80")
    world.serve(lab.container_ns("web"), "0.0.0.0", 80, "web")
    h1 = str(lab.address(1))
    assert world.ask(world.outside, h1, 8081).startswith("web ")
    assert stop_agent(world.agents[1]) == 0  # containers stay: so do their table and ports
    world.start(1)
    wait_for(
        lambda: any(a["published"] for a in status(lab, 1, TAP)["attachments"]), 10, "the publication adopted again"
    )
    assert world.ask(world.outside, h1, 8081).startswith("web ")


def test_bad_publications_and_names_are_refused_in_one_line_and_change_nothing(world: World) -> None:
    lab = world.lab
    world.attach(1, "web", "blue")
    ns = lab.container_ns("web")
    before = lab.run(1, ["nft", "list", "table", "inet", "overlay"]).stdout
    for args, said in [
        (("publish", ns, "70000:80"), "70000"),
        (("publish", ns, "8080:80/sctp"), "sctp"),
        (("publish", ns, "198.18.9.9:8080:80"), "198.18.9.9"),
        (("publish", "nobody", "8080:80"), "nobody"),
        (("attach", lab.add_container("bad"), "--net", "blue", "--name", "no_underscores"), "DNS label"),
    ]:
        result = world.overlay(1, *args, check=False)
        assert result.returncode == 2, result
        assert len(result.stderr.strip().splitlines()) == 1 and said in result.stderr, result.stderr
    assert lab.run(1, ["nft", "list", "table", "inet", "overlay"]).stdout == before
    assert all(not a["published"] for a in status(lab, 1, TAP)["attachments"])


def test_names_resolve_across_hosts_nxdomain_for_unknown_ones_and_follow_a_moved_container(world: World) -> None:
    lab = world.lab
    db = world.attach(3, "db", "blue", "--name", "db")
    world.attach(1, "app", "blue")
    ns = lab.container_ns("app")
    gw = "198.19.42.1"
    wait_for(lambda: world.dig(ns, gw, "db") == f"NOERROR {bare(db)}", 5, "db's name on h1")
    assert world.dig(ns, gw, "db.blue.") == f"NOERROR {bare(db)}"
    assert world.dig(ns, gw, "db.blue", tcp=True) == f"NOERROR {bare(db)}"
    assert world.dig(ns, gw, "nobody").startswith("NXDOMAIN")
    assert world.dig(ns, gw, "nobody.blue").startswith("NXDOMAIN")
    reverse = ".".join(reversed(bare(db).split("."))) + ".in-addr.arpa"
    assert world.dig(ns, gw, reverse, "PTR") == "NOERROR db.blue."
    assert world.dig(ns, gw, "example.org").startswith("REFUSED")  # no upstream resolvers in the lab
    resolv = Path(f"/etc/netns/{ns}/resolv.conf")
    assert f"nameserver {gw}" in resolv.read_text()
    # The container moves to h2 (a new address there): its name follows it.
    world.overlay(3, "detach", lab.container_ns("db"))
    moved = world.attach(2, "db2", "blue", "--name", "db", "--ip", "198.19.42.77/24")
    wait_for(lambda: world.dig(ns, gw, "db") == f"NOERROR {bare(moved)}", 5, "db's new address on h1")
    world.overlay(1, "detach", ns)
    assert not resolv.exists()


def test_joining_networks_at_run_time_leaves_a_running_stream_untouched_and_the_last_container_leaves(
    world: World, tmp_path: Path
) -> None:
    lab = world.lab
    a = world.attach(1, "a", "blue")
    b = world.attach(2, "b", "blue")
    payload = tmp_path / "payload"
    payload.write_bytes(bytes(range(256)) * 40000)  # 10 MB
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    want = hashlib.sha256(payload.read_bytes()).hexdigest()
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(tcp_transfer, lab, lab.container_ns("a"), lab.container_ns("b"), bare(b), payload)  # type: ignore[arg-type]
        red = world.attach(1, "r", "red")  # joins red on demand
        assert world.overlay(1, "net", "join", "44", check=False).returncode != 0  # not in the registry
        got = stream.result(timeout=120)
    assert got == (want, payload.stat().st_size)
    nets = world.networks(1)
    assert nets[BLUE].get("pinned") and not nets[RED].get("pinned") and nets[RED]["gateway"] == "198.19.43.1"
    world.attach(2, "r2", "red")
    assert world.ping(lab.container_ns("r"), "198.19.43.3") or world.ping(lab.container_ns("r"), "198.19.43.2")
    assert not world.ping(lab.container_ns("r"), bare(a))  # isolated through the gateways
    refused = world.overlay(1, "net", "leave", "red", check=False)
    assert refused.returncode == 2 and "detach" in refused.stderr
    world.overlay(1, "detach", lab.container_ns("r"))
    wait_for(lambda: RED not in world.networks(1), 10, "h1 to leave red with its last container")
    assert "ovbr43" not in lab.run(1, ["ip", "-o", "link"]).stdout
    assert red["vni"] == RED
    refused = world.overlay(1, "net", "leave", "blue", check=False)
    assert refused.returncode == 2 and "--network" in refused.stderr
    world.overlay(3, "net", "join", "red")  # by hand: it stays without containers
    assert RED in world.networks(3)


def test_the_agents_stop_removes_its_table_and_leaves_other_tables_as_they_were(world: World) -> None:
    lab = world.lab
    lab.run(1, ["nft", "add", "table", "inet", "other"])
    lab.run(1, ["nft", "add", "chain", "inet", "other", "keep", "{ type filter hook input priority 0; }"])
    other = lab.run(1, ["nft", "list", "table", "inet", "other"]).stdout
    world.attach(1, "c", "blue")
    assert "table inet overlay" in lab.run(1, ["nft", "list", "tables"]).stdout
    forwarding = lab.run(1, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
    world.overlay(1, "detach", lab.container_ns("c"))
    world.agents[1].send_signal(signal.SIGTERM)
    assert world.agents[1].wait(timeout=15) == 0
    tables = lab.run(1, ["nft", "list", "tables"]).stdout
    assert "table inet overlay" not in tables and "table inet other" in tables
    assert lab.run(1, ["nft", "list", "table", "inet", "other"]).stdout == other
    assert forwarding == "1"
    assert lab.run(1, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"  # as it was before the agent


def test_a_firewall_that_drops_forwarded_traffic_is_named_at_start_with_the_fix(world: World) -> None:
    lab = world.lab
    assert stop_agent(world.agents[1]) == 0
    lab.run(1, ["nft", "add", "table", "ip", "filter"])
    lab.run(
        1, ["nft", "add", "chain", "ip", "filter", "FORWARD", "{ type filter hook forward priority 0; policy drop; }"]
    )
    world.start(1)
    log = world.tmp / f"agent-{lab.name}-h1-{TAP}.log"
    wait_for(lambda: "drops forwarded traffic" in log.read_text(), 10, "the agent's warning about table ip filter")
    line = next(x for x in log.read_text().splitlines() if "drops forwarded traffic" in x)
    assert "ip filter" in line and "FORWARD" in line and "-i ovgw+ -j ACCEPT" in line
    assert status(lab, 1, TAP)["egress"]["problems"]


def test_exposed_ports_are_published_all_at_once_and_found_by_srv_and_detach_removes_them(world: World) -> None:
    """Issue "exposed ports": an exposed port shows in endpoint ls; publish --all maps two
    exposed ports to two distinct high ports that answer the outside; an SRV query from another
    host's container gives the target and port; detaching removes all of it."""
    lab = world.lab
    svc = world.attach(1, "svc", "blue", "--name", "svc", "--expose", "80", "--expose", "8081/tcp")
    assert svc["exposed"] == ["80/tcp", "8081/tcp"]
    rows = json.loads(world.overlay(1, "endpoint", "ls", "--etcd", world.etcd.endpoint, "--json").stdout)
    assert any(r.get("ports") == ["80/tcp", "8081/tcp"] for r in rows)
    world.serve(lab.container_ns("svc"), "0.0.0.0", 80, "svc80")
    world.serve(lab.container_ns("svc"), "0.0.0.0", 8081, "svc8081")
    out = world.overlay(1, "publish", "svc", "--all").stdout.strip().splitlines()
    ports = sorted(int(line.split()[1].rsplit(":", 1)[1]) for line in out)
    assert len(ports) == 2 and ports[0] != ports[1] and all(p >= 1024 for p in ports)
    h1 = str(lab.address(1))
    answers = sorted(world.ask(world.outside, h1, p).split()[0] for p in ports)
    assert answers == ["svc80", "svc8081"]
    again = world.overlay(1, "publish", "svc", "--all", check=False)
    assert again.returncode == 2 and "published already" in again.stderr
    world.attach(3, "client", "blue")
    client = lab.container_ns("client")
    wait_for(lambda: "svc.blue." in world.dig(client, "198.19.42.1", "_http._tcp.svc", "SRV"), 5, "svc's SRV on h3")
    assert world.dig(client, "198.19.42.1", "_http._tcp.svc.blue", "SRV") == "NOERROR 0 0 80 svc.blue."
    assert world.dig(client, "198.19.42.1", "_8081._tcp.svc", "SRV").endswith(" 8081 svc.blue.")
    assert world.dig(client, "198.19.42.1", "_https._tcp.svc", "SRV").startswith("NXDOMAIN")
    world.overlay(1, "detach", lab.container_ns("svc"))
    assert all(world.ask(world.outside, h1, p).startswith("failed") for p in ports)
    rows = json.loads(world.overlay(1, "endpoint", "ls", "--etcd", world.etcd.endpoint, "--json").stdout)
    assert not any(r.get("ports") for r in rows)
    wait_for(lambda: world.dig(client, "198.19.42.1", "_http._tcp.svc", "SRV").startswith("NXDOMAIN"), 5, "SRV gone")


def test_bad_exposed_ports_are_refused_in_one_line(world: World) -> None:
    lab = world.lab
    for args, said in [
        (("attach", lab.add_container("e1"), "--net", "blue", "--expose", "70000"), "70000"),
        (("attach", lab.add_container("e2"), "--net", "blue", "--expose", "80/sctp"), "sctp"),
    ]:
        result = world.overlay(1, *args, check=False)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and said in result.stderr
    world.attach(1, "plain", "blue")
    nothing = world.overlay(1, "publish", lab.container_ns("plain"), "--all", check=False)
    assert nothing.returncode == 2 and "exposes no ports" in nothing.stderr


def test_a_container_on_a_network_joined_on_demand_is_taken_back_by_a_restarted_agent(world: World) -> None:
    lab = world.lab
    r = world.attach(1, "r", "red", "--publish", "8090:80")  # red joined on demand
    world.serve(lab.container_ns("r"), "0.0.0.0", 80, "r")
    h1 = str(lab.address(1))
    assert world.ask(world.outside, h1, 8090) == "r 198.18.0.210"
    assert stop_agent(world.agents[1]) == 0  # the container stays: so does its lease
    world.start(1)
    wait_for(lambda: RED in world.networks(1), 10, "red joined again for its container")
    adopted = {a["id"]: a for a in status(lab, 1, TAP)["attachments"]}
    assert adopted[r["id"]]["published"] == r["published"]
    keys = etcdlab.etcdctl(world.etcd, "get", "--prefix", "--keys-only", f"/overlay/v1/networks/{RED}/ipam/").stdout
    assert bare(r) in keys  # its address still held: no other host can take it
    assert world.ask(world.outside, h1, 8090) == "r 198.18.0.210"


def test_containers_never_reach_the_underlays_vxlan_port_through_the_hosts_nat(world: World) -> None:
    lab = world.lab
    world.attach(1, "c", "blue")
    send = "import socket\nfor _ in range(5): socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'\\x08' + bytes(15), ('198.18.0.2', 4789))"
    lab.run(lab.container_ns("c"), [sys.executable, "-c", send])
    forward = lab.run(1, ["nft", "list", "chain", "inet", "overlay", "forward"]).stdout
    line = next(x for x in forward.splitlines() if "udp dport 4789" in x)
    assert int(line.split("packets")[1].split()[0]) >= 5  # dropped on h1: h2 never sees h1's address send them


def test_ipv6_containers_reach_out_are_reached_and_found_through_the_ipv6_gateway(tmp_path: Path) -> None:
    """Dual stack: a network with gateway6 NATs its IPv6 containers to the host's IPv6
    underlay address, publishes onto their IPv6 address, and answers AAAA over IPv6."""
    with new_lab_with_etcd(hosts=2, prefix="y", dual_stack=True) as (lab, etcd):
        w = World(lab, etcd, tmp_path)
        try:
            w.overlay(
                1,
                *("net", "create", str(BLUE), "--name", "blue", "--subnet", "198.19.42.0/24"),
                *("--gateway", "198.19.42.1", "--subnet6", "2001:2:0:42::/64", "--gateway6", "2001:2:0:42::1"),
                *("--etcd", etcd.endpoint),
            )
            for h in (1, 2):
                w.start(h)
            outside6 = str(lab.address6("outside"))
            c2 = w.attach(2, "c2", "blue", "--name", "c2")
            ns = lab.container_ns("c2")
            six = c2["address6"].split("/")[0]
            wait_for(
                lambda: "tentative" not in lab.run(ns, ["ip", "-6", "addr", "show", "dev", "eth0"]).stdout, 10, "DAD"
            )
            w.serve(w.outside, outside6, 7000, "outside")
            assert w.ask(ns, outside6, 7000) == f"outside {lab.address6(2)}"  # masqueraded to h2's IPv6 address
            w.overlay(2, "publish", "c2", f"[{lab.address6(2)}]:8086:80")
            w.serve(ns, "::", 80, "c2")
            assert w.ask(w.outside, str(lab.address6(2)), 8086) == f"c2 {outside6}"
            w.attach(1, "c1", "blue")
            c1 = lab.container_ns("c1")
            wait_for(lambda: w.dig(c1, "2001:2:0:42::1", "c2", "AAAA") == f"NOERROR {six}", 5, "c2's AAAA over IPv6")
            forwarding = lab.run(2, ["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout.strip()
            assert forwarding == "1"
        finally:
            w.close()
