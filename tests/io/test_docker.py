"""The Docker plugin served by the agent, driven over its unix socket as dockerd drives it (no
dockerd here): two hosts, a real etcd, the whole sequence from RequestPool to DeleteNetwork, the
veth moved and configured by hand as Docker does, traffic across hosts, a restart, bad requests,
and nothing left behind."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from overlay.lab import Lab, wait_for
from overlay.lab import etcd as etcdlab
from tests.labkit import new_lab_with_etcd, start_agent, status

pytestmark = [pytest.mark.root, pytest.mark.etcd]
OVERLAY = [sys.executable, "-m", "overlay"]
P = "/overlay/v1"
HOME = 10  # the network each agent names at start (its control socket's)
TAP = "ovl0"
SUBNET, GATEWAY = "198.19.42.0/24", "198.19.42.1"
POOL = "198.19.42.0_24"


class Plugin:
    def __init__(self, path: Path) -> None:
        self.path = path

    def raw(self, method: str, data: bytes, verb: str = "POST") -> tuple[int, Any]:
        conn = _UnixHTTP(str(self.path))
        try:
            conn.request(verb, f"/{method}", data, {"Content-Type": "application/vnd.docker.plugins.v1.2+json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def __call__(self, method: str, body: object = None) -> Any:
        status, answer = self.raw(method, json.dumps(body if body is not None else {}).encode())
        assert status == 200, answer
        assert "Err" not in answer, f"{method}: {answer['Err']}"
        return answer

    def err(self, method: str, body: object) -> str:
        status, answer = self.raw(method, json.dumps(body).encode())
        assert status == 200 and isinstance(answer.get("Err"), str) and answer["Err"], answer
        assert "\n" not in answer["Err"] and "Traceback" not in answer["Err"]
        return str(answer["Err"])


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=15)
        self.unix = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(15)
        s.connect(self.unix)
        self.sock = s


class World:
    def __init__(self, lab: Lab, etcd: etcdlab.EtcdServer, tmp: Path) -> None:
        self.lab, self.etcd, self.tmp = lab, etcd, tmp
        self.agents: dict[int, subprocess.Popen[Any]] = {}

    def plugin(self, host: int) -> Plugin:
        return Plugin(self.tmp / "plugins" / f"ov{host}.sock")

    def start(self, host: int) -> None:
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
            str(HOME),
            "--lease-ttl",
            "5",
            "--state-dir",
            str(self.tmp / "state"),
            "--docker-plugin",
            f"ov{host}",
            "--docker-plugin-dir",
            str(self.tmp / "plugins"),
        ]
        self.agents[host] = start_agent(self.lab, host, [], log_dir=self.tmp, argv=argv, tap=TAP)
        wait_for(lambda: self.plugin(host).path.exists(), 10, "the plugin's socket")

    def stop(self, host: int) -> None:
        proc = self.agents.pop(host)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)

    def keys(self, prefix: str) -> list[str]:
        return etcdlab.etcdctl(self.etcd, "get", "--prefix", "--keys-only", prefix, check=True).stdout.split()

    def links(self, host: int) -> list[str]:
        out = json.loads(self.lab.run(host, ["ip", "-j", "link", "show"]).stdout)
        return [link["ifname"] for link in out]

    def as_docker_does(self, host: int, src: str, container: str, address: str, gateway: str) -> None:
        """Move the veth's end into the container, name it eth0, address it, route via the gateway."""
        ns = self.lab.add_container(container)
        self.lab.run(host, ["ip", "link", "set", src, "netns", ns])
        for cmd in (
            ["ip", "link", "set", src, "name", "eth0"],
            ["ip", "addr", "add", address, "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "route", "add", "default", "via", gateway],
        ):
            self.lab.run(ns, cmd)

    def ping(self, container: str, address: str) -> bool:
        argv = ["ping", "-n", "-c", "1", "-W", "1", address]
        return self.lab.run(self.lab.container_ns(container), argv, check=False).returncode == 0


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with new_lab_with_etcd(hosts=2, prefix="q") as (lab, etcd):
        w = World(lab, etcd, tmp_path)
        for h in (1, 2):
            w.start(h)
        yield w


def network_create(p: Plugin, network_id: str, **opts: str) -> dict[str, Any]:
    """What dockerd asks for `docker network create -d ovN --ipam-driver ovN --subnet ... -o ...`."""
    pool = p("IpamDriver.RequestPool", {"AddressSpace": "overlay", "Pool": SUBNET, "Options": {}, "V6": False})
    gateway = pool["Data"]["com.docker.network.gateway"]
    body = {
        "NetworkID": network_id,
        "Options": {"com.docker.network.generic": opts, "com.docker.network.enable_ipv6": False},
        "IPv4Data": [{"AddressSpace": "overlay", "Pool": pool["Pool"], "Gateway": gateway, "AuxAddresses": {}}],
        "IPv6Data": [],
    }
    return {"pool": pool, "create": body}


def container_start(
    w: World, host: int, network_id: str, endpoint_id: str, name: str, **interface: str
) -> dict[str, Any]:
    p = w.plugin(host)
    wanted = interface.pop("ip", "")
    address = p("IpamDriver.RequestAddress", {"PoolID": POOL, "Address": wanted, "Options": {}})["Address"]
    given = {"Address": address, "AddressIPv6": "", "MacAddress": interface.get("mac", "")}
    body = {"NetworkID": network_id, "EndpointID": endpoint_id, "Interface": given, "Options": {}}
    created = p("NetworkDriver.CreateEndpoint", body)
    mac = created["Interface"].get("MacAddress") or interface["mac"]
    sandbox = f"/var/run/docker/netns/{endpoint_id}"
    join = {"NetworkID": network_id, "EndpointID": endpoint_id, "SandboxKey": sandbox, "Options": {}}
    joined = p("NetworkDriver.Join", join)
    assert joined["DisableGatewayService"] is True and joined["InterfaceName"]["DstPrefix"] == "eth"
    w.as_docker_does(host, joined["InterfaceName"]["SrcName"], name, address, joined["Gateway"])
    return {"address": address, "mac": mac, "joined": joined}


def container_stop(w: World, host: int, network_id: str, endpoint_id: str, address: str) -> None:
    p = w.plugin(host)
    ids = {"NetworkID": network_id, "EndpointID": endpoint_id}
    p("NetworkDriver.RevokeExternalConnectivity", ids)
    p("NetworkDriver.Leave", ids)
    p("NetworkDriver.DeleteEndpoint", ids)
    p("IpamDriver.ReleaseAddress", {"PoolID": POOL, "Address": address.split("/")[0]})


def test_dockers_whole_sequence_gives_one_network_across_hosts_and_leaves_nothing(world: World) -> None:
    w, p1, p2 = world, world.plugin(1), world.plugin(2)
    assert p1("Plugin.Activate") == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert p1("NetworkDriver.GetCapabilities") == {"Scope": "local", "ConnectivityScope": "global"}
    assert p1("IpamDriver.GetDefaultAddressSpaces")["LocalDefaultAddressSpace"]
    # docker network create on each host: the first creates it in the registry, the other joins it
    first = network_create(p1, "n1", vni="42", name="blue")
    assert first["pool"] == {"PoolID": POOL, "Pool": SUBNET, "Data": {"com.docker.network.gateway": f"{GATEWAY}/24"}}
    p1("NetworkDriver.CreateNetwork", first["create"])
    definition = etcdlab.etcdctl(w.etcd, "get", f"{P}/networks/42", "--print-value-only", check=True).stdout
    assert {k: v for k, v in json.loads(definition).items() if v is not None} == {
        "vni": 42,
        "name": "blue",
        "subnet": SUBNET,
        "gateway": GATEWAY,
    }
    p2("NetworkDriver.CreateNetwork", network_create(p2, "n2", vni="42", name="blue")["create"])
    # the same name with another subnet is refused in one line, nothing made
    other = network_create(p2, "n3", vni="42")["create"]
    other["IPv4Data"][0] |= {"Pool": "198.19.50.0/24", "Gateway": "198.19.50.1/24"}
    assert "has subnet 198.19.42.0/24" in p2.err("NetworkDriver.CreateNetwork", other)

    a = container_start(w, 1, "n1", "e1", "a")
    b = container_start(w, 2, "n2", "e2", "b", ip="198.19.42.77", mac="02:42:00:00:00:77")
    assert a["address"] == "198.19.42.2/24" and b["address"] == "198.19.42.77/24"
    assert a["joined"]["Gateway"] == GATEWAY
    assert wait_for(lambda: w.ping("a", "198.19.42.77"), 15, "a pings b across hosts")
    assert w.ping("b", "198.19.42.2") and w.ping("a", GATEWAY)
    keys = w.keys(f"{P}/networks/42/")
    assert f"{P}/networks/42/ipam/198.19.42.2" in keys and f"{P}/networks/42/endpoints/02:42:00:00:00:77" in keys
    owner = json.loads(
        etcdlab.etcdctl(w.etcd, "get", f"{P}/networks/42/ipam/198.19.42.2", "--print-value-only", check=True).stdout
    )
    assert owner == {"host": "h1", "mac": a["mac"], "owner": "docker/e1"}

    # -p 8080:80 through our published ports
    ids = {"NetworkID": "n1", "EndpointID": "e1"}
    portmap = [{"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080}]
    p1("NetworkDriver.ProgramExternalConnectivity", ids | {"Options": {"com.docker.network.portmap": portmap}})
    attached = {x["id"]: x for x in status(w.lab, 1, TAP)["attachments"]}
    assert [x["host_port"] for x in attached["docker/e1"]["published"]] == [8080]

    # bad requests: one line each, nothing made
    assert "unknown option -o colour" in p1.err(
        "NetworkDriver.CreateNetwork", network_create(p1, "n9", colour="red")["create"]
    )
    assert "missing NetworkID" in p1.err("NetworkDriver.CreateEndpoint", {"EndpointID": "e9"})
    assert "unknown to overlay" in p1.err("NetworkDriver.Join", {"NetworkID": "n1", "EndpointID": "nope"})
    assert "not handed out" in p1.err(
        "NetworkDriver.CreateEndpoint",
        {"NetworkID": "n1", "EndpointID": "e9", "Interface": {"Address": "198.19.42.200/24"}},
    )
    assert "in use" in p1.err("IpamDriver.RequestAddress", {"PoolID": POOL, "Address": "198.19.42.77"})
    status_, answer = p1.raw("NetworkDriver.Join", b"{not json")
    assert status_ == 200 and "not JSON" in answer["Err"]
    status_, answer = p1.raw("NetworkDriver.Nothing", b"{}")
    assert status_ == 404 and "no method" in answer["Err"]

    # an agent restart: Docker resends nothing, the agent still knows its network, endpoint and address
    w.stop(1)
    assert "ovbr42" in w.links(1)  # the container's veth keeps its bridge while no agent runs
    w.start(1)
    assert wait_for(lambda: w.ping("a", "198.19.42.77"), 15, "traffic after the restart")
    attached = {x["id"]: x for x in status(w.lab, 1, TAP)["attachments"]}
    assert "docker/e1" in attached
    assert (
        p1("IpamDriver.RequestAddress", {"PoolID": POOL, "Address": "", "Options": {}})["Address"] == "198.19.42.3/24"
    )
    p1("IpamDriver.ReleaseAddress", {"PoolID": POOL, "Address": "198.19.42.3"})

    # a container that dies without a word (its namespace gone): its address and endpoint go, and
    # Docker's late Leave, DeleteEndpoint and ReleaseAddress are no errors
    c = container_start(w, 1, "n1", "e3", "c")
    w.lab.run(1, ["ip", "netns", "del", w.lab.container_ns("c")], check=False)
    ipam_c = f"{P}/networks/42/ipam/{c['address'].split('/')[0]}"
    wait_for(lambda: ipam_c not in w.keys(f"{P}/networks/42/ipam/"), 10, "the dead container's address released")
    container_stop(w, 1, "n1", "e3", c["address"])

    # docker rm -f, then docker network rm: nothing is left
    container_stop(w, 1, "n1", "e1", a["address"])
    container_stop(w, 2, "n2", "e2", b["address"])
    for h, nid in ((1, "n1"), (2, "n2")):
        w.plugin(h)("NetworkDriver.DeleteNetwork", {"NetworkID": nid})
        w.plugin(h)("IpamDriver.ReleasePool", {"PoolID": POOL})
        wait_for(lambda h=h: not [x for x in w.links(h) if x.startswith(("ovx", "ovbr42"))], 5, "veths gone")  # type: ignore[misc]
        assert not status(w.lab, h, TAP)["attachments"]
    left = [k for k in w.keys(f"{P}/networks/42/") if "/ipam/" in k or "/endpoints/" in k]
    assert wait_for(lambda: not [k for k in w.keys(f"{P}/networks/42/") if "/ipam/" in k], 5, "no addresses"), left
    assert not [k for k in w.keys(f"{P}/networks/42/endpoints/") if k.endswith(("02:42:00:00:00:77", a["mac"]))]


def test_a_request_too_large_or_not_http_closes_with_a_reason(world: World) -> None:
    path = str(world.plugin(1).path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"POST /NetworkDriver.Join HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n{")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"HELLO THERE\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    mode = world.plugin(1).path.stat().st_mode & 0o777
    assert mode == 0o660
    status_, answer = world.plugin(1).raw("Plugin.Activate", b"", verb="GET")
    assert status_ == 405
