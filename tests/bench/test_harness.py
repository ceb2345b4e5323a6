"""The benchmark harness in --quick mode on the kernel VXLAN and overlay dataplanes: it must
produce numbers (a smoke test so the harness cannot rot; no speed is asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root  # and iperf3: scripts/setup installs it


def test_quick_harness_run_produces_figures_table_and_chart(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "kernel,overlay", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "bench.json").read_text())
    for plane in ("kernel", "overlay"):
        figures = data["medians"][plane]
        assert figures["tcp_gbps"] > 0 and figures["tcp4_gbps"] > 0 and figures["udp64_kpps"] > 0
        assert 0 < figures["rtt_median_ms"] <= figures["rtt_p99_ms"]
    assert data["medians"]["overlay"]["cpu_s_per_gb"] > 0 and data["medians"]["kernel"]["cpu_s_per_gb"] is None
    table = (tmp_path / "bench.md").read_text()
    assert "ratio to kernel" in table and "TCP, 4 streams" in table
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "... round 1/1" in result.stdout  # the progress display
