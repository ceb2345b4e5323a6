"""overlay.lab.engines: one real dockerd per lab host (and podman), an image imported from
busybox-static without a registry, containers with --network none in namespaces of their own,
and nothing left behind."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from overlay.lab import engines
from overlay.lab.engines import IMAGE, PODMAN_IMAGE, Dockerd, Podman

pytestmark = pytest.mark.root  # every wait in overlay.lab.engines is bounded; the docker test asserts < 90 s

needs_docker = pytest.mark.skipif(not engines.dockerd_available(), reason=f"needs docker.io: {engines.INSTALL}")
needs_podman = pytest.mark.skipif(not engines.podman_available(), reason=f"needs podman: {engines.INSTALL}")


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


@needs_docker
def test_a_dockerd_per_host_runs_a_local_image_with_no_network_and_cleans_up(labs) -> None:  # type: ignore[no-untyped-def]
    lab = labs(hosts=2, prefix="de")
    shared = [p for p in ("/run/docker/plugins", "/run/docker") if not os.path.exists(p)]
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="overlay-engines-"))
    daemons: list[Dockerd] = []
    try:
        for host in (1, 2):
            daemons.append(engines.start_dockerd(lab, host, work / f"h{host}"))
        pids = {}
        for d in daemons:
            assert d.running() and d.socket.is_socket()
            engines.import_busybox_image(d)
            d.cli("run", "-d", "--network", "none", "--name", "c1", IMAGE, "sleep", "600")
            pid = int(d.cli("inspect", "-f", "{{.State.Pid}}", "c1").stdout)
            pids[d.host] = pid
            # a network namespace of its own: neither the lab host's (dockerd's) nor the root one
            netns = engines.container_netns(pid)
            assert netns != engines.namespace_inode(lab.ns(d.host))
            assert netns != os.readlink("/proc/self/ns/net")
            assert engines.container_netns(d.proc.pid) == engines.namespace_inode(lab.ns(d.host))
            links = d.cli("exec", "c1", "ip", "-o", "link").stdout
            assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"], links
            # each dockerd sees its own plugin directory, not the shared /run/docker/plugins
            assert d.plugin_socket("ovl") == d.workdir / "plugins" / "ovl.sock"
        for d in daemons:
            d.cli("rm", "-f", "c1")
            assert d.cli("ps", "-aq").stdout.strip() == ""
            assert not os.path.exists(f"/proc/{pids[d.host]}")
    finally:
        for d in daemons:
            d.stop()
        leftover = _mounts_under(work)
        shutil.rmtree(work, ignore_errors=True)
    for d in daemons:
        assert not d.running()
        assert not d.workdir.exists()
        assert not engines._pids_with(str(d.workdir))
        assert not glob.glob(f"/sys/fs/cgroup/*/{lab.ns(d.host)}")
    assert not leftover
    assert not [p for p in shared if os.path.exists(p)]  # made for these dockerds, gone with them
    assert time.monotonic() - started < 90


@needs_podman
def test_podman_in_a_lab_host_runs_a_local_image_with_no_network_and_cleans_up(labs) -> None:  # type: ignore[no-untyped-def]
    lab = labs(hosts=1, prefix="pe")
    shared = [p for p in ("/var/lib/containers", "/var/lib/cni") if not os.path.exists(p)]
    work = Path(tempfile.mkdtemp(prefix="overlay-podman-"))
    p: Podman | None = None
    try:
        p = engines.start_podman(lab, 1, work / "h1")
        engines.import_busybox_image(p, PODMAN_IMAGE)
        p.cli("run", "-d", "--pull", "never", "--network", "none", "--name", "c1", PODMAN_IMAGE, "sleep", "600")
        pid = int(p.cli("inspect", "-f", "{{.State.Pid}}", "c1").stdout)
        assert engines.container_netns(pid) not in (
            engines.namespace_inode(lab.ns(1)),
            os.readlink("/proc/self/ns/net"),
        )
        p.cli("rm", "-f", "-t", "0", "c1")
        assert not os.path.exists(f"/proc/{pid}")
    finally:
        if p is not None:
            p.stop()
        leftover = _mounts_under(work)
        shutil.rmtree(work, ignore_errors=True)
    assert not leftover and p is not None and not p.workdir.exists()
    assert not [p for p in shared if os.path.exists(p)]
    assert not os.path.exists("/dev/shm/libpod_lock")  # lock_type = "file": no shared shm lock
