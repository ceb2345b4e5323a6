"""Helpers for tests on a lab: agents started as an operator would, and waiting on conditions."""

from __future__ import annotations

import itertools
import json
import os
import random
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from overlay.core import wire
from overlay.lab import Lab, wait_for
from overlay.lab import etcd as etcdlab

VNI = 42
_numbers = itertools.count(1)


@contextmanager
def new_lab(hosts: int = 3, prefix: str = "t", *, ipv6: bool = False, dual_stack: bool = False) -> Iterator[Lab]:
    """The one way tests build a lab: ``hosts`` namespaces on a bridge, named uniquely for this
    run (``prefix``, the pid, a counter), torn down afterwards, also when the test fails. The
    ``labs`` fixture (tests/conftest.py) gives the same per test. ``ipv6``: an IPv6-only
    underlay (2001:2:0:1::N/64), ``dual_stack``: both (overlay/lab/netns.py, the address plan)."""
    n = next(_numbers)
    name = f"{prefix}{os.getpid() % 100000}x{n}"
    if len(name) > 10:  # interface names carry it with up to 5 more characters (15 at most)
        name = f"{prefix}{os.getpid() % 1000}x{n}"
    with Lab(name, hosts=hosts, ipv6=ipv6, dual_stack=dual_stack) as lab:
        yield lab


@contextmanager
def new_lab_with_etcd(
    hosts: int = 3, prefix: str = "t", *, ipv6: bool = False, dual_stack: bool = False
) -> Iterator[tuple[Lab, etcdlab.EtcdServer]]:
    """``new_lab`` plus a real etcd in its service host (198.18.0.250; 2001:2:0:1::250 in an
    IPv6-only lab), stopped before the lab goes."""
    with new_lab(hosts, prefix, ipv6=ipv6, dual_stack=dual_stack) as lab, etcdlab.single(lab) as etcd:
        yield lab, etcd


def overlay_ip(host: int) -> str:
    return f"198.19.0.{host}"


class Labs:
    """Builds labs for one test (``labs(hosts=3)``, ``labs.with_etcd(hosts=2)``) and tears every
    one down after it, also when it fails (tests.labkit.new_lab is the same as a context manager,
    for module-wide labs)."""

    def __init__(self, stack: ExitStack) -> None:
        self.stack = stack

    def __call__(self, hosts: int = 3, prefix: str = "t", *, ipv6: bool = False, dual_stack: bool = False) -> Lab:
        return self.stack.enter_context(new_lab(hosts, prefix, ipv6=ipv6, dual_stack=dual_stack))

    def with_etcd(
        self, hosts: int = 3, prefix: str = "t", *, ipv6: bool = False, dual_stack: bool = False
    ) -> tuple[Lab, etcdlab.EtcdServer]:
        return self.stack.enter_context(new_lab_with_etcd(hosts, prefix, ipv6=ipv6, dual_stack=dual_stack))


def agent_argv(lab: Lab, host: int, peers: list[int], *extra: str, tap: str = "ovl0") -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "overlay",
        "agent",
        "--vni",
        str(VNI),
        "--local",
        str(lab.address(host)),
        "--tap",
        tap,
        "--address",
        f"{overlay_ip(host)}/24",
        "--mac",
        f"02:00:00:00:00:{host:02x}",
    ]
    for p in peers:
        argv += ["--peer", str(lab.address(p))]
    return argv + list(extra)


def etcd_agent_argv(lab: Lab, host: int, etcd: list[str], *extra: str, tap: str = "ovl0") -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "overlay",
        "agent",
        "--host-id",
        f"h{host}",
        "--network",
        str(VNI),
        "--local",
        str(lab.address(host)),
        "--tap",
        tap,
        "--address",
        f"{overlay_ip(host)}/24",
        "--mac",
        f"02:00:00:00:00:{host:02x}",
        "--state-dir",
        f"/tmp/overlay-state-{lab.name}",
    ]
    for e in etcd:
        argv += ["--etcd", e]
    return argv + list(extra)


