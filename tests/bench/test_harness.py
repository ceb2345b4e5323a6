"""The benchmark harness in --quick mode on kernel VXLAN and overlay, each over the IPv4 and the
IPv6 underlay (kernel, kernel6, overlay, overlay6), in one run shared by the tests here: it must
produce numbers (a smoke test so the harness cannot rot; no speed is asserted here). And its
report (tables, ratios, the IPv6 goal, JSON) on made-up figures, without a lab."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import harness
from tests.bench.test_registry import run_bench

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"\d+(?:\.\d+)?(?:e[+-]?\d+)?"
PLANES = ("kernel", "kernel6", "overlay", "overlay6")


def run_harness(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python -m bench ARGS``: the registry bench tests' bounded runner."""
    return run_bench(*args, module="bench", timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One quick run of the four dataplanes (about a minute here), shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    result = run_harness("--quick", "--only", ",".join(PLANES), "--out", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result, out


@pytest.mark.root  # and iperf3: scripts/setup installs it
def test_quick_harness_run_produces_figures_table_and_chart(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, tmp_path = quick_run
    data = json.loads((tmp_path / "bench.json").read_text())
    for plane in PLANES:
        figures = data["medians"][plane]
        assert figures["tcp_gbps"] > 0 and figures["tcp4_gbps"] > 0 and figures["udp64_kpps"] > 0
        assert 0 < figures["rtt_median_ms"] <= figures["rtt_p99_ms"]
    for plane in ("overlay", "overlay6"):
        assert data["medians"][plane]["cpu_s_per_gb"] > 0
    assert data["medians"]["kernel"]["cpu_s_per_gb"] is None and data["medians"]["kernel6"]["cpu_s_per_gb"] is None
    table = (tmp_path / "bench.md").read_text()
    assert "ratio to kernel" in table and "TCP, 4 streams" in table
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "... round 1/1" in result.stdout  # the progress display


@pytest.mark.root
def test_quick_harness_run_has_the_ipv6_underlay_rows_and_ratios(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, tmp_path = quick_run
    table = (tmp_path / "bench.md").read_text()
    assert table.strip() in result.stdout
    assert "| figure | kernel | kernel6 | overlay | overlay6 |" in table
    for label, name in (("kernel VXLAN (IPv6 underlay)", "kernel6"), ("overlay (IPv6 underlay)", "overlay6")):
        row = re.search(
            rf"^\| {re.escape(label)} \(`{name}`\) \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \|", table, re.M
        )
        assert row, f"no row for {name} in:\n{table}"
        assert all(float(x) > 0 for x in row.groups())  # TCP 1 and 4 streams, UDP 64 B
    for pair in ("kernel6/kernel", "overlay6/overlay"):
        assert re.search(rf"^\| \*\*ratio {pair}\*\* \| {NUMBER} \| {NUMBER} \|", table, re.M), table
    assert re.search(r"^goal \(issue 13\): .*RTT median .*\. Overall: (met|MISSED)$", table, re.M), table
    pairs = json.loads((tmp_path / "bench.json").read_text())["ipv6_vs_ipv4"]["pairs"]
    assert set(pairs) == {"kernel6/kernel", "overlay6/overlay"}
    assert pairs["overlay6/overlay"]["figures"]["tcp_gbps"]["ratio"] > 0
    assert set(pairs["overlay6/overlay"]["goal"]) == set(harness.IPV6_GOAL)


def _figures(scale: float, cpu: float | None) -> dict[str, float | None]:
    base = {
        "tcp_gbps": 5.0,
        "tcp4_gbps": 6.0,
        "udp64_kpps": 100.0,
        "udp64_loss_pct": 50.0,
        "udp64_fixed_loss_pct": 0.0,
        "rtt_median_ms": 0.4,
        "rtt_p99_ms": 0.6,
    }
    out: dict[str, float | None] = {k: v * scale if k.endswith(("gbps", "kpps")) else v for k, v in base.items()}
    out["cpu_s_per_gb"] = cpu
    return out


def test_report_compares_each_ipv6_dataplane_with_its_ipv4_twin(tmp_path: Path) -> None:
    results: dict[str, list[dict[str, Any]]] = {
        "kernel": [_figures(2.0, None), _figures(2.0, None)],
        "kernel6": [_figures(1.8, None), _figures(1.6, None)],  # ratio of the medians 0.85, rounds 0.8-0.9
        "overlay": [_figures(1.0, 1.0), _figures(1.0, 1.0)],
        "overlay6": [_figures(0.9375, 1.2), _figures(0.875, 1.2)],  # 0.906: just within the goal
    }
    harness.report(results, 2, 5, tmp_path)
    table = (tmp_path / "bench.md").read_text()
    assert "| kernel VXLAN (IPv6 underlay) (`kernel6`) | 8.5 (8-9) |" in table
    assert (
        "| **ratio kernel6/kernel** | 0.85 (0.80-0.90) | 0.85 (0.80-0.90) | 0.85 (0.80-0.90) | 1.00 (1.00-1.00) |"
        in table
    )
    assert "| **ratio overlay6/overlay** | 0.91 (0.88-0.94) |" in table
    assert "| 1.20 (1.20-1.20) |" in table  # CPU per GB: overlay6 against overlay
    assert "TCP, 1 stream 0.91 (>= 0.90: met)" in table and "RTT median 1.00 (<= 1.10: met)" in table
    assert table.rstrip().endswith("Overall: met")
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved) == {"rounds", "medians", "labels", "ipv6_vs_ipv4"}
    assert saved["labels"]["overlay6"] == "overlay (IPv6 underlay)"
    goal = saved["ipv6_vs_ipv4"]["pairs"]["overlay6/overlay"]["goal"]
    assert goal["tcp_gbps"] == {"bound": 0.9, "at_least": True, "met": True}
    assert "goal" not in saved["ipv6_vs_ipv4"]["pairs"]["kernel6/kernel"]

    results["overlay6"] = [_figures(0.8, 1.2), _figures(0.8, 1.2)]
    harness.report(results, 2, 5, tmp_path)
    table = (tmp_path / "bench.md").read_text()
    assert "TCP, 1 stream 0.80 (>= 0.90: MISSED)" in table and table.rstrip().endswith("Overall: MISSED")


def test_report_without_ipv6_dataplanes_is_unchanged(tmp_path: Path) -> None:
    harness.report({"kernel": [_figures(2.0, None)], "overlay": [_figures(1.0, 1.0)]}, 1, 2, tmp_path)
    table = (tmp_path / "bench.md").read_text()
    assert "IPv6" not in table and "goal" not in table
    assert set(json.loads((tmp_path / "bench.json").read_text())) == {"rounds", "medians"}
