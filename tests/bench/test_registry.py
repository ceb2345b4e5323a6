"""bench/registry.py in --quick mode against a real etcd: it runs, prints latency figures and
requests/s per idle agent, writes its results, and leaves nothing running; and --fleet --quick
(bench/fleet.py: in-process core figures, the forwarding table's memory, real agents on a
simulated fleet in a real etcd) prints every table and target and leaves no namespace or process."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"\d+(?:\.\d+)?"


def run_bench(*args: str, module: str = "bench.registry", timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` from the repository, bounded, its output captured."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.etcd
def test_quick_run_prints_latency_and_requests_per_second(tmp_path: Path) -> None:
    result = run_bench("--quick", "--out", str(tmp_path))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "... 10 watchers:" in out  # progress while running

    # A latency row per watcher count: p50, p99, max in ms.
    for watchers in (1, 10):
        row = re.search(rf"^\| {watchers} \| 10 \({NUMBER}\) \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \|", out, re.M)
        assert row, f"no latency row for {watchers} watchers in:\n{out}"
        p50, p99, worst = map(float, row.groups())
        assert 0 < p50 <= p99 <= worst
    assert re.search(rf"^target: p99 <= 100 ms at 100 watchers .*: p99 {NUMBER} ms at 10: (met|MISSED)$", out, re.M)

    rate = re.search(rf"^requests/s per idle agent: ({NUMBER}) messages", out, re.M)
    assert rate, out
    assert 0 < float(rate.group(1)) < 5  # a keepalive every TTL/3, nothing like polling
    assert re.search(r"^\| LeaseKeepAlive \| \d+ \| \d+ \| \d+ \| \d+\.\d+ \|$", out, re.M), out
    assert re.search(r"^no polling at rest .*: met \(0 Range calls", out, re.M), out

    assert (tmp_path / "registry.md").read_text().strip() in out
    saved = json.loads((tmp_path / "registry.json").read_text())
    assert [r["watchers"] for r in saved["propagation"]] == [1, 10]
    for r in saved["propagation"]:
        assert r["lost"] == 0 and r["pairs"] == r["watchers"] * r["puts"]
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("p50_ms", "p99_ms", "put_rtt_p50_ms"))
    rest = saved["at_rest"]
    assert rest["range_calls"] == 0 and rest["keepalive_per_client_s"] > 0


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.root
@pytest.mark.etcd
def test_fleet_quick_run_prints_every_table_and_target_and_leaves_nothing(tmp_path: Path) -> None:
    before = _namespaces()
    result = run_bench("--fleet", "--quick", "--out", str(tmp_path))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    lab = re.search(r"^\.\.\. lab (\S+): ", out, re.M)
    assert lab, out
    for line in (
        "... core: 300 hosts:",
        "... fleet: writing",
        "... 3 agents ready:",
        "... 3 agents: put -> applied p50",
    ):
        assert line in out, f"no progress line {line!r} in:\n{out}"

    # A: a row per fleet size, every figure a number, per-event CPU small and positive.
    for hosts in (100, 300):
        row = re.search(rf"^\| {hosts} \| {hosts * 32} \|((?: {NUMBER}(?: \({NUMBER}\))? \|){{8}})$", out, re.M)
        assert row, f"no core row for {hosts} hosts in:\n{out}"
        cells = [float(c.split()[0]) for c in row.group(1).strip(" |").split(" | ")]
        assert cells[4] == 2000 and 0 < cells[5] <= cells[6] <= cells[7] < 50
    assert re.search(rf"^resync: a \d+-key snapshot .* -> \d+ events: {NUMBER} s wall", out, re.M), out
    # B: bytes per MAC by RSS and by tracemalloc.
    row = re.search(rf"^\| 100000 \| 3000 \| ({NUMBER}) \| ({NUMBER}) \| (-?{NUMBER}) \| {NUMBER} \|$", out, re.M)
    assert row, out
    assert 0 < float(row.group(2)) < float(row.group(1)) < 2000
    # C: a row per fleet size with every agent ready, put -> applied with nothing lost, keepalive only at rest.
    for hosts in (100, 300):
        assert re.search(rf"^\| {hosts} \| \d+ \| 3/3 \| {NUMBER} \| {NUMBER} / {NUMBER} \|", out, re.M), out
        row = re.search(
            rf"^\| {hosts} \| 3 \| 20 \| 60 \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \| .* \| 0 \|$", out, re.M
        )
        assert row, f"no put -> applied row for {hosts} hosts in:\n{out}"
        p50, p99, worst = map(float, row.groups())
        assert 0 < p50 <= p99 <= worst < 10_000
        assert re.search(rf"^\| {hosts} \| 3 \| {NUMBER} \| LeaseKeepAlive {NUMBER} \| 0 \|", out, re.M), out
    # Every target of the issue, with a verdict.
    targets = re.findall(r"^\| (.+?) \| (.+?) \| (met|MISSED|not measured) \|$", out.split("### Targets", 1)[1], re.M)
    assert len(targets) >= 10, out
    assert any(t[0].startswith("put -> applied p99 <= 30 ms") and t[2] != "not measured" for t in targets), targets
    assert any(t[0].startswith("etcd requests per idle agent") and t[2] == "met" for t in targets), targets

    assert (tmp_path / "fleet.md").read_text().strip() in out
    saved = json.loads((tmp_path / "fleet.json").read_text())
    assert [r["hosts"] for r in saved["core"]["sizes"]] == [100, 300]
    phases = saved["agents"]["phases"]
    assert [(p["hosts"], p["ready"]) for p in phases] == [(100, 3), (300, 3)]
    assert all(p["applied"]["lost"] == 0 and math.isfinite(p["applied"]["p99_ms"]) for p in phases)
    assert len(saved["targets"]) == len(targets)

    # Nothing left: no namespace of its lab, no process it started (agents, driver, etcd).
    assert not {n for n in _namespaces() - before if n.startswith(lab.group(1) + "-")}
    assert saved["agents"]["pids"] and not [pid for pid in saved["agents"]["pids"] if _alive(pid)]