def start_agent(
    lab: Lab,
    host: int,
    peers: list[int],
    *extra: str,
    tap: str = "ovl0",
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
    argv: list[str] | None = None,
) -> subprocess.Popen[Any]:
    """Start `overlay agent` in ``host`` (static mode with ``peers``, or ``argv`` as given) and
    wait until its control socket answers."""
    log = open((log_dir or Path("/tmp")) / f"agent-{lab.name}-h{host}-{tap}.log", "w")
    proc = lab.spawn(
        host,
        argv or agent_argv(lab, host, peers, *extra, tap=tap),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    wait_for(lambda: proc.poll() is not None or status(lab, host, tap) is not None, 30, f"agent on host {host}")
    assert proc.poll() is None, Path(log.name).read_text()
    return proc


def stop_agent(proc: subprocess.Popen[Any]) -> int:
    proc.terminate()
    return proc.wait(timeout=15)


def status(lab: Lab, host: int, tap: str | None = None, cmd: str = "status") -> Any:
    """The agent's `overlay status --json` (or fdb), or None if no agent answers."""
    argv = [sys.executable, "-m", "overlay", cmd, "--json"] + (["--tap", tap] if tap else [])
    result = lab.run(host, argv, check=False, timeout=30)
    return json.loads(result.stdout) if result.returncode == 0 else None


def ping(
    lab: Lab, src: int, dst_ip: str, count: int = 1, size: int | None = None, dont_fragment: bool = False
) -> subprocess.CompletedProcess[str]:
    argv = ["ping", "-n", "-c", str(count), "-i", "0.05", "-W", "2", dst_ip]
    if size is not None:
        argv += ["-s", str(size)]
    if dont_fragment:
        argv += ["-M", "do"]
    return lab.run(src, argv, check=False, timeout=30)


def wait_ping(lab: Lab, src: int, dst_ip: str, timeout: float = 20) -> None:
    wait_for(lambda: ping(lab, src, dst_ip).returncode == 0, timeout, f"ping {dst_ip} from host {src}")


# A TCP sink and source in plain Python: the receiver prints the SHA-256 and byte count of
# everything it got; the sender sends a file. Run inside lab hosts.
TCP_SINK = """
import hashlib, socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
srv.settimeout(60)
print("listening", flush=True)
conn, _ = srv.accept()
conn.settimeout(60)
h, n = hashlib.sha256(), 0
while chunk := conn.recv(1 << 16):
    h.update(chunk); n += len(chunk)
print(h.hexdigest(), n, flush=True)
"""

TCP_SOURCE = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60) as s, open(sys.argv[3], "rb") as f:
    s.sendfile(f)
"""


def tcp_transfer(lab: Lab, src: int, dst: int, dst_ip: str, path: Path, port: int = 5001) -> tuple[str, int]:
    """Send ``path`` from host ``src`` to ``dst_ip`` (on host ``dst``); return (sha256, bytes) received."""
    sink = lab.spawn(dst, [sys.executable, "-c", TCP_SINK, dst_ip, str(port)], stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    assert sink.stdout.readline().strip() == "listening"
    lab.run(src, [sys.executable, "-c", TCP_SOURCE, dst_ip, str(port), str(path)], timeout=120)
    out, _ = sink.communicate(timeout=60)
    digest, count = out.split()
    return digest, int(count)


# Datagrams no agent accepts, each a drop of its own reason, sent from a lab host in plain
# Python over the family of the address given.
SEND_JUNK = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
for hexdata in sys.argv[2:]:
    s.sendto(bytes.fromhex(hexdata), (sys.argv[1], 4789))
"""


def hostile_datagrams() -> list[bytes]:
    frame = bytes.fromhex("020000000001 020000000002 0806") + bytes(28)
    return [
        random.Random(7).randbytes(40),  # random bytes (no I flag)
        bytes.fromhex("080000"),  # truncated header
        bytes.fromhex("00000000 00002a00") + frame,  # I flag missing
        bytes.fromhex("08000000 00002a00") + frame[:10],  # inner frame truncated
        wire.encode(VNI + 1, frame),  # unknown VNI
    ]


