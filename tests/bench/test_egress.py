"""bench/egress.py's building blocks: the checks that say what path a run took (on made-up iperf3
JSON), the report on made-up figures (no root), and the kernel row (Docker-style bridge, nft
masquerade and DNAT) on a lab of its own: both cases verified with a 1 s run, at MTU 1500 and at
the overlay's, then nothing of it left in the host namespace."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from bench import egress


def iperf_json(local: str, local_port: int, remote: str, remote_port: int, gbps: float = 1.0) -> dict[str, Any]:
    return {
        "start": {
            "connected": [
                {"local_host": local, "local_port": local_port, "remote_host": remote, "remote_port": remote_port}
            ]
        },
        "end": {"sum_received": {"bits_per_second": gbps * 1e9}, "sum_sent": {"retransmits": 0}},
    }


def test_egress_check_wants_the_hosts_address_at_the_outside() -> None:
    check = egress.egress_check("198.18.0.2", "198.19.42.3")
    client = iperf_json("198.19.42.3", 40000, "198.18.0.201", 5201)
    assert check(client, iperf_json("198.18.0.201", 5201, "::ffff:198.18.0.2", 40000)) == {
        "client_local": "198.19.42.3",
        "outside_saw": "198.18.0.2",
    }
    with pytest.raises(egress.CaseError, match="no masquerade"):
        check(client, iperf_json("198.18.0.201", 5201, "198.19.42.3", 40000))
    with pytest.raises(egress.CaseError, match="no connection"):
        check(client, {"error": "the client has terminated"})


def test_publish_check_wants_the_host_port_and_the_containers_port() -> None:
    check = egress.publish_check("198.18.0.2", "198.19.42.3")
    client = iperf_json("198.18.0.201", 50000, "198.18.0.2", egress.HOST_PORT)
    server = iperf_json("198.19.42.3", egress.PORT, "198.18.0.201", 50000)
    assert check(client, server)["container_saw"] == "198.18.0.201"
    with pytest.raises(egress.CaseError, match="not 198.18.0.2:8080"):
        check(iperf_json("198.18.0.201", 50000, "198.18.0.2", egress.PORT), server)
    with pytest.raises(egress.CaseError, match="server's end"):
        check(client, iperf_json("198.18.0.2", egress.HOST_PORT, "198.18.0.201", 50000))


def test_kernel_ruleset_is_dockers_bridge_network() -> None:
    rules = egress.nft_ruleset()
    assert f"table ip {egress.NFT_TABLE}" in rules
    assert 'ip saddr 198.19.99.0/24 oifname != "dk0" masquerade' in rules
    assert f"tcp dport {egress.HOST_PORT} dnat to 198.19.99.2:{egress.PORT}" in rules
    assert "policy drop" in rules  # Docker's FORWARD chain


def test_report_on_made_up_figures() -> None:
    def runs(*gbps: float, cpu: float | None = None) -> list[dict[str, Any]]:
        return [
            {"gbps": g, "retransmits": 0, "agent_cpu_s": cpu, "verified": {"outside_saw": "198.18.0.2"}} for g in gbps
        ]

    results = {
        "egress": {"kernel": runs(10, 12, 11), "kernel-mtu": runs(9, 10, 11), "overlay": runs(8, 9, 10, cpu=0.01)},
        "publish": {"kernel": runs(10, 10, 10), "kernel-mtu": runs(9, 9, 9), "overlay": []},
        "c2c": {"overlay": runs(3, 4, 5, cpu=2.0)},
    }
    summary = egress.summarize(results)
    assert summary["egress"]["planes"]["kernel"]["median_gbps"] == 11
    assert summary["egress"]["ratios"]["overlay/kernel"]["ratio"] == pytest.approx(9 / 11)
    assert summary["egress"]["ratios"]["overlay/kernel-mtu"]["rounds"] == pytest.approx([8 / 9, 9 / 10, 10 / 11])
    assert "overlay/kernel" not in summary["publish"]["ratios"]
    data = {
        "args": {"rounds": 3, "seconds": 5, "quick": False, "bridge_nf_call_iptables": None},
        "summary": summary,
        "results": results,
        "failed": {"overlay": {"publish": "`overlay publish` exited 1: no such command"}},
        "facts": {"kernel-mtu": {"container_mtu": 1418}},
        "machine": {"cpus": 2, "cpu": "x", "kernel": "6", "iperf3": "iperf 3.12", "note": "2 shared cores"},
    }
    text = egress.report(data)
    assert "| container -> outside (egress NAT, masquerade) | **11.00** (10.00, 12.00, 11.00) |" in text
    assert "kernel at overlay's MTU (1418)" in text
    assert "**0.82** (0.80, 0.75, 0.91)" in text  # overlay/kernel: 9/11, and per round
    assert "not measured" in text and "no such command" in text
    json.dumps(data)  # what egress.json holds


@pytest.mark.root  # and iperf3, nft
def test_kernel_row_is_verified_and_leaves_nothing(labs: Any) -> None:
    lab = labs(hosts=3, prefix="eg")
    lab.add_service(egress.OUTSIDE, egress.OUTSIDE_HOST)
    kernel = egress.setup_kernel(lab, egress.OUTSIDE)
    try:
        variant = egress.mtu_variant(lab, kernel, 1418)
        for plane, mtu in ((variant, 1418), (kernel, 1500)):
            for name, case in plane.cases.items():
                got = egress.measure(lab, case, 1, [])
                assert got["gbps"] > 0, name
                assert egress.mtu(lab, kernel.facts["ns"], "eth0") == mtu
            assert egress.measure(lab, plane.cases["egress"], 1, [])["verified"]["outside_saw"] == "198.18.0.3"
    finally:
        kernel.teardown()
    h3 = lab.ns(egress.KERNEL_HOST)
    links = lab.run(h3, ["ip", "-br", "link"]).stdout
    assert egress.KERNEL_BRIDGE not in links and egress.KERNEL_VETH not in links
    assert egress.NFT_TABLE not in lab.run(h3, ["nft", "list", "tables"]).stdout
    assert kernel.facts["ns"] not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
