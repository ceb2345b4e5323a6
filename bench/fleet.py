"""The control plane at fleet scale (issue 12): what one agent pays per registry event, per
snapshot and per MAC, in process and in real agents against a real etcd holding a simulated
fleet.

    python -m bench.registry --fleet [--sizes 1000,3000,10000] [--endpoints 30] [--agents 10,100]
                                     [--rate 10] [--seconds 30] [--puts 100] [--quick]
                                     [--profile [python|native]] [--budget S] [--keep-logs] [--out DIR]

A. In process, no etcd: a registry of N hosts x E endpoints in one network (VNI 42) as etcd
   would hand it over ((key, value bytes, mod_revision) tuples), taken by one agent's own classes:
   ``Registry.snapshot``, ``Topology.apply`` of its events and ``Topology.serve(42)`` into a
   ``ForwardingTable`` over the real C table (``CoreSink(ForwardingCore())``); then 2000 endpoint
   events (address changes, moves, deletes, re-creations) each applied as the agent does
   (``Registry.put``/``delete`` + ``Topology.apply``), CPU time per event (median, p99) at each
   size; and a 100k-key resync against a registry that holds the snapshot, 1% of keys differing.
B. The forwarding table at 1M registry MACs over 30k VTEPs (a fresh process): bytes per MAC
   from the RSS delta (C table and Python together) and from tracemalloc (the Python side);
   lookup flatness from ``python -m bench.fastpath`` (``--quick`` in a quick run; the active-set
   model is the target, uniform over the table is shown beside it).
C. A real etcd (its own lab namespace) holding the simulated fleet, written by a bounded writer
   (one lease per simulated host, transactions of at most 128 operations, etcd's default
   --max-txn-ops), and K real ``overlay agent`` processes, one per lab namespace, etcd mode, idle
   data plane (IPv6 off in their namespaces, so the TAPs send nothing; no probes, no metrics).
   Per fleet size and K: start -> control socket answering and -> ready (its registry applied up
   to the fleet's revision), the agent's own snapshot time (status registry.resync_s), RSS;
   agent CPU in an idle window and in a window of --rate endpoint changes per second fleet-wide
   (from /proc/<pid>/stat), hence % of a core and CPU per event; etcd's gRPC requests per idle
   agent (etcd's /metrics before and after the idle window); put -> applied: a fresh endpoint
   put every 100 ms, then every agent asked over its control socket when it applied that
   revision (``{"cmd": "applied", "revision": R}``, answered with the wall-clock time), latency
   over all (agent, put) pairs. The smallest K runs at every size; larger K at the smallest
   size, and at larger sizes only if K x the measured RSS fits in 16 GB and the run's time
   budget (--budget, 23 minutes) still holds that phase and the smallest K at the larger sizes.
   With --profile, py-spy records one agent's start and its busy window at each size.
   The benchmark process itself stays in the root namespace; the part that talks to etcd and to
   the agents runs as a driver process in a lab service namespace (``python -m bench.fleet
   --driver``), where etcd and every agent's control socket (abstract, per namespace: asked from
   a socket made inside the agent's namespace with setns) are reachable.

Addresses are data only (nothing is sent to them): endpoint i has IPv4 address number i of
198.18.0.0/15 while i < 131072 (the /15 has no more) and none beyond; simulated host j's VTEP is
address number 256 + j of it (outside the lab's 198.18.0.0/24, so unreachable from the lab);
MACs are locally administered unicast (02:...). Every load is bounded in time and count; the
lab, etcd and every agent are removed at the end, also on failure or Ctrl-C. Results:
bench/results/<date>-<commit>/fleet.md and fleet.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

import msgspec

from bench import pct, progress, results_dir

ROOT = Path(__file__).resolve().parents[1]
VNI = 42
SIZES, SIZES_QUICK = (1000, 3000, 10000), (100, 300)
ENDPOINTS = 30
AGENTS, AGENTS_QUICK = (10, 100), (3,)
RATE = 10.0  # endpoint changes per second, fleet-wide
SECONDS, SECONDS_QUICK = 30.0, 5.0
CORE_EVENTS = 2000
RESYNC_KEYS, RESYNC_KEYS_QUICK = 100_000, 20_000
RESYNC_CHANGED = 0.01
FDB_MACS, FDB_VTEPS = 1_000_000, 30_000
FDB_MACS_QUICK, FDB_VTEPS_QUICK = 100_000, 3_000
PUTS, PUTS_QUICK = 100, 20
PUT_SPACING = 0.100  # s between the put -> applied puts
APPLIED_TIMEOUT = 10.0
APPLIED_WAIT_MAX = 300.0  # the longest wait the control command "applied" takes
TXN_OPS = 128  # etcd's default --max-txn-ops
TXNS_IN_FLIGHT = 4
GRANTS_IN_FLIGHT = 32
LEASE_TTL = 4 * 3600  # the simulated hosts' leases: longer than any run, never kept alive
MEMORY_BUDGET = 16 * 1024**3  # K agents x RSS above this: that K is skipped at that size
BUDGET_S, BUDGET_S_QUICK = 23 * 60, 170.0  # the whole run; phases that would not fit are skipped
DRIVER_HOST = 240  # the driver's service namespace: 198.18.0.240
ADDRESSES = 131072  # in 198.18.0.0/15
ADDRESS_BASE = (198 << 24) | (18 << 16)
HOST_ADDRESS_FIRST = 256  # simulated host j: address 256 + j (198.18.1.0 on)
FRESH_MAC = 0x020100000000  # put -> applied: fresh MACs, distinct from the fleet's 02:00:...
CLONE_NEWNET = 0x40000000
TAP = "ovl0"
KINDS = ("address", "move", "delete", "create")  # in-process events, in turn
CHANGES = ("address", "move", "recreate")  # etcd changes, in turn (recreate = delete + put)

# Targets (issue 12)
T_EVENT_MS = 0.2
T_EVENT_RATIO = 1.5
T_RESYNC_S = 1.0
T_APPLIED_P99_MS = 30.0
T_CORE_PCT = 5.0
T_RSS_MB = 300.0
T_BYTES_PER_MAC = 200.0
T_FLAT = 1.20


def f(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


# --- the simulated fleet ---------------------------------------------------------------------------


def address(n: int) -> str:
    """Address number ``n`` of 198.18.0.0/15."""
    a = ADDRESS_BASE + n
    return f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"


def host_id(j: int) -> str:
    return f"s{j}"


def endpoint_ipv4(i: int) -> list[str]:
    return [address(i)] if i < ADDRESSES else []


def mac_str(mac: int) -> str:
    h = f"{mac:012x}"
    return ":".join(h[k : k + 2] for k in range(0, 12, 2))


class Keys:
    """The registry keys of the simulated fleet under one prefix, and their values."""

    def __init__(self, prefix: str, endpoints: int) -> None:
        self.prefix, self.endpoints = prefix, endpoints
        self.member_value = b"{}"

    def network(self) -> tuple[str, bytes]:
        return f"{self.prefix}/networks/{VNI}", msgspec.json.encode({"vni": VNI, "name": "fleet"})

    def host(self, j: int, port: int = 4789) -> tuple[str, bytes]:
        value = {"address": address(HOST_ADDRESS_FIRST + j), "port": port}
        return f"{self.prefix}/hosts/{host_id(j)}", msgspec.json.encode(value)

    def member(self, j: int) -> str:
        return f"{self.prefix}/networks/{VNI}/members/{host_id(j)}"

    def endpoint_key(self, mac: int) -> str:
        return f"{self.prefix}/networks/{VNI}/endpoints/{mac_str(mac)}"

    def endpoint_value(self, owner: int, ipv4: list[str]) -> bytes:
        return msgspec.json.encode({"host": host_id(owner), "ipv4": ipv4})

    def of_host(self, j: int) -> Iterator[tuple[str, bytes]]:
        """Host ``j``'s keys: its host record, its membership, its endpoints."""
        yield self.host(j)
        yield self.member(j), self.member_value
        for e in range(self.endpoints):
            i = j * self.endpoints + e
            yield self.endpoint_key(0x020000000000 | i), self.endpoint_value(j, endpoint_ipv4(i))


def fleet_kvs(keys: Keys, hosts: int, revision: int = 1) -> tuple[list[tuple[str, bytes, int]], int]:
    """The fleet of ``hosts`` hosts as a snapshot: (key, value, mod_revision) each, and the next revision."""
    kvs: list[tuple[str, bytes, int]] = []
    for j in range(hosts):
        for k, v in keys.of_host(j):
            kvs.append((k, v, revision))
            revision += 1
    return kvs, revision


# --- A. the core, in process ---------------------------------------------------------------------------


def _core_table() -> Any:
    from overlay.core.fdb import ForwardingTable
    from overlay.fastpath import load

    load()
    from overlay.fastpath.api import ForwardingCore
    from overlay.fastpath.sinks import CoreSink

    return ForwardingTable(CoreSink(ForwardingCore()), max_per_vni=2_000_000)


