"""The agent: config -> forwarding table -> TAP -> dataplane -> control socket; lifecycle.

Runs in the foreground on uvloop until SIGINT or SIGTERM, logs one line when the data path is
ready, and tells systemd READY=1 when NOTIFY_SOCKET is set. Stopping closes the TAP, so the
kernel removes it. Errors a user can fix arrive here as AgentError with a one-line message.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import uvloop

from overlay.io import bridge
from overlay.io import control
from overlay.io import metrics
from overlay.io.prober import Prober, ProbeError
from overlay.io.containers import Containers, read_state, state_path
from overlay.core.config import AgentConfig, tap_names
from overlay.io.etcd import ERRORS as ETCD_ERRORS
from overlay.io.etcd import EtcdClient, EtcdError, Tls, retry
from overlay.core.registry import AddressKey, Endpoint, EndpointKey, Host, Member, MemberKey, Network, NetworkKey, Registry, Schema
from overlay.core.topology import Topology
from overlay.io.dataplane import Dataplane, DataplaneError
from overlay.fastpath.api import ForwardingCore
from overlay.fastpath.sinks import CoreSink
from overlay.core.fdb import ForwardingTable, Vtep
from overlay.io.tap import Tap, TapError, default_overlay_mtu
from overlay.core.wire import mac_to_str
from overlay.core.addresses import format_address

log = logging.getLogger("overlay.agent")


class AgentError(RuntimeError):
    """The agent cannot start; the message says why and how to fix it."""


def sd_notify(message: str) -> None:
    """Send ``message`` (e.g. READY=1) to systemd if it supervises us; no-op otherwise."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), target)
        except OSError as e:
            log.warning("could not notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], e.strerror)


class Agent:
    """Everything one agent holds. Built synchronously (netlink via pyroute2 runs its own event
    loop, so devices and sockets are set up before uvloop starts), then served, then closed."""

    def __init__(self, cfg: AgentConfig, tun_device: str = "/dev/net/tun") -> None:
        self.cfg = cfg
        try:
            self.mtu = cfg.mtu if cfg.mtu is not None else default_overlay_mtu(cfg.local)
        except TapError as e:
            raise AgentError(str(e)) from None
        self.core = ForwardingCore(allow_vlan=cfg.allow_vlan, source_check=cfg.source_check)
        self.table = ForwardingTable(CoreSink(self.core), ageing=cfg.ageing, max_per_vni=cfg.max_per_vni)
        self.taps: dict[int, Tap] = {}  # VNI -> its TAP
        self.macs: dict[int, int] = {}  # VNI -> its TAP's MAC
        try:
            for vni, name in tap_names(cfg).items():
                self.table.add_vni(vni)
                self.taps[vni] = Tap.open(name, dev=tun_device)
                if cfg.bridge:  # the host's MAC and address belong to the bridge; the TAP is a port
                    bridge.quiet_port(name)  # before it is up: no IPv6 chatter from the TAP's own MAC
                    self.taps[vni].configure(self.mtu, None, None)
                    self.macs[vni] = bridge.ensure_bridge(vni, name, self.mtu, cfg.mac, cfg.address)
                else:
                    self.macs[vni] = self.taps[vni].configure(self.mtu, cfg.mac, cfg.address)
            self.table.set_flood(cfg.vni, [Vtep(p, cfg.port) for p in cfg.peers])
            self.dataplane = Dataplane(self.core, self.table, {v: t.fd for v, t in self.taps.items()},
                                       cfg.local, cfg.port, self.mtu)
        except (TapError, DataplaneError, bridge.PlumbingError) as e:
            self.close()
            raise AgentError(str(e)) from None
        self.mac = self.macs[cfg.vni]
        self.started = time.monotonic()
        self.etcd: EtcdClient | None = None
        self.containers: Containers | None = None
        self.prober: Prober | None = None

    def status(self) -> dict[str, Any]:
        cfg = self.cfg
        registry = None
        if self.etcd is not None:
            registry = {
                "endpoints": list(cfg.etcd), "host_id": cfg.host_id, "connected": self.etcd.connected,
                "revision": self.etcd.registry.revision, "reconnects": self.etcd.reconnects,
                "resyncs": self.etcd.resyncs,
            }
        agent = {
            "tap": cfg.tap, "vni": cfg.vni, "local": str(cfg.local), "port": cfg.port,
            "peers": [str(p) for p in cfg.peers], "mtu": self.mtu, "mac": mac_to_str(self.mac),
            "address": str(cfg.address) if cfg.address else None, "source_check": cfg.source_check,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "networks": [{"vni": v, "tap": t.name, "mac": mac_to_str(self.macs[v]),
                          "bridge": bridge.bridge_name(v) if cfg.bridge else None} for v, t in self.taps.items()],
        }
        attachments = self.containers.list({}) if self.containers is not None else []
        probes = self.prober.status() if self.prober is not None else {}
        counters = self.prober.counters() if self.prober is not None else {}
        return {"agent": agent, "registry": registry, **self.dataplane.status(), "attachments": attachments,
                "probes": probes, "probe_counters": counters}

    def _control(self) -> dict[str, control.Handler]:
        """The control socket's commands: status and fdb always; attach, detach, check and
        attachments with the registry (addresses and endpoints live there)."""
        handlers: dict[str, control.Handler] = {"status": lambda req: self.status(),
                                                "fdb": lambda req: self.dataplane.fdb()}

        def containers(name: str) -> control.Handler:
            def handler(req: dict[str, Any]) -> Any:
                if self.containers is None:
                    raise control.Refused("attaching containers needs the registry: run the agent in etcd mode "
                                          "(--etcd, --host-id, --network) with its bridge (the default there)",
                                          "invalid")
                return getattr(self.containers, name)(req)
            return handler

        for command, method in (("attach", "attach"), ("detach", "detach"), ("check", "check"),
                                ("attachments", "list")):
            handlers[command] = containers(method)
        return handlers

    async def serve(self) -> None:
        """Forward until SIGINT or SIGTERM."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        try:
            # Named after the first TAP: `overlay status --tap <it>` (or no --tap) finds the agent.
            server = await control.serve(self.taps[cfg.vni].name, self._control(),
                                         privileged=frozenset({"attach", "detach", "check"}))
        except control.ControlError as e:
            raise AgentError(str(e)) from None
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        failure: list[str] = []

        def fatal(message: str) -> None:
            failure.append(message)
            stop.set()

        self.dataplane.on_fatal = fatal
        tasks: list[asyncio.Task[None]] = []
        metrics_server: asyncio.AbstractServer | None = None
        try:
            # Metrics and probes first: the probe port published in the registry must be bound.
            metrics_server = await self._serve_metrics()
            await self._start_probes()
            if cfg.etcd:  # peers first: frames the TAP sends meanwhile wait in its queue
                try:
                    tasks = await self._join_registry()
                except (EtcdError, *ETCD_ERRORS) as e:
                    raise AgentError(str(e) if isinstance(e, EtcdError) else f"joining the registry failed: {e}") from None

                def supervise(task: asyncio.Task[None]) -> None:
                    if not task.cancelled() and task.exception() is not None:
                        log.error("registry task failed: %r", task.exception())
                        fatal(f"the registry task stopped: {task.exception()!r}")

                for task in tasks:
                    task.add_done_callback(supervise)
            self.dataplane.start(loop)
            peers = ", ".join(str(p) for p in cfg.peers) or "none"
            log.info(
                "ready: tap %s (%s, mtu %d%s) vni %s vtep %s:%d %s",
                ", ".join(t.name for t in self.taps.values()), ", ".join(map(mac_to_str, self.macs.values())),
                self.mtu, f", {cfg.address}" if cfg.address else "",
                ", ".join(map(str, self.taps)), cfg.local, cfg.port,
                f"registry etcd as host {cfg.host_id}" if cfg.etcd else f"peers {peers}",
            )
            sd_notify("READY=1")
            await stop.wait()
            log.info("stopping: removing tap %s", ", ".join(t.name for t in self.taps.values()))
            sd_notify("STOPPING=1")
        finally:
            server.close()  # first: no attach may start while we stop
            for task in tasks:
                task.cancel()
            if self.prober is not None:
                await self.prober.stop()
            if metrics_server is not None:
                metrics_server.close()
            if self.etcd is not None:
                keep = False
                if self.containers is not None:
                    async with self.containers.lock:  # an attach in flight finishes (or rolls back) first
                        keep = self.containers.stopping(self.etcd.lease)
                if keep:
                    log.info("containers stay attached: the lease lives on for %d s for the next agent to resume",
                             cfg.lease_ttl)
                await self.etcd.close(revoke=not keep)
            self.dataplane.stop()
        if failure:
            raise AgentError(failure[0])

    async def _serve_metrics(self) -> asyncio.AbstractServer | None:
        """The Prometheus endpoint. Asked for explicitly, a failure stops the agent; the default
        address taken (another agent in this namespace) only costs the metrics, and says so."""
        address = self.cfg.metrics_address
        if address is None:
            return None
        try:
            server = await metrics.serve(address[0], address[1], self.status)
        except metrics.MetricsError as e:
            if self.cfg.metrics is not None:
                raise AgentError(str(e)) from None
            log.warning("%s; running without metrics", e)
            return None
        log.info("metrics: http://%s/metrics", format_address(*address))
        return server

    async def _start_probes(self) -> None:
        """Probe every peer's VTEP once a second (RTT, loss, reachability). Same rule as the
        metrics: a port asked for must work, the default port may be given up with a warning."""
        cfg = self.cfg
        if cfg.probe == 0:
            return
        if cfg.etcd:
            def peers() -> dict[str, tuple[str, int]]:
                if self.etcd is None:
                    return {}
                return {host: (h.address, h.probe_port) for host, h in self.etcd.registry.hosts().items()
                        if host != cfg.host_id and h.probe_port}
        else:
            static = {str(p): (str(p), cfg.probe) for p in cfg.peers}

            def peers() -> dict[str, tuple[str, int]]:
                return static
        prober = Prober((str(cfg.local), cfg.probe), peers)
        try:
            await prober.start()
        except ProbeError as e:
            if cfg.probe_port is not None:
                raise AgentError(str(e)) from None
            log.warning("%s; running without peer probes", e)
            return
        self.prober = prober

    async def _join_registry(self) -> list[asyncio.Task[None]]:
        """etcd mode: register this host, join the network, publish the TAP's endpoint, read the
        registry, and follow it; returns the watch and keepalive tasks."""
        cfg = self.cfg
        assert cfg.host_id is not None
        registry = Registry(Schema(cfg.prefix))
        topology = Topology(registry, self.table, cfg.host_id)
        tls = Tls(cfg.etcd_ca, cfg.etcd_cert, cfg.etcd_key) if cfg.etcd_ca else None
        self.etcd = client = EtcdClient(list(cfg.etcd), registry, lambda evs: topology.apply(evs, time.monotonic()),
                                        ttl=cfg.lease_ttl, user=cfg.etcd_user, password=cfg.etcd_password, tls=tls)
        await retry("connecting to etcd", client.connect, 30)
        resume = None
        if cfg.bridge:
            try:
                resume = read_state(state_path(Path(cfg.state_dir), cfg.host_id))[0]
            except (OSError, ValueError):
                resume = None  # Containers.adopt says what is wrong with the file
        probe_port = self.prober.address[1] if self.prober is not None else None  # only if we answer probes
        await client.register(cfg.host_id, Host(str(cfg.local), cfg.port, probe_port),
                              wait_for_old=cfg.lease_ttl + 2, resume=resume)
        subnet = str(cfg.address.network) if cfg.address else None
        for vni, mac in self.macs.items():
            if await client.create_if_missing(NetworkKey(vni), Network(vni, f"net{vni}", subnet, self.mtu)):
                log.info("created network %d in etcd (it was not defined)", vni)
            await client.hold(MemberKey(vni, cfg.host_id), Member())
            await client.hold(EndpointKey(vni, mac), Endpoint(cfg.host_id, [str(cfg.address.ip)] if cfg.address else []))
        self._publish_local(client)
        await client.snapshot()
        for vni in self.macs:
            topology.serve(vni, time.monotonic())
        log.info("registry: etcd %s, host %s, %d hosts, networks %s", ", ".join(cfg.etcd), cfg.host_id,
                 len(registry.hosts()), ", ".join(f"{v} ({len(registry.endpoints(v))} endpoints)" for v in self.macs))
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(client.watch()), loop.create_task(client.keepalive())]
        if cfg.bridge:
            self.containers = Containers(client, registry, cfg.host_id, list(self.macs), self.mtu,
                                         Path(cfg.state_dir), self.core.local_forget)
            await self.containers.adopt()
            if client.resumed:
                await self._sweep(client, registry)
            tasks.append(loop.create_task(self.containers.reap()))
        return tasks

    async def _sweep(self, client: EtcdClient, registry: Registry) -> None:
        """After resuming the previous agent's lease: delete what it held that we do not (the
        keys of containers not adopted, MACs it had learned, networks no longer joined), or they
        would live as long as the lease, which is now forever."""
        cfg = self.cfg
        stale = [k for k, v in registry.entries.items() if k not in client.held and (
            (isinstance(k, MemberKey) and k.host == cfg.host_id)
            or (isinstance(k, (EndpointKey, AddressKey)) and getattr(v.value, "host", None) == cfg.host_id))]
        for k in stale:
            await client.delete_if_unchanged(k, registry.revision_of(k))
        if stale:
            log.info("registry: removed %d keys the previous agent held and this one does not", len(stale))

    def _publish_local(self, client: EtcdClient) -> None:
        """Publish, under our lease, every MAC that sends from our TAP with the IPv4 addresses
        it sends from: the TAP's own and, once containers sit behind it, theirs."""
        cfg = self.cfg
        assert cfg.host_id is not None
        own = {str(cfg.address.ip)} if cfg.address else set()
        addresses: dict[tuple[int, int], set[str]] = {(v, m): set(own) for v, m in self.macs.items()}
        loop = asyncio.get_running_loop()

        async def publish(vni: int, mac: int) -> None:
            try:
                await client.hold(EndpointKey(vni, mac), Endpoint(cfg.host_id, sorted(addresses[vni, mac])))
            except Exception as e:  # etcd away: it stays pending, the next keepalive writes it
                log.warning("registry: could not publish local endpoint %s yet (%s)", mac_to_str(mac),
                            e.__class__.__name__)

        def seen(local: list[tuple[int, int, int]]) -> None:
            for vni, mac, ip in local:
                if self.containers is not None and self.containers.owns(vni, mac):
                    continue  # attach publishes it with its address: that is authoritative
                known = addresses.setdefault((vni, mac), set())
                if ip:
                    known.add(str(ipaddress.IPv4Address(ip)))
                loop.create_task(publish(vni, mac))

        self.core.learn_local = True
        self.dataplane.on_local = seen

    def close(self) -> None:
        for tap in self.taps.values():
            tap.close()
        if self.cfg.bridge:  # a bridge with containers stays: they keep talking locally
            for vni in self.taps:
                bridge.remove_bridge_if_unused(vni)


def run(cfg: AgentConfig) -> None:
    """Run the agent until a signal; AgentError for anything the user must fix."""
    agent = Agent(cfg)
    try:
        uvloop.run(agent.serve())
    finally:
        agent.close()
