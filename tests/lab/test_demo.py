"""The README's main job: `overlay demo` runs end to end and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.root, pytest.mark.etcd]


def test_the_demo_shows_networks_kept_apart_and_cleans_up() -> None:
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    result = subprocess.run([sys.executable, "-m", "overlay", "demo"], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "result: all 12 same-network pairs talk, all 18 cross-network pairs are kept apart" in result.stdout
    assert "UNREACHABLE" not in result.stdout
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not {n for n in after - before if n.startswith("demo")}


def test_the_ipv6_demo_runs_on_an_ipv6_only_underlay_with_dual_stack_containers() -> None:
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    result = subprocess.run(
        [sys.executable, "-m", "overlay", "demo", "--ipv6"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "underlay 2001:2:0:1::/64 (IPv6 only)" in result.stdout
    assert "etcd: http://[2001:2:0:1::250]:2379" in result.stdout
    assert "underlay 2001:2:0:1::1 " in result.stdout  # agents on their IPv6 addresses
    assert "2001:2:0:42::" in result.stdout and "2001:2:0:43::" in result.stdout  # containers' IPv6 addresses
    assert (
        "result: all 12 same-network pairs talk, all 18 cross-network pairs are kept apart "
        "(over IPv4 and IPv6, on an IPv6-only underlay)" in result.stdout
    )
    assert "UNREACHABLE" not in result.stdout
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not {n for n in after - before if n.startswith("demo")}
