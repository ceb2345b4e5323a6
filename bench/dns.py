"""The DNS responder on a gateway under load: queries answered per second and their latency.

    python -m bench.dns [--queries N] [--concurrency W] [--names K] [--rounds R] [--json PATH] [--profile PATH]

A lab host holds the gateway end of a veth (198.19.42.1/24); a container namespace the other
end (198.19.42.100/24). In the host, a subprocess runs ``DnsServer`` on uvloop (as the agent
does) with K named endpoints (``n<i>``: 2001:2:0:42::<i>, and 198.19.42.<i> for the first 250)
and no upstreams. In the container, this process (uvloop too) keeps W queries in flight over
UDP, each worker on a socket of its own, until N were sent: a mix of 70% hits (A of a random
name, half of them ``<name>.blue``), 15% NXDOMAIN and 15% PTR (ip6.arpa of a random name).
Each query waits at most 1 s (a loss is counted, not retried). Per round: queries answered
per second, p50/p99/max latency; R rounds (default 3), medians reported. Bounded: N queries,
60 s per round at most. ``--profile``: one more round with the server under cProfile, its
top functions written to PATH. The lab goes at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.reversename

from bench import pct, progress
from overlay.lab import Lab

GW, ME = "198.19.42.1", "198.19.42.100"
ROUND_LIMIT = 60.0
CLONE_NEWNET = 0x40000000

SERVER = """
import asyncio, cProfile, ipaddress, json, pstats, signal, sys
import uvloop
from overlay.core.dns import Names
from overlay.core.registry import Endpoint, EndpointKey, Network, NetworkKey, Put
from overlay.io.dns import DnsServer

async def main(k, profile):
    names = Names()
    events = [Put(NetworkKey(42), Network(42, "blue", "198.19.42.0/24", subnet6="2001:2:0:42::/64"))]
    for i in range(k):
        v4 = [f"198.19.42.{i + 2}"] if i < 250 else []
        events.append(Put(EndpointKey(42, 0x020000000000 + i), Endpoint("h1", v4, [f"2001:2:0:42::{i:x}"], f"n{i}")))
    names.apply(events)
    server = DnsServer(names, [])
    await server.serve(42, ipaddress.ip_address("198.19.42.1"))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    prof = cProfile.Profile() if profile else None
    print("ready", flush=True)
    if prof:
        prof.enable()
    await stop.wait()
    if prof:
        prof.disable()
        with open(profile, "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(25)
    print(json.dumps(server.status()), flush=True)
    await server.close()

uvloop.run(main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None))
"""


def build(lab: Lab) -> str:
    """The gateway veth between lab host 1 and a container namespace; the container's name."""
    c = lab.add_container("client")
    lab.run(1, ["ip", "link", "add", "gw42", "type", "veth", "peer", "name", "eth0", "netns", c])
    lab.run(1, ["ip", "addr", "add", f"{GW}/24", "dev", "gw42"])
    lab.run(1, ["ip", "link", "set", "gw42", "up"])
    lab.run(c, ["ip", "addr", "add", f"{ME}/24", "dev", "eth0"])
    lab.run(c, ["ip", "link", "set", "eth0", "up"])
    return c


