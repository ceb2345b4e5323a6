"""Agents in etcd mode against a real etcd (Debian's etcd-server) in the lab's own namespace."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest

from overlay.lab import Lab, wait_for
from overlay.lab import etcd as etcdlab
from tests.labkit import VNI, Labs, etcd_agent_argv, new_lab_with_etcd, overlay_ip, start_agent, status, wait_ping

pytestmark = [pytest.mark.root, pytest.mark.etcd]
TTL = 3
P = "/overlay/v1"
GHOST = "02:00:00:00:00:99"  # an endpoint an operator declares with etcdctl


class World:
    def __init__(self, lab: Lab, etcd: etcdlab.EtcdServer, logs: Path) -> None:
        self.lab, self.etcd, self.logs = lab, etcd, logs
        self.agents: dict[int, subprocess.Popen[Any]] = {}

    def start(self, host: int, *extra: str) -> subprocess.Popen[Any]:
        argv = etcd_agent_argv(self.lab, host, [self.etcd.endpoint], "--lease-ttl", str(TTL), *extra)
        self.agents[host] = start_agent(self.lab, host, [], log_dir=self.logs, argv=argv)
        return self.agents[host]

    def etcdctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return etcdlab.etcdctl(self.etcd, *args, check=True)

    def fdb(self, host: int) -> dict[str, dict[str, Any]]:
        return {e["mac"]: e for e in status(self.lab, host, cmd="fdb") or []}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with new_lab_with_etcd(hosts=3, prefix="e") as (lab, etcd):
        w = World(lab, etcd, tmp_path)
        for h in (1, 2, 3):
            w.start(h)
        yield w


def test_agents_find_each_other_through_etcd(world: World) -> None:
    for src, dst in ((1, 2), (2, 3), (3, 1)):
        wait_ping(world.lab, src, overlay_ip(dst))
    fdb = world.fdb(1)
    assert fdb["02:00:00:00:00:02"]["source"] == "registry"  # known before any frame was seen
    assert fdb["02:00:00:00:00:02"]["vtep"] == f"{world.lab.address(2)}:4789"
    keys = world.etcdctl("get", "--prefix", "--keys-only", P).stdout.split()
    assert f"{P}/hosts/h1" in keys and f"{P}/networks/{VNI}" in keys and f"{P}/networks/{VNI}/members/h3" in keys


def tx_to(world: World, src: int, dst: int) -> int:
    s = status(world.lab, src)
    return next((p["tx_frames"] for p in s["peers"] if p["vtep"] == f"{world.lab.address(dst)}:4789"), 0)


def test_an_etcdctl_endpoint_is_forwarded_without_flooding_and_del_stops_it(world: World) -> None:
    lab = world.lab
    wait_ping(lab, 1, overlay_ip(2))
    world.etcdctl("put", f"{P}/networks/{VNI}/endpoints/{GHOST}", '{"host": "h2", "ipv4": ["198.19.0.99"]}')
    wait_for(
        lambda: world.fdb(1).get(GHOST, {}).get("vtep") == f"{lab.address(2)}:4789", 5, "the endpoint in h1's table"
    )
    lab.run(1, ["ip", "neigh", "replace", "198.19.0.99", "lladdr", GHOST, "dev", "ovbr42"])
    to2, to3 = tx_to(world, 1, 2), tx_to(world, 1, 3)
    lab.run(1, ["ping", "-c", "20", "-i", "0.02", "-W", "1", "198.19.0.99"], check=False)  # nobody answers
    # Unicast to h2 only: h2 got the 20 pings on top of whatever h3 got (background traffic,
    # such as IPv6 neighbour discovery of the fresh TAPs, reaches either; flooded, both would
    # have got all 20).
    assert (tx_to(world, 1, 2) - to2) - (tx_to(world, 1, 3) - to3) >= 15
    world.etcdctl("del", f"{P}/networks/{VNI}/endpoints/{GHOST}")
    wait_for(lambda: GHOST not in world.fdb(1), 5, "the endpoint to leave h1's table")
    to3 = tx_to(world, 1, 3)
    lab.run(1, ["ping", "-c", "3", "-i", "0.05", "-W", "1", "198.19.0.99"], check=False)
    assert tx_to(world, 1, 3) - to3 >= 3  # unknown again: flooded


def test_a_killed_agent_leaves_the_others_tables_within_the_lease_ttl(world: World) -> None:
    wait_ping(world.lab, 1, overlay_ip(2))
    world.agents[2].send_signal(signal.SIGKILL)
    world.agents[2].wait(timeout=10)
    killed = time.monotonic()
    wait_for(lambda: "02:00:00:00:00:02" not in world.fdb(1), TTL + 5, "h2 to leave h1's table")
    assert time.monotonic() - killed <= TTL + 2
    keys = world.etcdctl("get", "--prefix", "--keys-only", f"{P}/hosts").stdout.split()
    assert f"{P}/hosts/h2" not in keys


def test_hostile_values_under_the_prefix_never_crash_an_agent(world: World) -> None:
    for key, value in [
        (f"{P}/hosts/h9", "{not json"),
        (f"{P}/hosts/h8", '{"address": 42}'),
        (f"{P}/networks/{VNI}/endpoints/02:00:00:00:00:77", '{"host": "h2", "ipv4": ["300.1.1.1"]}'),
        (f"{P}/networks/{VNI}/members/h1", "[]"),
        (f"{P}/networks/{VNI}", '{"vni": "forty-two"}'),
        (f"{P}/garbage/key", "\x01\x02\xff"),
    ]:
        world.etcdctl("put", key, value)
    world.etcdctl("put", f"{P}/networks/{VNI}/endpoints/{GHOST}", '{"host": "h2"}')  # a good one after them
    wait_for(lambda: GHOST in world.fdb(1), 5, "the good endpoint after the bad ones")
    assert all(p.poll() is None for p in world.agents.values())
    wait_ping(world.lab, 1, overlay_ip(2))
    log = (world.logs / f"agent-{world.lab.name}-h1-ovl0.log").read_text()
    assert "ignoring /overlay/v1/hosts/h9" in log and "Traceback" not in log


def test_an_agents_own_keys_deleted_by_someone_are_written_back(world: World) -> None:
    world.etcdctl("del", f"{P}/hosts/h2")
    world.etcdctl("del", f"{P}/networks/{VNI}/members/h2")
    wait_for(
        lambda: (
            f"{P}/hosts/h2" in world.etcdctl("get", "--prefix", "--keys-only", P).stdout.split()
            and f"{P}/networks/{VNI}/members/h2" in world.etcdctl("get", "--prefix", "--keys-only", P).stdout.split()
        ),
        10,
        "h2 to write its keys back",
    )
    wait_ping(world.lab, 1, overlay_ip(2))


def test_a_second_agent_claiming_a_host_id_refuses_clearly(world: World) -> None:
    argv = etcd_agent_argv(
        world.lab, 1, [world.etcd.endpoint], "--lease-ttl", str(TTL), "--tap", "ovl7", "--port", "4790"
    )
    result = world.lab.run(1, argv, check=False, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "host id h1 is registered by another running agent" in result.stderr
    assert "ovl7" not in world.lab.run(1, ["ip", "-br", "link"]).stdout


def test_a_bad_etcd_endpoint_is_a_clear_error() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "overlay",
            "agent",
            "--etcd",
            "ftp://x",
            "--host-id",
            "h1",
            "--network",
            "42",
            "--local",
            "198.18.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "write it as http://HOST:PORT" in result.stderr


PACED_SOURCE = """
import random, socket, sys, time
rng = random.Random(5)
end = time.monotonic() + float(sys.argv[3])
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as s:
    while time.monotonic() < end:
        s.sendall(rng.randbytes(32768))
        time.sleep(0.02)
