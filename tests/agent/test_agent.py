"""The agent on a lab: real namespaces, real TAPs, real UDP, agents run as processes the way an
operator starts them (`overlay agent ...` inside `ip netns exec`)."""

from __future__ import annotations

import hashlib
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from overlay.core import wire
from overlay.lab import Lab, wait_for
from tests.labkit import (
    SEND_JUNK,
    VNI,
    Labs,
    hostile_datagrams,
    new_lab,
    overlay_ip,
    ping,
    send_hostile,
    start_agent,
    status,
    stop_agent,
    tcp_transfer,
    wait_ping,
)

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Three hosts, each running an agent whose peers are the other two."""
    logs = tmp_path_factory.mktemp("logs")
    with new_lab(hosts=3, prefix="ta") as lab:
        for h in (1, 2, 3):
            start_agent(lab, h, [p for p in (1, 2, 3) if p != h], log_dir=logs)
        yield lab


def test_three_hosts_ping_each_other(lab3: Lab) -> None:
    for src in (1, 2, 3):
        for dst in (1, 2, 3):
            if src != dst:
                wait_ping(lab3, src, overlay_ip(dst))
    # ARP went out by head-end replication; the answers taught every agent the others' MACs.
    for h in (1, 2, 3):
        fdb = status(lab3, h, cmd="fdb")
        learned = {e["mac"]: e["vtep"] for e in fdb if e["source"] == "learned"}
        others = {f"02:00:00:00:00:{p:02x}": f"{lab3.address(p)}:4789" for p in (1, 2, 3) if p != h}
        assert others.items() <= learned.items()


def test_status_reports_traffic_per_peer(lab3: Lab) -> None:
    wait_ping(lab3, 1, overlay_ip(2))
    s = status(lab3, 1)
    assert s["agent"]["local"] == str(lab3.address(1)) and s["agent"]["vni"] == VNI and s["agent"]["mtu"] == 1450
    peer2 = next(p for p in s["peers"] if p["vtep"] == f"{lab3.address(2)}:4789")
    assert peer2["tx_frames"] > 0 and peer2["rx_frames"] > 0 and peer2["rx_bytes"] > 0
    assert s["fdb"]["learned"] >= 1
    # Each namespace's `overlay status` reaches its own agent, though all TAPs are named ovl0.
    assert status(lab3, 2)["agent"]["local"] == str(lab3.address(2))


def test_static_agents_probe_their_peers_and_refuse_attach_clearly(lab3: Lab) -> None:
    wait_for(
        lambda: all(p["reachable"] for p in status(lab3, 1)["probes"].values()) and len(status(lab3, 1)["probes"]) == 2,
        10,
        "h1's probes of h2 and h3",
    )
    ns = lab3.add_container("static")
    result = lab3.run(1, [sys.executable, "-m", "overlay", "attach", ns, "--net", str(VNI)], check=False)
    assert result.returncode == 2 and "needs the registry" in result.stderr and "Traceback" not in result.stderr


def test_100_mb_tcp_transfer_arrives_byte_identical(lab3: Lab, tmp_path: Path) -> None:
    data = tmp_path / "payload"
    with open(data, "wb") as f:
        f.write(random.Random(1).randbytes(100 * 1024 * 1024))
    expected = hashlib.sha256(data.read_bytes()).hexdigest()
    wait_ping(lab3, 1, overlay_ip(2))
    assert tcp_transfer(lab3, 1, 2, overlay_ip(2), data) == (expected, 100 * 1024 * 1024)


def underlay_fragments(lab: Lab, host: int) -> int:
    """FragCreates + ReasmReqds from the host's /proc/net/snmp: any underlay fragmentation."""
    snmp = lab.run(host, ["cat", "/proc/net/snmp"]).stdout.splitlines()
    names, values = (line.split()[1:] for line in snmp if line.startswith("Ip:"))
    ip = dict(zip(names, map(int, values)))
    return ip["FragCreates"] + ip["ReasmReqds"]


