"""A naive pure-Python VXLAN tunnel: the deliberate floor of the benchmarks.

    python bench/naive_tunnel.py --tap nv0 --local 198.18.0.1 --peer 198.18.0.2 --address 198.19.42.1/24

What anyone would write first, with the standard library only: a TAP device (IFF_TAP |
IFF_NO_PI, no offloads, so the kernel hands over one MTU-sized frame at a time), a UDP socket
on (local, 4789) and a select() loop. Per frame one os.read and one sendto, with the same 8-byte
VXLAN header in front (flags 0x08, VNI 42); per datagram one recvfrom and, if its header is
ours, one os.write. No batching, no offloads, no learning, no forwarding table: one peer.
It is naive on purpose; do not optimise it, it is what the real dataplane is measured against.

SIGTERM or SIGINT stops it cleanly; the TAP goes away when its fd is closed.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import signal
import socket
import struct
import subprocess

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
PORT, VNI, MTU = 4789, 42, 1450
HEADER = struct.pack("!B3xI", 0x08, VNI << 8)  # flags (I bit), reserved, VNI, reserved


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tap", required=True, help="TAP device to create, e.g. nv0")
    parser.add_argument("--local", required=True, help="underlay address to bind UDP 4789 on")
    parser.add_argument("--peer", required=True, help="underlay address of the other end")
    parser.add_argument("--address", required=True, help="overlay address for the TAP, e.g. 198.19.42.1/24")
    args = parser.parse_args()

    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    # The signal's wakeup byte makes select() return, so the loop sees `stop` at once.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    tap = open_tap(args.tap)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        subprocess.run(["ip", "link", "set", args.tap, "mtu", str(MTU), "up"], check=True)
        subprocess.run(["ip", "addr", "add", args.address, "dev", args.tap], check=True)
        sock.bind((args.local, PORT))
        peer = (args.peer, PORT)
        while not stop:
            readable, _, _ = select.select([tap, sock, wake_r], [], [])
            if tap in readable:
                frame = os.read(tap, 65535)
                try:
                    sock.sendto(HEADER + frame, peer)
                except OSError:  # e.g. no buffer space: dropped, as a wire would
                    pass
            if sock in readable:
                data, _ = sock.recvfrom(65535)
                if len(data) > 8 and data[0] & 0x08 and data[4:7] == HEADER[4:7]:
                    os.write(tap, data[8:])
            if wake_r in readable:
                os.read(wake_r, 512)
    finally:
        sock.close()
        os.close(tap)


if __name__ == "__main__":
    main()