"""


def test_etcd_outage_and_compaction_keep_traffic_flowing_and_agents_resync(labs: Labs, tmp_path: Path) -> None:
    """etcd killed for 20 s, then cut off (link down) while keys change and the store is
    compacted: a TCP stream between existing endpoints flows throughout, and afterwards the
    agents have reconnected and resynced (a key put during the cut-off reaches them)."""
    from tests.labkit import TCP_SINK

    lab, etcd = labs.with_etcd(hosts=2, prefix="o")
    w = World(lab, etcd, tmp_path)
    for h in (1, 2):
        w.start(h)
    wait_ping(lab, 1, overlay_ip(2))
    sink = lab.spawn(2, [sys.executable, "-c", TCP_SINK, overlay_ip(2), "5002"], stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
    source = lab.spawn(1, [sys.executable, "-c", PACED_SOURCE, overlay_ip(2), "5002", "32"])

    etcd.kill()  # phase 1: etcd gone for 20 s
    time.sleep(20)  # the outage itself is the condition under test, not a wait for one
    etcd.start().wait_healthy()
    wait_for(lambda: status(lab, 1)["registry"]["connected"], 20, "h1 to reconnect to etcd")

    # Phase 2: etcd up but cut off from the hosts while keys change and history is compacted.
    lab.run(lab.switch, ["ip", "link", "set", "s-etcd1", "down"])
    wait_for(lambda: not status(lab, 1)["registry"]["connected"], 20, "h1 to notice the cut-off")
    w.etcdctl("put", f"{P}/networks/{VNI}/endpoints/{GHOST}", '{"host": "h2"}')
    for i in range(5):
        w.etcdctl("put", f"{P}/scratch", str(i))
    revision = int(w.etcdctl("get", f"{P}/scratch", "-w", "json").stdout.split('"revision":')[1].split(",")[0])
    w.etcdctl("compact", str(revision))
    lab.run(lab.switch, ["ip", "link", "set", "s-etcd1", "up"])
    wait_for(lambda: GHOST in w.fdb(1), 30, "the endpoint put during the cut-off to reach h1")
    assert status(lab, 1)["registry"]["resyncs"] >= 1

    assert source.wait(timeout=60) == 0
    out, _ = sink.communicate(timeout=60)
    digest, count = out.split()
    import hashlib
    import random

    rng, h, n = random.Random(5), hashlib.sha256(), 0
    while n < int(count):
        chunk = rng.randbytes(32768)
        h.update(chunk)
        n += len(chunk)
    assert n == int(count) > 20 * 32768 and digest == h.hexdigest()  # every byte, in order
    assert all(p.poll() is None for p in w.agents.values())


def test_a_three_member_cluster_losing_a_member_keeps_the_agents_working(labs: Labs, tmp_path: Path) -> None:
    lab = labs(hosts=2, prefix="c")
    members = etcdlab.cluster(lab, 3)
    try:
        endpoints = [m.endpoint for m in members]
        for h in (1, 2):
            argv = etcd_agent_argv(lab, h, endpoints, "--lease-ttl", str(TTL))
            start_agent(lab, h, [], log_dir=tmp_path, argv=argv)
        wait_ping(lab, 1, overlay_ip(2))
        # The member h1's agent is connected to (the first endpoint, unless it was slow to answer
        # when the agent started): from the agent's established connection to port 2379.
        conns = lab.run(1, ["ss", "-Htn", "state", "established", "( dport = :2379 )"]).stdout
        peers = {line.split()[-1].rsplit(":", 1)[0].strip("[]") for line in conns.splitlines() if line.strip()}
        used = next((m for m in members if urlsplit(m.endpoint).hostname in peers), members[0])
        used.kill()
        survivors = [m for m in members if m is not used]
        wait_for(lambda: etcdlab.leader(survivors) is not None, 20, "a leader among the survivors")
        etcdlab.etcdctl(survivors, "put", f"{P}/networks/{VNI}/endpoints/{GHOST}", '{"host": "h2"}', check=True)
        wait_for(
            lambda: GHOST in {e["mac"] for e in status(lab, 1, cmd="fdb") or []},
            30,
            "the endpoint to reach h1 through a surviving member",
        )
        wait_ping(lab, 1, overlay_ip(2))
        assert status(lab, 1)["registry"]["reconnects"] >= 1
    finally:
        for m in members:
            m.stop()


def test_arp_for_a_registry_address_is_answered_locally_and_unknown_ones_still_flood(world: World) -> None:
    lab = world.lab
    wait_ping(lab, 1, overlay_ip(2))
    wait_for(lambda: "02:00:00:00:00:02" in world.fdb(1), 10, "h2 in h1's table")
    lab.run(1, ["sysctl", "-q", "-w", "net.ipv6.conf.ovbr42.disable_ipv6=1"])  # no IPv6 chatter in the counts
    lab.run(1, ["ip", "neigh", "flush", "dev", "ovbr42"])
    before, to3 = status(lab, 1)["arp_suppressed"], tx_to(world, 1, 3)
    wait_ping(lab, 1, overlay_ip(2))  # the kernel ARPs for h2 first: the agent answers
    assert status(lab, 1)["arp_suppressed"] > before
    neigh = lab.run(1, ["ip", "neigh", "show", overlay_ip(2), "dev", "ovbr42"]).stdout
    assert "02:00:00:00:00:02" in neigh  # the answer carried the registry's MAC
    assert tx_to(world, 1, 3) - to3 <= 2  # no broadcast ARP to h3 (background multicast aside)
    before, to3 = status(lab, 1)["arp_suppressed"], tx_to(world, 1, 3)
    lab.run(1, ["ping", "-c", "1", "-W", "1", "198.19.0.77"], check=False)  # nobody has it
    assert status(lab, 1)["arp_suppressed"] == before and tx_to(world, 1, 3) > to3  # flooded


def test_macs_sending_from_the_tap_are_published_as_endpoints(world: World) -> None:
    """A container plugged into h1's bridge by hand (not with overlay attach): its frames teach
    h1's agent its MAC and address, which h1 publishes under its lease, so h2 forwards to it as a
    registry entry."""
    lab = world.lab
    mac = "02:00:00:00:01:01"
    c = lab.add_container("byhand")
    lab.run(1, ["ip", "link", "add", "vc0", "type", "veth", "peer", "name", "vc1"])
    lab.run(1, ["ip", "link", "set", "vc0", "master", "ovbr42", "up"])
    lab.run(1, ["ip", "link", "set", "vc1", "netns", c])
    lab.run(c, ["ip", "link", "set", "vc1", "address", mac, "up"])
    lab.run(c, ["ip", "addr", "add", "198.19.0.101/24", "dev", "vc1"])
    lab.run(c, ["ping", "-c", "2", "-i", "0.2", "-W", "1", overlay_ip(2)], check=False)
    key = f"{P}/networks/{VNI}/endpoints/{mac}"
    wait_for(lambda: "198.19.0.101" in world.etcdctl("get", key).stdout, 10, "h1 to publish the new MAC")
    assert '"host":"h1"' in world.etcdctl("get", key, "--print-value-only").stdout.replace(" ", "")
    wait_for(lambda: world.fdb(2).get(mac, {}).get("source") == "registry", 10, "h2 to take it from etcd")
    assert world.fdb(2)[mac]["vtep"] == f"{lab.address(1)}:4789"


def test_an_agent_on_several_networks_keeps_them_apart(labs: Labs, tmp_path: Path) -> None:
    lab, etcd = labs.with_etcd(hosts=2, prefix="m")
    for h in (1, 2):
        argv = [
            sys.executable,
            "-m",
            "overlay",
            "agent",
            "--etcd",
            etcd.endpoint,
            "--host-id",
            f"h{h}",
            "--local",
            str(lab.address(h)),
            "--network",
            "42",
            "--network",
            "43",
            "--tap",
            "ovl",
        ]
        start_agent(lab, h, [], log_dir=tmp_path, argv=argv, tap="ovl-42")
    assert {n["tap"] for n in status(lab, 1, tap="ovl-42")["agent"]["networks"]} == {"ovl-42", "ovl-43"}
    lab.run(1, ["ip", "addr", "add", "198.19.42.1/24", "dev", "ovbr42"])
    # arp_ignore=1: h2 answers ARP only on the interface holding the address (Linux answers on
    # any interface by default, which would hide what the overlay does).
    lab.run(2, ["sysctl", "-q", "-w", "net.ipv4.conf.all.arp_ignore=1"])
    lab.run(2, ["ip", "addr", "add", "198.19.42.2/24", "dev", "ovbr43"])  # same subnet, other network
    lab.run(2, ["ip", "addr", "add", "198.19.42.3/24", "dev", "ovbr42"])
    lab.run(1, ["ip", "addr", "add", "198.19.43.1/24", "dev", "ovbr43"])
    lab.run(2, ["ip", "addr", "add", "198.19.43.2/24", "dev", "ovbr43"])
    wait_ping(lab, 1, "198.19.42.3")  # network 42 to network 42
    wait_ping(lab, 1, "198.19.43.2")  # network 43 to network 43
    # 198.19.42.2 sits on h2's network-43 bridge: frames of network 42 never get there.
    assert lab.run(1, ["ping", "-c", "3", "-i", "0.2", "-W", "1", "198.19.42.2"], check=False).returncode != 0


HUGE = """
import asyncio, sys
from overlay.io.etcd import open_client

