"""overlay.etcdlab: a real etcd on the root loopback, in a lab's service host, and as a cluster
that survives losing its leader; lab service hosts; nothing left behind."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from typing import Iterator, TypeVar

import pytest

from overlay.lab import Lab, LabError, wait_for
from overlay.lab import etcd as etcdlab
from overlay.lab.etcd import EtcdError, EtcdServer, etcdctl

TAG = os.getpid() % 100000
LABS = (f"tes{TAG}", f"tec{TAG}", f"tel{TAG}", f"te6{TAG}", f"ted{TAG}")  # this module's labs
STARTED: list[EtcdServer] = []  # every server the tests start, checked afterwards
T = TypeVar("T", EtcdServer, list[EtcdServer])


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    yield
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert not [line for line in netns.splitlines() if line.split()[0].startswith(LABS)], netns
    for server in STARTED:
        assert not server.running and server.data_dir is None, server
        assert server.pid is None or not os.path.exists(f"/proc/{server.pid}"), server


def started(server: T) -> T:
    STARTED.extend(server if isinstance(server, list) else [server])
    return server


@pytest.mark.etcd
def test_single_server_on_loopback_serves_and_stop_removes_everything() -> None:
    server = started(etcdlab.single())
    try:
        assert server.endpoint.startswith("http://127.0.0.1:")
        data_dir, pid = server.data_dir, server.pid
        assert data_dir is not None and data_dir.is_dir() and server.log_path and server.log_path.exists()
        etcdctl(server, "put", "/overlay/k", "v1", check=True)
        assert etcdctl(server, "get", "/overlay/k", "--print-value-only", check=True).stdout.strip() == "v1"
    finally:
        server.stop()
    assert not server.running and server.data_dir is None and not data_dir.exists()
    assert not os.path.exists(f"/proc/{pid}")
    server.stop()  # idempotent


@pytest.mark.etcd
def test_etcd_that_cannot_start_fails_with_its_log() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = started(EtcdServer("bad", client_port=taken.getsockname()[1], peer_port=etcdlab.free_ports(1)[0]))
        try:
            with pytest.raises(EtcdError, match="(?s)exited.*address already in use"):
                server.start().wait_healthy(timeout=10)
        finally:
            server.stop()


def test_missing_binary_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(EtcdError, match="apt-get install etcd-server"):
        etcdlab.binary("etcd")
    with pytest.raises(EtcdError, match="apt-get install etcd-client"):
        etcdlab.binary("etcdctl")


@pytest.mark.root
def test_service_hosts_are_checked_and_found_by_another_lab_object() -> None:
    lab = Lab(LABS[2], hosts=1)
    with pytest.raises(LabError, match="not up"):
        lab.add_service("etcd1", 250)
    with lab:
        for name, host, error in [
            ("sw", 201, "service name"),
            ("h2", 201, "service name"),
            ("Etcd", 201, "service name"),
            ("etcd1", 200, r"\.201 \.\. \.254"),
        ]:
            with pytest.raises(LabError, match=error):
                lab.add_service(name, host)
        assert lab.add_service("etcd1", 250) == f"{lab.name}-etcd1"
        with pytest.raises(LabError, match="already"):
            lab.add_service("etcd2", 250)
        assert lab.run("etcd1", ["ping", "-c", "1", "-W", "2", str(lab.address(1))], timeout=10).returncode == 0
        other = Lab(LABS[2], hosts=1)  # as `overlay lab down --name ...` sees it
        assert sorted(other.namespaces()) == sorted([f"{lab.name}-h1", f"{lab.name}-etcd1", lab.switch])
        other.down()
        assert lab.namespaces() == []


@pytest.mark.root
@pytest.mark.etcd
def test_etcd_in_a_service_host_serves_the_lab_hosts() -> None:
    with Lab(LABS[0], hosts=2) as lab:
        server = started(etcdlab.single(lab))
        try:
            assert server.endpoint == "http://198.18.0.250:2379" and server.namespace == f"{lab.name}-etcd1"
            env = {**os.environ, "ETCDCTL_API": "3"}
            lab.run(
                1,
                ["etcdctl", "--endpoints", "http://198.18.0.250:2379", "put", "/overlay/h1", "up"],
                timeout=15,
                env=env,
            )
            got = lab.run(
                1,
                ["etcdctl", "--endpoints", "http://198.18.0.250:2379", "get", "/overlay/h1", "--print-value-only"],
                timeout=15,
                env=env,
            )
            assert got.stdout.strip() == "up"
            assert (
                etcdctl(
                    server, "get", "/overlay/h1", "--print-value-only", lab=lab, namespace=2, check=True
                ).stdout.strip()
                == "up"
            )
            assert f"{lab.name}-etcd1" in lab.namespaces()
        except BaseException:
            server.stop()
            raise
    # down() killed etcd with everything else in the lab and removed the service host
    assert not server.running and lab.namespaces() == []
    server.stop()


@pytest.mark.root
@pytest.mark.etcd
def test_cluster_keeps_serving_after_its_leader_is_killed() -> None:
    with Lab(LABS[1], hosts=1) as lab:
        servers = started(etcdlab.cluster(lab, members=3))
        try:
            assert [s.endpoint for s in servers] == [f"http://198.18.0.{a}:2379" for a in (250, 249, 248)]
            etcdctl(servers, "put", "/overlay/before", "1", lab=lab, namespace=1, check=True)
            old = wait_for(lambda: etcdlab.leader(servers), 10, "a leader")
            old.kill()  # the hard case: an election follows
            assert not old.running
            new = wait_for(lambda: etcdlab.leader(servers), 10, "a new leader")
            assert new is not old
            survivors = [s for s in servers if s is not old]
            etcdctl(survivors, "put", "/overlay/after", "2", lab=lab, namespace=1, check=True)
            for key, value in (("/overlay/before", "1"), ("/overlay/after", "2")):
                got = etcdctl(servers, "get", key, "--print-value-only", lab=lab, namespace=1, check=True)
                assert got.stdout.strip() == value
        finally:
            for s in servers:
                s.stop()


@pytest.mark.root
@pytest.mark.etcd
def test_etcd_in_an_ipv6_only_lab_listens_on_ipv6_and_serves_the_hosts() -> None:
    with Lab(LABS[3], hosts=2, ipv6=True) as lab:
        server = started(etcdlab.single(lab))
        try:
            assert server.endpoint == "http://[2001:2:0:1::250]:2379" and server.namespace == f"{lab.name}-etcd1"
            assert server.peer_url == "http://[2001:2:0:1::250]:2380"
            listening = lab.run("etcd1", ["ss", "-H", "-l", "-t", "-n"], timeout=10).stdout.split()
            assert "[2001:2:0:1::250]:2379" in listening and not [a for a in listening if a.startswith("198.18.")]
            etcdctl(server, "put", "/overlay/v6", "yes", lab=lab, namespace=1, check=True)  # the helper, from h1
            env = {**os.environ, "ETCDCTL_API": "3"}
            got = lab.run(  # by hand, from h2, over the IPv6 underlay
                2,
                ["etcdctl", "--endpoints", "http://[2001:2:0:1::250]:2379", "get", "/overlay/v6", "--print-value-only"],
                timeout=15,
                env=env,
            )
            assert got.stdout.strip() == "yes"
            health = etcdctl(server, "endpoint", "health", lab=lab, namespace=2, check=True)
            assert "is healthy" in health.stdout + health.stderr
        except BaseException:
            server.stop()
            raise
    assert not server.running and lab.namespaces() == []
    server.stop()


@pytest.mark.root
@pytest.mark.etcd
def test_etcd_in_a_dual_stack_lab_stays_on_ipv4() -> None:
    with Lab(LABS[4], hosts=1, dual_stack=True) as lab:
        server = started(etcdlab.single(lab))
        try:
            assert server.endpoint == "http://198.18.0.250:2379"
            assert etcdctl(server, "put", "/overlay/k", "v", lab=lab, namespace=1).returncode == 0
        finally:
            server.stop()


def test_client_urls_put_ipv6_addresses_in_brackets() -> None:
    assert etcdlab.url("2001:2:0:1::250", 2379) == "http://[2001:2:0:1::250]:2379"
    assert etcdlab.url("198.18.0.250", 2379, scheme="https") == "https://198.18.0.250:2379"
    assert EtcdServer("x", address="::1", client_port=1, peer_port=2).endpoint == "http://[::1]:1"


@pytest.mark.etcd
def test_single_server_on_the_ipv6_loopback() -> None:
    server = started(etcdlab.single(address="::1"))
    try:
        assert server.endpoint.startswith("http://[::1]:")
        etcdctl(server, "put", "/overlay/k", "v6", check=True)
        assert etcdctl(server, "get", "/overlay/k", "--print-value-only", check=True).stdout.strip() == "v6"
    finally:
        server.stop()
