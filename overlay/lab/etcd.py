"""Real etcd servers for the tests, the demo and the benchmarks (DESIGN.md, lab conventions).

The registry talks to Debian's etcd (3.4), not a fake, so what we test is what we ship against.
Each network namespace has its own loopback: an etcd on the root namespace's 127.0.0.1 is out
of reach of the lab's hosts. So in a lab etcd runs in a service host of its own on the underlay
bridge (``Lab.add_service``: ``<lab>-etcd1`` at 198.18.0.250, etcd2 at .249, ...), where every
host reaches it. In a lab with an IPv6-only underlay it listens on the service host's IPv6
address instead (2001:2:0:1::250, ::249, ...; client URL ``http://[2001:2:0:1::250]:2379``);
a dual-stack lab keeps it on IPv4. Without a lab (unit tests of the registry) it listens on
127.0.0.1 (or ``address="::1"``) on free ports of the current namespace::

    with Lab("demo", hosts=2) as lab, etcdlab.single(lab) as etcd:
        etcdlab.etcdctl(etcd, "put", "k", "v", lab=lab, namespace=1, check=True)  # from host 1

Each server gets a fresh data dir (``tempfile.mkdtemp``) holding etcd's data and its log;
``stop`` removes it. ``kill`` leaves it, so ``start`` after ``kill`` restarts the member with
its data, as after a crash. Processes are stopped by PID; every wait has a deadline.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Any, Sequence

from overlay.lab import Lab, wait_for

CLIENT_PORT, PEER_PORT = 2379, 2380  # etcd's own, in a namespace of its own
FIRST_SERVICE_HOST = 250  # etcd1 at 198.18.0.250, etcd2 at .249, ...
INSTALL = {"etcd": "apt-get install etcd-server", "etcdctl": "apt-get install etcd-client"}


class EtcdError(RuntimeError):
    """etcd could not be started, did not become healthy, or etcdctl failed; the message says why."""


def binary(name: str) -> str:
    """The path of ``etcd`` or ``etcdctl``; EtcdError saying what to install if it is missing."""
    path = shutil.which(name)
    if path is None:
        raise EtcdError(f"{name} not found on PATH: {INSTALL.get(name, 'install etcd')} (Debian's etcd 3.4)")
    return path


def available() -> bool:
    """Whether etcd and etcdctl are installed (for skipping tests)."""
    return all(shutil.which(name) for name in INSTALL)


def _env(**extra: str) -> dict[str, str]:
    """The environment without ETCD_* / ETCDCTL_*: etcd refuses a flag that an ETCD_ variable
    also sets, and a stray ETCDCTL_ENDPOINTS would point etcdctl elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "ETCDCTL_"))}
    return {**env, **extra}


def _argv(cmd: Sequence[str], lab: Lab | None, namespace: int | str | None) -> list[str]:
    """``cmd`` where it should run: a lab host or service, another namespace, or right here."""
    if namespace is None:
        return list(cmd)
    if lab is not None:
        return lab.argv(namespace, cmd)
    if not isinstance(namespace, str):
        raise EtcdError(f"host {namespace}: pass lab= to run in a lab host by number")
    return ["ip", "netns", "exec", namespace, *cmd]