async def main():
    client = await open_client(sys.argv[1], "/overlay/v1")
    value = b'{"host": "h2", "pad": "' + b"x" * (1024 * 1024) + b'"}'
    await client.put(sys.argv[2].encode(), value)
    await client.close()

asyncio.run(main())
"""


def test_an_agent_receives_no_event_of_a_network_it_does_not_serve_and_refuses_a_huge_value(world: World) -> None:
    before = status(world.lab, 1)["registry"]
    assert before["watches"] == [f"{P}/hosts/", f"{P}/networks/{VNI}"]
    for i in range(30):  # network 43 is busy; no agent here serves it
        world.etcdctl("put", f"{P}/networks/43/endpoints/02:00:00:00:43:{i:02x}", '{"host": "h2"}')
    huge = f"{P}/networks/{VNI}/endpoints/02:00:00:00:42:ff"
    world.lab.run(1, [sys.executable, "-c", HUGE, world.etcd.endpoint, huge], check=True, timeout=30)
    put = world.etcdctl("put", f"{P}/networks/{VNI}/endpoints/{GHOST}", '{"host": "h2"}', "-w", "json")
    revision = json.loads(put.stdout)["header"]["revision"]
    wait_for(lambda: status(world.lab, 1)["registry"]["applied_revision"] >= revision, 10, "the marker to be applied")
    after = status(world.lab, 1)["registry"]
    # Not one of the 30 events of network 43 reached the agent (counted), and it holds none of them.
    assert after["out_of_scope"] == 0 and after["events"] - before["events"] < 30
    assert after["too_large"] == 1 and after["refused"] >= 1  # the 1 MiB value: refused, counted, not held
    fdb = world.fdb(1)
    assert GHOST in fdb and "02:00:00:00:42:ff" not in fdb
    assert after["apply_lag"]["count"] > before["apply_lag"]["count"]
    log = (world.logs / f"agent-{world.lab.name}-h1-ovl0.log").read_text()
    assert f"ignoring {huge}: a value of " in log and "Traceback" not in log