def test_mtu_1450_crosses_and_larger_is_refused_never_fragmented(lab3: Lab) -> None:
    wait_ping(lab3, 1, overlay_ip(2))
    before = underlay_fragments(lab3, 1) + underlay_fragments(lab3, 2)
    ok = ping(lab3, 1, overlay_ip(2), count=3, size=1450 - 28, dont_fragment=True)  # 1450-byte IP packet
    assert ok.returncode == 0, ok.stdout
    too_big = ping(lab3, 1, overlay_ip(2), count=1, size=1451 - 28, dont_fragment=True)
    assert too_big.returncode != 0
    assert (
        "mtu = 1450" in (too_big.stdout + too_big.stderr).lower()
        or "too long" in (too_big.stdout + too_big.stderr).lower()
    )
    assert underlay_fragments(lab3, 1) + underlay_fragments(lab3, 2) == before


def test_hostile_datagrams_are_counted_drops_and_the_overlay_keeps_working(lab3: Lab) -> None:
    junk = hostile_datagrams()
    expected = send_hostile(lab3, 2, 1, lab3.address(1), junk)
    assert sum(expected.values()) == len(junk)  # every one of them is a drop
    wait_ping(lab3, 1, overlay_ip(2))


def test_datagrams_from_a_non_peer_are_dropped(labs: Labs, tmp_path: Path) -> None:
    lab = labs(hosts=3, prefix="tn")
    start_agent(lab, 1, [2], log_dir=tmp_path)
    start_agent(lab, 2, [1], log_dir=tmp_path)
    frame = bytes.fromhex("020000000001 020000000003 0806") + bytes(28)
    lab.run(3, [sys.executable, "-c", SEND_JUNK, str(lab.address(1)), wire.encode(VNI, frame).hex()])
    wait_for(lambda: status(lab, 1)["drops"]["not_member"] >= 1, 10, "the non-peer datagram to be counted")
    assert not any(e["mac"] == "02:00:00:00:00:03" for e in status(lab, 1, cmd="fdb"))
    wait_ping(lab, 1, overlay_ip(2))


def test_stopping_removes_the_tap_and_a_second_agent_on_the_port_fails_clearly(labs: Labs, tmp_path: Path) -> None:
    lab = labs(hosts=2, prefix="ts")
    notify = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(10)
    agent = start_agent(lab, 1, [2], log_dir=tmp_path, env={"NOTIFY_SOCKET": str(notify)})
    assert sock.recv(100) == b"READY=1"
    second = lab.run(
        1,
        [sys.executable, "-m", "overlay", "agent", "--vni", "42", "--local", str(lab.address(1)), "--tap", "ovl1"],
        check=False,
    )
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert "UDP port 4789 on 198.18.0.1 is in use" in second.stderr
    assert "ovl1" not in lab.run(1, ["ip", "-br", "link"]).stdout  # nothing left behind
    same_tap = lab.run(
        1,
        [sys.executable, "-m", "overlay", "agent", "--vni", "42", "--local", str(lab.address(1)), "--port", "4790"],
        check=False,
    )
    assert same_tap.returncode == 1 and "interface ovl0 already exists" in same_tap.stderr
    assert stop_agent(agent) == 0
    assert sock.recv(100) == b"STOPPING=1"
    assert "ovl0" not in lab.run(1, ["ip", "-br", "link"]).stdout
    sock.close()


