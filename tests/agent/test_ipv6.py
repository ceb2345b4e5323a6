"""The agent on an IPv6 underlay: real namespaces on 2001:2:0:1::/64 (the lab's address plan),
a real etcd, agents run as operators start them; kernel VXLAN interop over IPv6; a dual-stack
host that talks IPv4 to one peer and IPv6 to another."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Iterator

import pytest

from overlay.lab import Lab, wait_for
from overlay.lab import etcd as etcdlab
from tests.labkit import (
    VNI,
    Labs,
    etcd_agent_argv,
    hostile_datagrams,
    new_lab,
    new_lab_with_etcd,
    overlay_ip,
    ping,
    send_hostile,
    start_agent,
    status,
    tcp_transfer,
    wait_ping,
)

pytestmark = [pytest.mark.root, pytest.mark.etcd]
MTU6 = 1500 - 70 - 32  # etcd mode: an IPv6 underlay's overhead and room for sealing (encrypted networks)


def vtep(lab: Lab, host: int) -> str:
    return f"[{lab.address6(host)}]:4789"


@pytest.fixture(scope="module")
def lab6(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, etcdlab.EtcdServer]]:
    """Three hosts on an IPv6-only underlay, etcd on IPv6 too, an agent on each."""
    logs = tmp_path_factory.mktemp("logs")
    with new_lab_with_etcd(hosts=3, prefix="t6", ipv6=True) as (lab, etcd):
        for h in (1, 2, 3):
            start_agent(lab, h, [], log_dir=logs, argv=etcd_agent_argv(lab, h, [etcd.endpoint]))
        yield lab, etcd


def test_three_hosts_on_an_ipv6_underlay_find_each_other_and_ping(lab6: tuple[Lab, etcdlab.EtcdServer]) -> None:
    lab, etcd = lab6
    assert "[" in etcd.endpoint  # the registry is reached over IPv6 as well
    for src in (1, 2, 3):
        for dst in (1, 2, 3):
            if src != dst:
                wait_ping(lab, src, overlay_ip(dst))
    s = status(lab, 1)
    assert s["agent"]["local"] == str(lab.address6(1)) and s["agent"]["mtu"] == MTU6
    fdb = {e["mac"]: e for e in status(lab, 1, cmd="fdb")}
    assert fdb["02:00:00:00:00:02"]["vtep"] == vtep(lab, 2) and fdb["02:00:00:00:00:02"]["source"] == "registry"
    assert {p["vtep"] for p in s["peers"]} >= {vtep(lab, 2), vtep(lab, 3)}
    host = json.loads(etcdlab.etcdctl(etcd, "get", "--print-value-only", "/overlay/v1/hosts/h2", check=True).stdout)
    assert host["address"] == str(lab.address6(2)) and host.get("address6") is None


def test_100_mb_cross_an_ipv6_underlay_byte_identical(lab6: tuple[Lab, etcdlab.EtcdServer], tmp_path: Path) -> None:
    lab, _ = lab6
    data = tmp_path / "payload"
    data.write_bytes(random.Random(6).randbytes(100 * 1024 * 1024))
    wait_ping(lab, 1, overlay_ip(3))
    assert tcp_transfer(lab, 1, 3, overlay_ip(3), data) == (hashlib.sha256(data.read_bytes()).hexdigest(), 100 << 20)


def ip6_fragments(lab: Lab, host: int) -> int:
    """Ip6FragCreates + Ip6ReasmReqds from the host's /proc/net/snmp6."""
    rows = dict(line.split() for line in lab.run(host, ["cat", "/proc/net/snmp6"]).stdout.splitlines() if line)
    return int(rows["Ip6FragCreates"]) + int(rows["Ip6ReasmReqds"])


def test_the_mtu_crosses_an_ipv6_underlay_and_a_byte_more_is_refused_never_fragmented(
    lab6: tuple[Lab, etcdlab.EtcdServer],
) -> None:
    lab, _ = lab6
    wait_ping(lab, 1, overlay_ip(2))
    before = ip6_fragments(lab, 1) + ip6_fragments(lab, 2)
    ok = ping(lab, 1, overlay_ip(2), count=3, size=MTU6 - 28, dont_fragment=True)  # an MTU-sized IP packet
    assert ok.returncode == 0, ok.stdout
    too_big = ping(lab, 1, overlay_ip(2), count=1, size=MTU6 + 1 - 28, dont_fragment=True)
    assert too_big.returncode != 0 and str(MTU6) in too_big.stdout + too_big.stderr
    assert ip6_fragments(lab, 1) + ip6_fragments(lab, 2) == before


def test_hostile_ipv6_datagrams_are_counted_drops_and_the_overlay_keeps_working(
    lab6: tuple[Lab, etcdlab.EtcdServer],
) -> None:
    lab, _ = lab6
    send_hostile(lab, 2, 1, lab.address6(1), hostile_datagrams())
    wait_ping(lab, 1, overlay_ip(2))


