"""Per-frame cost of the fast path vs the pure-Python reference, in one run.

    python -m bench.fastpath [--quick] [--rounds N]

Encap+lookup: frames read from a TAP into a batch of 64, each looked up in the forwarding
table ((VNI, dst MAC) -> VTEP), given a VXLAN header and a flow-hash source port, and listed
for sendmmsg. Decap: datagrams as recvmmsg leaves them, checked, and their source MAC looked
up for learning. Frames are IPv4/UDP of 64, 512 and 1450 bytes; the table holds 10, 10k or 1M
MACs. Traffic model: as in the agent, one batch buffer is reused and is hot in cache (the
kernel just wrote it); before every batch, 64 fresh MACs are written into its frames, and that
write is part of the figure. Two destination models: "active", every frame to one of 4096
MACs of the table that are talking (a host's working set; the MACs come from a pool of 16384
cycled 16 times); "uniform", every frame to any MAC of the table (a pool of 262144), so with
1M entries nearly every lookup is a cold table slot: the worst case.

The reference is overlay/core/wire.py (encode/decode/source_port) with a dict for the table: what a
pure-Python data path would do per frame. Each figure is the median of several rounds (the
machine is shared and noisy); ratios compare figures from this same run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import struct
import time
from functools import partial
from typing import Callable

from overlay.core import wire
from overlay.fastpath import load

VNI = 42
VTEP = (0xC6120002, 4789)  # 198.18.0.2
BATCH = 64
SIZES = (64, 512, 1450)
TABLES = (10, 10_000, 1_000_000)
TARGET_NS, TARGET_RATIO, TARGET_FLAT = 150.0, 30.0, 1.20
ACTIVE = 4096
MODELS = ("active", "uniform")


def make_frame(dst: int, size: int, rng: random.Random) -> bytes:
    src = 0x020000000000 | rng.getrandbits(40)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size - 14, 0, 0x4000, 64, 17, 0, rng.randbytes(4), rng.randbytes(4))
    udp = struct.pack("!HHHH", rng.getrandbits(16), 5001, size - 34, 0)
    return dst.to_bytes(6, "big") + src.to_bytes(6, "big") + b"\x08\x00" + ip + udp + bytes(size - 42)


def ns_per_frame(run: Callable[[], None], frames: int) -> float:
    t0 = time.perf_counter_ns()
    run()
    return (time.perf_counter_ns() - t0) / frames


def build_cases(
    entries: int, pool: int, ref_frames: int
) -> dict[tuple[str, str, int], tuple[Callable[[], None], int, Callable[[], None], int]]:
    """For one table size: per (stage, frame size), the fast and the reference run and their frame counts."""
    fp = load()
    rng = random.Random(entries)
    macs = [0x020000000000 | rng.getrandbits(40) for _ in range(entries)]
    core = fp.ForwardingCore(capacity=entries)
    core.vni_add(VNI)
    core.flood_set(VNI, [VTEP])
    core.fdb_load(VNI, macs, *VTEP)
    # Fresh addresses for every batch: `pool` MACs, 6 bytes each, drawn from the whole table
    # (uniform) or from the ACTIVE MACs that currently talk (active).
    active = rng.sample(macs, min(ACTIVE, entries))
    # The active model cycles through a pool 16 times smaller (it only has 4096 MACs to draw
    # from), so streaming the pool itself does not push the table out of the caches.
    pools = {
        "uniform": [b"".join(rng.choice(macs).to_bytes(6, "big") for _ in range(BATCH)) for _ in range(pool // BATCH)],
        "active": [
            b"".join(rng.choice(active).to_bytes(6, "big") for _ in range(BATCH)) for _ in range(pool // BATCH // 16)
        ]
        * 16,
    }
    ref_table = {(VNI, m): VTEP for m in macs[:100_000]}  # a dict's cost hardly depends on size
    ref_macs = [m for _, m in ref_table]
    vnis = {VNI}
    cases = {}
    for size in SIZES:
        tx, rx = fp.FrameBatch(BATCH), fp.FrameBatch(BATCH)
        for i in range(BATCH):
            frame = make_frame(rng.choice(macs), size, rng)
            tx.put_frame(i, frame)
            rx.put_datagram(i, wire.encode(VNI, frame), src_ip=VTEP[0])
        ref_in = []
        for _ in range(ref_frames):
            frame = make_frame(rng.choice(ref_macs), size, rng)
            ref_in.append((frame, wire.encode(VNI, frame)))

        def fast_encap(tx: fp.FrameBatch = tx, model: str = "uniform") -> None:
            for chunk in pools[model]:
                tx.set_macs(chunk, 0)
                fp.encap(core, tx, VNI)

        def fast_decap(rx: fp.FrameBatch = rx, model: str = "uniform") -> None:
            for chunk in pools[model]:
                rx.set_macs(chunk, 6)
                fp.decap(core, rx, BATCH)
            core.take_learned()

        def ref_encap(ref_in: list = ref_in) -> None:
            for frame, _ in ref_in:
                dst = ref_table.get((VNI, int.from_bytes(frame[:6], "big")))
                wire.encode(VNI, frame), wire.source_port(frame), dst

        def ref_decap(ref_in: list = ref_in) -> None:
            for _, datagram in ref_in:
                d = wire.decode(datagram, vnis)
                ref_table.get((VNI, int.from_bytes(d.frame[6:12], "big")))  # type: ignore[union-attr]

        frames = (pool // BATCH) * BATCH
        for model in MODELS:
            cases[model, "encap", size] = (partial(fast_encap, model=model), frames, ref_encap, ref_frames)
            cases[model, "decap", size] = (partial(fast_decap, model=model), frames, ref_decap, ref_frames)
    return cases


def measure(pool: int, rounds: int, ref_frames: int) -> dict[int, dict[tuple[str, str, int], tuple[float, float]]]:
    """Median ns/frame (fast, reference) per table size, stage and frame size. Every round
    runs every case once, so drift on the shared machine hits all cases alike."""
    cases = {}
    for entries in TABLES:
        print(f"... building a table of {entries} entries and its frames", flush=True)
        cases[entries] = build_cases(entries, pool, ref_frames)
    samples: dict[tuple[int, str, str, int], tuple[list[float], list[float]]] = {}
    for r in range(rounds):
        print(f"... round {r + 1}/{rounds}", flush=True)
        for entries, per_table in cases.items():
            for (model, stage, size), (fast, n_fast, ref, n_ref) in per_table.items():
                fast()  # warm: caches, TLB, branch predictors
                f_s, r_s = samples.setdefault((entries, model, stage, size), ([], []))
                f_s.append(ns_per_frame(fast, n_fast))
                r_s.append(ns_per_frame(ref, n_ref))
    results: dict[int, dict[tuple[str, str, int], tuple[float, float]]] = {n: {} for n in TABLES}
    for (entries, model, stage, size), (f_s, r_s) in samples.items():
        results[entries][model, stage, size] = (statistics.median(f_s), statistics.median(r_s))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames and rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per figure; the median is shown")
    args = parser.parse_args()
    pool, rounds, ref_frames = (1 << 14, 3, 300) if args.quick else (1 << 18, args.rounds, 2000)
    results = measure(pool, rounds, ref_frames)
    for model in MODELS:
        print(f"\n{MODEL_TEXT[model]}")
        print(f"ns/frame, batches of {BATCH}, median of {rounds} rounds (fast | reference | speed-up)\n")
        print(f"{'stage':6} {'frame':>6} " + " ".join(f"{f'{n} entries':>30}" for n in TABLES) + f" {'1M/10':>7}")
        for stage in ("encap", "decap"):
            for size in SIZES:
                cells = []
                for n in TABLES:
                    fast, ref = results[n][model, stage, size]
                    cells.append(f"{fast:7.1f} | {ref:8.0f} | {ref / fast:6.0f}x")
                flat = results[TABLES[-1]][model, stage, size][0] / results[TABLES[0]][model, stage, size][0]
                print(f"{stage:6} {size:>6} " + " ".join(f"{c:>30}" for c in cells) + f" {flat:7.2f}")
    print("\ntargets (encap+lookup, every frame size and table size):")
    for model in MODELS:
        encap = [results[n][model, "encap", s] for n in TABLES for s in SIZES]
        worst_ns = max(f for f, _ in encap)
        worst_ratio = min(r / f for f, r in encap)
        worst_flat = max(
            results[TABLES[-1]][model, "encap", s][0] / results[TABLES[0]][model, "encap", s][0] for s in SIZES
        )
        print(f"  {model} destinations:")
        print(f"    slowest {worst_ns:.1f} ns/frame (target <= {TARGET_NS:.0f}): {verdict(worst_ns <= TARGET_NS)}")
        print(
            f"    smallest speed-up {worst_ratio:.0f}x (target >= {TARGET_RATIO:.0f}x): {verdict(worst_ratio >= TARGET_RATIO)}"
        )
        print(
            f"    1M vs 10 entries {worst_flat:.2f}x (target <= {TARGET_FLAT:.2f}x): {verdict(worst_flat <= TARGET_FLAT)}"
        )


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


MODEL_TEXT = {
    "active": f"active destinations: every frame to one of {ACTIVE} MACs of the table that are talking",
    "uniform": "uniform destinations (worst case): every frame to any MAC of the table, mostly a cold slot",
}


if __name__ == "__main__":
    main()
