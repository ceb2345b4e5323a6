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
import time
from pathlib import Path

import msgspec
import uvloop

from overlay.core.addresses import IPAddress, format_address, parse_endpoint
from overlay.core.attach import resolve_network
from overlay.core.config import AgentConfig, tap_names
from overlay.core.control import (
    AppliedRequest,
    AttachRequest,
    CheckRequest,
    DetachRequest,
    NetRequest,
    PublishRequest,
    Refused,
)
from overlay.core.dns import Names, upstreams
from overlay.core.fdb import ForwardingTable, Vtep
from overlay.core.keyring import Encrypted, Keyring, PeerKey
from overlay.core.keys import encode, fingerprint, public_of
from overlay.core.nat import Guard
from overlay.core.publishing import LeaseSweep, LocalEndpoints
from overlay.core.registry import (
    Deleted,
    Endpoint,
    EndpointKey,
    Event,
    Host,
    HostKey,
    Key,
    Member,
    MemberKey,
    Network,
    NetworkKey,
    Registry,
    Schema,
    Scope,
)
from overlay.core.seal import OVERHEAD as SEAL_OVERHEAD
from overlay.core.sessions import Limits, Sessions
from overlay.core.status import AgentInfo, NetworkInfo, RegistryStatus, Status
from overlay.core.status import Dns as DnsStatus
from overlay.core.topology import Topology
from overlay.core.wire import mac_to_str
from overlay.fastpath.api import ForwardingCore
from overlay.fastpath.sinks import CoreSink
from overlay.io import bridge, control, metrics
from overlay.io.containers import Containers, read_state, state_path
from overlay.io.dataplane import Dataplane, DataplaneError
from overlay.io.dns import DnsServer
from overlay.io.docker import DockerPlugin, DockerPluginError
from overlay.io.docker import serve as serve_docker
from overlay.io.docker import socket_path as docker_socket
from overlay.io.egress import Egress
from overlay.io.encryption import Encryption, cpu_has_aes
from overlay.io.etcd import FAILURES as ETCD_ERRORS
from overlay.io.etcd import EtcdClient, EtcdError, Tls, retry
from overlay.io.keys import KeyFileError, generate_private, load_or_create
from overlay.io.keys import write as write_key
from overlay.io.prober import ProbeError, Prober
from overlay.io.supervisor import Supervisor
from overlay.io.systemd import sd_notify
from overlay.io.tap import NotLocal, Tap, TapError, default_overlay_mtu

log = logging.getLogger("overlay.agent")


class AgentError(RuntimeError):
    """The agent cannot start; the message says why and how to fix it."""


class AgentUsageError(AgentError):
    """The agent cannot start because of a flag the user got wrong (``--local`` not an
    address of this host): the CLI exits 2, as for any bad flag."""


