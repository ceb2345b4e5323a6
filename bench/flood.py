"""A flood of registry events against the agent's own registry code: does it ever stall the
event loop (and with it the data path and the control socket, which run on that loop) for more
than 100 ms at a time?

    python -m bench.flood [--keys N] [--quick] [--out DIR]

One real etcd on loopback. In this process, on uvloop like the agent: the agent's EtcdClient
(hosts/ and network 42 followed), its Registry, Topology and ForwardingTable over the real C
table (CoreSink), and a ticker that wakes every millisecond and records how late it woke. A
separate writer process bulk-imports N endpoint keys (default 100,000) of 1,000 hosts into
network 42 as fast as etcd takes them (transactions of 128 puts, etcd's default --max-txn-ops),
while the client follows by watch; then the client reads everything again (a resync of
N keys, in pages). For each phase: the longest stall of the loop, the 99th percentile of the
ticker's lateness, the events applied and how long it took. The target (issue 12): no stall
above 100 ms. Every load is bounded (N keys, a deadline per phase); etcd and the writer are
stopped at the end, also on failure. Results: bench/results/<date>-<commit>/flood.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from bench import pct, progress, results_dir
from overlay.core.fdb import ForwardingTable
from overlay.core.registry import Registry, Schema, Scope
from overlay.core.topology import Topology
from overlay.fastpath.api import ForwardingCore
from overlay.fastpath.sinks import CoreSink
from overlay.io.etcd import EtcdClient
from overlay.lab import etcd as etcdlab

VNI = 42
HOSTS = 1000
TARGET_STALL_MS = 100.0
WRITER = """
import asyncio, sys
from overlay.core.registry import Endpoint, EndpointKey, Host, HostKey, MemberKey, Member, Schema
from overlay.io.etcd import open_client

async def main(endpoint, keys, hosts):
    S = Schema()
    client = await open_client(endpoint, S.prefix)
    t = client.transactions
    ops = [t.put(S.key(HostKey(f"f{h}")).encode(), S.encode(Host(f"198.18.{4 + h // 250}.{h % 250 + 1}")))
           for h in range(hosts)]
    ops += [t.put(S.key(MemberKey(42, f"f{h}")).encode(), S.encode(Member())) for h in range(hosts)]
    for i in range(keys):
        ip = [f"198.{18 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"] if i < 131072 else []
        ops.append(t.put(S.key(EndpointKey(42, 0x020000000000 | i)).encode(), S.encode(Endpoint(f"f{i % hosts}", ip))))
    for i in range(0, len(ops), 128):
        await client.transaction(compare=[], success=ops[i : i + 128], failure=[])
    print(len(ops), flush=True)
    await client.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


class Ticker:
    """Wakes every ``period`` s and records how late each wake-up was."""

    def __init__(self, period: float = 0.001) -> None:
        self.period, self.late = period, []  # type: ignore[var-annotated]
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(self.period)
            self.late.append(time.monotonic() - t - self.period)

    def start(self) -> None:
        self.late = []
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> dict[str, float]:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        return {
            "max_stall_ms": round(max(self.late, default=0) * 1000, 1),
            "p99_ms": round(pct(self.late, 99) * 1000, 2),
        }


async def run(endpoint: str, keys: int, deadline: float) -> dict[str, Any]:
    schema = Schema()
    registry = Registry(schema)
    table = ForwardingTable(CoreSink(ForwardingCore()), max_per_vni=keys + 10)
    topology = Topology(registry, table, "bench")
    applied = [0]

    def on_events(events: list[Any]) -> None:
        applied[0] += len(events)
        topology.apply(events, time.monotonic())

    client = EtcdClient([endpoint], registry, on_events, scope=Scope(hosts=True, vnis=frozenset({VNI})))
    topology.serve(VNI, time.monotonic())
    await client.snapshot()
    watch = asyncio.create_task(client.watch())
    ticker = Ticker()
    out: dict[str, Any] = {"keys": keys}
    try:
        while len(client._watches) < 2:
            await asyncio.sleep(0.01)
        progress(f"bulk import of {keys} endpoint keys by a separate writer, followed by watch")
        ticker.start()
        t0 = time.monotonic()
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRITER, endpoint, str(keys), str(HOSTS), stdout=subprocess.PIPE
        )
        written = int((await asyncio.wait_for(writer.communicate(), deadline))[0])
        imported = time.monotonic() - t0
        end = time.monotonic() + deadline
        while registry.count(VNI) < keys and time.monotonic() < end:
            await asyncio.sleep(0.01)
        out["watch"] = {
            **await ticker.stop(),
            "written": written,
            "write_s": round(imported, 1),
            "applied_s": round(time.monotonic() - t0, 1),
            "endpoints": registry.count(VNI),
            "fdb": len(table),
        }
        progress(f"resync: reading all {len(registry)} keys again in pages")
        ticker.start()
        await client.snapshot()
        out["resync"] = {**await ticker.stop(), "seconds": client.resync_s, "keys": client.resync_keys}
        ticker.start()
        fresh = Registry(schema)
        fresh_client = EtcdClient([endpoint], fresh, lambda evs: None, scope=client.scope)
        await fresh_client.snapshot()
        out["cold_snapshot"] = {
            **await ticker.stop(),
            "seconds": fresh_client.resync_s,
            "keys": fresh_client.resync_keys,
        }
        await fresh_client.close()
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await client.close()
    return out


def report(r: dict[str, Any]) -> str:
    w, rs, cold = r["watch"], r["resync"], r["cold_snapshot"]
    ok = max(w["max_stall_ms"], rs["max_stall_ms"], cold["max_stall_ms"]) <= TARGET_STALL_MS
    return "\n".join(
        [
            f"# Registry flood: {r['keys']} endpoint keys at once",
            "",
            "| phase | keys | took (s) | longest loop stall (ms) | loop lateness p99 (ms) |",
            "|---|---|---|---|---|",
            f"| bulk import, followed by watch | {w['written']} written, {w['endpoints']} applied | "
            f"{w['applied_s']} (etcd took the writes in {w['write_s']}) | {w['max_stall_ms']} | {w['p99_ms']} |",
            f"| resync of what is held (unchanged: compared by mod_revision) | {rs['keys']} | {rs['seconds']} | "
            f"{rs['max_stall_ms']} | {rs['p99_ms']} |",
            f"| cold snapshot (a new agent) | {cold['keys']} | {cold['seconds']} | {cold['max_stall_ms']} | "
            f"{cold['p99_ms']} |",
            "",
            f"target: no stall above {TARGET_STALL_MS:.0f} ms: {'met' if ok else 'NOT met'}",
            "",
            "The loop stall is the longest a 1 ms ticker on the client's event loop woke late: the time",
            "the data path and the control socket (on that loop in the agent) would have waited.",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=100_000, help="endpoint keys to import at once (default 100000)")
    p.add_argument("--quick", action="store_true", help="10,000 keys: a check that it runs")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<date>-<commit>/)")
    args = p.parse_args()
    keys = 10_000 if args.quick else args.keys
    if not etcdlab.available():
        sys.exit("bench.flood needs etcd: apt-get install etcd-server etcd-client (scripts/setup does)")
    progress("starting etcd on loopback")
    server = etcdlab.single(extra_args=["--quota-backend-bytes", str(4 * 1024**3)])
    try:
        result = uvloop.run(run(server.endpoint, keys, deadline=600))
    finally:
        server.stop()
    text = report(result)
    print(text)
    out = args.out or results_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "flood.md").write_text(text + "\n")
    (out / "flood.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out / 'flood.md'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