def test_agent_reads_a_toml_config_and_flags_override_it(labs: Labs, tmp_path: Path) -> None:
    lab = labs(hosts=2, prefix="tc")
    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'vni = 42\nlocal = "{lab.address(2)}"\npeer = ["{lab.address(1)}"]\n'
        f'tap = "ovl9"\naddress = "198.19.0.2/24"\nmtu = 1400\n'
    )
    start_agent(lab, 1, [2], log_dir=tmp_path)
    log = open(tmp_path / "toml.log", "w")
    proc = lab.spawn(
        2,
        [sys.executable, "-m", "overlay", "agent", "--config", str(conf), "--mtu", "1300"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_for(lambda: proc.poll() is not None or status(lab, 2) is not None, 30, "the TOML agent")
    s = status(lab, 2)
    assert s["agent"]["tap"] == "ovl9" and s["agent"]["mtu"] == 1300
    wait_ping(lab, 2, overlay_ip(1))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--vni", "16777216"], "vni: '16777216' is not an integer from 0 to 16777215"),
        (["--vni", "42", "--local", "198.18.0.300"], "local: '198.18.0.300' is not an IPv4 or IPv6 address"),
        (["--vni", "42", "--local", "198.18.0.1", "--mac", "01:00:5e:00:00:01"], "group or null address"),
        (["--vni", "42", "--local", "198.18.0.1", "--address", "198.19.0.1"], "needs a prefix length"),
        (["--vni", "42", "--local", "198.18.0.1", "--tap", "a/b"], "is not an interface name"),
        (["--local", "198.18.0.1"], "no VNI"),
        (["--vni", "42", "--local", "198.18.0.1", "--peer", "2001:2:0:1::2"], "is IPv6 but this host has no IPv6"),
        (["--vni", "42", "--local", "2001:2:0:1::1", "--local6", "2001:2:0:1::2"], "--local6 is the IPv6 address"),
        (["--vni", "42", "--local", "198.18.0.1", "--config", "/nonexistent.toml"], "No such file"),
    ],
)
def test_bad_input_is_one_clear_line(flags: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "overlay", "agent", *flags], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_local_address_not_on_this_host_is_a_clear_error(labs: Labs, tmp_path: Path) -> None:
    lab = labs(hosts=1, prefix="tl")
    result = lab.run(1, [sys.executable, "-m", "overlay", "agent", "--vni", "1", "--local", "198.18.0.99"], check=False)
    assert result.returncode == 2 and "198.18.0.99 is not an address of this host" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    for flags in (
        ["--local", "2001:2:0:1::99"],
        ["--local", "198.18.0.1", "--local6", "2001:2:0:1::99", "--mtu", "1400"],
    ):
        result = lab.run(1, [sys.executable, "-m", "overlay", "agent", "--vni", "1", *flags], check=False)
        assert result.returncode == 2 and "2001:2:0:1::99 is not an address of this host" in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "ovl0" not in lab.run(1, ["ip", "-o", "link"]).stdout  # nothing left behind


def test_without_privileges_the_error_says_what_is_needed(labs: Labs) -> None:
    lab = labs(hosts=1, prefix="tp")
    # root without CAP_NET_ADMIN: the capability dropped from the bounding set before exec
    result = lab.run(
        1,
        [
            "setpriv",
            "--bounding-set=-net_admin",
            sys.executable,
            "-m",
            "overlay",
            "agent",
            "--vni",
            "1",
            "--local",
            "198.18.0.1",
        ],
        check=False,
    )
    assert result.returncode == 1 and "CAP_NET_ADMIN" in result.stderr and "Traceback" not in result.stderr


def test_missing_tun_device_is_a_clear_error() -> None:
    from overlay.io.tap import Tap, TapError

    with pytest.raises(TapError, match="modprobe tun"):
        Tap.open("ovlx", dev="/nonexistent/tun")


def test_deleting_the_tap_stops_the_agent_with_a_clear_error(labs: Labs, tmp_path: Path) -> None:
    lab = labs(hosts=2, prefix="td")
    agent = start_agent(lab, 1, [2], log_dir=tmp_path)
    lab.run(1, ["ip", "link", "del", "ovl0"])
    assert agent.wait(timeout=20) == 1  # not a busy loop on a dead fd
    log = (tmp_path / f"agent-{lab.name}-h1-ovl0.log").read_text()
    assert "the TAP failed" in log and "Traceback" not in log


TAP_TWICE = """
import ipaddress
from overlay.io.tap import Tap
tap = Tap.open("ovlt")
addr = ipaddress.IPv4Interface("198.19.0.9/24")
first = tap.configure(1400, 0x020000000009, addr)
second = tap.configure(1400, 0x020000000009, addr)  # address and MTU already there: fine
print(first == second == 0x020000000009)
tap.close()
"""


def test_configuring_the_tap_is_idempotent(labs: Labs) -> None:
    lab = labs(hosts=1, prefix="tt")
    assert lab.run(1, [sys.executable, "-c", TAP_TWICE]).stdout.strip() == "True"
    assert "ovlt" not in lab.run(1, ["ip", "-br", "link"]).stdout  # closed: the kernel removed it
