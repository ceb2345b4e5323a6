"""Nebula between lab hosts 1 and 2: Slack's userspace mesh VPN, a row for the benchmarks.

    teardown = setup_nebula(lab, workdir=Path(tmp))
    ...                      # 198.19.42.1 (host 1) <-> 198.19.42.2 (host 2) over TUN neb0
    teardown.procs           # the two nebula Popen objects (their PIDs are nebula's)
    teardown()

Debian's ``nebula`` (1.6.1): in ``workdir`` a CA (``nebula-cert ca``) and a certificate per host
(``nebula-cert sign``, its overlay address 198.19.42.N/24, the same addresses as tinc's and
overlay's rows so iperf3 and ping run unchanged), and a config per host: host 1 is the
lighthouse, host 2 knows it from ``static_host_map``, and host 1 has host 2 there too (both
directions are static, no discovery needed); UDP port 4242 on the underlay address, with 8 MiB
socket buffers (``listen.read_buffer``/``write_buffer``: what tinc's row and overlay's agent
have; with the defaults its receiving socket overflows here); ``cipher:
aes`` (AES-256-GCM, the AEAD an encrypted overlay would use too; nebula's other choice is
chachapoly); a firewall that lets anything through both ways; TUN ``neb0`` with nebula's default
MTU 1300 (its recommended setting for internet paths; on this 1500-byte underlay up to 1440
would fit, so this row moves its TCP in smaller segments than the others: read its figures
so). Nebula is L3 (a TUN). ``nebula -config`` runs in each namespace (no fork; killed by PID).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable

from bench.tinc import stop_processes
from overlay.lab import Lab, LabError, wait_for

PORT, DEV, MTU, CIPHER = 4242, "neb0", 1300, "aes"
BUFFER = 8 << 20  # bytes: UDP socket buffers, as tinc's row and overlay's agent have (SO_RCVBUFFORCE)
OVERLAY_NET = "198.19.42.{}/24"
HOSTS = (1, 2)
LIGHTHOUSE = 1


def _config(lab: Lab, h: int, conf: Path) -> str:
    """Host ``h``'s nebula config (YAML, which JSON-like flow style is)."""
    overlay = {n: OVERLAY_NET.format(n).split("/")[0] for n in HOSTS}
    static = ", ".join(f'"{overlay[n]}": ["{lab.address(n)}:{PORT}"]' for n in HOSTS if n != h)
    lighthouses = "" if h == LIGHTHOUSE else f'"{overlay[LIGHTHOUSE]}"'
    anything = "[{port: any, proto: any, host: any}]"
    return (
        f'pki: {{ca: "{conf / "ca.crt"}", cert: "{conf / f"h{h}.crt"}", key: "{conf / f"h{h}.key"}"}}\n'
        f"static_host_map: {{{static}}}\n"
        f"lighthouse: {{am_lighthouse: {'true' if h == LIGHTHOUSE else 'false'}, interval: 60,"
        f" hosts: [{lighthouses}]}}\n"
        f'listen: {{host: "{lab.address(h)}", port: {PORT}, read_buffer: {BUFFER}, write_buffer: {BUFFER}}}\n'
        "punchy: {punch: false}\n"
        f"cipher: {CIPHER}\n"
        f"tun: {{disabled: false, dev: {DEV}, drop_local_broadcast: false, drop_multicast: false,"
        f" tx_queue: 500, mtu: {MTU}}}\n"
        "logging: {level: info, format: text}\n"
        f"firewall: {{conntrack: {{tcp_timeout: 12m, udp_timeout: 3m, default_timeout: 10m}},"
        f" outbound: {anything}, inbound: {anything}}}\n"
    )


def setup_nebula(lab: Lab, workdir: Path) -> Callable[[], None]:
    """Bring nebula up between hosts 1 and 2 and wait until host 1 pings 198.19.42.2 through it
    (a deadline, no sleep). Returns the teardown: it stops both nebula by PID (SIGTERM, then
    SIGKILL) and removes a neb0 left behind; ``teardown.procs`` holds the processes."""
    conf = Path(workdir).resolve() / "nebula"
    conf.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[Any]] = []
    logs = {h: conf / f"nebula-h{h}.log" for h in HOSTS}

    def teardown() -> None:
        stop_processes(procs)
        for h in HOSTS:  # the TUN goes with its process; this is for one that was killed
            if lab.run(h, ["ip", "link", "show", DEV], check=False).returncode == 0:
                lab.run(h, ["ip", "link", "del", DEV], check=False)

    teardown.procs = procs  # type: ignore[attr-defined]
    try:
        for f in conf.glob("*.crt"):  # nebula-cert refuses to overwrite (a second round, same workdir)
            f.unlink()
        for f in conf.glob("*.key"):
            f.unlink()
        certs = ["nebula-cert", "ca", "-name", "overlay bench lab"]
        subprocess.run(
            [*certs, "-out-crt", str(conf / "ca.crt"), "-out-key", str(conf / "ca.key")],
            check=True,
            capture_output=True,
            timeout=30,
        )
        for h in HOSTS:
            subprocess.run(
                [
                    "nebula-cert",
                    "sign",
                    "-ca-crt",
                    str(conf / "ca.crt"),
                    "-ca-key",
                    str(conf / "ca.key"),
                    "-name",
                    f"h{h}",
                    "-ip",
                    OVERLAY_NET.format(h),
                    "-out-crt",
                    str(conf / f"h{h}.crt"),
                    "-out-key",
                    str(conf / f"h{h}.key"),
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
            (conf / f"h{h}.yml").write_text(_config(lab, h, conf))
        for h in HOSTS:
            with logs[h].open("w") as log:
                procs.append(
                    lab.spawn(
                        h,
                        ["nebula", "-config", str(conf / f"h{h}.yml")],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        dst = OVERLAY_NET.format(2).split("/")[0]

        def pings() -> bool:
            for h, p in zip(HOSTS, procs):
                if p.poll() is not None:
                    raise LabError(f"nebula on host {h} exited ({p.returncode}): {logs[h].read_text()[-1000:]}")
            return lab.run(1, ["ping", "-c", "1", "-W", "1", dst], check=False).returncode == 0

        wait_for(pings, 30, f"ping {dst} over nebula")
    except BaseException:
        teardown()
        raise
    return teardown


__all__ = ["setup_nebula", "OVERLAY_NET", "DEV", "PORT", "MTU", "CIPHER"]
