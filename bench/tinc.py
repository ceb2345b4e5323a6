"""tinc 1.0 between lab hosts 1 and 2: a third dataplane for the benchmarks, a mature userspace VPN.

    teardown = setup_tinc(lab, cipher=False, workdir=Path(tmp))
    ...                      # 198.19.42.1 (host 1) <-> 198.19.42.2 (host 2) over TAP tinc0
    teardown.procs           # the two tincd Popen objects (their PIDs are tincd's own)
    teardown()

tincd runs in SWITCH mode: a TAP device and MAC learning, an L2 overlay like VXLAN and like
overlay's own agent, so all three carry the same Ethernet frames and compare like for like (router
mode would be an L3 TUN with Subnet routing, a different job). Each host gets a config dir in
``workdir`` (tinc.conf, hosts/h1 and hosts/h2 with Address and Port but no Subnet, an RSA key pair
made with ``tincd -K``, a tinc-up that sets address and MTU 1450); UDP port 655 on the underlay
address. ``cipher=False`` sets ``Cipher = none`` and ``Digest = none`` (no crypto, the fair
comparison with plain VXLAN); ``cipher=True`` keeps tinc's defaults (blowfish-CBC, SHA1 4-byte MAC).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from overlay.lab import Lab, LabError, wait_for

PORT, DEV, MTU = 655, "tinc0", 1450
OVERLAY_NET = "198.19.42.{}/24"
HOSTS = (1, 2)


def _write_config(lab: Lab, h: int, peer: int, cipher: bool, conf: Path) -> None:
    (conf / "hosts").mkdir(parents=True, exist_ok=True)
    (conf / "tinc.conf").write_text(
        f"Name = h{h}\nMode = switch\nDeviceType = tap\nInterface = {DEV}\nConnectTo = h{peer}\n"
        f"AddressFamily = ipv4\nBindToAddress = {lab.address(h)} {PORT}\n"
        # The same 8 MiB socket buffers overlay's agent asks for: with tinc's defaults its
        # receiving socket overflows on this lab and TCP runs at a third of what it can do.
        f"UDPRcvBuf = {8 << 20}\nUDPSndBuf = {8 << 20}\n"
    )
    crypto = "" if cipher else "Cipher = none\nDigest = none\n"
    (conf / "hosts" / f"h{h}").write_text(f"Address = {lab.address(h)}\nPort = {PORT}\n{crypto}")
    up = conf / "tinc-up"
    up.write_text(
        "#!/bin/sh\nset -e\n"
        f'ip link set "$INTERFACE" mtu {MTU}\n'
        f'ip addr add {OVERLAY_NET.format(h)} dev "$INTERFACE"\n'
        'ip link set "$INTERFACE" up\n'
    )
    up.chmod(0o755)
    # -K asks where to save the keys unless stdin says: answer the defaults (conf/rsa_key.priv and
    # the public key appended to conf/hosts/h<h>).
    lab.run(h, ["tincd", "-c", str(conf), "-K2048"], input="\n\n", timeout=60)


def stop_processes(procs: list[subprocess.Popen[Any]], timeout: float = 10) -> None:
    """SIGTERM each tunnel daemon (by PID), then wait; what is still there after ``timeout`` is
    killed. Shared by the tinc, wireguard-go and nebula rows."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


def setup_tinc(lab: Lab, cipher: bool, workdir: Path) -> Callable[[], None]:
    """Bring tinc up between hosts 1 and 2 and wait until host 1 pings 198.19.42.2 through it.

    Returns the teardown; ``teardown.procs`` holds the tincd processes (for /proc/<pid>/stat)."""
    workdir = Path(workdir).resolve()
    confs = {h: workdir / f"tinc-h{h}" for h in HOSTS}
    for h, peer in ((1, 2), (2, 1)):
        _write_config(lab, h, peer, cipher, confs[h])
    for h, peer in ((1, 2), (2, 1)):  # each side needs the other's host file (address, key)
        (confs[h] / "hosts" / f"h{peer}").write_bytes((confs[peer] / "hosts" / f"h{peer}").read_bytes())

    procs: list[subprocess.Popen[Any]] = []

    def teardown() -> None:
        stop_processes(procs)
        for h in HOSTS:  # tincd's TAP is not persistent and goes with it; this is for a killed one
            if lab.run(h, ["ip", "link", "show", DEV], check=False).returncode == 0:
                lab.run(h, ["ip", "link", "del", DEV], check=False)

    teardown.procs = procs  # type: ignore[attr-defined]
    try:
        for h in HOSTS:
            c = confs[h]
            procs.append(
                lab.spawn(
                    h,
                    [
                        "tincd",
                        "-D",
                        "-d0",
                        "-c",
                        str(c),
                        f"--pidfile={c / 'tincd.pid'}",
                        f"--logfile={c / 'tincd.log'}",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        dst = OVERLAY_NET.format(2).split("/")[0]

        def pings() -> bool:
            for h, p in zip(HOSTS, procs):
                if p.poll() is not None:
                    log = confs[h] / "tincd.log"
                    tail = log.read_text()[-1000:] if log.exists() else ""
                    raise LabError(f"tincd on host {h} exited ({p.returncode}): {tail}")
            return lab.run(1, ["ping", "-c", "1", "-W", "1", dst], check=False).returncode == 0

        wait_for(pings, 30, f"ping {dst} over tinc")
    except BaseException:
        teardown()
        raise
    return teardown


def tinc_pids(teardown: Callable[[], None]) -> list[int]:
    """The PIDs of the tincd processes behind a ``setup_tinc`` teardown (``ip netns exec`` execs)."""
    return [p.pid for p in teardown.procs]  # type: ignore[attr-defined]


__all__ = ["setup_tinc", "tinc_pids", "OVERLAY_NET", "DEV", "PORT", "MTU"]