def test_a_datagram_over_the_ipv6_path_mtu_is_a_counted_drop_not_a_fragment(labs: Labs, tmp_path: Path) -> None:
    """With the TAP's MTU set above what the IPv6 underlay carries, the outer datagram is
    refused by the kernel (IPV6_DONTFRAG): counted as too_big, never fragmented."""
    lab = labs(hosts=2, prefix="tm", ipv6=True)
    start_agent(lab, 1, [2], "--mtu", "1500", log_dir=tmp_path)
    start_agent(lab, 2, [1], log_dir=tmp_path)
    wait_ping(lab, 1, overlay_ip(2))
    before = ip6_fragments(lab, 1) + ip6_fragments(lab, 2)
    assert ping(lab, 1, overlay_ip(2), count=1, size=1431 - 28, dont_fragment=True).returncode != 0
    wait_for(lambda: status(lab, 1)["drops"]["too_big"] >= 1, 10, "the oversized datagram to be counted")
    assert ip6_fragments(lab, 1) + ip6_fragments(lab, 2) == before


def test_a_dual_stack_host_talks_ipv4_to_one_peer_and_ipv6_to_another(labs: Labs, tmp_path: Path) -> None:
    lab, etcd = labs.with_etcd(hosts=3, prefix="td", dual_stack=True)
    e = [etcd.endpoint]
    start_agent(lab, 1, [], log_dir=tmp_path, argv=etcd_agent_argv(lab, 1, e, "--local6", str(lab.address6(1))))
    start_agent(lab, 2, [], log_dir=tmp_path, argv=etcd_agent_argv(lab, 2, e))  # IPv4 only
    start_agent(lab, 3, [], log_dir=tmp_path, argv=etcd_agent_argv(lab, 3, e, "--local", str(lab.address6(3))))
    wait_ping(lab, 1, overlay_ip(2))
    wait_ping(lab, 1, overlay_ip(3))
    wait_ping(lab, 3, overlay_ip(1))
    fdb = {x["mac"]: x["vtep"] for x in status(lab, 1, cmd="fdb")}
    assert fdb["02:00:00:00:00:02"] == f"{lab.address(2)}:4789" and fdb["02:00:00:00:00:03"] == vtep(lab, 3)
    assert {x["mac"]: x["vtep"] for x in status(lab, 3, cmd="fdb")}["02:00:00:00:00:01"] == vtep(lab, 1)
    s1 = status(lab, 1)
    assert s1["agent"]["local6"] == str(lab.address6(1)) and s1["agent"]["unreachable"] == []
    # h2 (IPv4 only) and h3 (IPv6 only) share no family: each says so, and neither sends to the other.
    wait_for(lambda: status(lab, 2)["agent"]["unreachable"] == ["h3"], 10, "h2 to report h3 unreachable")
    assert status(lab, 3)["agent"]["unreachable"] == ["h2"]
    assert ping(lab, 2, overlay_ip(3)).returncode != 0
    assert all(p["tx_frames"] == 0 for p in status(lab, 2)["peers"] if p["vtep"].startswith("["))


@pytest.fixture(scope="module")
def mixed6(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Hosts 1 and 2 run agents, host 3 a kernel vxlan device, all on an IPv6-only underlay."""
    logs = tmp_path_factory.mktemp("logs")
    with new_lab(hosts=3, prefix="tk", ipv6=True) as lab:
        for h in (1, 2):
            start_agent(lab, h, [p for p in (1, 2, 3) if p != h], log_dir=logs)
        k = str(lab.address6(3))
        lab.run(3, ["ip", "link", "add", "vx0", "type", "vxlan", "id", str(VNI), "dstport", "4789", "local", k])
        lab.run(3, ["ip", "link", "set", "vx0", "type", "vxlan", "nolearning"], check=False)
        for h in (1, 2):
            lab.run(3, ["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vx0", "dst", str(lab.address6(h))])
        lab.run(3, ["ethtool", "-K", "vx0", "tx", "off"])  # see test_interop.py: finished inner checksums
        lab.run(3, ["ip", "link", "set", "vx0", "address", "02:00:00:00:00:03", "mtu", "1430", "up"])
        lab.run(3, ["ip", "addr", "add", f"{overlay_ip(3)}/24", "dev", "vx0"])
        yield lab


@pytest.mark.parametrize(("src", "dst"), [(1, 3), (3, 1), (2, 3), (3, 2)])
def test_ping_between_agent_and_kernel_vxlan_over_ipv6(mixed6: Lab, src: int, dst: int) -> None:
    wait_ping(mixed6, src, overlay_ip(dst))


@pytest.mark.parametrize(("src", "dst"), [(1, 3), (3, 1)])
def test_tcp_between_agent_and_kernel_vxlan_over_ipv6(mixed6: Lab, tmp_path: Path, src: int, dst: int) -> None:
    data = tmp_path / "payload"
    data.write_bytes(random.Random(src).randbytes(8 * 1024 * 1024))
    wait_ping(mixed6, src, overlay_ip(dst))
    assert tcp_transfer(mixed6, src, dst, overlay_ip(dst), data) == (
        hashlib.sha256(data.read_bytes()).hexdigest(),
        8 * 1024 * 1024,
    )
    fdb = {e["mac"]: e for e in status(mixed6, 1, cmd="fdb")}
    assert fdb["02:00:00:00:00:03"]["vtep"] == vtep(mixed6, 3)  # learned at the kernel's IPv6 address
