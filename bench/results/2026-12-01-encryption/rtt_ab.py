"""Interleaved RTT A/B: 2-host lab, static agents, plaintext then encrypted each round, 400 pings
at 5 ms per round; per-round medians and their differences. Run from the repository root as root:
    .venv/bin/python bench/results/2026-12-01-encryption/rtt_ab.py 7
"""

import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository
from pathlib import Path

from overlay.core.keys import encode, public_of
from overlay.io.keys import generate_private, write
from tests.labkit import new_lab, overlay_ip, start_agent, stop_agent, wait_ping

d = Path(tempfile.mkdtemp())
keys = {}
for h in (1, 2):
    p = d / f"r{h}.key"
    if p.exists():
        p.unlink()
    k = generate_private()
    write(p, k)
    keys[h] = encode(public_of(k))
res = {False: [], True: []}
with new_lab(hosts=2, prefix="rt") as lab:
    for _ in range(int(sys.argv[1])):
        for enc in (False, True):
            procs = []
            for h in (1, 2):
                o = 3 - h
                extra = (
                    ["--encrypt", "--key-file", str(d / f"r{h}.key"), "--peer-key", f"{lab.address(o)}={keys[o]}"]
                    if enc
                    else []
                )
                procs.append(start_agent(lab, h, [o], *extra, "--metrics", "off", "--probe-port", "0", log_dir=d))
            try:
                wait_ping(lab, 1, overlay_ip(2))
                out = lab.run(1, ["ping", "-n", "-c", "400", "-i", "0.005", overlay_ip(2)], timeout=60).stdout
                rtts = [float(x) for x in re.findall(r"time=([0-9.]+)", out)]
                res[enc].append(statistics.median(rtts))
                q = sorted(rtts)
                print(
                    "encrypted" if enc else "plaintext",
                    "min",
                    round(q[0] * 1000),
                    "p10",
                    round(q[40] * 1000),
                    "p50",
                    round(q[200] * 1000),
                    "p90",
                    round(q[360] * 1000),
                    flush=True,
                )
            finally:
                for p in procs:
                    stop_agent(p)
diffs = [(e - p) * 1000 for p, e in zip(res[False], res[True])]
print(
    "median of plaintext medians",
    round(statistics.median(res[False]) * 1000),
    "us; encrypted",
    round(statistics.median(res[True]) * 1000),
    "us; per-round differences (us)",
    [round(x) for x in diffs],
    "median",
    round(statistics.median(diffs)),
)
