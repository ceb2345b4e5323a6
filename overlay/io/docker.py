"""The Docker plugin: libnetwork's remote NetworkDriver and IpamDriver, served by the agent on a
unix socket (``/run/docker/plugins/<name>.sock``), HTTP/1.1 (h11, sans-IO) with JSON in and out.

Every request is typed and judged in overlay.core.docker; this module moves bytes and executes
with the agent's own machinery: addresses are IPAM claims in etcd under the agent's lease,
Join's veth is plugged into the network's bridge (overlay.io.bridge.plug_for_engine) and kept as
an attachment of overlay.io.containers.Containers (so the reaper, the state file, the status,
published ports and DNS names treat it like any other), networks are joined on demand.

    RequestAddress  claim the address (etcd transaction), remembered as a Claim
    CreateEndpoint  the claim's value becomes (host, MAC, docker/<endpoint id>) in one
                    compare-and-swap: what an adopted attachment expects after a restart
    Join            veth (host end on the bridge) -> endpoint published -> attachment saved;
                    a failure undoes what was done
    Leave           the attachment detached (veth, endpoint and address released)
    ReleaseAddress  the claim released (a no-op when Leave released it)

A refusal is ``{"Err": "<one line>"}`` with status 200, as libnetwork's remote client reads
it; an unknown method is 404, a request that is not HTTP, too large (``MAX_BODY``) or too slow
(``READ_TIMEOUT``) closes the connection. The socket is mode 0660, owned by root.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import h11

from overlay.core import docker as core
from overlay.core import ipam
from overlay.core.attach import Attachment, require_registry
from overlay.core.control import DetachRequest, PublishRequest, Refused
from overlay.core.docker import DockerError
from overlay.core.registry import AddressKey, Allocation, NetworkKey
from overlay.core.wire import mac_to_int, mac_to_str
from overlay.io import bridge
from overlay.io.containers import Containers
from overlay.io.etcd import FAILURES as ETCD_ERRORS
from overlay.io.etcd import EtcdClient

log = logging.getLogger("overlay.docker")
MAX_HEAD = 16 * 1024
MAX_BODY = 256 * 1024
READ_TIMEOUT = 10.0
CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
DEFAULT_DIR = "/run/docker/plugins"


class DockerPluginError(RuntimeError):
    """The plugin's socket cannot be served; the message says why."""


Handler = Callable[[object], Awaitable[dict[str, object]]]


