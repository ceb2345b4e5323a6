"""overlay vs the Linux kernel's vxlan between two lab hosts, side by side in one run.

    python -m bench.lab [--seconds 5] [--rounds 3]

For each round and each dataplane: iperf3 TCP throughput (1 stream), iperf3 UDP with 64-byte
payloads at full offered load (delivered packets per second and loss), and ping RTT (median and
p99 of 200 pings at 10 ms). Medians over rounds; ratios overlay / kernel. Every load is
bounded in time; the lab is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import signal
import statistics
import subprocess
import sys
from typing import Any, Callable

from bench import results_dir
from overlay.lab import Lab, LabError, wait_for

VNI, PORT = 42, 4789
OVERLAY_NET = "198.19.42.{}/24"


def underlay_address(lab: Lab, host: int, family: int = 4) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Host ``host``'s underlay address of ``family`` (4 or 6; 6 needs a lab with IPv6, e.g.
    ``Lab(..., dual_stack=True)``)."""
    if family == 6:
        return lab.address6(host)
    address = lab.address(host)
    if address.version != 4:
        raise LabError(f"lab {lab.name!r} has no IPv4 underlay")
    return address


def setup_kernel(lab: Lab, family: int = 4) -> Callable[[], None]:
    """A kernel vxlan pair over the IPv4 (``family=4``) or IPv6 (``family=6``) underlay, on
    eth0 (``dev eth0``), so the kernel sets vx0's MTU to eth0's minus 50 (IPv4) or 70 (IPv6),
    like overlay's default: 1450 or 1430 here (without ``dev`` it would be 1500 and every
    full-size segment would exceed the underlay's MTU).

    Offloads on: between two kernels, inner checksums left unfinished (CHECKSUM_PARTIAL) are
    fine, since neither side checks what the other offloaded; only a peer that takes the frame
    off the kernel, like overlay, needs `ethtool -K vx0 tx off` on the kernel side
    (tests/test_interop.py). With tx on the kernel keeps TSO through the tunnel, so this is the
    kernel at its best on this lab."""
    for h, peer in ((1, 2), (2, 1)):
        for cmd in (
            [
                "ip",
                "link",
                "add",
                "vx0",
                "type",
                "vxlan",
                "id",
                str(VNI),
                "dstport",
                str(PORT),
                "local",
                str(underlay_address(lab, h, family)),
                "dev",
                "eth0",
                "nolearning",
            ],
            [
                "bridge",
                "fdb",
                "append",
                "00:00:00:00:00:00",
                "dev",
                "vx0",
                "dst",
                str(underlay_address(lab, peer, family)),
            ],
            ["ip", "addr", "add", OVERLAY_NET.format(h), "dev", "vx0"],
            ["ip", "link", "set", "vx0", "up"],
        ):
            lab.run(h, cmd)

    def teardown() -> None:
        for h in (1, 2):
            lab.run(h, ["ip", "link", "del", "vx0"], check=False)

    return teardown


