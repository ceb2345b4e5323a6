"""The operator commands (`overlay net|host|endpoint`) as a user runs them: real processes against
a real etcd on the root loopback (Debian's etcd, overlay.etcdlab); etcdctl put/del of a key of
the schema and the command have the same effect. Each test works under a prefix of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Iterator

import pytest

from overlay.core.registry import Endpoint, Network, Schema
from overlay.lab import etcd as etcdlab

CLI = [sys.executable, "-m", "overlay"]


def overlay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def overlay_many(*argvs: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Several independent invocations at once (they do not touch etcd's state): faster."""
    procs = [
        subprocess.Popen(
            [*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
        )
        for argv in argvs
    ]
    results = []
    for argv, p in zip(argvs, procs):
        out, err = p.communicate(timeout=30)
        results.append(subprocess.CompletedProcess([*CLI, *argv], p.returncode, out, err))
    return results


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The result failed with ``code`` and one line on stderr naming ``words``; that line."""
    assert result.returncode == code, (result.args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("overlay: error: "), result.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


class Etcd:
    """The module's etcd, seen under one prefix."""

    def __init__(self, server: etcdlab.EtcdServer, prefix: str) -> None:
        self.server, self.prefix, self.schema = server, prefix, Schema(prefix)

    def cli(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return overlay(*args, "--etcd", self.server.endpoint, "--prefix", self.prefix, **kw)

    def json(self, *args: str) -> Any:
        return json.loads(ok(self.cli(*args, "--json")))

    def ctl(self, *args: str) -> str:
        return etcdlab.etcdctl(self.server, *args, check=True).stdout

    def value(self, key: str) -> str:
        return self.ctl("get", "--print-value-only", self.prefix + key).rstrip("\n")

    def keys(self) -> list[str]:
        return self.ctl("get", "--prefix", "--keys-only", self.prefix + "/").split()


@pytest.fixture(scope="module")
def server() -> Iterator[etcdlab.EtcdServer]:
    with etcdlab.single() as s:
        yield s


@pytest.fixture
def etcd(server: etcdlab.EtcdServer, request: pytest.FixtureRequest) -> Etcd:
    return Etcd(server, f"/t/{request.node.name}")


# --- networks ---------------------------------------------------------------------------------


@pytest.mark.etcd
def test_net_create_ls_rm_with_duplicates_and_members(etcd: Etcd) -> None:
    out = ok(etcd.cli("net", "create", "42", "--subnet", "198.19.42.0/24", "--mtu", "1450", "--name", "blue"))
    assert "created network 42" in out
    # Exactly what the agents decode: Schema.encode of the registry type.
    assert etcd.value("/networks/42") == etcd.schema.encode(Network(42, "blue", "198.19.42.0/24", 1450)).decode()
    one_line_error(etcd.cli("net", "create", "42"), 1, "network 42 exists")
    one_line_error(
        etcd.cli("net", "create", "421", "--subnet", "198.19.42.0/24", "--gateway", "198.19.42.255"),
        2,
        "not a host address",
    )
    assert json.loads(etcd.value("/networks/42"))["name"] == "blue"  # not overwritten
    assert etcd.json("net", "create", "420") == {
        "vni": 420,
        "name": "net420",
        "subnet": None,
        "mtu": None,
        "gateway": None,
        "subnet6": None,
        "gateway6": None,
        "encrypted": False,
        "nat": False,  # no gateway: nothing to masquerade behind (the default, resolved)
    }
    assert etcd.value("/networks/420") == etcd.schema.encode(Network(420, "net420")).decode()

    # A member (an agent's, under its lease) and endpoints; 420 shares 42's digits, not its keys.
    lease = etcd.ctl("lease", "grant", "30").split()[1]
    etcd.ctl("put", f"--lease={lease}", f"{etcd.prefix}/networks/42/members/h1", "{}")
    etcd.ctl("put", f"{etcd.prefix}/networks/42/endpoints/02:00:00:00:00:05", '{"host": "h1"}')
    etcd.ctl("put", f"{etcd.prefix}/networks/420/endpoints/02:00:00:00:00:06", '{"host": "h1"}')
    rows = etcd.json("net", "ls")
    assert rows == [
        {
            "vni": 42,
            "name": "blue",
            "subnet": "198.19.42.0/24",
            "mtu": 1450,
            "subnet6": None,
            "encrypted": False,
            "defined": True,
            "members": 1,
            "endpoints": 1,
            "gateway": None,
            "gateway6": None,
            "nat": False,
        },
        {
            "vni": 420,
            "name": "net420",
            "subnet": None,
            "mtu": None,
            "subnet6": None,
            "encrypted": False,
            "defined": True,
            "members": 0,
            "endpoints": 1,
            "gateway": None,
            "gateway6": None,
            "nat": False,
        },
    ]
    table = ok(etcd.cli("net", "ls")).splitlines()
    assert table[0].split() == [
        *["VNI", "NAME", "SUBNET", "SUBNET6", "MTU", "ENCRYPTED", "MEMBERS", "ENDPOINTS"],
        *["GATEWAY", "NAT"],  # added last: the columns before keep their places
    ]
    assert table[1].split() == ["42", "blue", "198.19.42.0/24", "-", "1450", "no", "1", "1", "-", "off"]

    one_line_error(etcd.cli("net", "rm", "42"), 1, "network 42 has 1 member (h1)", "--force")
    assert f"{etcd.prefix}/networks/42" in etcd.keys()
    assert etcd.json("net", "rm", "42", "--force") == {
        "vni": 42,
        "deleted_keys": 3,
        "defined": True,
        "members": 1,
        "endpoints": 1,
    }
    assert etcd.keys() == [f"{etcd.prefix}/networks/420", f"{etcd.prefix}/networks/420/endpoints/02:00:00:00:00:06"]
    one_line_error(etcd.cli("net", "rm", "42"), 1, "network 42 does not exist")
    assert "removed network 420" in ok(etcd.cli("net", "rm", "420"))  # no members: no --force needed
    assert etcd.keys() == []


@pytest.mark.etcd
def test_net_create_with_subnet6_and_gateway6_writes_them_and_ls_shows_subnet6(etcd: Etcd) -> None:
    created = etcd.json(
        "net",
        "create",
        "42",
        "--subnet",
        "198.19.42.0/24",
        "--subnet6",
        "2001:2:0:42:0::/64",
        "--gateway6",
        "2001:2:0:42::1",
    )
    assert created == {
        "vni": 42,
        "name": "net42",
        "subnet": "198.19.42.0/24",
        "mtu": None,
        "gateway": None,
        "subnet6": "2001:2:0:42::/64",  # canonical (RFC 5952), as the agents read it
        "gateway6": "2001:2:0:42::1",
        "encrypted": False,
        "nat": True,  # a gateway (gateway6): masqueraded by default
    }
    assert (
        etcd.value("/networks/42")
        == etcd.schema.encode(
            Network(42, "net42", "198.19.42.0/24", subnet6="2001:2:0:42::/64", gateway6="2001:2:0:42::1")
        ).decode()
    )
    assert "subnet -, mtu -, subnet6 2001:2:0:43::/120)" in ok(
        etcd.cli("net", "create", "43", "--subnet6", "2001:2:0:43::/120")
    )
    assert [(r["vni"], r["subnet"], r["subnet6"]) for r in etcd.json("net", "ls")] == [
        (42, "198.19.42.0/24", "2001:2:0:42::/64"),
        (43, None, "2001:2:0:43::/120"),
    ]
    assert ok(etcd.cli("net", "ls")).splitlines()[2].split()[:4] == ["43", "net43", "-", "2001:2:0:43::/120"]


def test_a_bad_subnet6_or_gateway6_is_one_line_exit_2_and_nothing_is_written() -> None:
    nowhere = ["--etcd", "http://127.0.0.1:9"]  # never reached: the input is checked first
    create = ["net", "create", "42", "--subnet", "198.19.42.0/24"]
    not_v6, v4, too_big, too_small, host_bits, outside, anycast, bare, no_subnet6 = overlay_many(
        [*create, "--subnet6", "nonsense", *nowhere],
        [*create, "--subnet6", "198.19.42.0/24", *nowhere],
        [*create, "--subnet6", "2001:2::/48", *nowhere],
        [*create, "--subnet6", "2001:2:0:42::/124", *nowhere],
        [*create, "--subnet6", "2001:2:0:42::1/64", *nowhere],
        [*create, "--subnet6", "2001:2:0:42::/64", "--gateway6", "2001:2:0:43::1", *nowhere],
        [*create, "--subnet6", "2001:2:0:42::/64", "--gateway6", "2001:2:0:42::", *nowhere],
        [*create, "--subnet6", "2001:2:0:42::/64", "--gateway6", "198.19.42.1", *nowhere],
        [*create, "--gateway6", "2001:2:0:42::1", *nowhere],
    )
    one_line_error(not_v6, 2, "--subnet6 'nonsense' is not an IPv6 network", "2001:2:0:42::/64")
    one_line_error(v4, 2, "--subnet6 '198.19.42.0/24' is not an IPv6 network")
    one_line_error(too_big, 2, "--subnet6 2001:2::/48 is a /48", "/64 to /120")
    one_line_error(too_small, 2, "--subnet6 2001:2:0:42::/124 is a /124", "/64 to /120")
    one_line_error(host_bits, 2, "host bits", "2001:2:0:42::/64")
    one_line_error(outside, 2, "--gateway6 2001:2:0:43::1 is not a host address of --subnet6 2001:2:0:42::/64")
    one_line_error(anycast, 2, "--gateway6 2001:2:0:42:: is not a host address")
    one_line_error(bare, 2, "--gateway6 '198.19.42.1' is not an IPv6 address")
    one_line_error(no_subnet6, 2, "--gateway6 needs --subnet6")


# --- endpoints --------------------------------------------------------------------------------


@pytest.mark.etcd
def test_endpoint_add_ls_rm_and_etcdctl_put_del_are_the_same(etcd: Etcd) -> None:
    ok(etcd.cli("net", "create", "42"))
    r = etcd.cli(
        "endpoint",
        "add",
        "--net",
        "42",
        "--mac",
        "02:00:00:00:00:AA",
        "--host",
        "h2",
        "--ip",
        "198.19.42.10",
        "fd00::a",
        "--ip",
        "198.19.42.11",
    )
    assert "added endpoint 02:00:00:00:00:aa" in ok(r)
    assert "warning: host h2 is not registered" in r.stderr  # a warning, not an error
    key = "/networks/42/endpoints/02:00:00:00:00:aa"
    assert etcd.value(key) == etcd.schema.encode(Endpoint("h2", ["198.19.42.10", "198.19.42.11"], ["fd00::a"])).decode()
    assert etcd.ctl("get", "-w", "json", etcd.prefix + key).count('"lease"') == 0  # written without a lease

    # etcdctl put of a schema value: `endpoint ls` shows it as if the command had added it.
    etcd.ctl(
        "put",
        f"{etcd.prefix}/networks/42/endpoints/02:00:00:00:00:bb",
        '{"host": "h3", "ipv4": ["198.19.42.20"], "name": "web", "ports": ["80/tcp", "53/udp"]}',
    )
    etcd.ctl("put", f"{etcd.prefix}/networks/42/endpoints/02:00:00:00:00:cc", '{"host": 7}')  # bad: skipped, warned
    r = etcd.cli("endpoint", "ls", "--net", "42", "--json")
    assert json.loads(ok(r)) == [
        {
            "vni": 42,
            "mac": "02:00:00:00:00:aa",
            "host": "h2",
            "ipv4": ["198.19.42.10", "198.19.42.11"],
            "ipv6": ["fd00::a"],
            "lease": None,
            "static": True,
            "ports": [],
        },
        {
            "vni": 42,
            "mac": "02:00:00:00:00:bb",
            "host": "h3",
            "ipv4": ["198.19.42.20"],
            "ipv6": [],
            "lease": None,
            "static": True,
            "ports": ["80/tcp", "53/udp"],  # exposed (attach --expose, CNI portMappings)
        },
    ]
    assert "ignoring" in r.stderr and "02:00:00:00:00:cc" in r.stderr
    etcd.ctl("del", f"{etcd.prefix}/networks/42/endpoints/02:00:00:00:00:cc")
    table = ok(etcd.cli("endpoint", "ls")).splitlines()
    assert table[0].split() == ["VNI", "MAC", "HOST", "IPV4", "IPV6", "LEASE", "PORTS"]  # PORTS added last
    assert table[1].split()[-2:] == ["static", "-"]  # none exposed
    assert table[2].split() == ["42", "02:00:00:00:00:bb", "h3", "198.19.42.20", "-", "static", "80/tcp,53/udp"]

    # etcdctl del and `endpoint rm` both take it away.
    etcd.ctl("del", f"{etcd.prefix}/networks/42/endpoints/02:00:00:00:00:bb")
    assert [e["mac"] for e in etcd.json("endpoint", "ls")] == ["02:00:00:00:00:aa"]
    removed = etcd.json("endpoint", "rm", "--net", "42", "--mac", "02-00-00-00-00-AA")
    assert removed["mac"] == "02:00:00:00:00:aa" and removed["host"] == "h2" and removed["static"] is True
    assert removed["ports"] == []
    assert etcd.keys() == [f"{etcd.prefix}/networks/42"]
    one_line_error(
        etcd.cli("endpoint", "rm", "--net", "42", "--mac", "02:00:00:00:00:aa"),
        1,
        "no endpoint 02:00:00:00:00:aa on network 42",
    )


@pytest.mark.etcd
def test_endpoint_add_leaves_an_agents_endpoint_alone(etcd: Etcd) -> None:
    lease = etcd.ctl("lease", "grant", "30").split()[1]
    etcd.ctl("put", f"--lease={lease}", f"{etcd.prefix}/networks/7/endpoints/02:00:00:00:00:01", '{"host": "h1"}')
    one_line_error(
        etcd.cli("endpoint", "add", "--net", "7", "--mac", "02:00:00:00:00:01", "--host", "h2"),
        1,
        "held by an agent",
        lease,
    )
    assert json.loads(etcd.value("/networks/7/endpoints/02:00:00:00:00:01"))["host"] == "h1"


# --- hosts ------------------------------------------------------------------------------------


@pytest.mark.etcd
def test_host_ls_shows_a_leased_host_alive_with_its_ttl(etcd: Etcd) -> None:
    lease = etcd.ctl("lease", "grant", "30").split()[1]  # "lease 694d... granted with TTL(30s)"
    etcd.ctl("put", f"--lease={lease}", f"{etcd.prefix}/hosts/h1", '{"address": "198.18.0.1", "port": 4789}')
    etcd.ctl("put", f"--lease={lease}", f"{etcd.prefix}/networks/42/members/h1", "{}")
    etcd.ctl("put", f"{etcd.prefix}/networks/42/endpoints/02:00:00:00:00:09", '{"host": "h9"}')  # h9: no key
    rows = etcd.json("host", "ls")
    assert [r["host"] for r in rows] == ["h1", "h9"]
    h1, h9 = rows
    assert h1["alive"] is True and 1 <= h1["ttl"] <= 30 and int(h1["lease"], 16) == int(lease, 16)
    assert h1 | {"ttl": 0} == {
        "host": "h1",
        "address": "198.18.0.1",
        "port": 4789,
        "alive": True,
        "lease": h1["lease"],
        "ttl": 0,
        "networks": [42],
        "rtt_ms": None,
        "loss": None,
        "reachable": None,
        "address6": None,
        "pubkey": None,
    }  # no agent here: no probes
    assert h9 == {
        "host": "h9",
        "address": None,
        "port": None,
        "alive": False,
        "lease": None,
        "ttl": None,
        "networks": [],
        "rtt_ms": None,
        "loss": None,
        "reachable": None,
        "address6": None,
        "pubkey": None,
    }
    table = ok(etcd.cli("host", "ls")).splitlines()
    assert table[0].split() == ["HOST", "VTEP", "ALIVE", "TTL", "NETWORKS", "KEY", "RTT", "LOSS", "PATH"]
    cells = table[1].split()
    assert cells[:3] == ["h1", "198.18.0.1:4789", "yes"] and cells[4:] == ["s", "42", "-", "-", "-", "-"]
    assert table[2].split()[:3] == ["h9", "-", "no"]
    # The VNI has members but no definition: listed as such.
    assert etcd.json("net", "ls")[0] == {
        "vni": 42,
        "name": None,
        "subnet": None,
        "mtu": None,
        "subnet6": None,
        "encrypted": None,
        "defined": False,
        "members": 1,
        "endpoints": 1,
        "gateway": None,
        "gateway6": None,
        "nat": None,
    }


# --- errors and help --------------------------------------------------------------------------


def test_bad_input_is_one_line_exit_2_before_any_connection() -> None:
    nowhere = ["--etcd", "http://127.0.0.1:9"]  # never reached: the input is checked first
    bad_mac, multicast, bad_vni, big_vni, bad_net, bad_host, bad_ip, host_bits, bad_etcd, https = overlay_many(
        ["endpoint", "add", "--net", "42", "--mac", "02:00:00:00:00", "--host", "h1", *nowhere],
        ["endpoint", "add", "--net", "42", "--mac", "ff:ff:ff:ff:ff:ff", "--host", "h1", *nowhere],
        ["net", "create", "forty-two", *nowhere],
        ["net", "rm", "16777216", *nowhere],
        ["endpoint", "ls", "--net", "x", *nowhere],
        ["endpoint", "add", "--net", "42", "--mac", "02:00:00:00:00:01", "--host=-h1", *nowhere],
        [
            "endpoint",
            "add",
            "--net",
            "42",
            "--mac",
            "02:00:00:00:00:01",
            "--host",
            "h1",
            "--ip",
            "198.19.0.300",
            *nowhere,
        ],
        ["net", "create", "42", "--subnet", "198.19.42.1/24", *nowhere],
        ["net", "ls", "--etcd", "ftp://somewhere"],
        ["host", "ls", "--etcd", "https://127.0.0.1:2379"],
    )
    one_line_error(bad_mac, 2, "--mac '02:00:00:00:00' is not a MAC address", "02:00:00:00:00:01")
    one_line_error(multicast, 2, "--mac ff:ff:ff:ff:ff:ff", "unicast")
    one_line_error(bad_vni, 2, "'forty-two' is not a VNI", "0 to 16777215")
    one_line_error(big_vni, 2, "'16777216' is not a VNI")
    one_line_error(bad_net, 2, "--net 'x' is not a VNI")
    one_line_error(bad_host, 2, "--host '-h1' is not a host id", "e.g. h1")
    one_line_error(bad_ip, 2, "--ip '198.19.0.300' is not an IP address")
    one_line_error(host_bits, 2, "host bits", "198.19.42.0/24")
    one_line_error(bad_etcd, 2, "http://HOST:PORT")
    one_line_error(https, 2, "--etcd-ca")


def test_unreachable_etcd_is_one_line_exit_1() -> None:
    port, other = etcdlab.free_ports(2)  # nothing listens there
    flag = overlay("net", "ls", "--etcd", f"http://127.0.0.1:{port}")
    env = overlay("host", "ls", "--json", env={"OVERLAY_ETCD": f"127.0.0.1:{port},127.0.0.1:{other}"})
    one_line_error(flag, 1, f"no etcd answered at http://127.0.0.1:{port}: start etcd or give --etcd")
    one_line_error(env, 1, f"no etcd answered at http://127.0.0.1:{port}, http://127.0.0.1:{other}")
    assert flag.stdout == env.stdout == ""


def test_help_teaches_with_examples() -> None:
    results = overlay_many(
        ["--help"],
        ["net", "--help"],
        ["net", "create", "--help"],
        ["host", "ls", "--help"],
        ["endpoint", "add", "--help"],
        ["endpoint", "rm", "--help"],
        ["endpoint", "ls", "--help"],
    )
    top, net, create, host, add, rm, ls = (ok(r) for r in results)
    assert "PORTS" in ls and "--expose" in ls and "portMappings" in ls
    assert all(w in top for w in ("net", "host", "endpoint"))
    assert "overlay net create 42 --name blue --subnet 198.19.42.0/24" in net
    assert "--subnet A.B.C.D/LEN" in create and "etcdctl put /overlay/v1/networks/42" in create
    assert "alive" in host and "--json" in host and "--etcd URL" in host and "--user" in host
    assert "overlay endpoint add --net 42 --mac 02:00:00:00:00:99 --host h2" in add
    assert "etcdctl del /overlay/v1/networks/42/endpoints/02:00:00:00:00:99" in rm


@pytest.mark.etcd
def test_login_with_user_and_password() -> None:
    """etcd with authentication on: no login, a wrong one, and the right one three ways."""
    with etcdlab.single() as server:
        etcdlab.etcdctl(server, "user", "add", "root:secret", check=True)
        etcdlab.etcdctl(server, "auth", "enable", check=True)
        at = ["--etcd", server.endpoint]
        anonymous, wrong, flags, colon = overlay_many(
            ["net", "ls", *at],
            ["net", "ls", *at, "--user", "root", "--password", "nope"],
            ["net", "create", "5", *at, "--user", "root", "--password", "secret"],
            ["endpoint", "ls", *at, "--user", "root:secret", "--json"],
        )
        one_line_error(anonymous, 1, "requires a login", "--user")
        one_line_error(wrong, 1, "refused the login of user 'root'")
        assert "created network 5" in ok(flags)
        assert json.loads(ok(colon)) == []
        env = overlay("net", "ls", *at, "--user", "root", "--json", env={"OVERLAY_ETCD_PASSWORD": "secret"})
        assert [n["vni"] for n in json.loads(ok(env))] == [5]


@pytest.mark.etcd
def test_host_ls_shows_both_vteps_of_a_dual_stack_host_and_an_ipv6_one(etcd: Etcd) -> None:
    p = etcd.prefix
    etcd.ctl("put", f"{p}/hosts/d1", '{"address": "198.18.0.1", "address6": "2001:2:0:1::1", "port": 4789}')
    etcd.ctl("put", f"{p}/hosts/s6", '{"address": "2001:2:0:1::6", "port": 8472}')
    rows = {r["host"]: r for r in etcd.json("host", "ls")}
    assert (rows["d1"]["address"], rows["d1"]["address6"]) == ("198.18.0.1", "2001:2:0:1::1")
    assert (rows["s6"]["address"], rows["s6"]["address6"]) == ("2001:2:0:1::6", None)
    table = {line.split()[0]: line for line in ok(etcd.cli("host", "ls")).splitlines()[1:]}
    assert "198.18.0.1:4789 [2001:2:0:1::1]:4789" in table["d1"] and "[2001:2:0:1::6]:8472" in table["s6"]


# --- encrypted networks -----------------------------------------------------------------------

KEY1 = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="  # RFC 7748's public keys
KEY2 = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08="


def put_host(etcd: Etcd, host: str, address: str, pubkey: str | None, member_of: int | None = None) -> None:
    value: dict[str, object] = {"address": address, "port": 4789}
    if pubkey is not None:
        value["pubkey"] = pubkey
    etcd.ctl("put", f"{etcd.prefix}/hosts/{host}", json.dumps(value))
    if member_of is not None:
        etcd.ctl("put", f"{etcd.prefix}/networks/{member_of}/members/{host}", "{}")


@pytest.mark.etcd
def test_net_create_encrypted_writes_the_field_and_a_plaintext_network_is_as_before(etcd: Etcd) -> None:
    created = etcd.json("net", "create", "42", "--encrypted", "--name", "secret")
    assert created["encrypted"] is True
    assert etcd.value("/networks/42") == etcd.schema.encode(Network(42, "secret", encrypted=True)).decode()
    assert json.loads(etcd.value("/networks/42"))["encrypted"] is True
    assert "created network 43 (" in ok(etcd.cli("net", "create", "43"))
    assert "encrypted" not in etcd.value("/networks/43")  # what older agents and tools have always read
    assert [(r["vni"], r["encrypted"]) for r in etcd.json("net", "ls")] == [(42, True), (43, False)]
    rows = ok(etcd.cli("net", "ls")).splitlines()
    assert rows[0].split()[5] == "ENCRYPTED" and rows[1].split()[5] == "yes" and rows[2].split()[5] == "no"


@pytest.mark.etcd
def test_net_set_encrypts_only_when_every_member_has_a_key_unless_forced(etcd: Etcd) -> None:
    one_line_error(etcd.cli("net", "set", "42", "--encrypted"), 1, "network 42 does not exist", "overlay net create 42")
    ok(etcd.cli("net", "create", "42", "--subnet", "198.19.42.0/24"))
    plain = etcd.value("/networks/42")
    put_host(etcd, "h1", "198.18.0.1", KEY1, member_of=42)
    put_host(etcd, "h2", "198.18.0.2", None, member_of=42)  # an older agent
    etcd.ctl("put", f"{etcd.prefix}/networks/42/members/h3", "{}")  # a member without a host value
    put_host(etcd, "h4", "198.18.0.4", None)  # not a member: not its business
    line = one_line_error(etcd.cli("net", "set", "42", "--encrypted"), 1, "network 42 cannot be encrypted", "--force")
    assert "member hosts h2, h3 publish no pubkey" in line and "h1" not in line and "h4" not in line
    assert etcd.value("/networks/42") == plain  # nothing written

    put_host(etcd, "h2", "198.18.0.2", KEY2)  # h2 upgraded
    line = one_line_error(etcd.cli("net", "set", "42", "--encrypted"), 1, "member host h3 publishes no pubkey")
    etcd.ctl("del", f"{etcd.prefix}/networks/42/members/h3")  # h3 left
    assert etcd.json("net", "set", "42", "--encrypted") == {
        "vni": 42,
        "encrypted": True,
        "changed": True,
        "members": ["h1", "h2"],
        "nat": False,
    }
    assert json.loads(etcd.value("/networks/42")) == {**json.loads(plain), "encrypted": True}
    assert "network 42 is already encrypted: nothing changed" in ok(etcd.cli("net", "set", "42", "--encrypted"))

    assert "network 42 is now plaintext" in ok(etcd.cli("net", "set", "42", "--no-encrypted"))
    assert etcd.value("/networks/42") == plain  # back to the bytes of before
    assert etcd.json("net", "set", "42", "--no-encrypted")["changed"] is False

    put_host(etcd, "h5", "198.18.0.5", None, member_of=42)
    one_line_error(etcd.cli("net", "set", "42", "--encrypted"), 1, "member host h5 publishes no pubkey")
    assert "network 42 is now encrypted" in ok(etcd.cli("net", "set", "42", "--encrypted", "--force"))
    assert json.loads(etcd.value("/networks/42"))["encrypted"] is True


@pytest.mark.etcd
def test_net_set_keeps_the_fields_it_does_not_know_and_refuses_a_bad_value(etcd: Etcd) -> None:
    etcd.ctl("put", f"{etcd.prefix}/networks/7", '{"vni": 7, "name": "n", "nat": true, "future": {"x": 1}}')
    ok(etcd.cli("net", "set", "7", "--encrypted"))
    assert json.loads(etcd.value("/networks/7")) == {
        "vni": 7,
        "name": "n",
        "nat": True,
        "future": {"x": 1},
        "encrypted": True,
    }
    etcd.ctl("put", f"{etcd.prefix}/networks/8", '{"vni": 9}')
    one_line_error(etcd.cli("net", "set", "8", "--encrypted"), 1, "holds a value agents refuse", "overlay net rm 8")


@pytest.mark.etcd
def test_net_create_encrypted_over_members_without_keys_needs_force(etcd: Etcd) -> None:
    put_host(etcd, "h2", "198.18.0.2", None, member_of=44)  # joined a VNI nobody defined yet
    one_line_error(etcd.cli("net", "create", "44", "--encrypted"), 1, "cannot be created encrypted", "h2")
    assert etcd.keys() == [f"{etcd.prefix}/hosts/h2", f"{etcd.prefix}/networks/44/members/h2"]
    ok(etcd.cli("net", "create", "44", "--encrypted", "--force"))
    assert json.loads(etcd.value("/networks/44"))["encrypted"] is True
    one_line_error(etcd.cli("net", "create", "44", "--encrypted"), 1, "network 44 exists", "overlay net set 44")


@pytest.mark.etcd
def test_the_member_check_and_the_write_are_one_transaction(etcd: Etcd) -> None:
    """A member that joins, or a host value that changes, between the read and the write makes
    the write fail (the command then reads again); an unrelated write does not."""
    from overlay.cmd import admin

    ok(etcd.cli("net", "create", "42"))
    put_host(etcd, "h1", "198.18.0.1", KEY1, member_of=42)
    target = admin.Target([etcd.server.endpoint], etcd.prefix)

    async def attempt(s: admin.Session, meanwhile: list[str]) -> bool:
        view = await admin.read_members(s, 42)
        assert view.members == ["h1"] and view.unkeyed == []
        etcd.ctl(*meanwhile)
        t = s.client.transactions
        key = s.schema.key(admin_network_key(42)).encode()
        ok_, _ = await s.client.transaction(
            compare=[t.mod(key) == view.network.mod_revision, *view.guard], success=[], failure=[]
        )
        return bool(ok_)

    p = etcd.prefix
    assert admin.run(target, lambda s: attempt(s, ["put", f"{p}/hosts/h9", '{"address": "198.18.0.9"}'])) is True
    assert admin.run(target, lambda s: attempt(s, ["put", f"{p}/networks/43/members/h9", "{}"])) is True
    assert admin.run(target, lambda s: attempt(s, ["put", f"{p}/hosts/h1", '{"address": "198.18.0.1"}'])) is False
    put_host(etcd, "h1", "198.18.0.1", KEY1)
    assert admin.run(target, lambda s: attempt(s, ["put", f"{p}/networks/42/members/h2", "{}"])) is False


def admin_network_key(vni: int) -> object:
    from overlay.core.registry import NetworkKey

    return NetworkKey(vni)


@pytest.mark.etcd
def test_host_ls_shows_each_hosts_key_fingerprint(etcd: Etcd) -> None:
    from overlay.core.keys import fingerprint, parse_public

    put_host(etcd, "h1", "198.18.0.1", KEY1, member_of=42)
    put_host(etcd, "h2", "198.18.0.2", None, member_of=42)
    rows = {r["host"]: r for r in etcd.json("host", "ls")}
    assert rows["h1"]["pubkey"] == KEY1 and rows["h2"]["pubkey"] is None
    table = ok(etcd.cli("host", "ls")).splitlines()
    at = table[0].index("KEY")
    assert [line[at:].split()[0] for line in table[1:]] == [fingerprint(parse_public(KEY1)), "-"]
    assert len(fingerprint(parse_public(KEY1))) == 8


def test_bad_net_set_and_create_flags_are_exit_2_before_any_connection() -> None:
    nowhere = ["--etcd", "http://127.0.0.1:9"]
    nothing, both, force_off, force_plain, bad_vni = overlay_many(
        ["net", "set", "42", *nowhere],
        ["net", "set", "42", "--encrypted", "--no-encrypted", *nowhere],
        ["net", "set", "42", "--no-encrypted", "--force", *nowhere],
        ["net", "create", "42", "--force", *nowhere],
        ["net", "set", "x", "--encrypted", *nowhere],
    )
    one_line_error(nothing, 2, "nothing to change: give --encrypted or --no-encrypted")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr and "Traceback" not in both.stderr
    one_line_error(force_off, 2, "--force goes with --encrypted")
    one_line_error(force_plain, 2, "--force goes with --encrypted")
    one_line_error(bad_vni, 2, "'x' is not a VNI")
    help_text = ok(overlay("net", "set", "--help"))
    assert "--encrypted" in help_text and "--no-encrypted" in help_text and "pubkey" in help_text


# --- egress NAT: net create/set --nat, --no-nat; net ls ---------------------------------------


@pytest.mark.etcd
def test_net_create_writes_nat_only_when_asked_and_ls_resolves_the_default(etcd: Etcd) -> None:
    gw = ["--subnet", "198.19.42.0/24", "--gateway", "198.19.42.1"]
    created = etcd.json("net", "create", "42", *gw)
    assert created["nat"] is True and "nat" not in json.loads(etcd.value("/networks/42"))  # the default holds
    assert (
        etcd.value("/networks/42")
        == etcd.schema.encode(Network(42, "net42", "198.19.42.0/24", gateway="198.19.42.1")).decode()
    )
    assert "gateway 198.19.43.1, egress NAT off)" in ok(
        etcd.cli("net", "create", "43", "--subnet", "198.19.43.0/24", "--gateway", "198.19.43.1", "--no-nat")
    )
    assert json.loads(etcd.value("/networks/43"))["nat"] is False
    lonely = etcd.cli("net", "create", "44", "--nat")
    assert "created network 44 (net44, subnet -, mtu -, egress NAT on)" in ok(lonely)
    assert "warning: network 44 has no --gateway" in lonely.stderr and "--nat has no effect" in lonely.stderr
    assert json.loads(etcd.value("/networks/44"))["nat"] is True
    ok(etcd.cli("net", "create", "45"))
    rows = {r["vni"]: r for r in etcd.json("net", "ls")}
    assert [(rows[v]["gateway"], rows[v]["nat"]) for v in (42, 43, 44, 45)] == [
        ("198.19.42.1", True),
        ("198.19.43.1", False),
        (None, True),
        (None, False),
    ]
    table = ok(etcd.cli("net", "ls")).splitlines()
    assert [line.split()[-2:] for line in table] == [
        ["GATEWAY", "NAT"],
        ["198.19.42.1", "on"],
        ["198.19.43.1", "off"],
        ["-", "on"],
        ["-", "off"],
    ]


@pytest.mark.etcd
def test_net_set_turns_nat_on_and_off_keeping_the_rest_of_the_value(etcd: Etcd) -> None:
    etcd.ctl(
        "put",
        f"{etcd.prefix}/networks/42",
        '{"vni": 42, "name": "blue", "subnet": "198.19.42.0/24", "gateway": "198.19.42.1", "future": 1}',
    )
    assert ok(etcd.cli("net", "set", "42", "--no-nat")).strip() == "network 42 now has egress NAT off"
    assert json.loads(etcd.value("/networks/42")) == {
        "vni": 42,
        "name": "blue",
        "subnet": "198.19.42.0/24",
        "gateway": "198.19.42.1",
        "future": 1,
        "nat": False,
    }
    assert etcd.json("net", "set", "42", "--no-nat") == {
        "vni": 42,
        "encrypted": False,
        "changed": False,
        "members": [],
        "nat": False,
    }
    assert "network 42 already has egress NAT off: nothing changed" in ok(etcd.cli("net", "set", "42", "--no-nat"))
    said = ok(etcd.cli("net", "set", "42", "--nat", "--encrypted")).strip()
    assert said == "network 42 is now encrypted and now has egress NAT on"
    value = json.loads(etcd.value("/networks/42"))
    assert value["nat"] is True and value["encrypted"] is True and value["future"] == 1
    assert [r["nat"] for r in etcd.json("net", "ls")] == [True]


def test_nat_flags_are_checked_before_any_connection_and_documented() -> None:
    nowhere = ["--etcd", "http://127.0.0.1:9"]
    both, force, both_set = overlay_many(
        ["net", "create", "42", "--nat", "--no-nat", *nowhere],
        ["net", "set", "42", "--nat", "--force", *nowhere],
        ["net", "set", "42", "--no-nat", "--nat", *nowhere],
    )
    assert both.returncode == 2 and "not allowed with argument" in both.stderr and "Traceback" not in both.stderr
    assert both_set.returncode == 2 and "not allowed with argument" in both_set.stderr
    one_line_error(force, 2, "--force goes with --encrypted")
    create, set_, ls = (
        ok(r) for r in overlay_many(["net", "create", "--help"], ["net", "set", "--help"], ["net", "ls", "--help"])
    )
    assert "--nat" in create and "--no-nat" in create and "--gateway 198.19.42.1 --no-nat" in create
    assert "--no-nat" in set_ and "overlay net set 42 --no-nat" in set_
    assert "NAT" in ls and "on when it has a gateway" in ls


# --- net join / leave: the local agent's control socket ---------------------------------------


class FakeControl:
    """Stands in for overlay.io.control.request: records each request, answers from ``answers``
    (a command's answer, or a ControlError to raise)."""

    def __init__(self, **answers: Any) -> None:
        self.answers, self.calls = answers, []

    def __call__(self, cmd: str, tap: str | None = None, timeout: float = 5.0, **params: Any) -> Any:
        self.calls.append((cmd, tap, params))
        answer = self.answers[cmd]
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    from overlay.io import control

    def install(**answers: Any) -> FakeControl:
        agent = FakeControl(**answers)
        monkeypatch.setattr(control, "request", agent)
        return agent

    return install


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from overlay.cmd.cli import main

    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_net_join_asks_the_local_agent_and_says_what_happened(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    agent = fake(net_join={"vni": 42, "name": "blue", "joined": True})
    assert cli(capsys, "net", "join", "blue") == (0, "joined network blue (VNI 42)\n", "")
    assert agent.calls == [("net_join", None, {"net": "blue"})]
    fake(net_join={"vni": 42, "name": "blue", "joined": False})
    assert cli(capsys, "net", "join", " 42", "--tap", "ovl0")[1] == "already joined network blue (VNI 42)\n"
    agent = fake(net_join={"vni": 42, "name": "blue", "joined": False})
    status, out, _ = cli(capsys, "net", "join", "042", "--json")
    assert status == 0 and json.loads(out) == {"vni": 42, "name": "blue", "joined": False}
    assert agent.calls == [("net_join", None, {"net": "42"})]  # a VNI in its canonical spelling


def test_net_leave_says_left_or_that_there_was_nothing_to_leave(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    agent = fake(net_leave={"vni": 43, "name": "red", "left": True})
    assert cli(capsys, "net", "leave", "red", "--tap", "ovl0") == (0, "left network red (VNI 43)\n", "")
    assert agent.calls == [("net_leave", "ovl0", {"net": "red"})]
    fake(net_leave={"vni": 43, "name": "red", "left": False})
    assert cli(capsys, "net", "leave", "43")[1] == "network red (VNI 43) was not joined here: nothing to leave\n"
    fake(net_leave={"vni": 43, "name": "red", "left": True})
    assert json.loads(cli(capsys, "net", "leave", "red", "--json")[1]) == {"vni": 43, "name": "red", "left": True}


def test_net_join_and_leave_failures_are_one_line_with_the_right_exit_status(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from overlay.io.control import ControlError

    agent = fake(net_join={"vni": 0, "name": "x", "joined": True})
    status, out, err = cli(capsys, "net", "join", "16777216")
    assert (status, out) == (2, "") and err.startswith("overlay: error: '16777216' is not a VNI") and agent.calls == []
    fake(net_join=ControlError("network 'green' is not defined: 'overlay net create' defines it", "network"))
    assert cli(capsys, "net", "join", "green") == (
        2,
        "",
        "overlay: error: network 'green' is not defined: 'overlay net create' defines it\n",
    )
    fake(net_leave=ControlError("network blue has containers attached here (web1): detach them first", "invalid"))
    assert cli(capsys, "net", "leave", "blue")[0] == 2
    fake(
        net_join=ControlError(
            "no overlay agent is running in this network namespace (start one with 'overlay agent')", "agent"
        )
    )
    status, _, err = cli(capsys, "net", "join", "blue")
    assert status == 1 and err.count("\n") == 1 and "no overlay agent" in err
    fake(net_join=ControlError("the registry is unreachable: try again", "etcd"))
    assert cli(capsys, "net", "join", "blue")[0] == 1


def test_net_join_and_leave_help_teach_with_examples() -> None:
    join, leave, net = (
        ok(r) for r in overlay_many(["net", "join", "--help"], ["net", "leave", "--help"], ["net", "--help"])
    )
    assert "overlay net join blue" in join and "not etcd" in join and "--tap" in join and "--etcd" not in join
    assert "joined network blue (VNI 42)" in join and "already joined" in join
    assert "overlay net leave blue" in leave and "not etcd" in leave and "attached" in leave
    assert "overlay net join blue" in net and "overlay net leave blue" in net


def test_an_endpoints_json_carries_its_exposed_ports() -> None:
    from overlay.cmd.admin import endpoint_json

    ep = Endpoint("h1", ["198.19.42.2"], [], "web", ["80/tcp", "53/udp"])
    assert endpoint_json(42, 0x020000000002, ep, 0x694D7B1F2A6C7C0A) == {
        "vni": 42,
        "mac": "02:00:00:00:00:02",
        "host": "h1",
        "ipv4": ["198.19.42.2"],
        "ipv6": [],
        "lease": "694d7b1f2a6c7c0a",
        "static": False,
        "ports": ["80/tcp", "53/udp"],
    }
    assert endpoint_json(42, 0x020000000002, Endpoint("h1"), 0)["ports"] == []