def sockets_in(ns: str, count: int) -> list[socket.socket]:
    """``count`` UDP sockets made inside namespace ``ns``, bound to ME and connected to the gateway."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        try:
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                os._exit(70)
    finally:
        os.close(fd)
        os.close(home)
    for s in socks:
        s.bind((ME, 0))
        s.connect((GW, 53))
        s.setblocking(False)
    return socks


def workload(n: int, k: int, seed: int = 1) -> list[tuple[str, bytes]]:
    """``n`` (kind, query) pairs: 70% hits, 15% NXDOMAIN, 15% PTR."""
    rnd = random.Random(seed)
    out = []
    for j in range(n):
        r, i = rnd.random(), rnd.randrange(k)
        if r < 0.35:
            kind, q = "hit", dns.message.make_query(f"n{i}", "AAAA" if i >= 250 else "A")
        elif r < 0.70:
            kind, q = "hit", dns.message.make_query(f"n{i}.blue", "AAAA")
        elif r < 0.85:
            kind, q = "nxdomain", dns.message.make_query(f"nope{i}", "A")
        else:
            kind, q = "ptr", dns.message.make_query(dns.reversename.from_address(f"2001:2:0:42::{i:x}"), "PTR")
        q.id = j % 65536
        out.append((kind, q.to_wire()))
    return out


async def fire(socks: list[socket.socket], queries: list[tuple[str, bytes]]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    lost = wrong = 0
    next_query = 0
    deadline = time.monotonic() + ROUND_LIMIT

    async def worker(s: socket.socket) -> None:
        nonlocal next_query, lost, wrong
        while next_query < len(queries) and time.monotonic() < deadline:
            kind, wire = queries[next_query]
            next_query += 1
            t0 = time.perf_counter()
            await loop.sock_sendall(s, wire)
            try:
                async with asyncio.timeout(1.0):
                    while True:
                        reply = await loop.sock_recv(s, 4096)
                        if reply[:2] == wire[:2]:
                            break
            except TimeoutError:
                lost += 1
                continue
            latencies.append(time.perf_counter() - t0)
            rcode = reply[3] & 0xF
            if (rcode == 3) != (kind == "nxdomain"):
                wrong += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker(s) for s in socks))
    took = time.monotonic() - t0
    return {
        "sent": next_query,
        "answered": len(latencies),
        "lost": lost,
        "wrong_rcode": wrong,
        "seconds": round(took, 3),
        "qps": round(len(latencies) / took),
        "p50_ms": round(pct(latencies, 50) * 1000, 3),
        "p99_ms": round(pct(latencies, 99) * 1000, 3),
        "max_ms": round(max(latencies, default=float("nan")) * 1000, 3),
    }


def one_round(
    lab: Lab, ns: str, args: argparse.Namespace, queries: list[tuple[str, bytes]], profile: str | None
) -> dict[str, Any]:
    import uvloop

    cmd = [sys.executable, "-c", SERVER, str(args.names), *([profile] if profile else [])]
    server = lab.spawn(1, cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the DNS server did not start")
        socks = sockets_in(ns, args.concurrency)
        try:
            result = uvloop.run(fire(socks, queries))
        finally:
            for s in socks:
                s.close()
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=30)
        result["server"] = json.loads(out.strip().splitlines()[-1])
        return result
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", type=Path, help="one more round with the server under cProfile; top functions here")
    args = ap.parse_args()
    if not (1 <= args.queries <= 1_000_000 and 1 <= args.concurrency <= 256 and 1 <= args.names <= 65000):
        ap.error("bounds: --queries 1..1000000, --concurrency 1..256, --names 1..65000")
    queries = workload(args.queries, args.names)
    rounds = []
    with Lab(f"dnsb{os.getpid() % 10000}", hosts=1) as lab:
        ns = build(lab)
        for r in range(args.rounds):
            progress(
                f"round {r + 1}/{args.rounds}: {args.queries} queries, {args.concurrency} in flight, {args.names} names"
            )
            rounds.append(one_round(lab, ns, args, queries, None))
            progress(f"{rounds[-1]['qps']} q/s, p50 {rounds[-1]['p50_ms']} ms, p99 {rounds[-1]['p99_ms']} ms")
        if args.profile:
            progress(f"profile round: cProfile of the server into {args.profile}")
            one_round(lab, ns, args, queries, str(args.profile.resolve()))
    keys = ("qps", "p50_ms", "p99_ms", "max_ms")
    median = {k: statistics.median(r[k] for r in rounds) for k in keys}
    summary = {
        "command": "python -m bench.dns " + " ".join(sys.argv[1:]),
        "queries": args.queries,
        "concurrency": args.concurrency,
        "names": args.names,
        "mix": {"hit": 0.70, "nxdomain": 0.15, "ptr": 0.15},
        "median": median,
        "rounds": rounds,
        "machine": f"{os.cpu_count()} CPUs, {os.uname().release}",
    }
    print()
    print("| round | answered | lost | q/s | p50 (ms) | p99 (ms) | max (ms) |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(rounds, 1):
        print(f"| {i} | {r['answered']} | {r['lost']} | {r['qps']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} |")
    print(f"| median | | | {median['qps']} | {median['p50_ms']} | {median['p99_ms']} | {median['max_ms']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