def url(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, scheme: str = "http") -> str:
    """``scheme://address:port``, an IPv6 address in brackets: http://[2001:2:0:1::250]:2379."""
    host = str(address)
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` (IPv4 or IPv6) now, below the ephemeral
    range so that no outgoing connection takes one before etcd binds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports: list[int] = []
    deadline = time.monotonic() + 5
    while len(ports) < count:
        if time.monotonic() > deadline:
            raise EtcdError(f"found only {len(ports)} of {count} free ports on {host}")
        port = random.randrange(20000, 32000)
        if port in ports:
            continue
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        ports.append(port)
    return ports


class EtcdServer:
    """One etcd member. In a lab it runs in the service namespace ``<lab>-<name>`` (made with
    ``lab.add_service``; its primary address, IPv6 in an IPv6-only lab, and ports 2379/2380 are
    the defaults); without a lab on 127.0.0.1 with free ports. A context manager: started (and
    waited healthy) on entry, stopped on exit."""

    def __init__(
        self,
        name: str = "etcd1",
        *,
        lab: Lab | None = None,
        namespace: str | None = None,
        address: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        cluster_state: str = "new",
        cluster_token: str | None = None,
        auto_compaction_retention: str = "0",
        log_level: str = "error",
        extra_args: Sequence[str] = (),
        tmpdir: str | None = None,
    ) -> None:
        if lab is not None and namespace is None and name in lab.services:
            namespace, address = lab.service_ns(name), address or lab.services[name]
        if lab is not None and namespace is None:
            raise EtcdError(f"lab {lab.name!r} has no service {name!r}: lab.add_service({name!r}, <201..254>) first")
        if cluster_state not in ("new", "existing"):
            raise EtcdError(f"cluster state is 'new' or 'existing', not {cluster_state!r}")
        self.name, self.lab, self.namespace = name, lab, namespace
        self.address = str(address or "127.0.0.1")
        if client_port is None or peer_port is None:
            if namespace is not None:
                free = [CLIENT_PORT, PEER_PORT]
            else:
                free = free_ports(2, self.address)
            client_port, peer_port = client_port or free[0], peer_port or free[1]
        self.client_port, self.peer_port = client_port, peer_port
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.cluster_state, self.auto_compaction_retention = cluster_state, auto_compaction_retention
        self.cluster_token = cluster_token or f"overlay-{uuid.uuid4().hex[:12]}"
        self.log_level, self.extra_args, self.tmpdir = log_level, list(extra_args), tmpdir
        self.data_dir: Path | None = None  # made by start(), removed by stop()
        self.proc: subprocess.Popen[Any] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        where = f" in {self.namespace}" if self.namespace else ""
        return f"<EtcdServer {self.name} {self.endpoint}{where} pid={self.pid}>"

    # --- where it is -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The client URL, e.g. http://198.18.0.250:2379 or http://[2001:2:0:1::250]:2379."""
        return url(self.address, self.client_port)

    @property
    def peer_url(self) -> str:
        return url(self.address, self.peer_port)

    @property
    def log_path(self) -> Path | None:
        """etcd's stdout and stderr, in the data dir (gone after ``stop``)."""
        return self.data_dir / "etcd.log" if self.data_dir else None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        """The etcd command line (without the namespace)."""
        if self.data_dir is None:
            raise EtcdError(f"{self.name}: no data dir before start()")
        return [
            binary("etcd"),
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir / "data"),
            "--listen-client-urls",
            self.endpoint,
            "--advertise-client-urls",
            self.endpoint,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            self.initial_cluster,
            "--initial-cluster-state",
            self.cluster_state,
            "--initial-cluster-token",
            self.cluster_token,
            "--auto-compaction-retention",
            self.auto_compaction_retention,
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> EtcdServer:
        """Start etcd (not waiting for it: ``wait_healthy``). After ``kill`` it restarts with its data."""
        if self.running:
            raise EtcdError(f"{self!r} is running already")
        binary("etcdctl")  # fail now, not at the first wait_healthy
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix=f"overlay-{self.name}-", dir=self.tmpdir))
        argv = self.argv()
        if self._log is not None:
            self._log.close()
        self._log = open(self.data_dir / "etcd.log", "ab")
        kw: dict[str, Any] = dict(stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=_env())
        if self.lab is not None and self.namespace is not None:
            self.proc = self.lab.spawn(self.namespace, argv, **kw)  # the lab's down() kills it too
        else:
            self.proc = subprocess.Popen(_argv(argv, None, self.namespace), **kw)
        return self

    def wait_healthy(self, timeout: float = 20) -> EtcdServer:
        """Poll ``etcdctl endpoint health`` (from etcd's namespace) until it answers healthy;
        EtcdError with the end of etcd's log if etcd exits or the deadline passes."""
        if self.proc is None:
            raise EtcdError(f"{self.name}: start() it first")
        deadline = time.monotonic() + timeout

        def healthy() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                return True  # stop waiting: it exited
            left = deadline - time.monotonic()
            try:
                result = etcdctl(
                    self,
                    "--dial-timeout=1s",
                    "--command-timeout=2s",
                    "endpoint",
                    "health",
                    timeout=max(0.5, min(5.0, left)),
                )
            except subprocess.TimeoutExpired:
                return False
            return result.returncode == 0

        try:
            wait_for(healthy, timeout, f"{self.name} healthy", interval=0.1)
        except TimeoutError:
            raise EtcdError(f"{self!r} not healthy after {timeout} s; its log ends:\n{self.log_tail()}") from None
        if self.proc.poll() is not None:
            raise EtcdError(f"{self.name} exited ({self.proc.returncode}); its log ends:\n{self.log_tail()}")
        return self

    def kill(self) -> None:
        """SIGKILL by PID, for fault tests; the data dir stays (``start`` restarts the member)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=5)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, SIGKILL after ``timeout``, then remove the data dir (and the log). Idempotent."""
        if self.running:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        elif self.proc is not None:
            self.proc.wait(timeout=5)  # reap
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of etcd's log, or a note saying it is empty."""
        text = self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""
        if not text.strip():
            return f"(nothing at log level {self.log_level!r}; log_level='info' says more)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> EtcdServer:
        if not self.running:
            try:
                self.start().wait_healthy()
            except BaseException:
                self.stop()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def single(lab: Lab | None = None, **kw: Any) -> EtcdServer:
    """One etcd member, started and healthy: in ``lab`` in service host "etcd1" at 198.18.0.250
    (2001:2:0:1::250 in an IPv6-only lab; added here), else on 127.0.0.1 with free ports. ``kw``
    goes to EtcdServer."""
    if lab is not None:
        lab.add_service("etcd1", FIRST_SERVICE_HOST)
    server = EtcdServer("etcd1", lab=lab, **kw)
    return server.__enter__()


def cluster(lab: Lab | None, members: int = 3, **kw: Any) -> list[EtcdServer]:
    """``members`` etcd members etcd1..N in one cluster, all started, then all waited healthy:
    in ``lab`` in service hosts at 198.18.0.250, .249, ... (2001:2:0:1::250, ::249, ... in an
    IPv6-only lab; added here), else on 127.0.0.1."""
    if not 1 <= members <= FIRST_SERVICE_HOST - 200:
        raise EtcdError(f"a lab cluster has 1 to {FIRST_SERVICE_HOST - 200} members, not {members}")
    names = [f"etcd{i}" for i in range(1, members + 1)]
    if lab is not None:
        for i, name in enumerate(names):
            lab.add_service(name, FIRST_SERVICE_HOST - i)
        servers = [EtcdServer(name, lab=lab, **kw) for name in names]
    else:
        ports = free_ports(2 * members, str(kw.get("address") or "127.0.0.1"))
        servers = [
            EtcdServer(name, client_port=ports[2 * i], peer_port=ports[2 * i + 1], **kw) for i, name in enumerate(names)
        ]
    initial, token = ",".join(f"{s.name}={s.peer_url}" for s in servers), servers[0].cluster_token
    try:
        for s in servers:
            s.initial_cluster, s.cluster_token = initial, token
            s.start()
        for s in servers:
            s.wait_healthy()
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def leader(servers: Sequence[EtcdServer], timeout: float = 5) -> EtcdServer | None:
    """The running server that every running server names as leader (``endpoint status``), or
    None: no agreement yet, e.g. during the election after the leader died. Poll it with
    ``wait_for`` before writing after a fault: etcd 3.4 holds a write sent during an election
    until its request timeout (about 7 s) and then fails it."""
    live = [s for s in servers if s.running]
    if not live:
        return None
    try:
        result = etcdctl(
            live, "--dial-timeout=1s", "--command-timeout=2s", "endpoint", "status", "-w", "json", timeout=timeout
        )
        statuses = json.loads(result.stdout or "[]")
        ids = {st["Status"]["header"]["member_id"]: st["Endpoint"] for st in statuses}
        leaders = {st["Status"]["leader"] for st in statuses}
    except (subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        return None
    if len(statuses) != len(live) or len(leaders) != 1:
        return None
    endpoint = ids.get(leaders.pop())
    return next((s for s in live if s.endpoint == endpoint), None)


def etcdctl(
    server_or_endpoints: EtcdServer | str | Sequence[EtcdServer | str],
    *args: str,
    lab: Lab | None = None,
    namespace: int | str | None = None,
    timeout: float = 15,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``etcdctl`` (API 3) against a server, an endpoint URL or several of either.

    It runs in ``namespace`` (a lab host's number or a service's name with ``lab``, or a
    namespace's name), else in the (first) server's own namespace, else right here. Bounded by
    ``timeout`` (subprocess.TimeoutExpired); with ``check``, EtcdError if etcdctl fails."""
    targets = [server_or_endpoints] if isinstance(server_or_endpoints, (EtcdServer, str)) else list(server_or_endpoints)
    if not targets:
        raise EtcdError("etcdctl: no server or endpoint given")
    endpoints = ",".join(t.endpoint if isinstance(t, EtcdServer) else t for t in targets)
    first = next((t for t in targets if isinstance(t, EtcdServer)), None)
    if namespace is None and first is not None:
        namespace, lab = first.namespace, lab or first.lab
    elif first is not None:
        lab = lab or first.lab
    argv = _argv([binary("etcdctl"), f"--endpoints={endpoints}", *args], lab, namespace)
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=_env(ETCDCTL_API="3"), stdin=subprocess.DEVNULL
    )
    if check and result.returncode != 0:
        where = f" in {namespace}" if namespace is not None else ""
        raise EtcdError(
            f"etcdctl {' '.join(args)}{where} against {endpoints} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result
