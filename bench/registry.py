"""The etcd registry against one real etcd on loopback: how fast a change reaches the watching
agents, and what idle agents cost etcd.

    python -m bench.registry [--quick] [--puts N] [--idle-clients K] [--idle-seconds S] [--ttl S] [--out DIR]
    python -m bench.registry --fleet [--quick] ...   the control plane at fleet scale: bench/fleet.py

Propagation: W registry clients (EtcdClient, each with its own Registry and its own aetcd
connection, all in this one asyncio process on uvloop like the agent) follow the prefix; a
separate aetcd client puts N endpoint keys (<prefix>/networks/42/endpoints/<mac>, a fresh MAC
each, so each is a Put event), one every 10 ms. Latency is from just before the put is issued to
the moment EtcdClient hands the typed event to its on_events callback (where the agent applies
it to its forwarding table at once); p50 and p99 over all (watcher, put) pairs, for W = 1, 10
and 100. The put's own round trip is shown for context. One process standing in for W agents is
itself a bottleneck when W is large (every event is decoded W times by one Python thread): the
table says how busy the process was, and gives the latency of the first watcher to receive each
put (closest to what one agent with a process of its own sees) and of the last one; when the
process was saturated at the largest count, that count runs again with puts 50 ms apart, so
that the process keeps up and what is left is etcd's and the network's share.

Requests at rest: K clients each do what an idle agent does (register under a lease, keep it
alive every TTL/3, snapshot, watch); etcd's own gRPC counters (/metrics on the client URL) are
read before and after a window of S seconds and divided by K and S: only LeaseKeepAlive should
move, at 3/TTL per agent (TTL 10 s, the agent's default, or --ttl), and no Range (no polling).

Each gRPC connection is the agent's own: the process sets grpc.use_local_subchannel_pool,
since gRPC would otherwise multiplex all clients of one process over one TCP connection, which
no real deployment (one agent per host) does. Every load is bounded in count and time; etcd
and every client are stopped at the end, also on failure. Results: bench/results/<date>-<commit>/
registry.md and registry.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aetcd
import uvloop

import overlay.io.etcd as etcdclient
from bench import pct, progress, results_dir
from overlay.core.addresses import parse_endpoint
from overlay.core.registry import Endpoint, EndpointKey, Event, Host, Put, Registry, Schema
from overlay.io.etcd import GRPC_OPTIONS, EtcdClient
from overlay.lab import etcd as etcdlab

VNI = 42
WATCHERS, WATCHERS_QUICK = (1, 10, 100), (1, 10)
PUTS, PUTS_QUICK = 200, 40
SPACING = 0.010  # s between puts
SLOW_SPACING = 0.050  # again at the largest count if the process was the bottleneck
IDLE_CLIENTS, IDLE_CLIENTS_QUICK = 50, 10
IDLE_SECONDS, IDLE_SECONDS_QUICK = 10.0, 3.0
TTL = 10  # the agent's default lease TTL
TARGET_P99_MS = 100.0  # at 100 watchers
CLIENT_BOUND = 0.7  # of one core: above it the process, not etcd, sets the pace
VALUE = Endpoint(host="h2", ipv4=["198.19.42.9"])
# One TCP connection per client, as with one agent per host (see the docstring).
OWN_CONNECTION = {"grpc.use_local_subchannel_pool": 1}
METRICS = (
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "grpc_server_msg_received_total",
    "grpc_server_msg_sent_total",
)


def mac(group: int, i: int) -> int:
    """A locally administered MAC per (group, i): distinct keys for every put of every phase."""
    return 0x020000000000 | (group << 24) | i


# --- propagation ---------------------------------------------------------------------------------


async def propagation(endpoint: str, watchers: int, puts: int, spacing: float = SPACING) -> dict[str, Any]:
    """W watching EtcdClients, one writer; the latency of every (watcher, put) pair."""
    schema = Schema()
    arrivals: list[dict[int, float]] = [{} for _ in range(watchers)]

    def on_events_of(record: dict[int, float]):  # type: ignore[no-untyped-def]
        def on_events(events: list[Event]) -> None:
            t = time.perf_counter()
            for ev in events:
                if type(ev) is Put and type(ev.key) is EndpointKey:
                    record.setdefault(ev.key.mac, t)

        return on_events

    clients = [EtcdClient([endpoint], Registry(schema), on_events_of(arrivals[w])) for w in range(watchers)]
    tasks: list[asyncio.Task[None]] = []
    host, port = parse_endpoint(endpoint)
    writer = aetcd.Client(host, port, timeout=etcdclient.REQUEST_TIMEOUT, options=etcdclient.GRPC_OPTIONS)
    group = watchers  # MACs of this phase: 02:00:<W>:...
    try:
        progress(f"{watchers} watchers: connecting, reading the prefix, watching")
        await asyncio.wait_for(asyncio.gather(*(c.connect() for c in clients)), 60)
        await asyncio.wait_for(asyncio.gather(*(c.snapshot() for c in clients)), 60)
        tasks = [asyncio.create_task(c.watch()) for c in clients]
        await writer.connect()

        async def put(m: int) -> tuple[float, float]:
            t0 = time.perf_counter()
            await writer.put(schema.key(EndpointKey(VNI, m)).encode(), schema.encode(VALUE))
            return t0, time.perf_counter()

        async def all_have(macs: list[int], timeout: float) -> bool:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:  # cheap test first: the process is busy delivering
                if all(len(rec) >= len(macs) for rec in arrivals) and all(m in rec for rec in arrivals for m in macs):
                    return True
                await asyncio.sleep(0.01)
            return False

        # Warm-up: every watch stream live (the first event reached everyone), code paths warm.
        warm = [mac(0xEE, group * 64 + j) for j in range(5)]
        for m in warm:
            await put(m)
            await asyncio.sleep(spacing)
        if not await all_have(warm, 30):
            missing = sum(1 for rec in arrivals if not all(m in rec for m in warm))
            raise RuntimeError(f"{missing} of {watchers} watchers did not receive the warm-up puts in 30 s")

        progress(f"{watchers} watchers: {puts} puts, {spacing * 1000:.0f} ms apart")
        macs = [mac(group, i) for i in range(puts)]
        sent: list[tuple[float, float]] = []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        start = time.perf_counter()
        for i, m in enumerate(macs):
            delay = start + i * spacing - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent.append(await put(m))
            if (i + 1) % max(1, puts // 4) == 0 and i + 1 < puts:
                progress(f"{watchers} watchers: {i + 1}/{puts} puts")
        complete = await all_have(macs, 15)
        last = max((rec.get(m, 0.0) for rec in arrivals for m in macs), default=wall0)
        wall = max(last, sent[-1][1]) - wall0
        cpu = time.process_time() - cpu0

        pairs: list[float] = []
        first: list[float] = []
        slowest: list[float] = []
        lost = 0
        for m, (t0, _) in zip(macs, sent):
            lat = [(rec[m] - t0) * 1000 for rec in arrivals if m in rec]
            lost += watchers - len(lat)
            pairs.extend(lat)
            if lat:
                first.append(min(lat))
                slowest.append(max(lat))
        rtt = [(t1 - t0) * 1000 for t0, t1 in sent]
        reconnects = sum(c.reconnects for c in clients)
        return {
            "watchers": watchers,
            "puts": puts,
            "spacing_ms": spacing * 1000,
            "pairs": len(pairs),
            "achieved_spacing_ms": (sent[-1][0] - sent[0][0]) / max(1, puts - 1) * 1000,
            "lost": lost,
            "complete": complete,
            "p50_ms": pct(pairs, 50),
            "p99_ms": pct(pairs, 99),
            "max_ms": max(pairs, default=float("nan")),
            "mean_ms": statistics.fmean(pairs) if pairs else float("nan"),
            "first_p50_ms": pct(first, 50),
            "first_p99_ms": pct(first, 99),
            "last_p50_ms": pct(slowest, 50),
            "last_p99_ms": pct(slowest, 99),
            "put_rtt_p50_ms": pct(rtt, 50),
            "put_rtt_p99_ms": pct(rtt, 99),
            "client_cpu": cpu / wall if wall > 0 else float("nan"),
            "client_us_per_event": cpu / max(1, len(pairs)) * 1e6,
            "client_cpu_ms_per_put": cpu / puts * 1000,
            "reconnects": reconnects,
        }
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait_for(asyncio.gather(*(c.close() for c in clients), return_exceptions=True), 30)
        try:
            if writer.kvstub is not None:
                await writer.delete_prefix((schema.prefix + "/").encode())  # the next phase starts empty
        finally:
            await writer.close()


# --- requests at rest --------------------------------------------------------------------------------


def deltas(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """What two ``scrape``s differ by, per gRPC method: {method: {metric: delta}}, methods
    that moved only."""
    methods: dict[str, dict[str, float]] = {}
    for name in METRICS:
        for method, value in after[name].items():
            delta = value - before[name].get(method, 0.0)
            if delta:
                methods.setdefault(method, {n: 0.0 for n in METRICS})[name] = delta
    return methods


def scrape(endpoint: str) -> dict[str, dict[str, float]]:
    """etcd's gRPC server counters: {metric: {method: value}}, summed over services, types, codes."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
    with opener.open(f"{endpoint}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, dict[str, float]] = {name: {} for name in METRICS}
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{([^}]*)\}\s+(\S+)$", line)
        if not m or m.group(1) not in out:
            continue
        method = re.search(r'grpc_method="([^"]*)"', m.group(2))
        if method:
            per = out[m.group(1)]
            per[method.group(1)] = per.get(method.group(1), 0.0) + float(m.group(3))
    return out


