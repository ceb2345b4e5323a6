"""overlay/io/nft.py on a real kernel, in network namespaces made for each test: the table
applies, replaces itself, fails without a trace, leaves other tables alone and goes; and the
rules of overlay/core/nat.py mean what they say, shown with plain ``ip`` and TCP on a lab:

    blue  198.19.42.2/24 ┐                        ┌ host (lab host 1) ───────────────────────┐
    blue2 198.19.42.3/24 ┴─ ovbr42 ─ ovgp42 = ovgw42 198.19.42.1/24                          │
    red   198.19.43.2/24 ── ovbr43 ─ ovgp43 = ovgw43 198.19.43.1/24    eth0 198.18.0.1/24 ───┼─ outside 198.18.0.250
                                                                                              (lab service)

The containers route by default via their gateway; the host forwards; outside has no route to
198.19.0.0/16, so nothing from a container reaches it unless masqueraded. blue publishes its
port 80 as the host's 8080.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import pytest
from pyroute2 import netns

from overlay.core import nat
from overlay.core.gateway import gateway_mac
from overlay.core.ports import parse
from overlay.core.wire import mac_to_str
from overlay.io import nft, ports
from overlay.lab import Lab, wait_for
from tests.labkit import new_lab

pytestmark = pytest.mark.root
BRIDGE_NF = "net.bridge.bridge-nf-call-iptables"
_numbers = itertools.count(1)

BLUE = nat.GatewayNet(
    42,
    IPv4Network("198.19.42.0/24"),
    IPv4Address("198.19.42.1"),
    IPv6Network("2001:2:0:42::/64"),
    IPv6Address("2001:2:0:42::1"),
)
RED = nat.GatewayNet(43, IPv4Network("198.19.43.0/24"), IPv4Address("198.19.43.1"), nat=False)


def pub(spec: str, address: str, vni: int = 42, owner: str = "att-blue") -> nat.Published:
    return nat.Published(parse(spec), ip_address(address), vni, owner)


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """This thread (and the nft it runs, the sockets it makes, the /proc/sys it opens) inside
    namespace ``ns`` for the block."""
    netns.pushns(ns)
    try:
        yield
    finally:
        netns.popns()


@pytest.fixture
def ns() -> Iterator[str]:
    """A bare network namespace of this test, removed afterwards."""
    name = f"nft{os.getpid() % 100000}x{next(_numbers)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        with inside(name):
            yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def listing(*what: str) -> str:
    """``nft list`` of ``what`` (default: the whole ruleset) in this namespace, with handles."""
    args = ["list", *what] if what else ["list", "ruleset"]
    return subprocess.run(["nft", "-a", *args], capture_output=True, text=True, check=True, timeout=10).stdout


def nft_script(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, timeout=10, capture_output=True)


OTHERS = """\
table ip filter {
	chain FORWARD { type filter hook forward priority filter; policy drop; counter jump DOCKER-USER; }
	chain DOCKER-USER { iifname "eth9" accept; return; }
}
table inet other {
	set blocked { type ipv4_addr; elements = { 198.18.7.7 } }
	chain input { type filter hook input priority 0; policy accept; ip saddr @blocked drop; }
}
"""

SCRIPTS = {
    "nothing": ([], [], False),
    "one network": ([BLUE], [], False),
    "two networks, forwarding ours only": ([BLUE, RED], [], True),
    "an IPv6-only network": (
        [nat.GatewayNet(45, None, None, IPv6Network("2001:2:0:45::/64"), IPv6Address("2001:2:0:45::1"))],
        [],
        False,
    ),
    "publications of every kind": (
        [BLUE, RED],
        [
            pub("8080:80", "198.19.42.2"),
            pub("198.18.0.1:5353:53/udp", "198.19.42.2"),
            pub("[2001:2:0:1::1]:8443:443", "2001:2:0:42::2"),
            pub("8444:443", "2001:2:0:42::2"),
            pub("9000:90", "198.19.43.2", 43, owner='red" ; drop \\ everything'),
            pub("[2001:2:0:1::1]:9001:90", "198.19.43.2", 43),  # of the other family: left out
        ],
        True,
    ),
    "a publication on a network without gateway": ([], [pub("8080:80", "198.19.42.2", 46)], False),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_kind_of_table_is_accepted_by_nft_and_applied_whole(ns, name):
    networks, published, ours = SCRIPTS[name]
    script = nat.ruleset(networks, published, ours)
    nft.check(script)
    assert nft.table_json() is None  # a check changes nothing
    nft.apply(script)
    table = nft.table_json()
    assert table is not None
    items = table["nftables"]  # type: ignore[index]
    chains = sorted(i["chain"]["name"] for i in items if "chain" in i)
    assert chains == ["bridged", "forward", "output", "postrouting", "prerouting"]
    assert sum(1 for i in items if "rule" in i) == nat.count_rules(script)


def test_nft_is_available_in_a_namespace_of_root(ns):
    assert nft.available() is None


def test_applying_twice_replaces_the_table(ns):
    nft.apply(nat.ruleset([BLUE], [pub("8080:80", "198.19.42.2")]))
    nft.apply(nat.ruleset([BLUE, RED], [pub("9090:80", "198.19.42.2")]))
    text = listing("table", "inet", "overlay")
    assert "dport 9090" in text and "dport 8080" not in text and "ovgw43" in text
    assert text.count("chain prerouting {") == 1
    assert listing().count("table inet overlay {") == 1


@pytest.mark.parametrize(
    "broken",
    [
        "junk\n",  # refused by nft's parser: nothing reaches the kernel
        "add rule inet overlay forward jump nosuch\n",  # refused by the kernel, mid-transaction
    ],
)
def test_a_failing_apply_leaves_the_old_table_byte_identical(ns, broken):
    nft_script(OTHERS)
    nft.apply(nat.ruleset([BLUE], [pub("8080:80", "198.19.42.2")]))
    before = listing()
    with pytest.raises(nft.NftError) as e:
        nft.apply(nat.ruleset([BLUE, RED], [pub("9090:80", "198.19.42.2")], True) + broken)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("nft refused the overlay table (the previous one stays): /dev/stdin:")
    assert listing() == before


def test_a_failing_first_apply_leaves_no_table(ns):
    with pytest.raises(nft.NftError):
        nft.apply(nat.ruleset([BLUE], []) + "add rule inet overlay forward jump nosuch\n")
    assert nft.table_json() is None


def test_other_tables_are_untouched_by_apply_and_remove(ns):
    nft_script(OTHERS)
    others = listing()
    nft.apply(nat.ruleset([BLUE], [pub("8080:80", "198.19.42.2")], True))
    nft.apply(nat.ruleset([RED], []))
    assert listing("table", "ip", "filter") + listing("table", "inet", "other") == others
    assert nft.remove() is True
    assert listing() == others


def test_remove_deletes_the_table_and_says_whether_it_was_there(ns):
    assert nft.remove() is False
    nft.apply(nat.ruleset([BLUE], []))
    assert nft.remove() is True
    assert nft.table_json() is None
    assert nft.remove() is False
    nft.apply(nat.removal())  # the removal script does not fail on a missing table


def test_the_ruleset_json_is_what_firewall_problems_reads(ns):
    nft_script(OTHERS)
    nft.apply(nat.ruleset([BLUE], []))
    problems = nat.firewall_problems(nft.ruleset_json(), "1")
    assert [p.split(":")[0] for p in problems] == [
        "table ip filter chain FORWARD drops forwarded traffic by default (Docker sets this)",
        "br_netfilter is loaded with net.bridge.bridge-nf-call-iptables=1 and table ip filter chain FORWARD "
        "drops forwarded traffic by default",
    ]
    nft_script(
        'insert rule ip filter DOCKER-USER iifname "ovgw*" accept\n'
        'insert rule ip filter DOCKER-USER oifname "ovgw*" accept\n'
        'insert rule ip filter FORWARD iifname "ovbr*" oifname "ovbr*" accept\n'
    )
    assert nat.firewall_problems(nft.ruleset_json(), "1") == []


def test_sysctls_are_read_and_set_in_this_namespace(ns):
    assert nft.sysctl("net.ipv4.ip_forward") == "0"  # a new namespace does not forward
    nft.set_sysctl("net.ipv4.ip_forward", "1")
    assert nft.sysctl("net.ipv4.ip_forward") == "1"
    assert nft.sysctl("net/ipv4/ip_forward") == "1"
    assert nft.sysctl("net.ipv4.no_such_thing") is None
    with pytest.raises(nft.NftError, match=r"^there is no sysctl net.ipv4.no_such_thing on this host"):
        nft.set_sysctl("net.ipv4.no_such_thing", "1")
    with pytest.raises(nft.NftError, match=r"^cannot set net.ipv4.ip_forward=x \(Invalid argument\)"):
        nft.set_sysctl("net.ipv4.ip_forward", "x")


def test_a_missing_nft_is_one_line_with_the_fix(monkeypatch):
    monkeypatch.setattr(nft, "NFT", "/nonexistent/nft")
    assert nft.available() == "nft is not installed: install Debian's nftables package ('apt-get install nftables')"
    with pytest.raises(nft.NftError, match="install Debian's nftables package"):
        nft.apply(nat.removal())


def test_without_cap_net_admin_nft_says_it_is_needed(ns):
    code = "from overlay.io import nft; from overlay.core import nat\nprint(nft.available())\n"
    code += "try:\n    nft.apply(nat.removal())\nexcept nft.NftError as e:\n    print(e)\n"
    result = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stderr
    assert all("needs CAP_NET_ADMIN (run it as root)" in line for line in lines)


# --- what the rules mean: traffic on a lab ---------------------------------------------------------

SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
srv.settimeout(120)
while True:
    conn, peer = srv.accept()
    with conn:
        conn.sendall(f"{peer[0]}\\n".encode())
"""

CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as s:
        s.settimeout(2)
        print(s.recv(100).decode().strip())
except OSError as e:
    print("failed", e)
    sys.exit(1)
"""


class World:
    """The lab of the module docstring (``up`` builds it, the Lab tears it down)."""

    OUTSIDE = "198.18.0.250"
    HOST = "198.18.0.1"

    def __init__(self, lab: Lab, path: str, bridge_netfilter: bool) -> None:
        self.lab = lab
        self.host = lab.ns(1)
        self.path = path
        self.bridge_netfilter = bridge_netfilter

    def up(self) -> World:
        self.outside = self.lab.add_service("outside", 250)
        self.containers: dict[str, str] = {}
        for vni, gateway in ((42, "198.19.42.1/24"), (43, "198.19.43.1/24")):
            self.ip(
                f"link add ovbr{vni} type bridge",
                f"link set ovbr{vni} up",
                f"link add ovgw{vni} address {mac_to_str(gateway_mac(vni))} type veth peer name ovgp{vni}",
                f"link set ovgp{vni} master ovbr{vni} up",
                f"addr add {gateway} dev ovgw{vni}",
                f"link set ovgw{vni} up",
            )
        for name, vni, address in (
            ("blue", 42, "198.19.42.2"),
            ("blue2", 42, "198.19.42.3"),
            ("red", 43, "198.19.43.2"),
        ):
            ns = self.lab.add_container(name)
            self.containers[name] = ns
            port = f"c{name}"
            self.ip(f"link add {port} type veth peer name eth0 netns {ns}", f"link set {port} master ovbr{vni} up")
            gateway = f"198.19.{vni}.1"
            for cmd in (f"addr add {address}/24 dev eth0", "link set eth0 up", f"route add default via {gateway}"):
                self.lab.run(ns, ["ip", *cmd.split()], timeout=10)
        with inside(self.host):
            nft.set_sysctl("net.ipv4.ip_forward", "1")
            if nft.sysctl(BRIDGE_NF) is not None:
                nft.set_sysctl(BRIDGE_NF, "1" if self.bridge_netfilter else "0")
            # Who answers ARP for the gateway: by default both the veth and the bridge device
            # (arp_ignore 0), whichever first. One of them, to know the path taken.
            quiet = "ovbr" if self.path == "ovgw" else "ovgw"
            for vni in (42, 43):
                nft.set_sysctl(f"net.ipv4.conf.{quiet}{vni}.arp_ignore", "1" if quiet == "ovbr" else "8")
        self.lab.spawn(self.containers["blue"], [sys.executable, "-c", SERVER, "0.0.0.0", "80"])
        self.lab.spawn(self.outside, [sys.executable, "-c", SERVER, self.OUTSIDE, "7000"])
        wait_for(lambda: self.ask("blue", "198.19.42.2", 80) == "198.19.42.2", 15, "the server in blue")
        wait_for(lambda: self.ask("outside", self.OUTSIDE, 7000) == self.OUTSIDE, 15, "the server outside")
        return self

    def ip(self, *commands: str) -> None:
        for cmd in commands:
            self.lab.run(self.host, ["ip", *cmd.split()], timeout=10)

    def where(self, who: str) -> str:
        return {"host": self.host, "outside": self.outside}.get(who) or self.containers[who]

    def ask(self, who: str, address: str, port: int) -> str | None:
        """What the server at ``address``:``port`` says to ``who`` (the address it saw the
        connection come from), or None if it cannot be reached within 2 s."""
        result = self.lab.run(
            self.where(who), [sys.executable, "-c", CLIENT, address, str(port)], check=False, timeout=20
        )
        return result.stdout.strip() if result.returncode == 0 else None

    def ping(self, who: str, address: str) -> bool:
        cmd = ["ping", "-n", "-c", "1", "-W", "1", address]
        return self.lab.run(self.where(who), cmd, check=False, timeout=10).returncode == 0

    def apply(self, script: str) -> None:
        with inside(self.host):
            nft.apply(script)


@pytest.fixture(scope="module", params=["ovgw", "ovgw+br_netfilter", "ovbr"])
def world(request) -> Iterator[World]:
    """The world, with containers' traffic reaching the host on the gateway veth (``ovgw``:
    the plumbing's intent), the same with br_netfilter handing bridged frames to the IP hooks
    (bridge-nf-call-iptables=1, as on Docker hosts), or on the bridge device (``ovbr``: its ARP
    answered first)."""
    path, _, extra = request.param.partition("+")
    if extra and nft.sysctl(BRIDGE_NF) is None:
        pytest.skip("br_netfilter is not loaded here")
    with new_lab(hosts=1, prefix="n") as lab:  # short: interface names carry the lab's name
        yield World(lab, path, bridge_netfilter=bool(extra)).up()


def test_without_the_table_routing_works_and_nothing_is_natted(world):
    world.apply(nat.removal())
    assert world.ping("red", "198.19.42.2")  # so the isolation below is the table's doing
    assert not world.ping("blue", World.OUTSIDE)  # outside has no route back to a container
    assert world.ask("outside", World.HOST, 8080) is None


@pytest.fixture
def ruled(world) -> Iterator[World]:
    """The world with blue's port 80 published as the host's 8080 (held by a reservation, as
    the agent holds it), blue masqueraded, red not."""
    with inside(world.host):
        held = ports.reserve(parse("8080:80"), socket.AF_INET)
    try:
        world.apply(nat.ruleset([BLUE, nat.GatewayNet(43, RED.subnet, RED.gateway)], [pub("8080:80", "198.19.42.2")]))
        yield world
    finally:
        held.close()
        world.apply(nat.removal())


def test_a_containers_egress_leaves_with_the_hosts_address(ruled):
    assert ruled.ping("blue", World.OUTSIDE)
    assert ruled.ask("blue", World.OUTSIDE, 7000) == World.HOST
    assert ruled.ask("red", World.OUTSIDE, 7000) == World.HOST


def test_the_outside_reaches_a_published_port_through_the_hosts_address(ruled):
    assert ruled.ask("outside", World.HOST, 8080) == World.OUTSIDE  # no SNAT: the container sees its client


def test_the_host_itself_reaches_its_published_port_through_its_own_address(ruled):
    assert ruled.ask("host", World.HOST, 8080) == World.HOST


def test_another_network_cannot_route_to_a_container_but_reaches_its_published_port(ruled):
    assert not ruled.ping("red", "198.19.42.2")
    assert ruled.ask("red", "198.19.42.2", 80) is None
    assert ruled.ask("red", World.HOST, 8080) == "198.19.43.2"


def test_a_container_of_the_same_network_reaches_the_published_port_through_the_gateway(ruled):
    assert ruled.ask("blue2", World.HOST, 8080) == "198.19.42.1"  # hairpin: the reply comes back via the host
    assert ruled.ask("blue", World.HOST, 8080) == "198.19.42.1"  # a container, its own published port
    assert ruled.ping("blue2", "198.19.42.2")  # on their bridge: not routed, not natted


def test_the_dnat_rules_count_their_packets_under_their_owners_name(ruled):
    assert ruled.ask("outside", World.HOST, 8080) == World.OUTSIDE
    with inside(ruled.host):
        table = nft.table_json()
    rules = [i["rule"] for i in table["nftables"] if "rule" in i]  # type: ignore[index]
    dnat = [r for r in rules if r["chain"] == "prerouting"]
    assert [r.get("comment") for r in dnat] == ["att-blue"]
    counter = next(e["counter"] for e in dnat[0]["expr"] if "counter" in e)
    assert counter["packets"] >= 1
