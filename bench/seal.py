"""The cost of sealing and opening, per datagram: the fast path's encap and decap of a batch on
an encrypted network against the same on a plaintext one, at 64 and 1450 bytes, for both
ciphers. No sockets: the stage alone (ext/crypto.pxi), as bench.fastpath measures the rest.

    .venv/bin/python -m bench.seal [--rounds 15]

Prints ns per datagram (median of rounds) and the seal/open cost = encrypted - plaintext.
"""

from __future__ import annotations

import argparse
import statistics
import time

from overlay.core import seal, wire
from overlay.fastpath import load

fp = load()
VNI = 42
PEER = (0xC6120002, 4789)
BATCH = 64
KEY = bytes(range(32))


def frame(size: int) -> bytes:
    head = bytes.fromhex("020000000002 020000000001 0800".replace(" ", ""))
    return head + bytes(size - len(head))


def core(encrypted: bool, cipher: int) -> fp.ForwardingCore:
    c = fp.ForwardingCore()
    c.vni_add(VNI)
    c.flood_set(VNI, [PEER])
    c.fdb_set(VNI, 0x020000000002, *PEER)
    if encrypted:
        c.vni_encrypt(VNI, True)
        c.tx_set(*PEER, 1, KEY, cipher)
        c.rx_add(1, *PEER, KEY, cipher)
    return c


def ns(run: object, n: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t = time.perf_counter_ns()
        for _ in range(n):
            run()  # type: ignore[operator]
        samples.append((time.perf_counter_ns() - t) / (n * BATCH))
    return statistics.median(samples)


def measure(size: int, encrypted: bool, cipher: int, rounds: int) -> tuple[float, float]:
    c = core(encrypted, cipher)
    tx = fp.FrameBatch(BATCH)
    for i in range(BATCH):
        tx.put_frame(i, frame(size))
    encap = ns(lambda: fp.encap(c, tx, VNI), 200, rounds)
    plain = wire.encode(VNI, frame(size))
    rx = fp.FrameBatch(BATCH)
    counter = [0]

    def fill() -> None:  # fresh counters each time (a replay would be dropped before the tag is checked... after)
        for i in range(BATCH):
            rx.put_datagram(i, seal.seal(cipher, KEY, 1, counter[0], plain) if encrypted else plain, PEER[0])
            counter[0] += 1

    samples = []
    for _ in range(rounds):
        total = 0
        for _ in range(20):
            fill()
            t = time.perf_counter_ns()
            assert fp.decap(c, rx, BATCH) == BATCH
            total += time.perf_counter_ns() - t
        samples.append(total / (20 * BATCH))
    return encap, statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    print(f"{'size':>5} {'cipher':18} {'encap ns':>9} {'seal ns':>8} {'decap ns':>9} {'open ns':>8}")
    for size in (64, 1450):
        p_encap, p_decap = measure(size, False, seal.AES_256_GCM, args.rounds)
        print(f"{size:5} {'plaintext':18} {p_encap:9.0f} {'':8} {p_decap:9.0f}")
        for cipher in (seal.AES_256_GCM, seal.CHACHA20_POLY1305):
            e_encap, e_decap = measure(size, True, cipher, args.rounds)
            print(
                f"{size:5} {seal.CIPHERS[cipher]:18} {e_encap:9.0f} {e_encap - p_encap:8.0f} "
                f"{e_decap:9.0f} {e_decap - p_decap:8.0f}"
            )


if __name__ == "__main__":
    main()
