"""The agent's Docker plugin driven by real dockerds (Debian's docker.io 20.10), one per lab
host (overlay.lab.engines), with a real etcd: one overlay network across two hosts, containers
that ping each other by address, a published port answering the outside, nothing left behind
after ``docker rm -f`` and ``docker network rm``, and bad input refused in one line by the
docker CLI. No registry is ever asked: the image is imported from busybox-static.

The plugin is called ``ovl``: ``overlay`` is Docker's built-in (swarm) overlay driver, which wins
over a remote plugin of that name. Each dockerd sees a plugin directory of its own
(``Dockerd.plugin_socket``), so both hosts' agents serve the same name."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlay.lab import Lab, engines, wait_for
from overlay.lab import etcd as etcdlab
from overlay.lab.engines import IMAGE, Dockerd
from tests.labkit import new_lab_with_etcd, start_agent, status, stop_agent

pytestmark = [
    pytest.mark.root,
    pytest.mark.etcd,
    pytest.mark.skipif(
        not engines.dockerd_available(),  # Debian's dockerd is /usr/sbin/dockerd: looked up on PATH
        reason=f"needs a real dockerd, containerd, runc and busybox-static: {engines.INSTALL}",
    ),
]
OVERLAY = [sys.executable, "-m", "overlay"]
P = "/overlay/v1"
PLUGIN = "ovl"
HOME = 10  # the network each agent names at start (its TAP and control socket); blue is joined on demand
TAP = "ovl0"
BLUE = 42
SUBNET, GATEWAY = "198.19.42.0/24", "198.19.42.1"
OUTSIDE = 210  # the lab's outside: 198.18.0.210 on the underlay


class World:
    """Two hosts, etcd, network blue (VNI 42) in the registry, a dockerd and an agent serving
    plugin ``ovl`` to it on each host, the outside at 198.18.0.210."""

    def __init__(self, lab: Lab, etcd: etcdlab.EtcdServer, tmp: Path) -> None:
        self.lab, self.etcd, self.tmp = lab, etcd, tmp
        self.dockerds: dict[int, Dockerd] = {}
        self.agents: dict[int, Any] = {}

    def start_agent(self, host: int) -> None:
        d = self.dockerds[host]
        # the dockerd's plugin directory, through a symlink: Dockerd.stop() kills every process
        # whose command line names its workdir (containerd, shims), and would kill the agent too
        plugins = self.tmp / f"plugins-h{host}"
        if not plugins.is_symlink():
            plugins.symlink_to(d.plugin_socket(PLUGIN).parent)
        argv = [
            *OVERLAY,
            "agent",
            *("--etcd", self.etcd.endpoint),
            *("--host-id", f"h{host}"),
            *("--local", str(self.lab.address(host))),
            *("--network", str(HOME)),
            *("--lease-ttl", "5"),
            *("--state-dir", str(self.tmp / "state")),
            *("--resolv-conf", "/dev/null"),  # no upstream resolvers: no query ever leaves the lab
            *("--docker-plugin", PLUGIN, "--docker-plugin-dir", str(plugins)),
        ]
        self.agents[host] = start_agent(self.lab, host, [], log_dir=self.tmp, argv=argv, tap=TAP)
        wait_for(lambda: d.plugin_socket(PLUGIN).is_socket(), 10, f"the plugin's socket on host {host}")

    def docker(self, host: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.dockerds[host].cli(*args, check=check, timeout=60)

    def overlay(self, host: int, *args: str) -> str:
        result = self.lab.run(host, [*OVERLAY, *args], check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def network_create(
        self, host: int, *args: str, name: str = "blue", check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.docker(
            host,
            *("network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN, *args, name),
            check=check,
        )

    def run(self, host: int, name: str, *args: str, cmd: tuple[str, ...] = ("sleep", "600")) -> str:
        """``docker run -d --network blue --name NAME ...``; returns the container's address."""
        self.docker(host, "run", "-d", "--network", "blue", "--dns", GATEWAY, "--name", name, *args, IMAGE, *cmd)
        return self.address(host, name)

    def address(self, host: int, name: str) -> str:
        out = self.docker(host, "inspect", "-f", '{{(index .NetworkSettings.Networks "blue").IPAddress}}', name)
        return str(out.stdout.strip())

    def ping(self, host: int, name: str, address: str) -> bool:
        argv = ("exec", name, "ping", "-c", "1", "-W", "1", address)
        return self.docker(host, *argv, check=False).returncode == 0

    def keys(self, prefix: str) -> list[str]:
        return etcdlab.etcdctl(self.etcd, "get", "--prefix", "--keys-only", prefix, check=True).stdout.split()

    def links(self, host: int) -> list[str]:
        return [link["ifname"] for link in json.loads(self.lab.run(host, ["ip", "-j", "link", "show"]).stdout)]

    def attachments(self, host: int) -> list[dict[str, Any]]:
        return list(status(self.lab, host, TAP)["attachments"])

    def log(self, host: int) -> str:
        path = self.tmp / f"agent-{self.lab.name}-h{host}-{TAP}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """The dockerds first (their containers' Leave, DeleteEndpoint while the agents run),
        then the agents; the lab and etcd go afterwards."""
        errors: list[BaseException] = []
        for d in self.dockerds.values():
            try:
                d.stop()
            except Exception as e:  # the other dockerds are stopped all the same
                errors.append(e)
        for proc in self.agents.values():
            if proc.poll() is None:
                stop_agent(proc)
        if errors:
            raise errors[0]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    # the dockerds' workdirs are short paths (their unix sockets must fit in 108 bytes); the
    # agents' logs and state stay in tmp_path for a failed run's reader
    with new_lab_with_etcd(hosts=2, prefix="d") as (lab, etcd):
        work = Path(tempfile.mkdtemp(prefix="ovl-dk-"))
        w = World(lab, etcd, tmp_path)
        try:
            lab.add_service("outside", OUTSIDE)
            w.overlay(
                1,
                *("net", "create", str(BLUE), "--name", "blue", "--subnet", SUBNET, "--gateway", GATEWAY),
                *("--etcd", etcd.endpoint),
            )
            for h in (1, 2):
                w.dockerds[h] = engines.start_dockerd(lab, h, work / f"h{h}")
                engines.import_busybox_image(w.dockerds[h])
                w.start_agent(h)
            yield w
        finally:
            w.stop()
            shutil.rmtree(work, ignore_errors=True)


def fetch(lab: Lab, where: str, address: str, port: int) -> str:
    """GET / from namespace ``where``: the body, or ``failed <error>``."""
    code = (
        "import http.client, sys\n"
        "c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=3)\n"
        "try:\n"
        "    c.request('GET', '/')\n"
        "    print(c.getresponse().read().decode().strip())\n"
        "except OSError as e:\n"
        "    print('failed', e.__class__.__name__)\n"
    )
    return lab.run(where, [sys.executable, "-c", code, address, str(port)], timeout=15).stdout.strip()


def test_containers_on_two_hosts_share_one_docker_network_and_ping_each_other(world: World) -> None:
    w = world
    w.network_create(1, "--subnet", SUBNET, "-o", f"vni={BLUE}")
    w.network_create(2, "--subnet", SUBNET, "-o", "network=blue")  # the registry's name works too
    for h in (1, 2):
        shown = json.loads(w.docker(h, "network", "inspect", "blue").stdout)[0]
        assert shown["Driver"] == PLUGIN and shown["IPAM"]["Config"][0]["Subnet"] == SUBNET
    a = w.run(1, "ca")
    b = w.run(2, "cb")
    assert a != b and {a, b} <= {f"198.19.42.{i}" for i in range(2, 255)}
    assert wait_for(lambda: w.ping(1, "ca", b), 15, "a pings b across hosts")
    assert w.ping(2, "cb", a) and w.ping(1, "ca", GATEWAY)
    # the container's eth0 is our veth, its default route our distributed gateway; no docker_gwbridge
    route = w.docker(1, "exec", "ca", "ip", "route").stdout
    assert f"default via {GATEWAY}" in route, route
    for h in (1, 2):
        assert "docker_gwbridge" not in w.links(h)
        assert "docker_gwbridge" not in w.docker(h, "network", "ls", "--format", "{{.Name}}").stdout
    # the addresses are IPAM claims in etcd, the endpoints ours
    ipam = w.keys(f"{P}/networks/{BLUE}/ipam/")
    assert {f"{P}/networks/{BLUE}/ipam/{x}" for x in (a, b)} <= set(ipam)
    assert [x["address"].split("/")[0] for x in w.attachments(1)] == [a]


def test_a_published_port_answers_the_outside_on_the_hosts_underlay_address(world: World) -> None:
    w = world
    for h in (1, 2):
        w.network_create(h, "--subnet", SUBNET, "-o", f"vni={BLUE}")
    serve = "echo hello-from-web > /var/www/index.html && exec httpd -f -p 80 -h /var/www"
    w.run(1, "web", "-p", "8080:80", cmd=("sh", "-c", serve))
    h1 = str(w.lab.address(1))
    outside = w.lab.service_ns("outside")
    assert wait_for(lambda: fetch(w.lab, outside, h1, 8080) == "hello-from-web", 15, "web from the outside")
    published = [p for x in w.attachments(1) for p in x["published"]]
    assert [p["host_port"] for p in published] == [8080], published
    w.docker(1, "rm", "-f", "web")
    assert fetch(w.lab, outside, h1, 8080).startswith("failed")
    assert not w.attachments(1)


def ours(links: list[str]) -> list[str]:
    """The links of Docker's containers on blue: veths (host end ``ov`` and 11 hex digits, the
    container's end ``ovx...`` before Docker takes it), and blue's bridge and gateway."""
    return [x for x in links if re.fullmatch(r"ov(x?[0-9a-f]{11}|(br|gw|gp)42)", x)]


def test_docker_rm_and_network_rm_leave_nothing_behind(world: World) -> None:
    w = world
    for h in (1, 2):
        w.network_create(h, "--subnet", SUBNET, "-o", f"vni={BLUE}")
    w.run(1, "ca", "-p", "8081:80")
    b = w.run(2, "cb")
    assert wait_for(lambda: w.ping(1, "ca", b), 15, "a pings b")
    assert {x["id"].split("/")[0] for h in (1, 2) for x in w.attachments(h)} == {"docker"}
    assert all(ours(w.links(h)) for h in (1, 2))  # what is to go is there
    for h, name in ((1, "ca"), (2, "cb")):
        w.docker(h, "rm", "-f", name)
        w.docker(h, "network", "rm", "blue")
    for h in (1, 2):
        wait_for(lambda h=h: not ours(w.links(h)), 10, f"no veth, bridge or gateway of blue on h{h}")
        assert not w.attachments(h)
        assert BLUE not in {n["vni"] for n in status(w.lab, h, TAP)["agent"]["networks"]}
        assert "8081" not in w.lab.run(h, ["nft", "list", "ruleset"]).stdout
        state = json.loads((w.tmp / "state" / f"h{h}.docker.json").read_text())
        assert state == {"networks": [], "endpoints": [], "claims": []}
    prefix = f"{P}/networks/{BLUE}/"
    assert wait_for(lambda: not [k for k in w.keys(prefix) if "/ipam/" in k or "/endpoints/" in k], 10, "no keys")
    assert f"{P}/networks/{BLUE}" in w.keys(f"{P}/networks/")  # the registry's network stays


def test_a_network_with_another_subnet_or_an_unknown_option_is_refused_in_one_line(world: World) -> None:
    w = world
    w.network_create(1, "--subnet", SUBNET, "-o", f"vni={BLUE}")
    registry = w.keys(f"{P}/networks/")
    for args, said in [
        (("--subnet", "198.19.50.0/24", "-o", f"vni={BLUE}"), f"has subnet {SUBNET}"),
        (("--subnet", "198.19.51.0/24", "-o", "colour=red"), "unknown option -o colour"),
    ]:
        refused = w.network_create(2, *args, name="other", check=False)
        assert refused.returncode != 0, refused.stdout
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and said in lines[0], refused.stderr
        assert "Traceback" not in refused.stderr
    assert "other" not in w.docker(2, "network", "ls", "--format", "{{.Name}}").stdout.split()
    assert w.keys(f"{P}/networks/") == registry  # nothing made in the registry either
    w.network_create(2, "--subnet", SUBNET, "-o", f"vni={BLUE}")  # the right one still works after