def send_hostile(lab: Lab, src: int, dst: int, address: object, junk: list[bytes]) -> Counter[str]:
    """Send ``junk`` from host ``src`` to ``address`` (host ``dst``'s agent) and wait until its
    agent counted each as the drop the wire rules name; return those counts."""
    before = status(lab, dst)["drops"]
    lab.run(src, [sys.executable, "-c", SEND_JUNK, str(address), *(j.hex() for j in junk)])
    expected = Counter(wire.decode(j, {VNI}).name.lower() for j in junk)  # type: ignore[union-attr]

    def counted() -> bool:
        after = status(lab, dst)["drops"]
        return all(after[k] - before[k] >= n for k, n in expected.items())

    wait_for(counted, 10, f"the hostile datagrams to {address} to be counted")
    return expected


# --- encrypted networks: keys, captures, datagrams from a chosen source ----------------------


def write_key(path: Path) -> str:
    """A new private key in ``path`` (mode 0600, as `overlay key generate` writes one); its
    public key as text, for another host's ``--peer-key``."""
    from overlay.core.keys import encode, public_of
    from overlay.io.keys import generate_private, write

    private = generate_private()
    write(path, private)
    return encode(public_of(private))


@contextmanager
def capture(lab: Lab, host: int, iface: str, path: Path, pcap_filter: str) -> Iterator[Path]:
    """tcpdump on ``iface`` of ``host`` writing a pcap to ``path``; capturing once this yields
    (tcpdump said "listening on"), stopped by PID on exit. Immediate mode and packet-buffered
    output, so ``pcap_frames(path)`` sees each packet as it comes."""
    log = path.with_name(path.name + ".log")
    with open(path, "wb") as out, open(log, "w") as err:
        cap = lab.spawn(
            host,
            ["tcpdump", "-i", iface, "-n", "--immediate-mode", "-U", "-s", "0", "-w", "-", pcap_filter],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    try:
        wait_for(lambda: cap.poll() is not None or "listening on" in log.read_text(), 10, f"tcpdump on host {host}")
        assert cap.poll() is None, f"tcpdump on host {host} exited: {log.read_text()}"
        yield path
    finally:
        if cap.poll() is None:
            cap.terminate()
        try:
            cap.wait(timeout=10)
        except subprocess.TimeoutExpired:
            cap.kill()
            cap.wait(timeout=5)


def pcap_frames(path: Path) -> list[bytes]:
    """The frames of a pcap file as tcpdump writes it (a record not yet written whole is left out)."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    frames, offset = [], 24
    while offset + 16 <= len(data):
        length = struct.unpack_from(order + "I", data, offset + 8)[0]
        offset += 16
        if offset + length > len(data):
            break
        frames.append(data[offset : offset + length])
        offset += length
    return frames


def udp_in(frames: list[bytes]) -> list[tuple[str, int, str, int, bytes]]:
    """(source, source port, destination, destination port, payload) of each IPv4 UDP datagram
    in Ethernet frames."""
    out = []
    for f in frames:
        if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 17:
            continue
        ihl = (f[14] & 0x0F) * 4
        total = int.from_bytes(f[16:18], "big")
        udp = f[14 + ihl : 14 + total]
        src, dst = ".".join(map(str, f[26:30])), ".".join(map(str, f[30:34]))
        out.append((src, int.from_bytes(udp[0:2], "big"), dst, int.from_bytes(udp[2:4], "big"), udp[8:]))
    return out


SEND_FROM = """
import socket, sys
source, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((source, 0))
for hexdata in sys.argv[4:]:
    s.sendto(bytes.fromhex(hexdata), (address, port))
"""


def send_from(lab: Lab, host: int, source: object, address: object, datagrams: list[bytes], port: int = 4789) -> None:
    """Send ``datagrams`` from inside ``host`` with a UDP socket bound to ``source`` (one of its
    addresses, any port) to ``address``:``port``."""
    lab.run(
        host, [sys.executable, "-c", SEND_FROM, str(source), str(address), str(port), *(d.hex() for d in datagrams)]
    )