def setup_overlay(lab: Lab, etcd: str | None = None, family: int = 4) -> Callable[[], None]:
    """Agents on hosts 1 and 2: static peers, or with ``etcd`` (an endpoint URL) in etcd mode,
    over the IPv4 (``family=4``) or IPv6 (``family=6``) underlay: ``--local`` and ``--peer`` of
    that family, the TAP's MTU the agent's default (eth0's minus 50 or 70). The inner addresses
    are IPv4 (OVERLAY_NET) either way. The returned teardown has ``procs``: the agent processes
    (for CPU accounting)."""
    procs = []
    for h, peer in ((1, 2), (2, 1)):
        mode = (
            ["--etcd", etcd, "--host-id", f"h{h}", "--network", str(VNI)]
            if etcd
            else ["--vni", str(VNI), "--peer", str(underlay_address(lab, peer, family))]
        )
        procs.append(
            lab.spawn(
                h,
                [
                    sys.executable,
                    "-m",
                    "overlay",
                    "agent",
                    *mode,
                    "--local",
                    str(underlay_address(lab, h, family)),
                    "--tap",
                    "ovl0",
                    "--address",
                    OVERLAY_NET.format(h),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    for h in (1, 2):  # the address is on ovl0 (static) or on the network's bridge ovbr42 (etcd mode)
        address = OVERLAY_NET.format(h).split("/")[0]
        wait_for(
            lambda h=h, address=address: f" {address}/" in lab.run(h, ["ip", "-br", "addr"]).stdout,
            20,
            f"agent on host {h}",
        )

    def teardown() -> None:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)

    teardown.procs = procs  # type: ignore[attr-defined]
    return teardown


FIXED_RATE = "20M"  # 64-byte payloads: 39 kpps offered, below every dataplane's capacity on this lab
IPERF_TRIES = 3  # an iperf3 run that ends without its summary (it lost its control connection) is run again


def iperf(lab: Lab, argv: list[str], seconds: int, summary: str) -> dict[str, Any]:
    """Run ``iperf3 -J`` on host 1 and return its JSON, whose ``end`` has ``summary``. On a loaded
    machine iperf3 sometimes reports an error instead (e.g. "unable to receive control message"):
    such a run is repeated, up to IPERF_TRIES times, then reported with iperf3's own words."""
    error = ""
    for _ in range(IPERF_TRIES):
        run = lab.run(1, ["iperf3", *argv, "-J"], check=False, timeout=seconds + 30)
        try:
            result = json.loads(run.stdout)
        except ValueError:
            error = (run.stderr or run.stdout).strip()[-300:]
            continue
        if summary in result.get("end", {}):
            return result
        error = result.get("error", "no summary in its output")
    raise RuntimeError(f"iperf3 {' '.join(argv)} failed {IPERF_TRIES} times: {error}")


def measure(
    lab: Lab,
    seconds: int,
    dst: str | None = None,
    streams: int = 1,
    only_tcp: bool = False,
    tcp: bool = True,
    progress: Callable[[str], None] = lambda what: None,
    cpu: Callable[[], float] | None = None,
) -> dict[str, float]:
    """iperf3 TCP (``streams`` streams; its bytes as tcp_bytes and, with ``cpu``, the CPU
    seconds ``cpu()`` counted during it as tcp_cpu_s), 64-byte UDP at full offered load and at
    FIXED_RATE, and 200 pings, from host 1 to ``dst`` (default: host 2's overlay address)."""
    dst = dst or OVERLAY_NET.format(2).split("/")[0]
    wait_for(lambda: lab.run(1, ["ping", "-c", "1", "-W", "1", dst], check=False).returncode == 0, 20, "ping")
    out: dict[str, float] = {}
    server = lab.spawn(2, ["iperf3", "-s", "-B", dst], stdout=subprocess.DEVNULL)
    try:
        wait_for(
            lambda: lab.run(1, ["iperf3", "-c", dst, "-t", "1", "-J"], check=False, timeout=30).returncode == 0,
            20,
            "iperf3 server",
        )
        if tcp:
            progress(f"TCP, {streams} stream(s)")
            before = cpu() if cpu else 0.0
            result = iperf(lab, ["-c", dst, "-t", str(seconds), "-P", str(streams)], seconds, "sum_received")
            if cpu:
                out["tcp_cpu_s"] = cpu() - before
            out["tcp_gbps"] = result["end"]["sum_received"]["bits_per_second"] / 1e9
            out["tcp_bytes"] = result["end"]["sum_received"]["bytes"]
        if only_tcp:
            return out
        progress("UDP, 64-byte payloads")
        udp = iperf(lab, ["-c", dst, "-u", "-l", "64", "-b", "0", "-t", str(seconds)], seconds, "sum")
        s = udp["end"]["sum"]
        out["udp64_kpps"] = (s["packets"] - s["lost_packets"]) / s["seconds"] / 1e3
        out["udp64_loss_pct"] = s["lost_percent"]
        progress(f"UDP, 64-byte payloads at {FIXED_RATE}bit/s")
        udp = iperf(lab, ["-c", dst, "-u", "-l", "64", "-b", FIXED_RATE, "-t", str(seconds)], seconds, "sum")
        out["udp64_fixed_loss_pct"] = udp["end"]["sum"]["lost_percent"]
    finally:
        server.kill()
        server.wait()
    progress("ping")
    ping = lab.run(1, ["ping", "-c", "200", "-i", "0.01", "-n", dst], timeout=60).stdout
    rtts = sorted(float(m) for m in re.findall(r"time=([\d.]+) ms", ping))
    out["rtt_median_ms"] = statistics.median(rtts)
    out["rtt_p99_ms"] = rtts[int(len(rtts) * 0.99) - 1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each iperf3 run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are shown")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the lab is torn down
    results: dict[str, list[dict[str, float]]] = {"kernel": [], "overlay": []}
    with Lab("bench", hosts=2) as lab:
        for r in range(args.rounds):
            for name, setup in (("kernel", setup_kernel), ("overlay", setup_overlay)):
                print(f"... round {r + 1}/{args.rounds}: {name}", flush=True)
                teardown = setup(lab)
                try:
                    results[name].append({k: v for k, v in measure(lab, args.seconds).items() if k != "tcp_bytes"})
                finally:
                    teardown()
    keys = ["tcp_gbps", "udp64_kpps", "udp64_loss_pct", "udp64_fixed_loss_pct", "rtt_median_ms", "rtt_p99_ms"]
    med = {n: {k: statistics.median(x[k] for x in rs) for k in keys} for n, rs in results.items()}
    lines = [
        f"medians of {args.rounds} rounds, {args.seconds} s each (spread: min-max)",
        "",
        "| figure | kernel vxlan | overlay | overlay/kernel |",
        "|---|---:|---:|---:|",
    ]
    for k in keys:
        cells = []
        for n in ("kernel", "overlay"):
            vals = [x[k] for x in results[n]]
            cells.append(f"{med[n][k]:.3f} ({min(vals):.2f}-{max(vals):.2f})")
        ratio = med["overlay"][k] / med["kernel"][k] if med["kernel"][k] else float("nan")
        lines.append(f"| {k} | {cells[0]} | {cells[1]} | {ratio:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = results_dir()
    (out / "lab.md").write_text(table + "\n")
    (out / "lab.json").write_text(json.dumps({"args": vars(args), "rounds": results, "medians": med}, indent=2))
    print(f"\nwritten: {out}/lab.md, lab.json")


if __name__ == "__main__":
    main()