class DockerPlugin:
    """The drivers' state on this host and their handlers (one change at a time)."""

    def __init__(
        self,
        client: EtcdClient,
        containers: Containers,
        host_id: str,
        mtu: int,
        state_dir: Path | None,
        join: Callable[[str], Awaitable[object]],
        unused: Callable[[int], Awaitable[object]],
    ) -> None:
        self.client, self.containers, self.host_id, self.mtu = client, containers, host_id, mtu
        self.path = state_dir / f"{host_id}.docker.json" if state_dir is not None else None
        self.join, self.unused = join, unused  # join a network (on demand); leave one no longer used
        self.state = core.DockerState()
        self.lock = asyncio.Lock()

    # --- the methods --------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        async def constant(answer: dict[str, object]) -> dict[str, object]:
            return answer

        def fixed(answer: dict[str, object]) -> Handler:
            return lambda body: constant(answer)

        return {
            "Plugin.Activate": fixed(core.ACTIVATE),
            "NetworkDriver.GetCapabilities": fixed(core.CAPABILITIES),
            "NetworkDriver.CreateNetwork": self.create_network,
            "NetworkDriver.DeleteNetwork": self.delete_network,
            "NetworkDriver.CreateEndpoint": self.create_endpoint,
            "NetworkDriver.EndpointOperInfo": self.endpoint_info,
            "NetworkDriver.DeleteEndpoint": self.delete_endpoint,
            "NetworkDriver.Join": self.join_endpoint,
            "NetworkDriver.Leave": self.leave,
            "NetworkDriver.ProgramExternalConnectivity": self.program,
            "NetworkDriver.RevokeExternalConnectivity": self.revoke,
            "NetworkDriver.DiscoverNew": fixed({}),
            "NetworkDriver.DiscoverDelete": fixed({}),
            "IpamDriver.GetCapabilities": fixed(core.IPAM_CAPABILITIES),
            "IpamDriver.GetDefaultAddressSpaces": fixed(core.ADDRESS_SPACES),
            "IpamDriver.RequestPool": self.request_pool,
            "IpamDriver.ReleasePool": self.release_pool,
            "IpamDriver.RequestAddress": self.request_address,
            "IpamDriver.ReleaseAddress": self.release_address,
        }

    async def request_pool(self, body: object) -> dict[str, object]:
        req = core.PoolRequest.from_json(body)
        return core.pool(req, await self.client.network_definitions())

    async def release_pool(self, body: object) -> dict[str, object]:
        core.PoolIdRequest.from_json(body)
        return {}  # a pool is a subnet: nothing held for it

    async def request_address(self, body: object) -> dict[str, object]:
        req = core.AddressRequest.from_json(body)
        if req.gateway:
            return core.gateway_address(req, await self.client.network_definitions())
        async with self.lock:
            network = self.state.for_pool(req.pool)
            if network is None:
                raise DockerError(f"pool {req.pool} is no Docker network's on this host: create the network first")
            await self._joined(network)
            require_registry(self.client.connected)
            used = ipam.taken(self.containers.registry, network.vni) | core.taken_addresses(self.state, network.vni)
            choice = core.address_choice(req, network, used)
            while True:
                address = core.next_address(choice)
                claim = core.Claim(network.vni, str(address.ip))
                if await self.client.claim(
                    AddressKey(network.vni, address.ip), Allocation(self.host_id, "", claim.owner)
                ):
                    break
                choice.lost(address)  # another host was first: the next one
            self.state.claims.append(claim)
            self._save()
        log.info("docker: address %s claimed on network %s", address, network.name)
        return {"Address": str(address), "Data": {}}

    async def release_address(self, body: object) -> dict[str, object]:
        req = core.ReleaseAddressRequest.from_json(body)
        async with self.lock:
            network = self.state.for_pool(req.pool)
            vnis = [network.vni] if network is not None else sorted({c.vni for c in self.state.claims})
            for claim in [c for c in self.state.claims if c.vni in vnis and c.address == str(req.address)]:
                await self.client.release(AddressKey(claim.vni, ipaddress.IPv4Address(claim.address)))
                self.state.claims.remove(claim)
                log.info("docker: address %s released on network %s", claim.address, claim.vni)
            self._save()
        return {}

    async def create_network(self, body: object) -> dict[str, object]:
        req = core.CreateNetworkRequest.from_json(body)
        async with self.lock:
            for _ in range(2):  # a network another host created meanwhile is read again
                choice = core.resolve_network(req, await self.client.network_definitions(), self.state)
                if choice.create is None or await self.client.create_if_missing(
                    NetworkKey(choice.create.vni), choice.create
                ):
                    break
            else:
                raise DockerError("the network was changed in the registry meanwhile: try again")
            if choice.create is not None:
                log.info("docker: created network %s (VNI %d) in the registry", choice.create.name, choice.create.vni)
            network = choice.network
            await self._joined(network)
            self.state.networks[network.network_id] = network
            self._save()
        log.info("docker: network %s is overlay network %s (VNI %d)", req.network_id[:12], network.name, network.vni)
        return {}

    async def delete_network(self, body: object) -> dict[str, object]:
        req = core.NetworkIdRequest.from_json(body)
        async with self.lock:
            network = self.state.networks.pop(req.network_id, None)
            self._save()
        if network is not None:
            log.info("docker: network %s (overlay network %s) removed", req.network_id[:12], network.name)
            if not any(a.vni == network.vni for a in self.containers.attached.values()):
                await self.unused(network.vni)
        return {}

    async def create_endpoint(self, body: object) -> dict[str, object]:
        req = core.CreateEndpointRequest.from_json(body)
        async with self.lock:
            network = self.state.network(req.network_id)
            await self._joined(network)
            require_registry(self.client.connected)
            registry = self.containers.registry
            in_use = [mac_to_str(k.mac) for k in registry.endpoints(network.vni)]
            in_use += [a.mac for a in self.containers.attached.values() if a.vni == network.vni]
            e = core.endpoint(req, self.state, mac_to_str(bridge.random_mac()), in_use)
            if req.endpoint_id not in self.state.endpoints:
                claim = core.Claim(e.vni, str(ipaddress.IPv4Interface(e.address).ip))
                await self._reassign(claim, Allocation(self.host_id, e.mac, e.attachment_id))
                self.state.endpoints[e.endpoint_id] = e
                self._save()
        return core.endpoint_answer(req, e)

    async def endpoint_info(self, body: object) -> dict[str, object]:
        core.EndpointRequest.from_json(body, "EndpointOperInfo")
        return {"Value": {}}

    async def delete_endpoint(self, body: object) -> dict[str, object]:
        req = core.EndpointRequest.from_json(body, "DeleteEndpoint")
        await self._detach(core.attachment_id(req.endpoint_id))  # Leave never came: nothing stays
        async with self.lock:
            if self.state.endpoints.pop(req.endpoint_id, None) is not None:
                self._save()
        return {}

    async def join_endpoint(self, body: object) -> dict[str, object]:
        req = core.JoinRequest.from_json(body)
        async with self.lock:
            e = self.state.endpoint(req.endpoint_id)
            network = self.state.network(e.network_id)
            if e.network_id != req.network_id:
                raise DockerError(
                    f"endpoint {e.endpoint_id[:12]} is on network {e.network_id[:12]}, not {req.network_id[:12]}"
                )
            await self._joined(network)
            containers = self.containers
            async with containers.lock:
                require_registry(self.client.connected)
                existing = containers.attached.get(e.attachment_id)
                if existing is not None and await asyncio.to_thread(bridge.exists, existing.host_ifname):
                    return core.join_answer(existing)
                a = core.attachment(e, network, req.sandbox, bridge.host_ifname(e.attachment_id), self.mtu, req.name)
                await self._plug(a)
        log.info("docker: joined %s: %s %s on network %s via %s", a.id, a.mac, a.address, a.network, a.host_ifname)
        return core.join_answer(a)

    async def leave(self, body: object) -> dict[str, object]:
        req = core.EndpointRequest.from_json(body, "Leave")
        await self._detach(core.attachment_id(req.endpoint_id))
        return {}

    async def program(self, body: object) -> dict[str, object]:
        req = core.ConnectivityRequest.from_json(body)
        containers = self.containers
        a = containers.attached.get(core.attachment_id(req.endpoint_id))
        if a is None:
            raise DockerError(f"endpoint {req.endpoint_id[:12]} has not joined on this host")
        if req.exposed:
            async with containers.lock:
                exposed = core.with_exposed(a, req.exposed)
                containers.attached[a.id] = exposed
                await self.client.hold(exposed.endpoint_key, exposed.endpoint(self.host_id))
                containers._save()
        done: list[str] = []
        try:
            for spec in req.publish:
                answer = await containers.publish(PublishRequest(a.id, spec))
                shown = answer["published"]
                assert isinstance(shown, dict)
                done.append(f"{shown['host_port']}/{shown['proto']}")
        except BaseException:
            for port in done:
                await containers.unpublish(PublishRequest.from_params({"target": a.id, "spec": port}, unpublish=True))
            raise
        return {}

    async def revoke(self, body: object) -> dict[str, object]:
        req = core.EndpointRequest.from_json(body, "RevokeExternalConnectivity")
        a = self.containers.attached.get(core.attachment_id(req.endpoint_id))
        if a is not None and a.published:
            await self.containers.unpublish(PublishRequest(a.id, None))
        return {}

    # --- execution ----------------------------------------------------------------------------

    async def _joined(self, network: core.DockerNetwork) -> None:
        """This host on ``network`` (joined on demand, again after its last container left)."""
        if network.vni in self.containers.attachments.served:
            return
        async with self.containers.lock:
            await self.join(str(network.vni))

    async def _plug(self, a: Attachment) -> None:
        """Join's plumbing: veth, endpoint, attachment; a failure undoes what was done."""
        containers, key = self.containers, a.endpoint_key
        containers.attachments.attaching.add((a.vni, key.mac))  # its frames are not a new local endpoint
        try:
            await asyncio.to_thread(
                bridge.plug_for_engine, a.host_ifname, a.ifname, bridge.bridge_name(a.vni), mac_to_int(a.mac), a.mtu
            )
            try:
                await self.client.hold(key, a.endpoint(self.host_id))
                containers.attached[a.id] = a
                containers._save()
            except BaseException:
                containers.attached.pop(a.id, None)
                await asyncio.shield(self._undo(a))
                raise
        except bridge.PlumbingError as e:
            raise DockerError(str(e)) from None
        finally:
            containers.attachments.attaching.discard((a.vni, key.mac))

    async def _undo(self, a: Attachment) -> None:
        for step in (
            lambda: asyncio.to_thread(bridge.unplug, a.host_ifname),
            lambda: self.client.release(a.endpoint_key),
        ):
            try:
                await step()
            except Exception as e:
                log.warning("docker: rolling back a join: %s (%s)", e.__class__.__name__, e)
        self.client.forget(a.endpoint_key)

    async def _detach(self, attachment_id: str) -> None:
        if attachment_id in self.containers.attached:
            await self.containers.detach(DetachRequest(id=attachment_id))

    async def _reassign(self, claim: core.Claim, new: Allocation) -> None:
        """The claim's IPAM value becomes ``new`` in one compare-and-swap (ours, under our lease)."""
        client = self.client
        key = AddressKey(claim.vni, ipaddress.IPv4Address(claim.address))
        old = client.held.get(key) or Allocation(self.host_id, "", claim.owner)
        if old == new:
            return
        etcd = await client.connect()
        raw, t = client.schema.key(key).encode(), etcd.transactions
        client.held[key] = new  # first: a keepalive rewriting the claim meanwhile writes the new value
        ok, _ = await etcd.transaction(
            compare=[t.value(raw) == client.schema.encode(old)],
            success=[t.put(raw, client.schema.encode(new), client.lease)],
            failure=[],
        )
        if not ok:
            client.held[key] = old
            raise DockerError(
                f"address {claim.address} is no longer this host's in the registry: start the container again"
            )

    # --- lifecycle ----------------------------------------------------------------------------

    async def adopt(self) -> None:
        """Take back what an earlier run kept: Docker's networks (joined again) and the claims
        not held by an adopted attachment (claimed again, or held if still ours)."""
        if self.path is None or not self.path.exists():
            return
        try:
            self.state = core.DockerState.decode(self.path.read_text())
        except (OSError, ValueError) as e:
            log.warning(
                "docker: state file %s is unreadable (%s); Docker's networks must be created again", self.path, e
            )
            return
        for network in list(self.state.networks.values()):
            try:
                await self._joined(network)
            except Refused as e:
                log.warning("docker: cannot join network %s (VNI %d) again: %s", network.name, network.vni, e)
        by_address = {(e.vni, ipaddress.IPv4Interface(e.address).ip): e for e in self.state.endpoints.values()}
        for claim in list(self.state.claims):
            ip = ipaddress.IPv4Address(claim.address)
            key = AddressKey(claim.vni, ip)
            if key in self.client.held:
                continue  # an adopted attachment's
            ep = by_address.get((claim.vni, ip))
            allocation = (
                Allocation(self.host_id, ep.mac, ep.attachment_id) if ep else Allocation(self.host_id, "", claim.owner)
            )
            if await self.client.claim(key, allocation):
                continue
            if self.containers.registry.get(key) == allocation:
                await self.client.hold(key, allocation)
                continue
            log.warning("docker: address %s of network %d was taken meanwhile: dropped", claim.address, claim.vni)
            self.state.claims.remove(claim)
        self._save()
        log.info("docker: %d networks, %d endpoints, %d addresses taken back", *self.counts())

    def counts(self) -> tuple[int, int, int]:
        s = self.state
        return len(s.networks), len(s.endpoints), len(s.claims)

    def uses(self, vni: int) -> bool:
        return self.state.uses(vni)

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(self.state.encode())
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning(
                "docker: cannot write %s (%s): Docker's networks will not survive a restart", self.path, e.strerror
            )