class Agent:
    """Everything one agent holds. Built synchronously (netlink via pyroute2 runs its own event
    loop, so devices and sockets are set up before uvloop starts), then served, then closed."""

    def __init__(self, cfg: AgentConfig, tun_device: str = "/dev/net/tun") -> None:
        self.cfg = cfg
        # A host that can encrypt (etcd mode, where any network may be switched to encrypted,
        # or --encrypt) has a static key; its default MTU leaves room for the 32 bytes of sealing.
        self.private_key: bytes | None = None
        if cfg.etcd or cfg.encrypt:
            try:
                self.private_key = load_or_create(cfg.key_path)
            except KeyFileError as e:
                raise AgentUsageError(str(e)) from None
        room = SEAL_OVERHEAD if self.private_key is not None else 0
        try:
            fits = default_overlay_mtu(*cfg.locals) - room  # the underlay's MTU less VXLAN's and sealing's
            self.mtu = cfg.mtu if cfg.mtu is not None else fits
            if cfg.mtu is not None and room and cfg.mtu > fits:
                log.warning(
                    "--mtu %d leaves no room for the %d bytes of sealing on this underlay: on encrypted "
                    "networks frames over %d bytes are dropped (too_big); the default is %d",
                    cfg.mtu,
                    room,
                    fits,
                    fits,
                )
        except TapError as e:
            raise AgentError(str(e)) from None
        except NotLocal as e:
            raise AgentUsageError(str(e)) from None
        self.core = ForwardingCore(allow_vlan=cfg.allow_vlan, source_check=cfg.source_check)
        self.table = ForwardingTable(CoreSink(self.core), ageing=cfg.ageing, max_per_vni=cfg.max_per_vni)
        self.taps: dict[int, Tap] = {}  # VNI -> its TAP
        self.macs: dict[int, int] = {}  # VNI -> its TAP's MAC (its bridge's, with a bridge)
        self.pinned = frozenset(tap_names(cfg))  # named at start: they stay without containers
        self.local: LocalEndpoints | None = None
        self.egress: Egress | None = None
        self.membership = asyncio.Lock()  # one join or leave at a time
        self.names: Names | None = None  # the DNS responders' view of the registry (etcd mode)
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
            self.dataplane = Dataplane(
                self.core,
                self.table,
                {v: t.fd for v, t in self.taps.items()},
                cfg.local,
                cfg.port,
                self.mtu,
                local6=cfg.local6,
            )
        except (TapError, DataplaneError, bridge.PlumbingError, NotLocal) as e:
            self.close()
            raise (AgentUsageError if isinstance(e, NotLocal) else AgentError)(str(e)) from None
        self.keyring: Keyring | None = None
        if self.private_key is not None:
            r = cfg.rekey_after
            limits = Limits(
                rekey_after_time=r,
                responder_rekey_after_time=r * 1.25,
                reject_after_time=r * 1.5,
                rekey_timeout=min(5.0, r / 3),
            )
            sessions = Sessions(
                self.private_key,
                wall_ns=time.time_ns(),
                now=time.monotonic(),
                rng=os.urandom,
                aes=cpu_has_aes(),
                limits=limits,
            )
            self.dataplane.encryption = Encryption(self.core, sessions, self.dataplane.by_family)
            if not cfg.etcd:
                self.dataplane.encryption.apply(
                    [PeerKey(Vtep(ip, cfg.port), key) for ip, key in cfg.peer_keys]
                    + ([Encrypted(cfg.vni, True)] if cfg.encrypt else [])
                )
        self.mac = self.macs[cfg.vni]
        self.started = time.monotonic()
        self.etcd: EtcdClient | None = None
        self.containers: Containers | None = None
        self.prober: Prober | None = None
        self.topology: Topology | None = None
        self.host: Host | None = None  # what hosts/<host-id> holds (etcd mode)
        self.docker: DockerPlugin | None = None  # Docker's network and IPAM drivers (--docker-plugin)
        self.docker_server: asyncio.AbstractServer | None = None
        self.supervisor: Supervisor  # made by serve(), with the loop that runs the tasks

    def status(self) -> Status:
        """The agent's status, typed (overlay.core.status): what the metrics read on each scrape."""
        cfg = self.cfg
        registry = None
        if self.etcd is not None:
            assert cfg.host_id is not None  # etcd mode: config.build required it
            etcd, r = self.etcd, self.etcd.registry
            registry = RegistryStatus(
                endpoints=list(cfg.etcd),
                host_id=cfg.host_id,
                connected=etcd.connected,
                revision=r.revision,
                reconnects=etcd.reconnects,
                resyncs=etcd.resyncs,
                applied_revision=etcd.applied_revision,
                events=etcd.events,
                out_of_scope=r.out_of_scope,
                refused=r.refused,
                too_large=r.too_large,
                keys=len(r),
                watches=[start.decode(errors="replace") for start, _ in etcd.ranges()],
                resync_s=etcd.resync_s,
                resync_keys=etcd.resync_keys,
                apply_lag=etcd.lag.status(),
            )
        agent = AgentInfo(
            tap=cfg.tap,
            vni=cfg.vni,
            local=str(cfg.local),
            port=cfg.port,
            peers=[str(p) for p in cfg.peers],
            mtu=self.mtu,
            mac=mac_to_str(self.mac),
            address=str(cfg.address) if cfg.address else None,
            source_check=cfg.source_check,
            uptime_s=round(time.monotonic() - self.started, 1),
            networks=[self._network_info(v, t) for v, t in self.taps.items()],
            local6=str(cfg.local6) if cfg.local6 else None,
            unreachable=self.topology.unreachable() if self.topology is not None else [],
        )
        encryption = None
        if self.dataplane.encryption is not None:
            served = self.core.vni_encrypted
            encryption = self.dataplane.encryption.status(
                [v for v in self.taps if served(v)], self.keyring.without_key() if self.keyring is not None else []
            )
        return Status(
            agent=agent,
            registry=registry,
            egress=self.egress.status() if self.egress is not None else None,
            dns=self._dns_status(),
            encryption=encryption,
            dataplane=self.dataplane.status(),
            attachments=self.containers.list() if self.containers is not None else [],
            probes=self.prober.status() if self.prober is not None else {},
            probe_counters=self.prober.counters() if self.prober is not None else None,
        )

    def _network_info(self, vni: int, tap: Tap) -> NetworkInfo:
        network = self.etcd.registry.networks().get(vni) if self.etcd is not None else None
        return NetworkInfo(
            vni=vni,
            tap=tap.name,
            mac=mac_to_str(self.macs[vni]),
            bridge=bridge.bridge_name(vni) if self.cfg.bridge else None,
            name=network.name if network is not None else None,
            gateway=network.gateway if network is not None else None,
            gateway6=network.gateway6 if network is not None else None,
            nat=bool(network is not None and network.masquerades),
            pinned=vni in self.pinned,
        )

    def _dns_status(self) -> DnsStatus | None:
        egress = self.egress
        if egress is None or egress.dns is None:
            return None
        return DnsStatus(
            listening=[a for v in sorted(egress.listening) for a in egress.listening[v]],
            upstreams=[str(u) for u in egress.dns.upstreams],
            counters=egress.dns.status(),
        )

    def status_json(self) -> dict[str, object]:
        """The status in its JSON form (README.md): what the control socket answers."""
        return self.status().to_json()

    def _control(self) -> dict[str, control.Handler]:
        """The control socket's commands: status and fdb always; attach, detach, check and
        attachments with the registry (addresses and endpoints live there), their parameters
        typed (overlay.core.control) before the containers see them."""

        def containers() -> Containers:  # first: without the registry, no request is even read
            if self.containers is None:
                raise control.Refused(
                    "attaching containers needs the registry: run the agent in etcd mode "
                    "(--etcd, --host-id, --network) with its bridge (the default there)",
                    "invalid",
                )
            return self.containers

        return {
            "status": lambda req: self.status_json(),
            "fdb": lambda req: self.dataplane.fdb(),
            "attach": lambda req: containers().attach(AttachRequest.from_params(req)),
            "detach": lambda req: containers().detach(DetachRequest.from_params(req)),
            "check": lambda req: containers().check(CheckRequest.from_params(req)),
            "attachments": lambda req: containers().list(),
            "applied": lambda req: self._applied(AppliedRequest.from_params(req)),
            "rotate_key": lambda req: self._rotate_key(),
            "publish": lambda req: containers().publish(PublishRequest.from_params(req)),
            "unpublish": lambda req: containers().unpublish(PublishRequest.from_params(req, unpublish=True)),
            "net_join": lambda req: self._net_join(containers(), NetRequest.from_params(req)),
            "net_leave": lambda req: self._net_leave(containers(), NetRequest.from_params(req)),
        }

    async def _net_join(self, containers: Containers, req: NetRequest) -> dict[str, object]:
        """The control command ``net_join`` (overlay net join)."""
        async with containers.lock:
            vni, network, joined = await self.join(req.net)
        return {"vni": vni, "name": network.name or str(vni), "joined": joined}

    async def _net_leave(self, containers: Containers, req: NetRequest) -> dict[str, object]:
        """The control command ``net_leave`` (overlay net leave): refused while containers are
        attached to it, or for a network named with --network at start."""
        async with containers.lock:
            served = (
                {v: self.etcd.registry.networks().get(v) or Network(v, str(v)) for v in self.taps} if self.etcd else {}
            )
            try:
                vni, network = resolve_network(req.net, {v: n for v, n in served.items()}, served)
            except Refused:
                return {"vni": int(req.net) if req.net.isdigit() else None, "name": req.net, "left": False}
            if vni in self.pinned:
                raise Refused(
                    f"network {network.name or vni} (VNI {vni}) was named with --network at start: it stays "
                    f"joined (restart the agent without it to leave)",
                    "invalid",
                )
            users = [a.id for a in containers.attached.values() if a.vni == vni]
            if users:
                raise Refused(
                    f"network {network.name or vni} (VNI {vni}) has {len(users)} container(s) attached here "
                    f"({', '.join(sorted(users)[:3])}{', ...' if len(users) > 3 else ''}): detach them first",
                    "invalid",
                )
            await self.leave(vni)
        return {"vni": vni, "name": network.name or str(vni), "left": True}

    async def _rotate_key(self) -> dict[str, object]:
        """The control command ``rotate_key`` (overlay key rotate): a new static key, written,
        published and used for every handshake from now on; nothing in flight is lost
        (core/sessions.py rules 6 and 7)."""
        encryption = self.dataplane.encryption
        if encryption is None or self.private_key is None:
            raise Refused("this agent has no key: encryption is for etcd mode or --encrypt", "invalid")
        private = generate_private()
        try:
            write_key(self.cfg.key_path, private, replace=True)
        except KeyFileError as e:
            raise Refused(f"the new key could not be written, nothing changed: {e}", "invalid") from None
        encryption.sessions.rotate(private, time.monotonic())
        self.private_key = private
        public = public_of(private)
        if self.etcd is not None and self.host is not None:
            self.host = msgspec.structs.replace(self.host, pubkey=encode(public))
            try:
                await self.etcd.hold(HostKey(self.cfg.host_id or ""), self.host)
            except ETCD_ERRORS as e:  # kept pending: written at the next successful keepalive
                log.warning("key rotated, its publication waits for etcd (%s)", e.__class__.__name__)
        log.info("key rotated: now %s (%s)", fingerprint(public), self.cfg.key_path)
        return {"key_file": self.cfg.key_path, "pubkey": encode(public), "fingerprint": fingerprint(public)}

    async def _applied(self, req: AppliedRequest) -> dict[str, object]:
        """The control command ``applied``: wait until ``req.revision`` is in the forwarding table."""
        if self.etcd is None:
            raise Refused("there is no registry in static mode: nothing is applied from etcd", "invalid")
        try:
            revision, at = await self.etcd.applied(req.revision, req.timeout)
        except TimeoutError:
            raise Refused(
                f"revision {req.revision} was not applied within {req.timeout:g} s "
                f"(applied: {self.etcd.applied_revision}; connected to etcd: {self.etcd.connected})",
                "etcd",
            ) from None
        return {"revision": revision, "applied_at": at}

    async def serve(self) -> None:
        """Forward until SIGINT or SIGTERM."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        try:
            # Named after the first TAP: `overlay status --tap <it>` (or no --tap) finds the agent.
            server = await control.serve(
                self.taps[cfg.vni].name,
                self._control(),
                privileged=frozenset(
                    {"attach", "detach", "check", "rotate_key", "publish", "unpublish", "net_join", "net_leave"}
                ),
            )
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
        self.supervisor = Supervisor(fatal)
        metrics_server: asyncio.AbstractServer | None = None
        try:
            # Metrics and probes first: the probe port published in the registry must be bound.
            metrics_server = await self._serve_metrics()
            await self._start_probes()
            if cfg.etcd:  # peers first: frames the TAP sends meanwhile wait in its queue
                try:
                    await self._join_registry()
                except ETCD_ERRORS as e:
                    raise AgentError(
                        str(e) if isinstance(e, EtcdError) else f"joining the registry failed: {e}"
                    ) from None
            self.dataplane.start(loop)
            peers = ", ".join(str(p) for p in cfg.peers) or "none"
            log.info(
                "ready: tap %s (%s, mtu %d%s) vni %s vtep %s %s",
                ", ".join(t.name for t in self.taps.values()),
                ", ".join(map(mac_to_str, self.macs.values())),
                self.mtu,
                f", {cfg.address}" if cfg.address else "",
                ", ".join(map(str, self.taps)),
                " ".join(format_address(str(a), cfg.port) for a in cfg.locals),
                f"registry etcd as host {cfg.host_id}" if cfg.etcd else f"peers {peers}",
            )
            sd_notify("READY=1")
            await stop.wait()
            log.info("stopping: removing tap %s", ", ".join(t.name for t in self.taps.values()))
            sd_notify("STOPPING=1")
        finally:
            server.close()  # first: no attach may start while we stop
            if self.docker_server is not None:
                self.docker_server.close()
                try:
                    docker_socket(cfg.docker_plugin_dir, cfg.docker_plugin or "").unlink()
                except OSError:
                    pass
            await self.supervisor.stop()
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
                    log.info(
                        "containers stay attached: the lease lives on for %d s for the next agent to resume",
                        cfg.lease_ttl,
                    )
                if self.egress is not None:
                    await self.egress.close(keep)
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
                six = cfg.local.version == 6  # the probe socket's family: a dual-stack peer is probed on it
                out = {}
                for host, h in self.etcd.registry.hosts().items():  # checked values: no parsing needed
                    address = h.address6 if six and h.address6 else h.address
                    if host != cfg.host_id and h.probe_port and (":" in address) == six:
                        out[host] = (address, h.probe_port)
                return out
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

    async def _join_registry(self) -> None:
        """etcd mode: register this host, join the network, publish the TAP's endpoint, read the
        registry, and follow it (the watch, keepalive and reaper run as supervised tasks)."""
        cfg = self.cfg
        assert cfg.host_id is not None
        registry = Registry(Schema(cfg.prefix))
        topology = self.topology = Topology(registry, self.table, cfg.host_id, cfg.underlay)
        keyring = self.keyring = Keyring(cfg.host_id, cfg.underlay)
        encryption = self.dataplane.encryption
        tls = Tls(cfg.etcd_ca, cfg.etcd_cert, cfg.etcd_key) if cfg.etcd_ca else None

        names = self.names = Names()

        def apply(events: list[Event]) -> None:
            topology.apply(events, time.monotonic())
            if encryption is not None:
                encryption.apply(keyring.apply(events))
            names.apply(events)
            if self.egress is not None and any(
                isinstance(ev.key, NetworkKey) and ev.key.vni in self.taps for ev in events
            ):
                self.supervisor.spawn(self._egress_quietly(), "gateway and rules")

        self.etcd = client = EtcdClient(
            list(cfg.etcd),
            registry,
            apply,
            ttl=cfg.lease_ttl,
            user=cfg.etcd_user,
            password=cfg.etcd_password,
            tls=tls,
            scope=Scope(hosts=True, vnis=frozenset(self.macs)),  # hosts/ and our networks: nothing else
        )
        await retry("connecting to etcd", client.connect, 30)
        resume = None
        if cfg.bridge:
            try:
                resume = read_state(state_path(Path(cfg.state_dir), cfg.host_id))[0]
            except (OSError, ValueError):
                resume = None  # Containers.adopt says what is wrong with the file
        probe_port = self.prober.address[1] if self.prober is not None else None  # only if we answer probes
        self.host = Host(
            str(cfg.local),
            cfg.port,
            probe_port,
            address6=str(cfg.local6) if cfg.local6 else None,
            underlay_family=4 if cfg.local6 and cfg.underlay.prefer == 4 else None,
            pubkey=encode(public_of(self.private_key)) if self.private_key is not None else None,
        )
        await client.register(
            cfg.host_id,
            self.host,
            wait_for_old=cfg.lease_ttl + 2,
            resume=resume,
        )
        # Kept alive from now: reading a large registry takes longer than the lease's TTL.
        self.supervisor.spawn(client.keepalive(), "registry keepalive")
        subnet = str(cfg.address.network) if cfg.address else None
        local = self.local = LocalEndpoints(cfg.host_id, self.macs, cfg.address.ip if cfg.address else None)
        for vni in self.macs:
            if await client.create_if_missing(NetworkKey(vni), Network(vni, f"net{vni}", subnet, self.mtu)):
                log.info("created network %d in etcd (it was not defined)", vni)
            await client.hold(MemberKey(vni, cfg.host_id), Member())
        for key, endpoint in local.initial():
            await client.hold(key, endpoint)
        self._publish_local(client, local)
        for vni in self.macs:  # served first: the snapshot's pages are applied as they come
            topology.serve(vni, time.monotonic())
        await client.snapshot()
        log.info(
            "registry: etcd %s, host %s, %d hosts, networks %s",
            ", ".join(cfg.etcd),
            cfg.host_id,
            len(registry.hosts()),
            ", ".join(f"{v} ({registry.count(v)} endpoints)" for v in self.macs),
        )
        self.supervisor.spawn(client.watch(), "registry watch")
        if cfg.bridge:
            self.containers = Containers(
                client,
                registry,
                cfg.host_id,
                self.macs,  # live: networks joined on demand are served too
                self.mtu,
                Path(cfg.state_dir),
                self.core.local_forget,
                join=self.join,
                emptied=self._emptied,
                egress=self._egress,
            )
            self.egress = Egress(
                self.table,
                lambda: {v: (registry.networks().get(v), t.name) for v, t in self.taps.items()},
                lambda: self.containers.attachments.publications() if self.containers is not None else [],
                self.mtu,
                DnsServer(names, _upstreams(cfg.resolv_conf)),
                guards=self._guards(),
                underlay=list(cfg.locals),
                forwarding_file=Path(cfg.state_dir) / f"{cfg.host_id}.forwarding",
            )
            await self.containers.adopt()
            if cfg.docker_plugin is not None:
                await self._serve_docker(client, self.containers)
            await self._egress_quietly()
            if client.resumed:
                await self._sweep(client, registry)
            self.supervisor.spawn(self.containers.reap(), "container reaper")

    # --- networks on demand ---------------------------------------------------------------------

    async def join(self, net: str) -> tuple[int, Network, bool]:
        """Join network ``net`` (a name or a VNI) at run time: its TAP, bridge (and gateway),
        membership and flood list, its part of the registry followed; (vni, definition, whether
        it was joined now). Refused (one line) when it is not in the registry; a failure half-way
        undoes what was done. The other networks' traffic is not touched."""
        client = self.etcd
        if client is None or self.topology is None or self.local is None or not self.cfg.bridge:
            raise Refused("joining networks needs etcd mode with bridges", "invalid")
        async with self.membership:
            try:
                defined = await client.network_definitions(int(net) if net.isdigit() else None)
            except ETCD_ERRORS as e:
                raise Refused(
                    f"the registry (etcd) did not answer ({e.__class__.__name__}): try again", "etcd"
                ) from None
            known = defined | {v: client.registry.networks().get(v) or Network(v, str(v)) for v in self.taps}
            vni, network = resolve_network(net, known, known)
            if vni in self.taps:
                return vni, network, False
            if vni not in defined:
                raise Refused(f"network {net} is not in the registry: create it with 'overlay net create'", "network")
            name = f"{self.cfg.tap}-{vni}"
            name = name if len(name) <= 15 else f"ovt{vni}"
            tap: Tap | None = None
            done: list[str] = []
            try:
                tap = await asyncio.to_thread(Tap.open, name)
                mac = await asyncio.to_thread(self._plumb, vni, tap)
                self.table.add_vni(vni)
                self.taps[vni], self.macs[vni] = tap, mac
                self.dataplane.add_tap(vni, tap.fd)
                done.append("tap")
                self.topology.serve(vni, time.monotonic())
                done.append("follow")  # first: a follow that fails half-way is undone too
                await client.follow(vni)
                assert self.cfg.host_id is not None
                await client.hold(MemberKey(vni, self.cfg.host_id), Member())
                key, endpoint = self.local.add(vni, mac)
                await client.hold(key, endpoint)
            except (TapError, bridge.PlumbingError) as e:
                await self._unjoin(vni, tap, done)
                raise Refused(f"cannot join network {network.name or vni} (VNI {vni}): {e}", "network") from None
            except ETCD_ERRORS as e:
                await self._unjoin(vni, tap, done)
                raise Refused(
                    f"the registry (etcd) did not answer ({e.__class__.__name__}): try again", "etcd"
                ) from None
            except BaseException:
                await self._unjoin(vni, tap, done)
                raise
        log.info("joined network %s (VNI %d) on demand: tap %s", network.name or vni, vni, name)
        await self._egress_quietly()
        return vni, network, True

    async def _serve_docker(self, client: EtcdClient, containers: Containers) -> None:
        """--docker-plugin: take back Docker's networks and claims, then serve the drivers."""
        cfg = self.cfg
        assert cfg.host_id is not None and cfg.docker_plugin is not None

        async def unused(vni: int) -> None:  # a Docker network removed: leave unless still used
            async with containers.lock:
                if not any(a.vni == vni for a in containers.attached.values()):
                    await self._emptied(vni)

        plugin = self.docker = DockerPlugin(
            client, containers, cfg.host_id, self.mtu, Path(cfg.state_dir), self.join, unused
        )
        await plugin.adopt()
        path = docker_socket(cfg.docker_plugin_dir, cfg.docker_plugin)
        try:
            self.docker_server = await serve_docker(path, plugin.handlers())
        except DockerPluginError as e:
            raise AgentError(str(e)) from None
        log.info("docker: serving the network and IPAM drivers %r on %s", cfg.docker_plugin, path)

    def _guards(self) -> list[Guard]:
        """What containers must never reach through the host: every host's VXLAN and probe
        ports, and the etcd endpoints (core/nat.py Guard)."""
        out = [Guard("udp", self.cfg.port)]
        if self.prober is not None:
            out.append(Guard("udp", self.prober.address[1]))
        for endpoint in self.cfg.etcd:
            host, port = parse_endpoint(endpoint)
            try:
                out.append(Guard("tcp", port, ipaddress.ip_address(host)))
            except ValueError:
                out.append(Guard("tcp", port))  # a name: the port everywhere
        return out

    def _plumb(self, vni: int, tap: Tap) -> int:
        """A joined network's TAP into its bridge (made if missing); the bridge's MAC."""
        bridge.quiet_port(tap.name)
        tap.configure(self.mtu, None, None)
        return bridge.ensure_bridge(vni, tap.name, self.mtu, None, None)

    async def _unjoin(self, vni: int, tap: Tap | None, done: list[str]) -> None:
        """Undo a join (or do a leave): everything ``join`` made, newest first."""
        client = self.etcd
        assert client is not None and self.topology is not None and self.local is not None
        assert self.cfg.host_id is not None
        if "tap" in done:
            self.dataplane.remove_tap(vni)  # first: no frame read from it may publish an endpoint again
        keys: list[Key] = [MemberKey(vni, self.cfg.host_id), *self.local.remove(vni)]
        for key in keys:
            try:
                await client.release(key)
            except ETCD_ERRORS as e:
                client.forget(key)  # under our lease: it goes with it at the latest
                log.warning("registry: could not release %s (%s)", key, e.__class__.__name__)
        if "follow" in done:
            if self.names is not None:  # its names go with it (leaving drops keys without events)
                registry = client.registry
                gone: list[Event] = [Deleted(k, v) for k, v in registry.endpoints(vni).items()]
                network = registry.networks().get(vni)
                self.names.apply(gone + ([Deleted(NetworkKey(vni), network)] if network is not None else []))
            await client.leave(vni)
        self.topology.unserve(vni)
        self.table.remove_vni(vni)  # the fast path forgets the network (and its TAP) first ...
        if "tap" in done:
            self.taps.pop(vni, None)
            self.macs.pop(vni, None)
        if tap is not None:
            tap.close()  # ... then the TAP goes
        await asyncio.to_thread(bridge.remove_bridge_if_unused, vni)
        await self._egress_quietly()  # its gateway, DNS and rules go (and a retried join plumbs them anew)

    async def leave(self, vni: int) -> None:
        """Leave network ``vni`` (joined on demand, no container left on it)."""
        async with self.membership:
            tap = self.taps.get(vni)
            if tap is None:
                return
            await self._unjoin(vni, tap, ["tap", "follow"])
        log.info("left network %d", vni)

    async def _emptied(self, vni: int) -> None:
        """A network's last container here left: leave it unless it was named at start."""
        if vni not in self.pinned and vni in self.taps and not (self.docker is not None and self.docker.uses(vni)):
            await self.leave(vni)  # a Docker network on it keeps it joined

    async def _egress(self) -> None:
        if self.egress is not None:
            await self.egress.apply()

    async def _egress_quietly(self) -> None:
        """Apply gateways and rules after a registry or membership change; a failure is logged
        (it is retried with the next change)."""
        try:
            await self._egress()
        except Refused as e:
            log.warning("%s", e)
        except Exception as e:  # plumbing or sockets: one network's gateway must not stop the agent
            log.warning(
                "gateways and rules not fully applied (%s: %s); the next change tries again", e.__class__.__name__, e
            )

    async def _sweep(self, client: EtcdClient, registry: Registry) -> None:
        """After resuming the previous agent's lease: delete what it held that we do not
        (core.publishing.LeaseSweep says which keys)."""
        assert self.cfg.host_id is not None
        stale = LeaseSweep(self.cfg.host_id).leftovers(registry, client.held)
        for key, revision in stale:
            await client.delete_if_unchanged(key, revision)
        if stale:
            log.info("registry: removed %d keys the previous agent held and this one does not", len(stale))

    def _publish_local(self, client: EtcdClient, local: LocalEndpoints) -> None:
        """Publish, under our lease, every MAC that sends from our TAPs with the IPv4 addresses
        it sends from (core.publishing.LocalEndpoints decides what; a supervised task writes)."""

        async def publish(key: EndpointKey, endpoint: Endpoint) -> None:
            try:
                await client.hold(key, endpoint)
            except ETCD_ERRORS as e:  # etcd away: it stays pending, the next keepalive writes it
                log.warning(
                    "registry: could not publish local endpoint %s yet (%s)", mac_to_str(key.mac), e.__class__.__name__
                )

        def owned(vni: int, mac: int) -> bool:
            return self.containers is not None and self.containers.owns(vni, mac)

        def seen(reports: list[tuple[int, int, IPAddress | None]]) -> None:
            for key, endpoint in local.seen(reports, owned):
                self.supervisor.spawn(publish(key, endpoint), "local endpoint publisher")

        self.core.learn_local = True
        self.dataplane.on_local = seen

    def close(self) -> None:
        for tap in self.taps.values():
            tap.close()
        if self.cfg.bridge:  # a bridge with containers stays: they keep talking locally
            for vni in self.taps:
                bridge.remove_bridge_if_unused(vni)


def _upstreams(path: str) -> list[IPAddress]:
    """The host's resolvers (loopback ones left out: they cannot serve a container; behind
    systemd-resolved's stub, the servers it uses)."""
    found: list[IPAddress] = []
    for candidate in (path, "/run/systemd/resolve/resolv.conf"):
        try:
            with open(candidate) as f:
                found = list(upstreams(f.read()))
        except OSError as e:
            if candidate == path:
                log.warning("cannot read %s (%s): names outside the overlay are refused", path, e.strerror)
            continue
        if found:
            break
    return found


def run(cfg: AgentConfig) -> None:
    """Run the agent until a signal; AgentError for anything the user must fix."""
    agent = Agent(cfg)
    try:
        uvloop.run(agent.serve())
    finally:
        agent.close()
