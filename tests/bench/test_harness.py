"""The benchmark harness in --quick mode on kernel VXLAN and overlay, each over the IPv4 and the
IPv6 underlay (kernel, kernel6, overlay, overlay6), in one run shared by the tests here: it must
produce numbers (a smoke test so the harness cannot rot; no speed is asserted here). The
wireguard-go and nebula rows each on a lab of their own: set up, a ping and a 1 s iperf3 through
them, their sockets' buffers, nothing in the clear on the underlay, and nothing left afterwards
(process, device, socket file, namespace, link); the plaintext check of the overlay-encrypted
row against the plain overlay row; its key files. And the report (tables, ratios, the IPv6 goal,
overlay-encrypted against the others, JSON) on made-up figures, without a lab."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bench import harness, wireguard
from bench.lab import OVERLAY_NET, iperf, setup_overlay
from overlay.lab import Lab, wait_for
from tests.bench.test_registry import run_bench
from tests.labkit import new_lab

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
    assert "IPv6" not in table and "goal" not in table and "overlay-encrypted" not in table
    assert set(json.loads((tmp_path / "bench.json").read_text())) == {"rounds", "medians"}


# The wireguard-go and nebula rows: name -> the device on host h of a lab, its UDP port
ENCRYPTED_ROWS = {
    "wireguard-go": (lambda lab, h: wireguard.device(lab, h), wireguard.PORT),
    "nebula": (lambda lab, h: "neb0", 4242),
}


def _links(lab: Lab, h: int) -> list[str]:
    return [line.split()[0].split("@")[0] for line in lab.run(h, ["ip", "-br", "link"]).stdout.splitlines()]


@pytest.mark.root  # and wireguard-go, wireguard-tools, nebula, iperf3, tcpdump: scripts/setup installs them
@pytest.mark.parametrize("name", list(ENCRYPTED_ROWS))
def test_encrypted_alternative_row_carries_traffic_and_leaves_nothing(name: str, tmp_path: Path) -> None:
    device, port = ENCRYPTED_ROWS[name]
    dst = OVERLAY_NET.format(2).split("/")[0]
    with new_lab(hosts=2, prefix="bw") as lab:
        lab_name, namespaces = lab.name, lab.namespaces()
        devices = {h: device(lab, h) for h in (1, 2)}
        teardown = harness.dataplanes(lambda: "")[name](lab, tmp_path / name)
        try:
            pids = [p.pid for p in teardown.procs]  # type: ignore[attr-defined]
            assert len(pids) == 2 and all(p.poll() is None for p in teardown.procs)  # type: ignore[attr-defined]
            for h in (1, 2):
                assert devices[h] in _links(lab, h)
                assert f" {OVERLAY_NET.format(h)} " in lab.run(h, ["ip", "-br", "addr", "show", devices[h]]).stdout
                # the tunnel's sockets have the 8 MiB buffers tinc's and overlay's have (the kernel shows 2x)
                sockets = lab.run(h, ["ss", "-u", "-a", "-n", "-m", f"sport = :{port}"]).stdout
                buffers = [int(b) for b in re.findall(r"\brb(\d+)", sockets)]
                assert buffers and min(buffers) >= 8 << 20, sockets
            ping = lab.run(1, ["ping", "-c", "3", "-i", "0.2", "-W", "2", dst], check=False)
            assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout
            server = lab.spawn(2, ["iperf3", "-s", "-1", "-B", dst], stdout=subprocess.DEVNULL)
            try:
                wait_for(lambda: f"{dst}:5201" in lab.run(2, ["ss", "-ltn"]).stdout, 10, "iperf3 server")
                tcp = iperf(lab, ["-c", dst, "-t", "1"], 1, "sum_received")
            finally:
                server.kill()
                server.wait(timeout=10)
            assert tcp["end"]["sum_received"]["bytes"] > 0
            assert not harness.plaintext_on_wire(lab, tmp_path)  # it encrypts: the ping's pattern is not on eth0
        finally:
            teardown()
        for h in (1, 2):
            assert devices[h] not in _links(lab, h)
            assert Lab._pids(lab.ns(h)) == []  # nothing runs in the hosts any more
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists()
        if name == "wireguard-go":
            assert not any((wireguard.SOCKET_DIR / f"{devices[h]}.sock").exists() for h in (1, 2))
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed.split() for ns in namespaces)
    root_links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert lab_name not in root_links


@pytest.mark.root  # and tcpdump
def test_plaintext_check_of_the_encrypted_row_sees_the_plain_overlay(tmp_path: Path) -> None:
    """What keeps overlay-encrypted from reporting an agent that takes --encrypt but does not
    encrypt: a ping's payload pattern found on the underlay of the plain overlay row."""
    with new_lab(hosts=2, prefix="bp") as lab:
        teardown = setup_overlay(lab)
        try:
            assert harness.plaintext_on_wire(lab, tmp_path)
        finally:
            teardown()


def test_key_files_for_the_encrypted_row(tmp_path: Path) -> None:
    path = tmp_path / "h1.key"
    path.write_text("old\n")
    path.chmod(0o644)
    public = harness.write_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    raw = base64.b64decode(text.strip(), validate=True)
    assert len(raw) == 32
    expected = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert base64.b64decode(public) == expected and len(public) == 44
    assert harness.write_key(tmp_path / "h2.key") != public  # random


