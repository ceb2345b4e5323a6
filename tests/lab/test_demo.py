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