# --- HTTP over the unix socket ---------------------------------------------------------------------


class _TooLarge(Exception):
    pass


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[h11.Request, bytes] | None:
    """The next request and its body; None when the client closed the connection."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Request):
            request = event
            length = dict(event.headers).get(b"content-length", b"0")
            if length.isdigit() and int(length) > MAX_BODY:  # refused before it is read
                raise _TooLarge
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _TooLarge
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _send(conn: h11.Connection, writer: asyncio.StreamWriter, status: int, answer: object) -> None:
    data = json.dumps(answer).encode()
    headers = [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(data)))]
    writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    writer.write(conn.send(h11.Data(data=data)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")


async def answer(handlers: dict[str, Handler], method: str, target: str, body: bytes) -> tuple[int, dict[str, object]]:
    """(HTTP status, JSON answer) for one request: a handler's answer, or ``{"Err"}``."""
    name = target.split("?")[0].lstrip("/")
    handler = handlers.get(name)
    if handler is None:
        return 404, core.error(f"overlay's Docker plugin has no method {name[:80]!r}")
    if method != "POST":
        return 405, core.error(f"{name} is called with POST, not {method[:10]}")
    try:
        return 200, await handler(core.decode_body(body))
    except (DockerError, Refused) as e:
        log.info("docker: %s refused: %s", name, e)
        return 200, core.error(str(e))
    except ETCD_ERRORS as e:
        return 200, core.error(f"the registry (etcd) did not answer ({e.__class__.__name__}): try again")
    except Exception as e:  # never a traceback to Docker: one line, the details in our log
        log.exception("docker: %s failed", name)
        return 200, core.error(f"overlay's agent failed on {name}: {e.__class__.__name__}: {e} (see its log)")


