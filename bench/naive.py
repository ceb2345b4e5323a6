"""The naive pure-Python tunnel (bench/naive_tunnel.py) as a dataplane on a 2-host lab.

``setup_naive(lab)`` works like ``setup_kernel`` and ``setup_overlay`` in bench/lab.py: it
starts the tunnel in hosts 1 and 2 (TAP nv0, overlay 198.19.42.<host>/24), waits until host 1
pings 198.19.42.2 and returns a teardown. The teardown's ``procs`` are the two tunnel
processes (``ip netns exec`` execs, so each Popen's PID is the Python process itself, and
/proc/<pid>/stat has its CPU time).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from overlay.lab import Lab, wait_for

TUNNEL = Path(__file__).with_name("naive_tunnel.py")
TAP = "nv0"
OVERLAY_NET = "198.19.42.{}/24"
START_TIMEOUT = 20.0  # s: both tunnels up and a ping through them
STOP_TIMEOUT = 5.0  # s: after SIGTERM, before SIGKILL


class NaiveTeardown:
    """Stops the tunnels by PID: SIGTERM, then SIGKILL past a deadline. Safe to call twice."""

    def __init__(self, lab: Lab, procs: list[subprocess.Popen[Any]]) -> None:
        self.lab = lab
        self.procs = procs

    def __call__(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=STOP_TIMEOUT)
            if p.stderr is not None:
                p.stderr.close()
        # The TAPs go with the processes' fds; make sure before the next dataplane is set up.
        for h in (1, 2):
            wait_for(
                lambda h=h: self.lab.run(h, ["ip", "link", "show", TAP], check=False).returncode != 0,
                STOP_TIMEOUT,
                f"{TAP} gone from host {h}",
            )


def setup_naive(lab: Lab) -> Callable[[], None]:
    for h in (1, 2):  # else a ping could pass through someone else's tunnel, and ours fail later
        if lab.run(h, ["ip", "link", "show", TAP], check=False).returncode == 0:
            raise RuntimeError(f"{TAP} exists in host {h} already: is a naive tunnel still running?")
    procs: list[subprocess.Popen[Any]] = []
    teardown = NaiveTeardown(lab, procs)
    try:
        for h, peer in ((1, 2), (2, 1)):
            # stderr: a pipe, read only once the process has died (a running tunnel writes nothing)
            procs.append(
                lab.spawn(
                    h,
                    [
                        sys.executable,
                        str(TUNNEL),
                        "--tap",
                        TAP,
                        "--local",
                        str(lab.address(h)),
                        "--peer",
                        str(lab.address(peer)),
                        "--address",
                        OVERLAY_NET.format(h),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
        dst = OVERLAY_NET.format(2).split("/")[0]

        def pings() -> bool:
            for h, p in enumerate(procs, 1):
                if p.poll() is not None:
                    err = p.stderr.read().decode(errors="replace").strip().splitlines() if p.stderr else []
                    raise RuntimeError(f"naive tunnel in host {h} exited ({p.returncode}): {err[-1] if err else ''}")
            for h in (1, 2):
                if OVERLAY_NET.format(h) not in lab.run(h, ["ip", "-br", "addr", "show", TAP], check=False).stdout:
                    return False
            # bound to nv0: through this tunnel, whatever else routes 198.19.42.0/24
            return lab.run(1, ["ping", "-c", "1", "-W", "1", "-I", TAP, dst], check=False, timeout=10).returncode == 0

        wait_for(pings, START_TIMEOUT, f"a ping from host 1 to {dst} through the naive tunnel")
    except BaseException:
        teardown()
        raise
    return teardown