def test_report_holds_overlay_encrypted_against_overlay_and_the_encrypted_alternatives(tmp_path: Path) -> None:
    def rtt(figures: dict[str, float | None], ms: float) -> dict[str, float | None]:
        return {**figures, "rtt_median_ms": ms}

    results: dict[str, list[dict[str, Any]]] = {
        "kernel": [_figures(2.0, None), _figures(2.0, None)],
        "tinc": [_figures(0.1, 9.0), _figures(0.1, 9.0)],
        "overlay": [rtt(_figures(1.0, 1.0), 0.4), rtt(_figures(1.0, 1.0), 0.4)],
        "wireguard-go": [_figures(0.2, 5.0), _figures(0.2, 5.0)],
        "nebula": [_figures(0.25, 4.0), _figures(0.25, 4.0)],
        # TCP and UDP 0.75 and 0.85 of overlay (median 0.8), RTT +30 and +50 us (median +40)
        "overlay-encrypted": [rtt(_figures(0.75, 1.5), 0.43), rtt(_figures(0.85, 1.5), 0.45)],
    }
    harness.report(results, 2, 5, tmp_path)
    table = (tmp_path / "bench.md").read_text()
    assert "| figure | kernel | tinc | overlay | wireguard-go | nebula | overlay-encrypted |" in table
    assert "ratio to kernel (same run)" in table
    assert (
        "| ratio | TCP, 1 stream | UDP 64 B delivered | RTT median difference (us) |\n|---|---:|---:|---:|\n"
        "| **overlay-encrypted / overlay** | 0.80 (0.75-0.85) | 0.80 (0.75-0.85) | +40 (+30 to +50) |\n"
        "| **overlay-encrypted / wireguard-go** | 4.00 (3.75-4.25) |"
    ) in table
    assert "| **overlay-encrypted / nebula** | 3.20 (3.00-3.40) |" in table
    assert "| **overlay-encrypted / tinc** | 8.00 (7.50-8.50) |" in table
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved) == {"rounds", "medians", "encrypted_vs"}
    assert list(saved["encrypted_vs"]) == ["overlay", "wireguard-go", "nebula", "tinc"]
    vs_overlay = saved["encrypted_vs"]["overlay"]
    assert vs_overlay["tcp_gbps"]["ratio"] == pytest.approx(0.8)
    assert vs_overlay["rtt_median_diff_us"]["diff_us"] == pytest.approx(40)
    assert vs_overlay["rtt_median_diff_us"]["round_min"] == pytest.approx(30)

    # without the alternatives, one row; without overlay-encrypted, no such table at all
    harness.report({n: results[n] for n in ("overlay", "overlay-encrypted")}, 2, 5, tmp_path)
    table = (tmp_path / "bench.md").read_text()
    assert table.count("**overlay-encrypted / ") == 1
    harness.report({n: results[n] for n in ("overlay", "wireguard-go", "nebula")}, 2, 5, tmp_path)
    table = (tmp_path / "bench.md").read_text()
    assert "overlay-encrypted" not in table
    assert set(json.loads((tmp_path / "bench.json").read_text())) == {"rounds", "medians"}


@pytest.mark.root
def test_a_default_run_goes_on_without_a_failing_overlay_encrypted_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """All rows but ``underlay`` taken out (a default run of the rest takes minutes); the
    encrypted row fails as the plaintext check would make it."""

    def not_encrypted(lab: Lab, workdir: Path) -> Any:
        raise harness.NotEncrypted("overlay-encrypted: a ping crossed the underlay in the clear")

    planes = {"underlay": harness.underlay, harness.ENCRYPTED: not_encrypted}
    monkeypatch.setattr(harness, "dataplanes", lambda etcd_url: planes)
    monkeypatch.setattr(harness, "agent_can_encrypt", lambda: True)
    monkeypatch.setattr("sys.argv", ["bench", "--quick", "--out", str(tmp_path)])
    handler = signal.getsignal(signal.SIGTERM)  # main() sets its own
    try:
        harness.main()
    finally:
        signal.signal(signal.SIGTERM, handler)
    out = capsys.readouterr().out
    assert "... overlay-encrypted left out: overlay-encrypted: a ping crossed the underlay in the clear" in out
    assert "| figure | underlay |\n" in (tmp_path / "bench.md").read_text()
    assert set(json.loads((tmp_path / "bench.json").read_text())["medians"]) == {"underlay"}

    monkeypatch.setattr(
        "sys.argv", ["bench", "--quick", "--only", "underlay,overlay-encrypted", "--out", str(tmp_path)]
    )
    try:
        with pytest.raises(SystemExit, match="error: overlay-encrypted: a ping crossed"):
            harness.main()
    finally:
        signal.signal(signal.SIGTERM, handler)


def test_sigterm_handler_exits_a_fork_at_once() -> None:
    """pyroute2's forked helpers get SIGTERM: they must not unwind the harness (and its lab)."""
    handler = harness.on_sigterm(os.getpid())
    with pytest.raises(SystemExit) as exit_:
        handler(signal.SIGTERM, None)
    assert exit_.value.code == 143
    pid = os.fork()
    if pid == 0:  # the child: must end in the handler, never come back here
        try:
            handler(signal.SIGTERM, None)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 143