async def at_rest(endpoint: str, clients_n: int, seconds: float, ttl: int = TTL) -> dict[str, Any]:
    """K idle agents' worth of etcd clients; etcd's gRPC counters over ``seconds``."""
    clients = [EtcdClient([endpoint], Registry(), lambda events: None, ttl=ttl) for _ in range(clients_n)]
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    try:
        progress(f"at rest: {clients_n} clients registering (lease TTL {ttl} s), reading the prefix, watching")

        async def start(i: int, c: EtcdClient) -> None:
            await c.register(f"bench-idle-{i}", Host(f"198.18.{1 + i // 250}.{1 + i % 250}", 4789), wait_for_old=0)
            await c.snapshot()

        await asyncio.wait_for(asyncio.gather(*(start(i, c) for i, c in enumerate(clients))), 60)
        for c in clients:
            tasks += [loop.create_task(c.watch()), loop.create_task(c.keepalive())]
        await asyncio.sleep(1.0)  # watch streams created: the window sees only the steady state
        reconnects0 = sum(c.reconnects + c.resyncs for c in clients)
        before = await loop.run_in_executor(None, scrape, endpoint)
        t0 = time.monotonic()
        progress(f"at rest: counting etcd's gRPC requests for {seconds:.0f} s")
        await asyncio.sleep(seconds)
        after = await loop.run_in_executor(None, scrape, endpoint)
        window = time.monotonic() - t0
        reconnects = sum(c.reconnects + c.resyncs for c in clients) - reconnects0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait_for(asyncio.gather(*(c.close() for c in clients), return_exceptions=True), 30)
    methods = deltas(before, after)
    received = sum(m["grpc_server_msg_received_total"] for m in methods.values())
    started = sum(m["grpc_server_started_total"] for m in methods.values())
    keepalive = methods.get("LeaseKeepAlive", {}).get("grpc_server_msg_received_total", 0.0)
    return {
        "clients": clients_n,
        "seconds": window,
        "ttl": ttl,
        "methods": methods,
        "msgs_per_client_s": received / clients_n / window,
        "calls_per_client_s": started / clients_n / window,
        "keepalive_per_client_s": keepalive / clients_n / window,
        "keepalive_expected_per_client_s": 3 / ttl,
        "range_calls": methods.get("Range", {}).get("grpc_server_started_total", 0.0),
        "other_msgs": received - keepalive,
        "reconnects_or_resyncs": reconnects,
    }


