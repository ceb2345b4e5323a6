"""bench/registry.py in --quick mode against a real etcd: it runs, prints latency figures and
requests/s per idle agent, writes its results, and leaves nothing running."""

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


@pytest.mark.etcd
def test_quick_run_prints_latency_and_requests_per_second(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "bench.registry", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
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
