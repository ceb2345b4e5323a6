"""wireguard-go between lab hosts 1 and 2: the userspace WireGuard, a row for the benchmarks.

    teardown = setup_wireguard(lab, workdir=Path(tmp))
    ...                      # 198.19.42.1 (host 1) <-> 198.19.42.2 (host 2) over TUN wg<lab>h<N>
    teardown.procs           # the two wireguard-go Popen objects (their PIDs are wireguard-go's)
    teardown()

Debian's ``wireguard-go`` (the Go implementation, in userspace like overlay's agent: the fair
encrypted twin of an encrypted overlay) runs in the foreground (``-f``) in each host namespace,
configured with ``wg`` (wireguard-tools): a key pair from ``wg genkey``/``wg pubkey`` per host in
``workdir`` (mode 0600), UDP port 51820 on the underlay address, one peer (the other host's
underlay address and port, ``allowed-ips`` its overlay /32), MTU 1420 (WireGuard's own default:
1500 minus its 80 bytes of IPv6 worst case), and the same overlay addresses as tinc's and
overlay's rows (198.19.42.N/24), so iperf3 and ping run unchanged. WireGuard is L3 (a TUN, no
Ethernet header), the others here carry Ethernet frames: 14 bytes less per packet for it.

Socket buffers: tinc's row and overlay's agent use 8 MiB UDP socket buffers, since with the
defaults (208 KiB here) the receiving socket overflows on this lab (UdpRcvbufErrors) and TCP runs
far below what the tunnel can do. wireguard-go sets its own to 7 MiB only from 0.0.20230223 on;
Debian's 0.0.20220316 keeps the defaults and has no option, and net.core.rmem_default cannot be
set inside a namespace. So, once the tunnel carries a ping, ``force_socket_buffers`` gives
them the same 8 MiB from outside: it takes a copy of each of the process's UDP sockets with
pidfd_getfd(2) and sets SO_RCVBUFFORCE and SO_SNDBUFFORCE on it (the copy is the same socket).

The device is not called wg0: wireguard-go's control socket is /var/run/wireguard/<dev>.sock, and
/var/run is the same in every namespace, so two hosts' wg0 would share one socket (and one lab's
those of another running at the same time). Each host's device is named after its lab and host
(``device(lab, h)``), which keeps both apart; wireguard-go refuses to start on a socket in use.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import zlib
from pathlib import Path
from typing import Any, Callable

from bench.tinc import stop_processes
from overlay.lab import Lab, LabError, wait_for

PORT, MTU = 51820, 1420
OVERLAY_NET = "198.19.42.{}/24"
HOSTS = (1, 2)
SOCKET_DIR = Path("/var/run/wireguard")
IFNAMSIZ = 15  # the longest interface name Linux takes
BUFFER = 8 << 20  # bytes: the UDP socket buffers tinc's row and overlay's agent use
SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 alike (the unified syscall table)
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h


def device(lab: Lab, h: int) -> str:
    """Host ``h``'s WireGuard device: ``wg<lab name>h<h>``, or, if that is longer than IFNAMSIZ,
    ``wg<crc32 of the lab name>h<h>`` (unique per lab and host, so are the control sockets)."""
    name = f"wg{lab.name.replace('-', '')}h{h}"
    return name if len(name) <= IFNAMSIZ else f"wg{zlib.crc32(lab.name.encode()):08x}h{h}"


def force_socket_buffers(pid: int, size: int = BUFFER) -> int:
    """Set SO_RCVBUFFORCE and SO_SNDBUFFORCE to ``size`` on every UDP socket of process ``pid``
    (root), through a copy of each made with pidfd_getfd(2). Returns how many it set."""
    inodes = set()
    for table in ("udp", "udp6"):  # the sockets of the process's own namespace
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            inodes.add(line.split()[9])
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    count = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed meanwhile
                continue
            if not (link.startswith("socket:[") and link[8:-1] in inodes):
                continue
            copy = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            if copy < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"pidfd_getfd of fd {fd} of {pid}: {os.strerror(err)}")
            with socket.socket(fileno=copy) as sock:  # closing it closes the copy only
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)
            count += 1
    finally:
        os.close(pidfd)
    return count


def _keys(lab: Lab, h: int, workdir: Path) -> tuple[Path, str]:
    """Host ``h``'s private key file (made by ``wg genkey``, mode 0600) and public key."""
    private = lab.run(h, ["wg", "genkey"]).stdout.strip()
    path = workdir / f"wg-h{h}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(private + "\n")
    public = lab.run(h, ["wg", "pubkey"], input=private + "\n").stdout.strip()
    return path, public