# --- report ------------------------------------------------------------------------------------------


def f(x: float, digits: int = 1) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def report(args: argparse.Namespace, env: dict[str, Any], lat: list[dict[str, Any]], rest: dict[str, Any]) -> str:
    main_rows = [r for r in lat if r["spacing_ms"] == SPACING * 1000]
    lines = [
        f"etcd registry on loopback: etcd {env['etcd']}, {env['cpus']} CPUs, one benchmark process "
        f"(uvloop), {env['date']} at {env['commit']}{' (--quick)' if args.quick else ''}",
        "",
        f"### Propagation: put -> EtcdClient on_events, {lat[0]['puts'] if lat else 0} puts per row (ms)",
        "",
        "| watchers | puts every (achieved) | p50 | p99 | max | first to receive p50 / p99 "
        "| last to receive p50 / p99 | put round trip p50 / p99 | process CPU | lost |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in lat:
        lines.append(
            f"| {r['watchers']} | {r['spacing_ms']:.0f} ({r['achieved_spacing_ms']:.1f}) "
            f"| {f(r['p50_ms'])} | {f(r['p99_ms'])} | {f(r['max_ms'])} "
            f"| {f(r['first_p50_ms'])} / {f(r['first_p99_ms'])} | {f(r['last_p50_ms'])} / {f(r['last_p99_ms'])} "
            f"| {f(r['put_rtt_p50_ms'])} / {f(r['put_rtt_p99_ms'])} | {r['client_cpu'] * 100:.0f}% | {r['lost']} |"
        )
    lines += [
        "",
        "p50/p99 over all (watcher, put) pairs; first/last to receive: per put, the earliest and the "
        "latest watcher; process CPU: this process's CPU time over the row's wall time (100% = one core; "
        "gRPC's own threads count too)",
        "",
    ]
    big = max(main_rows, key=lambda r: r["watchers"]) if main_rows else None
    if big is not None:
        ok = big["p99_ms"] <= TARGET_P99_MS and big["lost"] == 0
        scope = "" if big["watchers"] == 100 else f" (measured at {big['watchers']}: --quick stops there)"
        lines.append(
            f"target: p99 <= {TARGET_P99_MS:.0f} ms at 100 watchers{scope}: "
            f"p99 {f(big['p99_ms'])} ms at {big['watchers']}: {'met' if ok else 'MISSED'}"
        )
    for r in lat:
        if r["client_cpu"] >= CLIENT_BOUND:
            lines.append(
                f"note: at {r['watchers']} watchers, puts every {r['spacing_ms']:.0f} ms, this process was busy "
                f"{r['client_cpu'] * 100:.0f}% of a core: the client, not etcd, sets the pace there, and the "
                f"writer, which shares the loop, waits too (its round trip grows)."
            )
    base = {r["spacing_ms"]: r["client_cpu_ms_per_put"] for r in lat if r["watchers"] == 1}
    marginal = [
        ((r["client_cpu_ms_per_put"] - base[r["spacing_ms"]]) / (r["watchers"] - 1), r)
        for r in lat
        if r["watchers"] > 1 and r["spacing_ms"] in base
    ]
    if marginal:
        cost, r = max(marginal, key=lambda m: m[1]["watchers"])
        most = r["watchers"]
        lines.append(
            f"note: one process delivers every put {most} times here, at ~{cost * 1000:.0f} us of its CPU per "
            f"extra watcher (per put, {most} watchers vs 1), ~{most * cost:.1f} ms of serial work per put "
            f"that no agent does (an agent has a process of its own and receives each put once); the "
            f"spread from the first to the last watcher (p50 {r['last_p50_ms'] - r['first_p50_ms']:.1f} ms) "
            f"comes mostly from it. What one agent sees at {most} watchers lies between 'first to "
            f"receive' and p50/p99 over all pairs."
        )
    if any(r["reconnects"] for r in lat):
        lines.append(
            "note: watchers reconnected during the run: "
            + ", ".join(f"{r['reconnects']} at {r['watchers']}" for r in lat if r["reconnects"])
        )
    lines += [
        "",
        f"### etcd requests at rest: {rest['clients']} idle agents (register, lease keepalive every "
        f"TTL/3 with TTL {rest['ttl']} s, watch), {rest['seconds']:.1f} s",
        "",
        "| gRPC method | calls started | messages received | handled (ended) | messages / agent / s |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, m in sorted(rest["methods"].items()):
        lines.append(
            f"| {method} | {m['grpc_server_started_total']:.0f} | {m['grpc_server_msg_received_total']:.0f} "
            f"| {m['grpc_server_handled_total']:.0f} "
            f"| {m['grpc_server_msg_received_total'] / rest['clients'] / rest['seconds']:.3f} |"
        )
    if not rest["methods"]:
        lines.append("| (none) | 0 | 0 | 0 | 0 |")
    no_polling = rest["range_calls"] == 0 and rest["other_msgs"] == 0
    lines += [
        "",
        f"requests/s per idle agent: {rest['msgs_per_client_s']:.3f} messages, {rest['calls_per_client_s']:.3f} "
        f"calls (LeaseKeepAlive {rest['keepalive_per_client_s']:.3f}/s; 3/TTL = "
        f"{rest['keepalive_expected_per_client_s']:.3f}/s expected)",
        f"no polling at rest (no Range, nothing but LeaseKeepAlive): "
        f"{'met' if no_polling else 'MISSED'} ({rest['range_calls']:.0f} Range calls, "
        f"{rest['other_msgs']:.0f} other messages, {rest['reconnects_or_resyncs']} reconnects)",
        f"(gRPC keepalive pings, an HTTP/2 PING per connection every "
        f"{GRPC_OPTIONS['grpc.keepalive_time_ms'] / 1000:g} s, are no RPCs and not counted here)",
    ]
    if rest["reconnects_or_resyncs"]:
        lines.append(
            f"note: idle clients lost their connection {rest['reconnects_or_resyncs']} times and came back "
            f"(a Range and a new Watch each). If gRPC logged 'too_many_pings' above, etcd closed them: its "
            f"--grpc-keepalive-min-time (5 s by default) is longer than the client's "
            f"{GRPC_OPTIONS['grpc.keepalive_time_ms'] / 1000:g} s keepalive pings, and "
            f"only traffic from etcd (here the lease refresh every TTL/3) resets its count of pings."
        )
    return "\n".join(lines)


async def run(
    endpoint: str, watchers: tuple[int, ...], puts: int, idle_clients: int, idle_seconds: float, quick: bool, ttl: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    lat = []

    async def row(w: int, spacing: float) -> dict[str, Any]:
        r = await asyncio.wait_for(propagation(endpoint, w, puts, spacing), 120 + puts * spacing * 2)
        progress(
            f"{w} watchers: p50 {f(r['p50_ms'])} ms, p99 {f(r['p99_ms'])} ms, process CPU {r['client_cpu'] * 100:.0f}%"
        )
        return r

    for w in watchers:
        lat.append(await row(w, SPACING))
    if not quick and lat[-1]["client_cpu"] >= CLIENT_BOUND:
        progress(f"{watchers[-1]} watchers kept this process busy: again with puts {SLOW_SPACING * 1000:.0f} ms apart")
        lat.append(await row(watchers[-1], SLOW_SPACING))
    rest = await asyncio.wait_for(at_rest(endpoint, idle_clients, idle_seconds, ttl), 120 + idle_seconds)
    return lat, rest


def main() -> None:
    if "--fleet" in sys.argv[1:]:  # a benchmark of its own, with its own options
        from bench import fleet

        fleet.main([a for a in sys.argv[1:] if a != "--fleet"])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fleet",
        action="store_true",
        help="instead: the control plane at fleet scale, simulated fleets and real agents "
        "(bench/fleet.py; --fleet --help for its options)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {PUTS_QUICK} puts, 1 and 10 watchers, {IDLE_CLIENTS_QUICK} idle clients "
        f"for {IDLE_SECONDS_QUICK:.0f} s",
    )
    parser.add_argument("--puts", type=int, default=None, help=f"puts per watcher count (default {PUTS})")
    parser.add_argument("--idle-clients", type=int, default=None, help=f"idle agents (default {IDLE_CLIENTS})")
    parser.add_argument("--idle-seconds", type=float, default=None, help=f"window at rest (default {IDLE_SECONDS:.0f})")
    parser.add_argument(
        "--ttl", type=int, default=TTL, help=f"idle agents' lease TTL in s (default {TTL}, the agent's)"
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<date>-<commit>)")
    args = parser.parse_args()
    puts = args.puts or (PUTS_QUICK if args.quick else PUTS)
    idle_clients = args.idle_clients or (IDLE_CLIENTS_QUICK if args.quick else IDLE_CLIENTS)
    idle_seconds = args.idle_seconds or (IDLE_SECONDS_QUICK if args.quick else IDLE_SECONDS)
    if (
        not 1 <= puts <= 10_000
        or not 1 <= idle_clients <= 1000
        or not 1 <= idle_seconds <= 300
        or not 2 <= args.ttl <= 3600
    ):
        parser.error(
            "bounds: 1 <= --puts <= 10000, 1 <= --idle-clients <= 1000, 1 <= --idle-seconds <= 300, 2 <= --ttl <= 3600"
        )
    watchers = WATCHERS_QUICK if args.quick else WATCHERS
    etcdclient.GRPC_OPTIONS = {**etcdclient.GRPC_OPTIONS, **OWN_CONNECTION}  # this process only
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
        or "nogit"
    )
    version = subprocess.run([etcdlab.binary("etcd"), "--version"], capture_output=True, text=True, timeout=10)
    env = {
        "etcd": (version.stdout.split("\n")[0].split(":")[-1].strip() or "?"),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "loadavg_before": os.getloadavg(),
    }
    progress("starting etcd on 127.0.0.1")
    etcd = etcdlab.single(None)
    try:
        progress(f"etcd {env['etcd']} at {etcd.endpoint} (pid {etcd.pid})")
        lat, rest = uvloop.run(run(etcd.endpoint, watchers, puts, idle_clients, idle_seconds, args.quick, args.ttl))
    finally:
        etcd.stop()
    table = report(args, env, lat, rest)
    print("\n" + table)
    out = args.out or results_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "registry.md").write_text(table + "\n")
    (out / "registry.json").write_text(
        json.dumps(
            {
                "args": {
                    **vars(args),
                    "out": str(out),
                    "puts": puts,
                    "idle_clients": idle_clients,
                    "idle_seconds": idle_seconds,
                    "watchers": list(watchers),
                },
                "env": env,
                "propagation": lat,
                "at_rest": rest,
            },
            indent=2,
        )
    )
    print(f"\nwritten: {out}/registry.md, registry.json")


if __name__ == "__main__":
    main()
