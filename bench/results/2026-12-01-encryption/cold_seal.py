"""One frame encapsulated (and one datagram decapsulated) after 5 ms of sleep, 300 times, on a
plaintext and on an encrypted network: the cost of a cold cipher. From the repository root:
    PYTHONPATH=. .venv/bin/python bench/results/2026-12-01-encryption/cold_seal.py
"""

import statistics
import time

from bench.seal import KEY, PEER, VNI, core, frame
from overlay.core import seal, wire
from overlay.fastpath import load

fp = load()
for enc in (False, True):
    c = core(enc, seal.AES_256_GCM)
    tx = fp.FrameBatch(1)
    tx.put_frame(0, frame(98))
    rx = fp.FrameBatch(1)
    plain = wire.encode(VNI, frame(98))
    t_enc, t_dec = [], []
    for n in range(300):
        time.sleep(0.005)

        t = time.perf_counter_ns()
        fp.encap(c, tx, VNI)
        t_enc.append(time.perf_counter_ns() - t)
        rx.put_datagram(0, seal.seal(seal.AES_256_GCM, KEY, 1, n, plain) if enc else plain, PEER[0])
        t = time.perf_counter_ns()
        fp.decap(c, rx, 1)
        t_dec.append(time.perf_counter_ns() - t)
    print(
        "encrypted" if enc else "plaintext",
        "encap median ns",
        statistics.median(t_enc),
        "decap median ns",
        statistics.median(t_dec),
    )