def setup_wireguard(lab: Lab, workdir: Path) -> Callable[[], None]:
    """Bring wireguard-go up between hosts 1 and 2 and wait until host 1 pings 198.19.42.2
    through it (a deadline, no sleep); its sockets get BUFFER bytes of buffer. Returns the teardown: it stops both wireguard-go by PID
    (SIGTERM, then SIGKILL) and removes what is left of their devices and control sockets;
    ``teardown.procs`` holds the processes (for /proc/<pid>/stat)."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    devs = {h: device(lab, h) for h in HOSTS}
    procs: list[subprocess.Popen[Any]] = []
    logs = {h: workdir / f"wireguard-go-h{h}.log" for h in HOSTS}

    def teardown() -> None:
        stop_processes(procs)
        for h in HOSTS:  # the TUN goes with its process; this is for one that was killed
            if lab.run(h, ["ip", "link", "show", devs[h]], check=False).returncode == 0:
                lab.run(h, ["ip", "link", "del", devs[h]], check=False)
            (SOCKET_DIR / f"{devs[h]}.sock").unlink(missing_ok=True)

    teardown.procs = procs  # type: ignore[attr-defined]
    try:
        keys = {h: _keys(lab, h, workdir) for h in HOSTS}
        for h in HOSTS:
            with logs[h].open("w") as log:
                procs.append(
                    lab.spawn(
                        h,
                        ["wireguard-go", "-f", devs[h]],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"},
                    )
                )

        def alive() -> None:
            for h, p in zip(HOSTS, procs):
                if p.poll() is not None:
                    raise LabError(f"wireguard-go on host {h} exited ({p.returncode}): {logs[h].read_text()[-1000:]}")

        def ready(h: int) -> bool:
            alive()
            return (SOCKET_DIR / f"{devs[h]}.sock").exists() and (
                lab.run(h, ["ip", "link", "show", devs[h]], check=False).returncode == 0
            )

        for h, peer in ((1, 2), (2, 1)):
            wait_for(lambda h=h: ready(h), 20, f"wireguard-go on host {h}")
            lab.run(
                h,
                [
                    "wg",
                    "set",
                    devs[h],
                    "private-key",
                    str(keys[h][0]),
                    "listen-port",
                    str(PORT),
                    "peer",
                    keys[peer][1],
                    "endpoint",
                    f"{lab.address(peer)}:{PORT}",
                    "allowed-ips",
                    OVERLAY_NET.format(peer).split("/")[0] + "/32",
                ],
            )
            for cmd in (
                ["ip", "link", "set", devs[h], "mtu", str(MTU)],
                ["ip", "addr", "add", OVERLAY_NET.format(h), "dev", devs[h]],
                ["ip", "link", "set", devs[h], "up"],
            ):
                lab.run(h, cmd)
        dst = OVERLAY_NET.format(2).split("/")[0]

        def pings() -> bool:
            alive()
            return lab.run(1, ["ping", "-c", "1", "-W", "1", dst], check=False).returncode == 0

        wait_for(pings, 30, f"ping {dst} over wireguard-go")
        # Now both have bound their sockets (wireguard-go binds when the device comes up, before
        # the handshake that the ping needed) and will not again (the port stays).
        for h, p in zip(HOSTS, procs):
            if not force_socket_buffers(p.pid):
                raise LabError(f"wireguard-go on host {h} has no UDP socket")
    except BaseException:
        teardown()
        raise
    return teardown


__all__ = ["setup_wireguard", "device", "force_socket_buffers", "BUFFER", "OVERLAY_NET", "PORT", "MTU"]