async def serve(path: Path, handlers: dict[str, Handler]) -> asyncio.AbstractServer:
    """Serve ``handlers`` on the unix socket at ``path`` (mode 0660, root's)."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                try:
                    got = await asyncio.wait_for(_read_request(conn, reader), READ_TIMEOUT)
                except (h11.RemoteProtocolError, _TooLarge) as e:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        too_large = isinstance(e, _TooLarge)
                        message = f"the request is over {MAX_BODY} bytes" if too_large else f"bad HTTP request ({e})"
                        _send(conn, writer, 413 if too_large else 400, core.error(message))
                        await writer.drain()
                    return
                if got is None:
                    return
                request, body = got
                status, result = await answer(handlers, request.method.decode(), request.target.decode(), body)
                _send(conn, writer, status, result)
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (TimeoutError, ConnectionError, h11.LocalProtocolError):
            return
        finally:
            writer.close()

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise DockerPluginError(f"{path} exists and is not a socket: remove it, or choose another plugin name")
            path.unlink()  # left by an agent that died
        server = await asyncio.start_unix_server(on_client, path=str(path))
        os.chmod(path, 0o660)
        if os.geteuid() == 0:
            os.chown(path, 0, 0)
    except OSError as e:
        raise DockerPluginError(f"cannot serve the Docker plugin on {path}: {e.strerror}") from None
    return server


def socket_path(directory: str, name: str) -> Path:
    return Path(directory) / f"{name}.sock"