def core_size(hosts: int, endpoints: int, events: int) -> dict[str, Any]:
    """Snapshot, apply and serve of ``hosts`` x ``endpoints``, then ``events`` endpoint events timed one by one."""
    from overlay.core.registry import Registry, Schema
    from overlay.core.topology import Topology

    schema = Schema()
    keys = Keys(schema.prefix, endpoints)
    kvs, revision = fleet_kvs(keys, hosts)
    gc.collect()
    c0, w0 = time.process_time(), time.perf_counter()
    registry = Registry(schema)
    evs = registry.snapshot(kvs, revision - 1)
    c1 = time.process_time()
    table = _core_table()
    topology = Topology(registry, table, "bench")
    topology.apply(evs, 0.0)
    c2 = time.process_time()
    topology.serve(VNI, 0.0)
    c3, w3 = time.process_time(), time.perf_counter()
    entries = len(table)
    del evs, kvs

    rnd = random.Random(hosts)
    total = hosts * endpoints
    owner: dict[int, int] = {}
    deleted: list[int] = []
    ops: list[tuple[str, str, bytes | None]] = []
    for n in range(events):
        kind = KINDS[n % len(KINDS)]
        if kind == "create":
            i = deleted.pop()
        else:
            i = rnd.randrange(total)
            while i in deleted:
                i = rnd.randrange(total)
        key = keys.endpoint_key(0x020000000000 | i)
        if kind == "address":
            ops.append(
                (kind, key, keys.endpoint_value(owner.get(i, i // endpoints), [address(rnd.randrange(ADDRESSES))]))
            )
        elif kind == "move":
            owner[i] = rnd.randrange(hosts)
            ops.append((kind, key, keys.endpoint_value(owner[i], endpoint_ipv4(i))))
        elif kind == "delete":
            deleted.append(i)
            ops.append((kind, key, None))
        else:
            ops.append((kind, key, keys.endpoint_value(owner.get(i, i // endpoints), endpoint_ipv4(i))))
    costs: dict[str, list[float]] = {k: [] for k in KINDS}
    clock = time.process_time
    gc.collect()
    for kind, key, value in ops:
        revision += 1
        t0 = clock()
        evs = registry.put(key, value, revision) if value is not None else registry.delete(key, revision)
        topology.apply(evs, 1.0)
        costs[kind].append(clock() - t0)
    every = [c * 1000 for cs in costs.values() for c in cs]
    result = {
        "hosts": hosts,
        "endpoints": endpoints,
        "keys": hosts * (endpoints + 2),
        "table_entries": entries,
        "with_ipv4": min(total, ADDRESSES),
        "snapshot_cpu_s": c1 - c0,
        "apply_cpu_s": c2 - c1,
        "serve_cpu_s": c3 - c2,
        "total_cpu_s": c3 - c0,
        "total_wall_s": w3 - w0,
        "events": len(every),
        "event_median_ms": statistics.median(every),
        "event_p99_ms": pct(every, 99),
        "event_max_ms": max(every),
        "event_median_ms_by_kind": {k: statistics.median(cs) * 1000 for k, cs in costs.items() if cs},
        "table_entries_after": len(table),
    }
    del registry, topology, table
    gc.collect()
    return result


def core_resync(keys_wanted: int, endpoints: int, changed: float = RESYNC_CHANGED) -> dict[str, Any]:
    """A snapshot of ``keys_wanted`` keys against a registry (and topology) that holds it, with
    ``changed`` of the keys differing: half of them new values, a quarter gone, a quarter new."""
    from overlay.core.registry import Registry, Schema
    from overlay.core.topology import Topology

    schema = Schema()
    keys = Keys(schema.prefix, endpoints)
    hosts = max(1, keys_wanted // (endpoints + 2))
    kvs, revision = fleet_kvs(keys, hosts)
    registry = Registry(schema)
    c0, w0 = time.process_time(), time.perf_counter()
    evs = registry.snapshot(kvs, revision - 1)
    table = _core_table()
    topology = Topology(registry, table, "bench")
    topology.apply(evs, 0.0)
    topology.serve(VNI, 0.0)
    cold_cpu, cold_wall = time.process_time() - c0, time.perf_counter() - w0
    del evs

    total = hosts * endpoints
    differ = max(4, int(len(kvs) * changed))
    step = max(1, total // differ)
    index = {k: n for n, (k, _, _) in enumerate(kvs)}
    fresh = list(kvs)
    gone: set[int] = set()
    n_changed = n_gone = n_new = 0
    for c, i in enumerate(range(0, total, step)):
        if c >= differ:
            break
        key = keys.endpoint_key(0x020000000000 | i)
        if c % 4 in (0, 1):
            fresh[index[key]] = (key, keys.endpoint_value(i // endpoints, [address((i + 7) % ADDRESSES)]), revision)
            n_changed += 1
        elif c % 4 == 2:
            gone.add(index[key])
            n_gone += 1
        else:
            new = keys.endpoint_key(FRESH_MAC | 0xF00000 | c)
            fresh.append((new, keys.endpoint_value(i // endpoints, []), revision))
            n_new += 1
        revision += 1
    fresh = [kv for n, kv in enumerate(fresh) if n not in gone]
    gc.collect()
    c0, w0 = time.process_time(), time.perf_counter()
    evs = registry.snapshot(fresh, revision)
    topology.apply(evs, 1.0)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    result = {
        "keys": len(kvs),
        "snapshot_keys": len(fresh),
        "changed": n_changed,
        "gone": n_gone,
        "new": n_new,
        "events": len(evs),
        "resync_cpu_s": cpu,
        "resync_wall_s": wall,
        "cold_cpu_s": cold_cpu,
        "cold_wall_s": cold_wall,
        "table_entries": len(table),
    }
    del registry, topology, table, kvs, fresh, evs
    gc.collect()
    return result


# --- B. the forwarding table at 1M MACs ---------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fdb_memory(macs: int, vteps: int, trace: bool) -> dict[str, Any]:
    """``macs`` REGISTRY entries over ``vteps`` VTEPs (one Vtep object per host, shared, as
    Topology does) in a ForwardingTable over the C table; bytes per MAC by RSS, or by
    tracemalloc (the Python side; the C table's malloc is not traced). Run in a fresh process."""
    import ipaddress

    from overlay.core.fdb import Source, Vtep

    hosts = [Vtep(ipaddress.IPv4Address(ADDRESS_BASE + HOST_ADDRESS_FIRST + j), 4789) for j in range(vteps)]
    gc.collect()
    if trace:
        tracemalloc.start()
    r0, t0 = _rss(), time.perf_counter()
    table = _core_table()
    table.add_vni(VNI)
    put, registry = table.put, Source.REGISTRY
    for i in range(macs):
        put(VNI, 0x020000000000 | i, hosts[i % vteps], registry, 0.0)
    gc.collect()
    r1, seconds = _rss(), time.perf_counter() - t0
    out: dict[str, Any] = {"macs": macs, "vteps": vteps, "entries": len(table), "build_s": seconds}
    if trace:
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["python_bytes_per_mac"] = current / macs
    else:
        out["rss_bytes_per_mac"] = (r1 - r0) / macs
    probe = table.lookup(VNI, 0x020000000000 | (macs - 1))
    out["lookup_ok"] = probe is not None and probe.vtep == hosts[(macs - 1) % vteps]
    return out


def fdb_figures(macs: int, vteps: int) -> dict[str, Any]:
    """fdb_memory twice in fresh processes: by RSS, then by tracemalloc."""
    out: dict[str, Any] = {}
    for trace in (False, True):
        what = "tracemalloc (Python side)" if trace else "RSS"
        progress(f"forwarding table: {macs} registry MACs over {vteps} VTEPs, by {what}")
        code = f"import json, bench.fleet as f; print(json.dumps(f.fdb_memory({macs}, {vteps}, {trace})))"
        run = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
        if run.returncode != 0:
            raise RuntimeError(f"the forwarding-table probe failed: {run.stderr.strip()[-500:]}")
        r = json.loads(run.stdout.strip().splitlines()[-1])
        out.update({k: v for k, v in r.items() if k != "build_s"})
        out["build_s_traced" if trace else "build_s"] = r["build_s"]
    out["c_and_rest_bytes_per_mac"] = out["rss_bytes_per_mac"] - out["python_bytes_per_mac"]
    return out


def fastpath_flatness(quick: bool, limit: float = 180.0) -> dict[str, Any]:
    """``python -m bench.fastpath`` (with ``--quick``: fewer rounds; about 15 s without it here):
    the 1M vs 10 entries ratio of encap+lookup, for the active set and uniform."""
    argv = ["--quick"] if quick else []
    progress(f"lookup flatness: python -m bench.fastpath {' '.join(argv)}")
    t0 = time.monotonic()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "bench.fastpath", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=limit,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {"ran": False, "note": f"bench.fastpath {' '.join(argv)} did not finish within {limit:.0f} s"}
    out: dict[str, Any] = {"ran": run.returncode == 0, "seconds": time.monotonic() - t0, "argv": argv}
    text = run.stdout
    for model in ("active", "uniform"):
        section = text.split(f"  {model} destinations:", 1)
        m = re.search(r"1M vs 10 entries (\d+\.\d+)x", section[1]) if len(section) == 2 else None
        out[f"{model}_1m_vs_10"] = float(m.group(1)) if m else None
    if out["active_1m_vs_10"] is None:
        out["note"] = "no '1M vs 10 entries' line in its output: " + (run.stderr or text).strip()[-300:]
    return out


# --- C. real etcd, real agents: the driver (runs in a lab service namespace) ------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        rest = fh.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def python_pid(pid: int) -> int:
    """The process itself, or its child if it is still the ``ip netns exec`` wrapper."""
    try:
        with open(f"/proc/{pid}/comm") as fh:
            if fh.read().strip() != "ip":
                return pid
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = fh.read().split()
        return int(children[0]) if children else pid
    except OSError:
        return pid


class Namespaces:
    """Sockets made inside another network namespace: the calling thread enters it with setns,
    makes the socket (which stays in that namespace) and comes back."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        self.fds: dict[str, int] = {}

    def socket_in(self, ns: str) -> socket.socket:
        fd = self.fds.get(ns)
        if fd is None:
            fd = self.fds[ns] = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        if self.libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        try:
            return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        finally:
            if self.libc.setns(self.own, CLONE_NEWNET) != 0:
                os._exit(70)  # never go on in the wrong namespace

    def close(self) -> None:
        for fd in [*self.fds.values(), self.own]:
            os.close(fd)
        self.fds.clear()


class Agent:
    """One real agent process in lab namespace ``ns``."""

    def __init__(self, n: int, ns: str, local: str, host: str, log: Path) -> None:
        self.n, self.ns, self.local, self.host, self.log = n, ns, local, host, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.spawned = 0.0
        self.socket_s: float | None = None  # start -> control socket answers
        self.ready_s: float | None = None  # start -> registry applied up to the fleet's revision
        self.status: dict[str, Any] = {}
        self.error: str | None = None
        self.startup_cpu = 0.0  # CPU seconds from start to ready

    def argv(self, etcd: str) -> list[str]:
        return [
            "ip", "netns", "exec", self.ns,
            sys.executable, "-m", "overlay", "agent",
            "--etcd", etcd, "--host-id", self.host, "--network", str(VNI),
            "--local", self.local, "--tap", TAP, "--no-bridge",
            "--metrics", "off", "--probe-port", "0", "--max-per-vni", "1000000",
        ]  # fmt: skip

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""


async def ask(nss: Namespaces, agent: Agent, cmd: str, limit: float, **params: Any) -> Any:
    """One control request to ``agent`` (its abstract socket, from inside its namespace),
    answered within ``limit`` seconds."""
    from overlay.io import control

    loop = asyncio.get_running_loop()
    s = nss.socket_in(agent.ns)
    s.setblocking(False)

    async def exchange() -> Any:
        await loop.sock_connect(s, control.address(TAP))
        await loop.sock_sendall(s, json.dumps({"cmd": cmd, **params}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = await loop.sock_recv(s, 1 << 16)
            if not chunk:
                break
            data += chunk
        return json.loads(data)

    try:
        return await asyncio.wait_for(exchange(), limit)
    finally:
        s.close()


class Writer:
    """The simulated fleet in etcd: hosts, members and endpoints under one lease per host,
    written in transactions of at most TXN_OPS operations; then endpoint changes and puts."""

    def __init__(self, endpoint: str, endpoints: int) -> None:
        import aetcd

        from overlay.core.addresses import parse_endpoint
        from overlay.core.registry import DEFAULT_PREFIX
        from overlay.io import etcd as etcdclient

        host, port = parse_endpoint(endpoint)
        # No keepalive pings of its own: idle while agents start, it would ping more often than
        # etcd allows (etcd then hangs up: "too_many_pings"); its requests are bounded by timeouts.
        options = {k: v for k, v in etcdclient.GRPC_OPTIONS.items() if "keepalive" not in k and "ping" not in k}
        self.client = aetcd.Client(host, port, timeout=30, options=options)
        self.keys = Keys(DEFAULT_PREFIX, endpoints)
        self.endpoints = endpoints
        self.hosts = 0
        self.leases: list[int] = []
        self.owner: dict[int, int] = {}
        self.revision = 0
        self.fresh = 0
        self.grant_s = 0.0
        self.write_s = 0.0
        self.written = 0

    async def connect(self) -> None:
        await self.client.connect()

    async def close(self) -> None:
        await self.client.close()

    async def _txn(self, ops: list[tuple[str, bytes, int]]) -> int:
        from aetcd import rpc

        request = rpc.TxnRequest(
            success=[
                rpc.RequestOp(request_put=rpc.PutRequest(key=k.encode(), value=v, lease=lease)) for k, v, lease in ops
            ]
        )
        response = await self.client.kvstub.Txn(request, timeout=30, metadata=self.client.metadata)
        return int(response.header.revision)

    async def grow(self, hosts: int) -> dict[str, Any]:
        """Write hosts self.hosts .. hosts-1 (their leases first)."""
        from aetcd import rpc

        first, new = self.hosts, hosts - self.hosts
        if new <= 0:
            return {"hosts": hosts, "new_hosts": 0}
        if first == 0:
            k, v = self.keys.network()
            self.revision = await self._txn([(k, v, 0)])
        t0 = time.monotonic()
        leases: list[int] = [0] * new
        sem = asyncio.Semaphore(GRANTS_IN_FLIGHT)

        async def grant(n: int) -> None:
            async with sem:
                r = await self.client.leasestub.LeaseGrant(
                    rpc.LeaseGrantRequest(TTL=LEASE_TTL, ID=0), timeout=30, metadata=self.client.metadata
                )
                leases[n] = r.ID

        progress(f"fleet: granting {new} leases (one per simulated host, TTL {LEASE_TTL} s, never kept alive)")
        await asyncio.wait_for(asyncio.gather(*(grant(n) for n in range(new))), 600)
        self.leases += leases
        grant_s = time.monotonic() - t0
        ops = [(k, v, self.leases[j]) for j in range(first, hosts) for k, v in self.keys.of_host(j)]
        chunks = [ops[n : n + TXN_OPS] for n in range(0, len(ops), TXN_OPS)]
        t1 = time.monotonic()
        done, next_report = 0, 0.1
        txn_sem = asyncio.Semaphore(TXNS_IN_FLIGHT)

        async def write(chunk: list[tuple[str, bytes, int]]) -> None:
            nonlocal done, next_report
            async with txn_sem:
                revision = await self._txn(chunk)
            self.revision = max(self.revision, revision)
            done += len(chunk)
            if done / len(ops) >= next_report and done < len(ops):
                rate = done / max(1e-9, time.monotonic() - t1)
                progress(f"fleet: {done}/{len(ops)} keys written ({rate:.0f} keys/s)")
                next_report += 0.1

        progress(f"fleet: writing {len(ops)} keys of hosts {first}..{hosts - 1} in {len(chunks)} txns of <= {TXN_OPS}")
        await asyncio.wait_for(asyncio.gather(*(write(c) for c in chunks)), 1200)
        write_s = time.monotonic() - t1
        self.hosts = hosts
        self.grant_s += grant_s
        self.write_s += write_s
        self.written += len(ops)
        return {
            "hosts": hosts,
            "new_hosts": new,
            "keys_written": len(ops),
            "grant_s": grant_s,
            "write_s": write_s,
            "keys_per_s": len(ops) / write_s if write_s else float("nan"),
            "revision": self.revision,
        }

    def _owner(self, i: int) -> int:
        return self.owner.get(i, i // self.endpoints)

    async def put(self, key: str, value: bytes, owner: int) -> int:
        r = await self.client.put(key.encode(), value, lease=self.leases[owner])
        self.revision = max(self.revision, int(r.header.revision))
        return int(r.header.revision)

    async def change(self, kind: str, rnd: random.Random) -> int:
        """One endpoint change of the fleet; the number of etcd events it made."""
        i = rnd.randrange(self.hosts * self.endpoints)
        key = self.keys.endpoint_key(0x020000000000 | i)
        if kind == "address":
            owner = self._owner(i)
            await self.put(key, self.keys.endpoint_value(owner, [address(rnd.randrange(ADDRESSES))]), owner)
            return 1
        if kind == "move":
            owner = self.owner[i] = rnd.randrange(self.hosts)
            await self.put(key, self.keys.endpoint_value(owner, endpoint_ipv4(i)), owner)
            return 1
        owner = self._owner(i)
        await self.client.delete(key.encode())
        await self.put(key, self.keys.endpoint_value(owner, endpoint_ipv4(i)), owner)
        return 2

    async def put_fresh(self, rnd: random.Random) -> tuple[int, float, float]:
        """A new endpoint (a fresh MAC) on a simulated host: (revision, t0, t1), wall clock."""
        self.fresh += 1
        owner = rnd.randrange(self.hosts)
        key = self.keys.endpoint_key(FRESH_MAC | self.fresh)
        value = self.keys.endpoint_value(owner, [address(ADDRESSES - self.fresh)])
        t0 = time.time()
        revision = await self.put(key, value, owner)
        return revision, t0, time.time()


class Driver:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.nss = Namespaces()
        self.writer = Writer(cfg["etcd"], cfg["endpoints"])
        self.rnd = random.Random(12)
        self.results: dict[str, Any] = {"fleet": [], "phases": [], "skipped": [], "pids": [], "notes": []}
        self.deadline = cfg["deadline"]
        self.logs = Path(cfg["logs"])
        self.phase = 0
        self.profiling = False

    def save(self) -> None:
        Path(self.cfg["result"]).write_text(json.dumps(self.results, indent=2))

    def left(self) -> float:
        return float(self.deadline) - time.time()

    async def run(self) -> None:
        cfg = self.cfg
        await self.writer.connect()
        try:
            sizes, counts = cfg["sizes"], cfg["agents"]
            rss_seen: dict[int, float] = {}  # size -> RSS per agent (MB) at the smallest K
            startup_wall: dict[int, float] = {}  # size -> s of the smallest K's start, per agent
            for size in sizes:
                if self.left() < 60:
                    self.skip(size, None, f"the run's time budget is spent ({cfg['budget_s']:.0f} s)")
                    continue
                progress(f"fleet: growing to {size} hosts x {cfg['endpoints']} endpoints")
                self.results["fleet"].append(await self.writer.grow(size))
                self.save()
                for k in counts:
                    why = self.why_skip(size, k, counts, sizes, rss_seen, startup_wall)
                    if why:
                        self.skip(size, k, why)
                        continue
                    phase: dict[str, Any] = {"hosts": size, "agents": k}
                    try:
                        await self.run_phase(size, k, phase)
                    except Exception as e:  # the phase's figures so far are kept, and the run goes on
                        phase["error"] = f"{e.__class__.__name__}: {e}"
                        progress(f"{k} agents at {size} hosts: failed: {phase['error']}")
                    self.results["phases"].append(phase)
                    self.save()
                    if k == min(counts) and phase.get("rss_mb_max"):
                        rss_seen[size] = phase["rss_mb_max"]
                        startup_wall[size] = phase.get("startup_wall_s", 0.0) / k
        finally:
            await self.writer.close()
            self.nss.close()
            self.save()

    def skip(self, size: int, k: int | None, why: str) -> None:
        who = f"{k} agents at " if k else ""
        progress(f"skipped: {who}{size} hosts: {why}")
        self.results["skipped"].append({"hosts": size, "agents": k, "why": why})

    def why_skip(
        self,
        size: int,
        k: int,
        counts: list[int],
        sizes: list[int],
        rss_seen: dict[int, float],
        startup_wall: dict[int, float],
    ) -> str | None:
        if k == min(counts):
            return None if self.left() > 60 else "the run's time budget is spent"
        rss = rss_seen.get(size)
        if rss is None:
            return f"no RSS measured with {min(counts)} agents at this size to size it by"
        if k * rss * 1024**2 > MEMORY_BUDGET:
            return (
                f"{k} agents x {rss:.0f} MB RSS (measured with {min(counts)}) = {k * rss / 1024:.1f} GB "
                f"> {MEMORY_BUDGET / 1024**3:.0f} GB"
            )
        per_agent = startup_wall.get(size, 5.0)
        estimate = self.estimate(k, per_agent)
        # What the smallest K still needs at the larger fleets: its start grows with the fleet
        # (the snapshot), and the fleet is written first.
        kmin = min(counts)
        later = [n for n in sizes if n > size]
        reserve = sum(
            self.estimate(kmin, per_agent * n / size) + (n - size) * self.cfg["endpoints"] / 15_000 for n in later
        )
        if estimate > self.left() - reserve:
            return (
                f"about {estimate:.0f} s needed (starting one agent took {per_agent:.1f} s here with {kmin}), "
                f"{self.left():.0f} s left in the run's budget"
                + (
                    f", {reserve:.0f} s of it kept for {kmin} agents at {', '.join(map(str, later))} hosts"
                    if later
                    else ""
                )
            )
        return None

    def estimate(self, k: int, per_agent: float) -> float:
        """Seconds a phase of ``k`` agents takes, each taking ``per_agent`` s to start (they start
        one per CPU at a time: that is the wall time per agent so measured)."""
        windows = 2 * (float(self.cfg["seconds"]) + 1) + int(self.cfg["puts"]) * PUT_SPACING + 30
        return k * per_agent * 1.3 + windows + k * 0.5

    # --- one phase: K agents on a fleet of a size -------------------------------------------------------

    async def run_phase(self, size: int, k: int, out: dict[str, Any]) -> None:
        """K agents on the fleet as it is: figures into ``out`` as they come."""
        cfg = self.cfg
        self.phase += 1
        agents = [
            Agent(
                n, f"{cfg['lab']}-h{n}", f"198.18.0.{n}", f"a{n}-p{self.phase}", self.logs / f"p{self.phase}-a{n}.log"
            )
            for n in range(1, k + 1)
        ]
        out["keys"] = self.writer.written + 1
        self.profiling = bool(cfg.get("profile_now")) and k == min(cfg["agents"])
        try:
            t0 = time.monotonic()
            await self.start(agents, size)
            out["startup_wall_s"] = time.monotonic() - t0
            live = [a for a in agents if a.ready_s is not None]
            out.update(self.startup_figures(agents, live))
            if not live:
                raise RuntimeError("no agent became ready: " + "; ".join(f"a{a.n}: {a.error}" for a in agents))
            await asyncio.sleep(2.0)  # the registrations of the last wave settle
            out["idle"] = await self.window(live, "idle", None)
            out["busy"] = await self.window(live, "busy", cfg["rate"])
            out["applied"] = await self.put_applied(live, cfg["puts"])
            status = await self.statuses(live)
            out["apply_lag"] = [
                {k: v for k, v in ((s.get("registry") or {}).get("apply_lag") or {}).items() if k != "buckets"}
                for s in status
                if s
            ]
            out["rss_mb_end"] = [rss_mb(a.pid) for a in live]
            out["refused"] = sum((s.get("registry") or {}).get("refused", 0) for s in status if s)
            out["out_of_scope"] = sum((s.get("registry") or {}).get("out_of_scope", 0) for s in status if s)
            out["reconnects"] = sum((s.get("registry") or {}).get("reconnects", 0) for s in status if s)
        finally:
            out["stopped"] = await self.stop(agents)

    async def start(self, agents: list[Agent], size: int) -> None:
        """Start the agents in waves of one per CPU; each wave until every agent is ready."""
        wave = max(1, os.cpu_count() or 1)
        target = self.writer.revision
        progress(f"{len(agents)} agents at {size} hosts: starting, {wave} at a time (fleet at revision {target})")
        limit = 90.0 + size * self.cfg["endpoints"] / 1500
        for w in range(0, len(agents), wave):
            batch = agents[w : w + wave]
            profile = None
            for a in batch:
                log = open(a.log, "wb")
                a.spawned = time.monotonic()
                a.proc = subprocess.Popen(a.argv(self.cfg["etcd"]), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
                log.close()
                a.pid = python_pid(a.proc.pid)
                self.results["pids"].append(a.proc.pid)
                if self.profiling and a is agents[0]:  # its start: registration, snapshot (after the imports)
                    await asyncio.sleep(0.7)  # py-spy needs the interpreter up
                    a.pid = python_pid(a.proc.pid)
                    profile = self.start_profile(a, "startup", min(120.0, 20 + size * self.cfg["endpoints"] / 5000))
            await asyncio.gather(*(self.wait_ready(a, target, limit) for a in batch))
            if profile is not None:
                profile[0].send_signal(signal.SIGINT)  # py-spy writes what it has and ends
                self.finish_profile(profile)
            ready = sum(1 for a in agents if a.ready_s is not None)
            if (w // wave) % max(1, len(agents) // wave // 5) == 0 or w + wave >= len(agents):
                progress(f"{len(agents)} agents at {size} hosts: {ready}/{len(agents)} ready")

    async def wait_ready(self, a: Agent, target: int, limit: float) -> None:
        """Until ``a``'s control socket answers, then until it applied ``target`` (one ``applied``
        request that waits: polling status would cost a large agent CPU of its own)."""
        assert a.proc is not None
        deadline = a.spawned + limit
        while time.monotonic() < deadline:
            if a.proc.poll() is not None:
                a.error = f"exited ({a.proc.returncode}): {a.log_tail()}"
                progress(f"agent a{a.n}: {a.error}")
                return
            a.pid = python_pid(a.proc.pid)
            left = deadline - time.monotonic()
            try:
                if a.socket_s is None:
                    await ask(self.nss, a, "status", 5.0)
                    a.socket_s = time.monotonic() - a.spawned
                    continue
                wait = max(1.0, min(APPLIED_WAIT_MAX, left))
                answer = await ask(self.nss, a, "applied", wait + 5, revision=target, timeout=wait)
            except (TimeoutError, OSError, ValueError):
                await asyncio.sleep(0.05 if a.socket_s is None else 0.25)
                continue
            if isinstance(answer, dict) and "revision" in answer:
                a.ready_s = time.monotonic() - a.spawned
                a.startup_cpu = cpu_seconds(a.pid)
                try:
                    a.status = await ask(self.nss, a, "status", 10.0)
                except (TimeoutError, OSError, ValueError):
                    a.status = {}
                return
            await asyncio.sleep(0.25)  # refused: its registry is not there yet
        a.error = f"not ready within {limit:.0f} s: {a.log_tail()}"
        progress(f"agent a{a.n}: {a.error}")

    def startup_figures(self, agents: list[Agent], live: list[Agent]) -> dict[str, Any]:
        socket_s = [a.socket_s for a in agents if a.socket_s is not None]
        ready_s = [a.ready_s for a in live if a.ready_s is not None]
        regs = [a.status.get("registry") or {} for a in live]
        resync_s = [r["resync_s"] for r in regs if "resync_s" in r]
        keys = [r["resync_keys"] for r in regs if "resync_keys" in r]
        cpu = [a.startup_cpu for a in live]
        rss = [rss_mb(a.pid) for a in live]
        out = {
            "ready": len(live),
            "failed": [{"agent": a.n, "error": a.error} for a in agents if a.ready_s is None],
            "socket_s": socket_s,
            "ready_s": ready_s,
            "resync_s": resync_s,
            "resync_keys": keys,
            "startup_cpu_s": cpu,
            "startup_cpu_s_median": statistics.median(cpu) if cpu else None,
            "rss_mb": rss,
            "rss_mb_max": max(rss) if rss else None,
            "status_fields": sorted(regs[0]) if regs else [],
        }
        progress(
            f"{len(agents)} agents ready: start -> socket p50 {f(pct(socket_s, 50), 2)} s, -> ready p50 "
            f"{f(pct(ready_s, 50), 2)} s (max {f(max(ready_s, default=float('nan')), 2)}), agent snapshot p50 "
            f"{f(pct(resync_s, 50), 2)} s of {keys[0] if keys else '?'} keys, RSS max {f(max(rss, default=float('nan')))} MB"
        )
        return out

    async def statuses(self, agents: list[Agent]) -> list[dict[str, Any]]:
        async def one(a: Agent) -> dict[str, Any]:
            try:
                s = await ask(self.nss, a, "status", 10.0)
                return s if isinstance(s, dict) else {}
            except (TimeoutError, OSError, ValueError):
                return {}

        return list(await asyncio.gather(*(one(a) for a in agents)))

    async def window(self, agents: list[Agent], name: str, rate: float | None) -> dict[str, Any]:
        """CPU of every agent (and etcd's, and ours) over a window of cfg seconds: idle, or with
        ``rate`` endpoint changes per second; etcd's gRPC counters too."""
        from bench.registry import deltas, scrape

        seconds = self.cfg["seconds"]
        loop = asyncio.get_running_loop()
        st0 = await self.statuses(agents)
        before = await loop.run_in_executor(None, scrape, self.cfg["etcd"])
        cpu0 = [cpu_seconds(a.pid) for a in agents]
        etcd0, own0 = cpu_seconds(self.cfg["etcd_pid"]), time.process_time()
        t0 = time.monotonic()
        events = changes = 0
        if rate is None:
            progress(f"{len(agents)} agents: idle window, {seconds:.0f} s")
            await asyncio.sleep(seconds)
        else:
            progress(f"{len(agents)} agents: {rate:g} endpoint changes/s fleet-wide for {seconds:.0f} s")
            profile = self.start_profile(agents[0], "busy", seconds) if self.profiling else None
            n = int(rate * seconds)
            for c in range(n):
                delay = t0 + c / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.monotonic() - t0 > seconds + 10:
                    break  # bounded: etcd is slower than the rate asks
                events += await self.writer.change(CHANGES[c % len(CHANGES)], self.rnd)
                changes += 1
            delay = t0 + seconds - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await asyncio.sleep(1.0)  # the last events are applied
            if profile is not None:
                self.finish_profile(profile)
        wall = time.monotonic() - t0
        cpu1 = [cpu_seconds(a.pid) for a in agents]
        etcd1, own1 = cpu_seconds(self.cfg["etcd_pid"]), time.process_time()
        after = await loop.run_in_executor(None, scrape, self.cfg["etcd"])
        st1 = await self.statuses(agents)
        per = [(c1 - c0) for c0, c1 in zip(cpu0, cpu1)]
        methods = deltas(before, after)
        seen = [
            (s1.get("registry") or {}).get("events", 0) - (s0.get("registry") or {}).get("events", 0)
            for s0, s1 in zip(st0, st1)
            if s0 and s1
        ]
        out = {
            "seconds": wall,
            "changes": changes,
            "events": events,
            "agent_events": seen,
            "cpu_s": per,
            "core_pct": [c / wall * 100 for c in per],
            "core_pct_median": statistics.median(c / wall * 100 for c in per),
            "core_pct_max": max(c / wall * 100 for c in per),
            "etcd_core_pct": (etcd1 - etcd0) / wall * 100,
            "driver_core_pct": (own1 - own0) / wall * 100,
            "methods": methods,
            "loadavg": os.getloadavg(),
        }
        received = {m: v["grpc_server_msg_received_total"] for m, v in methods.items()}
        out["msgs_per_agent_s"] = {m: v / len(agents) / wall for m, v in received.items()}
        out["range_calls"] = methods.get("Range", {}).get("grpc_server_started_total", 0.0)
        progress(
            f"{len(agents)} agents, {name}: CPU per agent p50 {out['core_pct_median']:.2f}% of a core "
            f"(max {out['core_pct_max']:.2f}%), {events} events, etcd {out['etcd_core_pct']:.0f}%"
        )
        return out

    def start_profile(
        self, agent: Agent, what: str, seconds: float
    ) -> tuple[subprocess.Popen[bytes], dict[str, Any]] | None:
        """py-spy on ``agent`` for ``seconds`` (raw collapsed stacks into the results folder)."""
        spy = Path(sys.executable).with_name("py-spy")
        if not spy.exists():
            if "py-spy" not in " ".join(self.results["notes"]):
                self.results["notes"].append("py-spy is not installed in the venv (pip install py-spy): no profile")
            return None
        path = Path(self.cfg["out"]) / f"fleet-pyspy-{self.writer.hosts}-{what}.txt"
        entry = {"hosts": self.writer.hosts, "what": what, "agent": agent.n, "path": str(path), "seconds": seconds}
        argv = [str(spy), "record", "-d", str(int(seconds)), "-r", "200", "-p", str(agent.pid), "-o", str(path)]
        if self.cfg.get("profile_now") == "native":  # C frames too: py-spy then pauses the agent for each sample
            argv.append("--native")
            entry["native"] = True
        else:
            argv.append("--nonblocking")
        proc = subprocess.Popen([*argv, "-f", "raw"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return proc, entry

    def finish_profile(self, profile: tuple[subprocess.Popen[bytes], dict[str, Any]]) -> None:
        proc, entry = profile
        try:
            proc.wait(timeout=entry["seconds"] + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        entry["top"], entry["inclusive"], entry["samples"] = profile_top(Path(entry["path"]))
        self.results.setdefault("profiles", []).append(entry)

    async def put_applied(self, agents: list[Agent], puts: int) -> dict[str, Any]:
        """``puts`` fresh endpoints, PUT_SPACING apart; then every agent asked when it applied each."""
        progress(f"{len(agents)} agents: put -> applied, {puts} puts {PUT_SPACING * 1000:.0f} ms apart")
        records: list[tuple[int, float, float]] = []
        start = time.monotonic()
        for n in range(puts):
            delay = start + n * PUT_SPACING - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            records.append(await self.writer.put_fresh(self.rnd))
        await asyncio.sleep(0.5)

        async def answers(a: Agent) -> list[float | str]:
            out: list[float | str] = []
            for revision, t0, _ in records:
                try:
                    r = await ask(
                        self.nss, a, "applied", APPLIED_TIMEOUT + 5, revision=revision, timeout=APPLIED_TIMEOUT
                    )
                except (TimeoutError, OSError, ValueError) as e:
                    out.append(f"{e.__class__.__name__}: {e}")
                    continue
                at = r.get("applied_at") if isinstance(r, dict) else None
                out.append((at - t0) * 1000 if isinstance(at, (int, float)) else str(r.get("error", r))[:200])
            return out

        every = await asyncio.gather(*(answers(a) for a in agents))
        lat = [x for per in every for x in per if isinstance(x, float)]
        errors = [x for per in every for x in per if isinstance(x, str)]
        first = [min(x) for x in zip(*every) if all(isinstance(v, float) for v in x)]
        rtt = [(t1 - t0) * 1000 for _, t0, t1 in records]
        out: dict[str, Any] = {
            "puts": puts,
            "pairs": len(lat),
            "lost": len(errors),
            "errors": errors[:5],
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "max_ms": max(lat, default=float("nan")),
            "first_p50_ms": pct(first, 50),
            "put_rtt_p50_ms": pct(rtt, 50),
            "per_agent_p99_ms": [pct([x for x in per if isinstance(x, float)], 99) for per in every],
        }
        progress(
            f"{len(agents)} agents: put -> applied p50 {f(out['p50_ms'])} ms, p99 {f(out['p99_ms'])} ms, "
            f"max {f(out['max_ms'])} ms, {out['lost']} lost"
        )
        return out

    async def stop(self, agents: list[Agent]) -> int:
        """SIGTERM every agent (each revokes its lease), SIGKILL what is left after 15 s."""
        procs = [a.proc for a in agents if a.proc is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 15
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)
        return len(procs)


def profile_top(path: Path, n: int = 12) -> tuple[list[tuple[str, float]], list[tuple[str, float]], int]:
    """From a py-spy raw (collapsed) profile: the frames most often on top of the stack and the
    frames most often anywhere in it, (frame, % of samples) each, and the number of samples."""
    leaf: dict[str, int] = {}
    anywhere: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return [], [], 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + c
        for frame in set(frames[1:]):  # the first is the process/thread
            anywhere[frame] = anywhere.get(frame, 0) + c
    if not total:
        return [], [], 0

    outer = ("runpy>", "overlay/__main__.py", "overlay/cmd/cli.py", "uvloop/__init__.py", "asyncio/runners.py")
    anywhere = {k: v for k, v in anywhere.items() if not any(o in k for o in (*outer, "threading.py"))}

    def top(counts: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, v / total * 100) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:n]]

    return top(leaf), top({k: v for k, v in anywhere.items() if v < total}), total


def on_sigterm() -> None:
    """SIGTERM unwinds this process like Ctrl-C, so that its finally clauses tear down what it
    made; in forked children (pyroute2 forks helpers into namespaces) it stays the default, or a
    child would unwind its copy of our stack and tear down the parent's lab."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))


def drive(config_path: str) -> None:
    """The driver's entry point (``python -m bench.fleet --driver CONFIG``), in the lab."""
    import uvloop

    cfg = json.loads(Path(config_path).read_text())
    on_sigterm()
    driver = Driver(cfg)
    try:
        uvloop.run(driver.run())
    finally:
        driver.save()


# --- the run --------------------------------------------------------------------------------------


def run_agents(args: argparse.Namespace, budget_end: float, out: Path) -> dict[str, Any]:
    """Lab, etcd, the driver in its service namespace; the driver's results."""
    from overlay.lab import Lab
    from overlay.lab import etcd as etcdlab

    name = f"fl{os.getpid() % 100000}"
    hosts = max(args.agents)
    tmp = Path(tempfile.mkdtemp(prefix="overlay-fleet-"))
    result = tmp / "driver.json"
    progress(f"lab {name}: {hosts} hosts, etcd, the driver (namespaces {name}-*)")
    with Lab(name, hosts=hosts) as lab:
        etcd = None
        try:
            for n in range(1, hosts + 1):  # the TAPs send nothing: no IPv6 (no DAD, RS, MLD)
                lab.run(
                    n,
                    ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
                )
            etcd = etcdlab.single(lab)
            progress(f"etcd at {etcd.endpoint} (pid {etcd.pid}) in {lab.service_ns('etcd1')}")
            lab.add_service("drv", DRIVER_HOST)
            cfg = {
                "sizes": args.sizes,
                "endpoints": args.endpoints,
                "agents": args.agents,
                "rate": args.rate,
                "seconds": args.seconds,
                "puts": args.puts,
                "quick": args.quick,
                "etcd": etcd.endpoint,
                "etcd_pid": etcd.pid,
                "lab": name,
                "logs": str(tmp),
                "result": str(result),
                "out": str(out),
                "deadline": budget_end,
                "budget_s": args.budget,
                "profile_now": args.profile,
            }
            (tmp / "driver-config.json").write_text(json.dumps(cfg))
            driver = lab.spawn(
                "drv", [sys.executable, "-m", "bench.fleet", "--driver", str(tmp / "driver-config.json")], cwd=ROOT
            )
            try:
                driver.wait(timeout=max(60.0, budget_end - time.time() + 120))
            except subprocess.TimeoutExpired:
                progress("the driver overran the run's budget: stopped")
                driver.terminate()
                try:
                    driver.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    driver.kill()
                    driver.wait()
            results: dict[str, Any] = json.loads(result.read_text()) if result.exists() else {}
            if driver.returncode != 0:
                results.setdefault("notes", []).append(f"the driver exited with status {driver.returncode}")
            results["lab"] = name
            results["pids"] = [*results.get("pids", []), etcd.pid, driver.pid]
            results["etcd_version"] = etcd_version()
            return results
        finally:
            if etcd is not None:
                etcd.stop()
            if args.keep_logs:
                (out / "fleet-logs").mkdir(exist_ok=True)
                for p in tmp.glob("*.log"):
                    shutil.copy(p, out / "fleet-logs" / p.name)
            shutil.rmtree(tmp, ignore_errors=True)


def etcd_version() -> str:
    from overlay.lab import etcd as etcdlab

    version = subprocess.run([etcdlab.binary("etcd"), "--version"], capture_output=True, text=True, timeout=10)
    return version.stdout.split("\n")[0].split(":")[-1].strip() or "?"


# --- report ----------------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "met" if ok else "MISSED"


def report(res: dict[str, Any]) -> str:
    env, args = res["env"], res["args"]
    quick = " (--quick)" if args["quick"] else ""
    lines = [
        f"Fleet benchmark (issue 12): {env['date']} at {env['commit']}, {env['cpus']} CPUs, python {env['python']}, "
        f"etcd {res.get('agents', {}).get('etcd_version', '?')}{quick}; run took {res['seconds']:.0f} s",
        "",
    ]
    targets: list[tuple[str, str, bool | None]] = []

    # A
    core = res["core"]
    lines += [
        f"### A. One agent's core in process (no etcd): Registry + Topology + ForwardingTable over the C table, "
        f"one network, {args['endpoints']} endpoints per host",
        "",
        "| hosts | keys | snapshot CPU s | topology apply s | serve(42) s | total s (wall) | events | "
        "event CPU median ms | p99 ms | max ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in core["sizes"]:
        lines.append(
            f"| {r['hosts']} | {r['keys']} | {r['snapshot_cpu_s']:.2f} | {r['apply_cpu_s']:.2f} | {r['serve_cpu_s']:.2f} "
            f"| {r['total_cpu_s']:.2f} ({r['total_wall_s']:.2f}) | {r['events']} | {r['event_median_ms']:.4f} "
            f"| {r['event_p99_ms']:.4f} | {r['event_max_ms']:.3f} |"
        )
    small, big = core["sizes"][0], core["sizes"][-1]
    worst = max(core["sizes"], key=lambda r: r["event_p99_ms"])
    ratio_med = big["event_median_ms"] / small["event_median_ms"]
    ratio_p99 = big["event_p99_ms"] / small["event_p99_ms"]
    rs = core["resync"]
    lines += [
        "",
        "events: address changes, moves to another host, deletes and re-creations in turn, each "
        "`Registry.put`/`delete` + `Topology.apply` (time.process_time per event); by kind at "
        f"{big['hosts']} hosts (median ms): "
        + ", ".join(f"{k} {v:.4f}" for k, v in big["event_median_ms_by_kind"].items()),
        f"largest / smallest fleet ({big['hosts']} / {small['hosts']} hosts): median {ratio_med:.2f}x, p99 {ratio_p99:.2f}x",
        f"resync: a {rs['snapshot_keys']}-key snapshot against a registry holding the {rs['keys']}-key one, "
        f"{rs['changed'] + rs['gone'] + rs['new']} keys differing ({rs['changed']} changed, {rs['gone']} gone, "
        f"{rs['new']} new) -> {rs['events']} events: {rs['resync_wall_s']:.3f} s wall ({rs['resync_cpu_s']:.3f} s CPU) "
        f"including the topology; the cold snapshot of it took {rs['cold_wall_s']:.2f} s",
        f"addresses: endpoint i has IPv4 address number i of 198.18.0.0/15 while i < {ADDRESSES} (all the /15 holds) "
        f"and none beyond: at {big['hosts']} hosts {big['with_ipv4']} of {big['hosts'] * big['endpoints']} endpoints "
        "have one",
        "",
    ]
    scale = f" (--quick: {small['hosts']} to {big['hosts']} hosts)" if args["quick"] else ""
    targets.append(
        (
            f"one endpoint event <= {T_EVENT_MS} ms of agent CPU at every fleet size (in process, p99){scale}",
            f"p99 {worst['event_p99_ms']:.3f} ms (worst, at {worst['hosts']} hosts)",
            worst["event_p99_ms"] <= T_EVENT_MS,
        )
    )
    targets.append(
        (
            f"largest fleet within {T_EVENT_RATIO}x of the smallest (per-event CPU){scale}",
            f"median {ratio_med:.2f}x, p99 {ratio_p99:.2f}x ({big['hosts']} vs {small['hosts']} hosts)",
            max(ratio_med, ratio_p99) <= T_EVENT_RATIO,
        )
    )
    rk = "" if rs["keys"] >= 100_000 else f" (--quick: {rs['keys']} keys)"
    targets.append(
        (
            f"a 100k-key resync <= {T_RESYNC_S:g} s{rk}",
            f"{rs['resync_wall_s']:.3f} s",
            rs["resync_wall_s"] <= T_RESYNC_S,
        )
    )

    # B
    fdb = res["fdb"]
    flat = res["flatness"]
    lines += [
        f"### B. The forwarding table at {fdb['macs']} registry MACs over {fdb['vteps']} VTEPs (Vtep objects shared per host)",
        "",
        "| MACs | VTEPs | total by RSS, B/MAC | Python side by tracemalloc, B/MAC | C table and the rest (RSS - Python), B/MAC | build s |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {fdb['macs']} | {fdb['vteps']} | {fdb['rss_bytes_per_mac']:.0f} | {fdb['python_bytes_per_mac']:.0f} "
        f"| {fdb['c_and_rest_bytes_per_mac']:.0f} | {fdb['build_s']:.1f} |",
        "",
    ]
    if flat.get("active_1m_vs_10") is not None:
        lines.append(
            f"lookup flatness (`python -m bench.fastpath{''.join(' ' + a for a in flat['argv'])}`, {flat['seconds']:.0f} s, "
            "encap+lookup, 64-1450-byte frames, the worst of them): 1M vs 10 "
            f"entries {flat['active_1m_vs_10']:.2f}x for the active set, {flat['uniform_1m_vs_10']:.2f}x uniform over "
            "the table (not a target)"
        )
    else:
        lines.append(f"lookup flatness: not measured here ({flat.get('note', '?')}); see `python -m bench.fastpath`")
    lines.append("")
    mq = "" if fdb["macs"] >= 1_000_000 else f" (--quick: {fdb['macs']} MACs)"
    targets.append(
        (
            f"forwarding table <= {T_BYTES_PER_MAC:.0f} B per MAC in total at 1M MACs{mq}",
            f"{fdb['rss_bytes_per_mac']:.0f} B (Python {fdb['python_bytes_per_mac']:.0f} + C and the rest "
            f"{fdb['c_and_rest_bytes_per_mac']:.0f})",
            fdb["rss_bytes_per_mac"] <= T_BYTES_PER_MAC,
        )
    )
    fl = flat.get("active_1m_vs_10")
    targets.append(
        (
            f"lookup cost flat from 10 to 1M entries, active set (<= {T_FLAT:.2f}x)",
            f"{fl:.2f}x" if fl is not None else "n/a",
            None if fl is None else fl <= T_FLAT,
        )
    )

    # C
    ag = res.get("agents") or {}
    phases = ag.get("phases", [])
    lines += ["### C. Real etcd, real agents (one per lab namespace, etcd mode, idle data plane)", ""]
    for g in ag.get("fleet", []):
        if g.get("new_hosts"):
            lines.append(
                f"fleet writer: to {g['hosts']} hosts: {g['keys_written']} keys in {g['write_s']:.1f} s "
                f"({g['keys_per_s']:.0f} keys/s, txns of <= {TXN_OPS} ops, {TXNS_IN_FLIGHT} in flight), "
                f"{g['new_hosts']} leases granted in {g['grant_s']:.1f} s (one per host, TTL {LEASE_TTL} s)"
            )
    lines += [
        "",
        "| hosts | keys | agents | start -> socket s p50 | start -> ready s p50 / max | agent snapshot s p50 / max "
        "(keys) | startup CPU s p50 | RSS MB p50 / max | idle % core p50 | busy % core p50 / max | events "
        "| CPU ms/event | apply lag p99 bucket / max ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        idle, busy = p.get("idle") or {}, p.get("busy") or {}
        per_event = None
        if idle and busy and busy.get("events"):
            extra = statistics.median(b - i for b, i in zip(busy["cpu_s"], idle["cpu_s"]))
            per_event = extra / busy["events"] * 1000
            p["cpu_ms_per_event"] = per_event
        lags = [x for x in p.get("apply_lag") or [] if x]
        lag = f"<= {max(x['p99_ms'] for x in lags):g} / {max(x['max_ms'] for x in lags):.1f}" if lags else "n/a"
        keys = p.get("resync_keys") or []
        rss = p.get("rss_mb_end") or p.get("rss_mb") or []
        lines.append(
            f"| {p['hosts']} | {p.get('keys', 'n/a')} | {p.get('ready', 0)}/{p['agents']} | {f(pct(p.get('socket_s', []), 50), 2)} "
            f"| {f(pct(p.get('ready_s', []), 50), 1)} / {f(max(p.get('ready_s', []), default=None), 1)} "
            f"| {f(pct(p.get('resync_s', []), 50), 2)} / {f(max(p.get('resync_s', []), default=None), 2)} ({keys[0] if keys else 'n/a'}) "
            f"| {f(p.get('startup_cpu_s_median'), 1)} | {f(pct(rss, 50), 0)} / {f(max(rss, default=None), 0)} "
            f"| {f(idle.get('core_pct_median'), 2)} | {f(busy.get('core_pct_median'), 2)} / {f(busy.get('core_pct_max'), 2)} "
            f"| {busy.get('events', 'n/a')} | {f(per_event, 3)} | {lag} |"
        )
    lines += [
        "",
        "start -> socket: the agent's control socket answers; -> ready: its registry applied up to the fleet's "
        "revision (agents started one per CPU at a time); agent snapshot: status registry.resync_s (reading and "
        "applying); busy: "
        f"{args['rate']:g} endpoint changes/s fleet-wide ({', '.join(CHANGES)} in turn; a re-creation is a delete and a put) "
        f"for {args['seconds']:g} s; CPU ms/event: (busy - idle CPU) per agent / events, median; CPU from "
        "/proc/<pid>/stat (every thread); apply lag: status registry.apply_lag (an event's arrival to its "
        "application, the agent's whole life, its start included; p99 is a histogram bucket's upper bound), "
        "the worst agent",
        "",
        "| hosts | agents | puts | pairs | put -> applied p50 ms | p99 ms | max ms | first agent p50 ms | put round trip p50 ms | lost |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        a = p.get("applied")
        if a:
            lines.append(
                f"| {p['hosts']} | {p.get('ready', 0)} | {a['puts']} | {a['pairs']} | {f(a['p50_ms'])} | {f(a['p99_ms'])} "
                f"| {f(a['max_ms'])} | {f(a['first_p50_ms'])} | {f(a['put_rtt_p50_ms'])} | {a['lost']} |"
            )
    lines += [
        "",
        f"put -> applied: a fresh endpoint put every {PUT_SPACING * 1000:.0f} ms; after the puts every agent is asked "
        "(`applied`, control socket) when it applied each put's revision to its forwarding table (its wall clock, "
        "this machine's): latency over all (agent, put) pairs, from just before the put",
        "",
        "| hosts | agents | window s | etcd gRPC messages received per idle agent per s | Range calls | etcd % core | "
        "driver % core |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for p in phases:
        idle = p.get("idle")
        if idle:
            msgs = ", ".join(f"{m} {v:.3f}" for m, v in sorted(idle["msgs_per_agent_s"].items())) or "none"
            lines.append(
                f"| {p['hosts']} | {p.get('ready', 0)} | {idle['seconds']:.1f} | {msgs} | {idle['range_calls']:.0f} "
                f"| {idle['etcd_core_pct']:.1f} | {idle['driver_core_pct']:.1f} |"
            )
    lines.append("")
    for s in ag.get("skipped", []):
        who = f"{s['agents']} agents at " if s.get("agents") else ""
        lines.append(f"skipped: {who}{s['hosts']} hosts: {s['why']}")
    for n in ag.get("notes", []):
        lines.append(f"note: {n}")
    for p in phases:
        for fail in p.get("failed", []):
            lines.append(f"note: at {p['hosts']} hosts agent a{fail['agent']} did not start: {fail['error']}")
        if p.get("error"):
            lines.append(f"note: {p['agents']} agents at {p['hosts']} hosts: the phase failed: {p['error']}")
        if "LeaseGrant" in ((p.get("idle") or {}).get("msgs_per_agent_s") or {}):
            lines.append(
                f"note: {p['agents']} agents at {p['hosts']} hosts: LeaseGrant and Puts in the idle window: an agent "
                "found its lease expired and registered again (a lease is not kept alive while the agent reads its "
                "first snapshot; when that takes longer than the TTL, 10 s, the lease expires)"
            )
        if p.get("reconnects"):
            lines.append(
                f"note: {p['agents']} agents at {p['hosts']} hosts: {p['reconnects']} reconnects to etcd in all "
                "(etcd hangs up on a client pinging more often than its --grpc-keepalive-min-time: 'too_many_pings')"
            )
        if p.get("out_of_scope"):
            lines.append(f"note: at {p['hosts']} hosts agents counted {p['out_of_scope']} out-of-scope events")
    for prof in ag.get("profiles", []):
        if not prof.get("samples"):
            continue
        what = "its start (after the imports) until ready" if prof["what"] == "startup" else "the busy window"
        lines += [
            "",
            f"py-spy{' --native' if prof.get('native') else ''}, agent a{prof['agent']} at {prof['hosts']} hosts, "
            f"{what}: {prof['samples']} samples at 200 Hz "
            f"while on CPU ({Path(prof['path']).name}); on top of the stack / anywhere in it, % of samples:",
            "",
        ]
        lines += [f"- {share:.1f}% {frame}" for frame, share in prof["top"][:8]]
        lines += ["- anywhere: " + "; ".join(f"{share:.0f}% {frame}" for frame, share in prof["inclusive"][:10])]
    lines.append("")

    # C targets
    if not phases:
        for what in ("put -> applied p99", "% of a core at 10k hosts", "RSS at 300k keys", "requests per idle agent"):
            targets.append((what, "no agent phase ran", None))
    else:
        most = max(phases, key=lambda p: (p.get("ready", 0), -p["hosts"]))
        a = most.get("applied") or {}
        k_note = "" if most.get("ready", 0) >= 100 else f" (measured with {most.get('ready', 0)} agents)"
        targets.append(
            (
                f"put -> applied p99 <= {T_APPLIED_P99_MS:.0f} ms with 100 agent processes{k_note}",
                f"p99 {f(a.get('p99_ms'))} ms at {most['hosts']} hosts, {a.get('lost', '?')} lost",
                None if not a else (a["p99_ms"] <= T_APPLIED_P99_MS and a["lost"] == 0),
            )
        )
        largest = max(phases, key=lambda p: (p["hosts"], -p.get("ready", 0)))
        busy = largest.get("busy") or {}
        h_note = "" if largest["hosts"] >= 10_000 else f" (measured at {largest['hosts']} hosts)"
        r_note = "" if args["rate"] == RATE else f" ({args['rate']:g} changes/s here)"
        targets.append(
            (
                f"an agent in a 10k-host fleet with {RATE:g} changes/s <= {T_CORE_PCT:g}% of a core{h_note}{r_note}",
                f"{f(busy.get('core_pct_median'), 2)}% (max {f(busy.get('core_pct_max'), 2)}%)",
                None if not busy else busy["core_pct_max"] <= T_CORE_PCT,
            )
        )
        rss = largest.get("rss_mb_end") or largest.get("rss_mb") or []
        k_note = "" if largest.get("keys", 0) >= 300_000 else f" (measured at {largest.get('keys')} keys)"
        targets.append(
            (
                f"RSS per agent at 300k registry keys <= {T_RSS_MB:.0f} MB{k_note}",
                f"{f(max(rss, default=None), 0)} MB max at {largest.get('keys')} keys",
                None if not rss else max(rss) <= T_RSS_MB,
            )
        )
        per_event = [p["cpu_ms_per_event"] for p in phases if p.get("cpu_ms_per_event") is not None]
        if per_event:
            targets.append(
                (
                    f"one endpoint event <= {T_EVENT_MS} ms of CPU in a real agent ((busy - idle) / events)",
                    f"{max(per_event):.3f} ms (worst phase)",
                    max(per_event) <= T_EVENT_MS,
                )
            )
        idle_ok = [
            p["idle"]["range_calls"] == 0 and set(p["idle"]["msgs_per_agent_s"]) <= {"LeaseKeepAlive"}
            for p in phases
            if p.get("idle")
        ]
        keep = [p["idle"]["msgs_per_agent_s"].get("LeaseKeepAlive", 0.0) for p in phases if p.get("idle")]
        targets.append(
            (
                "etcd requests per idle agent: the lease keepalive only (no Range, no polling)",
                f"LeaseKeepAlive {min(keep):.3f}-{max(keep):.3f} msgs/s per agent (3/TTL = 0.300), "
                f"{sum(p['idle']['range_calls'] for p in phases if p.get('idle')):.0f} Range calls",
                all(idle_ok) if idle_ok else None,
            )
        )
    lines += ["### Targets (issue 12)", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {what} | {measured} | {verdict(ok)} |" for what, measured, ok in targets]
    res["targets"] = [{"target": w, "measured": m, "met": ok} for w, m, ok in targets]
    return "\n".join(lines)


def parse_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.registry --fleet", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--sizes", type=parse_list, default=None, help="fleet sizes in hosts (default 1000,3000,10000)")
    parser.add_argument("--endpoints", type=int, default=ENDPOINTS, help=f"endpoints per host (default {ENDPOINTS})")
    parser.add_argument("--agents", type=parse_list, default=None, help="agent process counts (default 10,100)")
    parser.add_argument("--rate", type=float, default=RATE, help=f"endpoint changes/s fleet-wide (default {RATE:g})")
    parser.add_argument("--seconds", type=float, default=None, help=f"idle and busy windows (default {SECONDS:g})")
    parser.add_argument("--puts", type=int, default=None, help=f"put -> applied puts per phase (default {PUTS})")
    parser.add_argument(
        "--quick", action="store_true", help="small: 100 and 300 hosts, 3 agents, 5 s windows (under 3 minutes)"
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const="python",
        choices=("python", "native"),
        default=None,
        help="py-spy one agent (its start and the busy window) at each size; 'native' adds C frames",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the agents' logs in the results folder")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run; later phases skip")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<date>-<commit>)")
    args = parser.parse_args(argv)
    args.sizes = sorted(args.sizes or (SIZES_QUICK if args.quick else SIZES))
    args.agents = sorted(args.agents or (AGENTS_QUICK if args.quick else AGENTS))
    args.seconds = args.seconds or (SECONDS_QUICK if args.quick else SECONDS)
    args.puts = args.puts or (PUTS_QUICK if args.quick else PUTS)
    args.budget = args.budget or (BUDGET_S_QUICK if args.quick else BUDGET_S)
    if (
        not all(1 <= s <= 100_000 for s in args.sizes)
        or not 1 <= args.endpoints <= 100
        or not all(1 <= k <= 200 for k in args.agents)
        or not 0.1 <= args.rate <= 1000
        or not 1 <= args.seconds <= 600
        or not 1 <= args.puts <= 1000
        or not 60 <= args.budget <= 3 * 3600
    ):
        parser.error(
            "bounds: sizes 1..100000 hosts, 1 <= --endpoints <= 100, agents 1..200, 0.1 <= --rate <= 1000, "
            "1 <= --seconds <= 600, 1 <= --puts <= 1000, 60 <= --budget <= 10800"
        )
    if os.geteuid() != 0:
        parser.error("the fleet benchmark builds a lab (network namespaces): run it as root")
    on_sigterm()
    started = time.time()
    out = args.out or results_dir()
    out.mkdir(parents=True, exist_ok=True)
    commit = (
        subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        or "nogit"
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=ROOT
    )
    env = {
        "commit": commit + ("+dirty" if dirty.stdout.strip() else ""),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "loadavg_before": os.getloadavg(),
    }
    res: dict[str, Any] = {"args": {**vars(args), "out": str(out)}, "env": env}

    sizes = []
    for hosts in args.sizes:
        progress(f"core: {hosts} hosts x {args.endpoints} endpoints in process: snapshot, serve, {CORE_EVENTS} events")
        r = core_size(hosts, args.endpoints, CORE_EVENTS)
        progress(
            f"core: {hosts} hosts: snapshot+apply+serve {r['total_cpu_s']:.2f} s CPU, event median "
            f"{r['event_median_ms']:.4f} ms, p99 {r['event_p99_ms']:.4f} ms"
        )
        sizes.append(r)
    keys = RESYNC_KEYS_QUICK if args.quick else RESYNC_KEYS
    progress(f"core: resync of a {keys}-key snapshot, {RESYNC_CHANGED:.0%} of keys differing")
    resync = core_resync(keys, args.endpoints)
    progress(f"core: resync {resync['resync_wall_s']:.3f} s ({resync['events']} events)")
    res["core"] = {"sizes": sizes, "resync": resync}

    macs, vteps = (FDB_MACS_QUICK, FDB_VTEPS_QUICK) if args.quick else (FDB_MACS, FDB_VTEPS)
    res["fdb"] = fdb_figures(macs, vteps)
    progress(f"forwarding table: {res['fdb']['rss_bytes_per_mac']:.0f} B/MAC by RSS")
    res["flatness"] = fastpath_flatness(args.quick)

    res["agents"] = run_agents(args, started + args.budget, out)
    res["seconds"] = time.time() - started
    table = report(res)
    print("\n" + table, flush=True)
    (out / "fleet.md").write_text(table + "\n")
    (out / "fleet.json").write_text(json.dumps(res, indent=2, default=str))
    print(f"\nwritten: {out}/fleet.md, fleet.json")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--driver":
        drive(sys.argv[2])
    else:
        main()
