"""The registry's etcd client (aetcd): connection, host lease and keepalive, a snapshot, and a
watch that resumes after a disconnect and resyncs after a compaction.

aetcd gives the RPCs; this module adds what an agent needs around them:
- endpoints tried in turn, gRPC keepalive so a frozen etcd is noticed within seconds;
- a lease (default TTL 10 s) refreshed every TTL/3; if it expired meanwhile (etcd was away
  longer than the TTL) a new one is granted and everything held under it written again;
- host registration by compare-and-create, so two agents cannot claim one host id;
- a consistent read of the prefix at a revision, then a watch from revision + 1; after a
  reconnect the watch resumes from the last revision seen + 1, and when that revision was
  compacted meanwhile the client re-reads and the Registry diffs (nothing in the gap is lost).
While etcd is unreachable nothing here stops the data path: the agent forwards with what it
last knew, and this module retries with backoff (0.2 s doubling to 5 s).
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Sequence

import aetcd
import aetcd.exceptions

if TYPE_CHECKING:
    import grpc

from overlay.core.addresses import parse_endpoint
from overlay.core.registry import (
    EVERYTHING,
    AddressKey,
    Deleted,
    Event,
    Host,
    HostKey,
    Key,
    Network,
    NetworkKey,
    Registry,
    Schema,
    Scope,
    Value,
)
from overlay.core.status import Lag

log = logging.getLogger("overlay.etcd")
GRPC_OPTIONS = {
    # Ping an idle connection every 5 s (etcd's --grpc-keepalive-min-time: more often and etcd
    # hangs up with "too_many_pings") and give up 3 s after an unanswered ping: a frozen etcd
    # is noticed within about 8 s.
    "grpc.keepalive_time_ms": 5000,
    "grpc.keepalive_timeout_ms": 3000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    # A snapshot page or a watch response may carry values up to etcd's 1.5 MiB each.
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
}
REQUEST_TIMEOUT = 5
PAGE = 10_000  # keys per range read of a snapshot: etcd counts the whole rest of the range for every page
FEED = 1000  # keys of a page applied at once, before the event loop lets the data path run
SLICE = 0.010  # s of registry work at most before the event loop lets the data path run
FREEZE_EVERY = 5000  # watch events: what they built is frozen out of the cyclic GC (see snapshot)
Range = tuple[bytes, bytes]  # [start, end) of etcd keys


def _prefix_range(prefix: str) -> Range:
    raw = prefix.encode()
    return raw, raw[:-1] + bytes([raw[-1] + 1])


BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0
ERRORS = (aetcd.exceptions.ClientError, asyncio.TimeoutError, OSError)


class EtcdError(RuntimeError):
    """A registry failure the user must fix (a claimed host id, no etcd reachable at start)."""


FAILURES = (*ERRORS, EtcdError)  # etcd away, or refusing (a role revoked): what a registry write may raise


@dataclass(frozen=True)
class Tls:
    """TLS for the etcd connection: a CA to trust, and a client certificate if etcd asks."""

    ca: str
    cert: str | None = None
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        import grpc

        def read(path: str | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise EtcdError(f"etcd TLS {what} {path}: {e.strerror}") from None

        return grpc.ssl_channel_credentials(read(self.ca, "CA"), read(self.key, "key"), read(self.cert, "certificate"))


class SecureClient(aetcd.Client):  # type: ignore[misc]  # aetcd ships no types
    """aetcd.Client over a TLS channel: aetcd itself only opens insecure ones. The same
    stubs as aetcd's connect, on a channel made with our credentials."""

    def __init__(self, *args: object, tls: Tls, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._credentials = tls.credentials()

    async def connect(self) -> None:
        from aetcd import rpc, watcher

        if self._connected.is_set():
            return
        self.channel = rpc.secure_channel(
            f"{self._host}:{self._port}", self._credentials, options=list(self._options.items())
        )
        if self._username is not None and self._password is not None:
            self.auth_stub = rpc.AuthStub(self.channel)
            response = await self.auth_stub.Authenticate(
                rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout
            )
            self.metadata = (("token", response.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
        self._connected.set()


async def open_client(
    url: str, prefix: str, user: str | None = None, password: str | None = None, tls: Tls | None = None
) -> aetcd.Client:
    """A client connected to the etcd at ``url``, over TLS when ``tls`` is given, that has made
    one round trip (a read of ``<prefix>/``: a prefix-only role may read it), so a frozen or
    refusing etcd shows here and not at the first real request. On any failure (also a
    cancellation, e.g. by a timeout around this call) the client is closed and the error
    raised as it came; callers say what it means to their user. The one way to connect to etcd:
    the agent's EtcdClient and the operator commands both use it."""
    host, port = parse_endpoint(url)
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address: gRPC's target is [V6]:PORT
    common = {"username": user, "password": password, "timeout": REQUEST_TIMEOUT, "options": GRPC_OPTIONS}
    client: aetcd.Client = (
        SecureClient(host, port, tls=tls, **common) if tls is not None else aetcd.Client(host, port, **common)
    )
    try:
        await client.connect()
        await client.get((prefix + "/").encode())
    except BaseException:
        try:
            await asyncio.shield(client.close())
        except BaseException:
            pass
        raise
    return client


@dataclass
class EtcdClient:
    endpoints: list[str]
    registry: Registry
    on_events: Callable[[list[Event]], None]
    ttl: int = 10
    user: str | None = None
    password: str | None = None
    tls: Tls | None = None
    held: dict[Key, Value] = field(default_factory=dict)  # written under our lease, rewritten on renewal
    connected: bool = False
    resumed: bool = False  # register() took over the previous agent's lease
    reconnects: int = 0
    resyncs: int = 0
    _client: aetcd.Client | None = None
    _lease: int | None = None
    _next: int = 0
    _pending: set[Key] = field(default_factory=set)  # held keys not yet written under the current lease
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    scope: Scope = EVERYTHING  # what we follow: hosts/ and the served networks
    events: int = 0  # watch events received
    applied_revision: int = 0
    resync_s: float = 0.0  # the last snapshot's duration, reading and applying
    resync_keys: int = 0
    lag: Lag = field(default_factory=Lag)  # an event's arrival to its application
    _watched_from: dict[Range, int] = field(default_factory=dict)  # range -> last revision seen in it
    _watches: dict[Range, tuple[Any, asyncio.Task[None]]] = field(default_factory=dict)
    _queue: asyncio.Queue[Any] | None = None
    _watch_client: aetcd.Client | None = None
    _history: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=4096))
    _waiters: list[tuple[int, int, asyncio.Future[None]]] = field(default_factory=list)
    _sequence: int = 0
    _unfrozen: int = 0  # watch events since the last gc.freeze()

    def __post_init__(self) -> None:
        self.registry.scope = self.scope

    @property
    def schema(self) -> Schema:
        return self.registry.schema

    # --- connection -----------------------------------------------------------------------------

    async def connect(self) -> aetcd.Client:
        """A connected client, trying the endpoints in turn; raises the last error. One at a
        time: the watch and the keepalive share it."""
        async with self._lock:
            return await self._connect()

    async def _connect(self) -> aetcd.Client:
        if self._client is not None:
            return self._client
        last: Exception | None = None
        for _ in range(len(self.endpoints)):
            url = self.endpoints[self._next % len(self.endpoints)]
            self._next += 1
            try:
                client = await open_client(url, self.schema.prefix, self.user, self.password, self.tls)
            except ERRORS as e:
                if "authentication failed" in str(e) or isinstance(e, aetcd.exceptions.UnauthenticatedError):
                    raise EtcdError("etcd refused the user name or password (--etcd-user, --etcd-password)") from None
                if "permission denied" in str(e):
                    raise EtcdError(
                        f"etcd denied access under {self.schema.prefix}/: grant this user's role "
                        f"readwrite on the prefix {self.schema.prefix}/ "
                        f"('etcdctl role grant-permission ROLE --prefix=true readwrite "
                        f"{self.schema.prefix}/')"
                    ) from None
                last = e
                continue
            self._client = client
            self.connected = True
            return client
        raise last or EtcdError("no etcd endpoint given")

    async def _drop(self, stale: aetcd.Client | None = None) -> None:
        """Close the connection (only if it is still ``stale``'s, when given: another task
        may have reconnected meanwhile)."""
        if stale is not None and stale is not self._client:
            return
        client, self._client = self._client, None
        self.connected = False
        if client is not None:
            try:
                await client.close()
            except Exception:
                pass

    async def close(self, revoke: bool = True) -> None:
        """Revoke our lease (our keys vanish at once) and disconnect. ``revoke=False`` leaves
        the lease to live out its TTL, for a successor to resume (``register(resume=...)``)."""
        if revoke and self._client is not None and self._lease is not None:
            try:
                await asyncio.wait_for(self._client.revoke_lease(self._lease), 2)
            except Exception:
                pass
        await self._drop()

    # --- lease and what we hold under it ----------------------------------------------------------

    async def register(self, host_id: str, host: Host, wait_for_old: float, resume: int | None = None) -> None:
        """Claim hosts/<host_id> under a fresh lease by compare-and-create. If another agent holds
        it, wait up to ``wait_for_old`` seconds (the key of a dead agent goes with its lease),
        then raise EtcdError. ``resume``: the lease of this host's previous agent, left alive on
        purpose (a restart with containers attached); if it still lives it is taken over, so the
        host's keys never leave the registry."""
        client = await self.connect()
        key = self.schema.key(HostKey(host_id)).encode()
        if resume is not None and await self._resume(client, key, host_id, host, resume):
            return
        lease = await client.lease(self.ttl)
        self._lease = lease.id
        deadline = asyncio.get_running_loop().time() + wait_for_old
        while True:
            ok, _ = await client.transaction(
                compare=[client.transactions.create(key) == 0],
                success=[client.transactions.put(key, self.schema.encode(host), lease.id)],
                failure=[],
            )
            if ok:
                self.held[HostKey(host_id)] = host
                return
            if asyncio.get_running_loop().time() > deadline:
                await client.revoke_lease(lease.id)
                raise EtcdError(
                    f"host id {host_id} is registered by another running agent "
                    f"({self.schema.key(HostKey(host_id))} is kept alive): give this host another --host-id"
                )
            await asyncio.sleep(0.5)
            await client.refresh_lease(lease.id)  # ours must outlive the wait

    async def _resume(self, client: aetcd.Client, key: bytes, host_id: str, host: Host, lease: int) -> bool:
        try:
            alive = getattr(await client.refresh_lease(lease), "TTL", 0) > 0
        except ERRORS:
            alive = False
        current = await client.get(key) if alive else None
        if not alive or (current is not None and current.lease != lease):
            return False
        self._lease = lease
        self.resumed = True
        await client.put(key, self.schema.encode(host), lease)
        self.held[HostKey(host_id)] = host
        log.info("etcd: resumed the lease of this host's previous agent (%x): its keys stayed in place", lease)
        return True

    @property
    def lease(self) -> int | None:
        return self._lease

    async def hold(self, key: Key, value: Value) -> None:
        """Write ``key`` under our lease, and again whenever the lease is renewed, after a failed
        write (at the next successful keepalive) or after someone deleted it."""
        self.held[key] = value
        self._pending.add(key)
        await self._write_pending()

    async def _write_pending(self) -> None:
        client = await self.connect()
        for key in list(self._pending):
            value = self.held.get(key)
            if isinstance(key, AddressKey) and value is not None:
                await self._rewrite_claim(client, key, value)
            elif value is not None:
                await client.put(self.schema.key(key).encode(), self.schema.encode(value), self._lease)
            self._pending.discard(key)

    async def _rewrite_claim(self, client: aetcd.Client, key: AddressKey, value: Value) -> None:
        """Put a claimed address back under our lease, unless another host took it while our
        lease was gone (then it is theirs: we stop holding it and say so)."""
        raw, encoded = self.schema.key(key).encode(), self.schema.encode(value)
        t = client.transactions
        ok = await self._create(client, key, value, self._lease)
        if not ok:
            ok, _ = await client.transaction(
                compare=[t.value(raw) == encoded], success=[t.put(raw, encoded, self._lease)], failure=[]
            )
        if not ok:
            self.held.pop(key, None)
            log.warning(
                "etcd: address %s of network %d was taken by another host while our lease was gone; "
                "the container holding it here must be attached again",
                key.address,
                key.vni,
            )

    async def claim(self, key: Key, value: Value) -> bool:
        """Create ``key`` under our lease if nobody has it (an address for IPAM); True if it is
        ours now. Held from then on like ``hold``."""
        return not await self.claim_all([(key, value)])

    async def claim_all(self, items: Sequence[tuple[Key, Value]]) -> list[Key]:
        """Create every key of ``items`` under our lease in one transaction, if none of them
        exists (a container's IPv4 and IPv6 addresses, for IPAM): all or nothing. Returns the
        keys someone else has: none, and every key is ours now, held from then on like ``hold``;
        some, and nothing was written."""
        client = await self.connect()
        t = client.transactions
        raws = [self.schema.key(key).encode() for key, _ in items]
        ok, responses = await client.transaction(
            compare=[t.create(raw) == 0 for raw in raws],
            success=[t.put(raw, self.schema.encode(value), self._lease) for raw, (_, value) in zip(raws, items)],
            failure=[t.get(raw) for raw in raws],  # which exist: read at the transaction's revision
        )
        if ok:
            self.held.update(items)
            return []
        return [key for (key, _), found in zip(items, responses) if found] or [key for key, _ in items]

    async def release(self, key: Key) -> None:
        """Delete ``key`` if it still holds our value (another host may own it by now: a moved
        endpoint, a reclaimed address), then stop holding it. A failed delete raises and the
        key stays held, so the caller can try again."""
        value = self.held.pop(key, None)  # first: the watch must not see our delete and write it back
        self._pending.discard(key)
        if value is None:
            return
        try:
            client = await self.connect()
            got = await client.get(self.schema.key(key).encode())
            if got is not None and self._still_ours(key, value, got.value):
                await self.delete_if_unchanged(key, got.mod_revision)
        except BaseException:
            self.held.setdefault(key, value)  # still ours in etcd: a later release tries again
            raise

    def _still_ours(self, key: Key, value: Value, raw: bytes) -> bool:
        """Whether etcd's value at ``key`` is this host's: the same owning host for endpoints and
        addresses (our own later write may differ in detail), the same value otherwise."""
        try:
            current = self.schema.decode(key, raw)
        except ValueError:
            return False
        mine = getattr(value, "host", None)
        return current.host == mine if mine is not None else current == value  # type: ignore[union-attr]

    async def delete_if_unchanged(self, key: Key, mod_revision: int) -> bool:
        """Delete ``key`` unless it was written since ``mod_revision``; True if deleted."""
        client = await self.connect()
        raw = self.schema.key(key).encode()
        t = client.transactions
        ok, _ = await client.transaction(compare=[t.mod(raw) == mod_revision], success=[t.delete(raw)], failure=[])
        return bool(ok)

    def forget(self, key: Key) -> None:
        """Stop holding ``key`` without touching etcd (it goes with our lease, or was never written)."""
        self.held.pop(key, None)
        self._pending.discard(key)

    async def create_if_missing(self, key: Key, value: Value) -> bool:
        """Compare-and-create without a lease (e.g. a network's definition); True if we made it."""
        return await self._create(await self.connect(), key, value, None)

    async def _create(self, client: aetcd.Client, key: Key, value: Value, lease: int | None) -> bool:
        """Put ``key`` (under ``lease``, if given) only if it does not exist; True if we made it."""
        raw = self.schema.key(key).encode()
        t = client.transactions
        ok, _ = await client.transaction(
            compare=[t.create(raw) == 0], success=[t.put(raw, self.schema.encode(value), lease)], failure=[]
        )
        return bool(ok)

    async def keepalive(self) -> None:
        """Refresh the lease every TTL/3; after an outage longer than the TTL, start over."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            client = None
            try:
                client = await self.connect()
                response = await client.refresh_lease(self._lease)
                if getattr(response, "TTL", 1) <= 0:
                    raise aetcd.exceptions.ClientError("lease expired")
                if self._pending:
                    await self._write_pending()
            except ERRORS as e:
                if "expired" in str(e) or "not found" in str(e).lower():
                    await self._renew()
                else:
                    log.warning("etcd: lease keepalive failed (%s); retrying", e.__class__.__name__)
                    await self._drop(client)

    async def _renew(self) -> None:
        """A new lease, and everything we hold written under it again (what fails now stays
        pending for the next keepalive)."""
        client = None
        try:
            client = await self.connect()
            lease = await client.lease(self.ttl)
            self._lease = lease.id
            self._pending.update(self.held)
            await self._write_pending()
            log.info("etcd: lease renewed after an outage; %d keys written again", len(self.held))
        except ERRORS as e:
            log.warning("etcd: cannot renew the lease yet (%s)", e.__class__.__name__)
            await self._drop(client)

    # --- snapshot and watch ---------------------------------------------------------------------

    def ranges(self, scope: Scope | None = None) -> list[Range]:
        """The key ranges ``scope`` covers: ``hosts/``, and per network ``networks/<vni>`` with
        everything under ``networks/<vni>/`` (the range ends at ``networks/<vni>0``: no other
        VNI falls in it), or all of ``networks/`` when the scope has every network."""
        scope = scope if scope is not None else self.scope
        p = self.schema.prefix
        out: list[Range] = []
        if scope.hosts:
            out.append(_prefix_range(f"{p}/hosts/"))
        if scope.vnis is None:
            out.append(_prefix_range(f"{p}/networks/"))
        else:
            out += [(f"{p}/networks/{v}".encode(), f"{p}/networks/{v}0".encode()) for v in sorted(scope.vnis)]
        return out

    async def snapshot(self, scope: Scope | None = None) -> None:
        """Read the ranges of ``scope`` (default: all we follow) at one revision, in pages, into
        the registry, handing the events over page by page (the data path runs in between);
        what the read lacks is deleted at the end. The watches go on from that revision."""
        scope = scope if scope is not None else self.scope
        client = await self.connect()
        started = time.monotonic()
        resync = self.registry.resync(scope)
        revision, keys = 0, 0
        ranges = self.ranges(scope)
        for start, end in ranges:
            async for header_revision, kvs in self._pages(client, start, end, revision):
                revision = revision or header_revision
                keys += len(kvs)
                for i in range(0, len(kvs), FEED):  # applied in slices: the data path runs in between
                    self._hand_over(resync.feed(kvs[i : i + FEED]))
                    gc.freeze()  # long-lived from here on (see below); O(1)
                    await asyncio.sleep(0)
        self._hand_over(resync.finish(revision))
        for r in ranges:
            self._watched_from[r] = revision
        self._applied(revision, time.monotonic(), observe=False)
        self.resync_s, self.resync_keys = round(time.monotonic() - started, 3), keys
        # What the snapshot built lives long: keep the cyclic collector from walking it again. A
        # full collection over a registry of 300k keys would stall the loop (and the data path
        # on it) for a second; our objects hold no cycles, reference counting frees them.
        gc.freeze()

    async def _pages(
        self, client: aetcd.Client, start: bytes, end: bytes, revision: int
    ) -> AsyncIterator[tuple[int, list[tuple[str, bytes, int]]]]:
        """(revision, kvs) pages of [start, end) read at ``revision`` (0: the newest, and every
        later page at the revision of the first). A page too large for one gRPC message (values
        of up to etcd's 1.5 MiB each) is read again in smaller pages."""
        from aetcd import rpc

        limit, key = PAGE, start
        while True:
            request = rpc.RangeRequest(key=key, range_end=end, limit=limit, revision=revision)
            try:
                response = await client.kvstub.Range(request, timeout=REQUEST_TIMEOUT, metadata=client.metadata)
            except rpc.AioRpcError as e:
                if e.code() == rpc.StatusCode.RESOURCE_EXHAUSTED and limit > 1:
                    limit = max(1, limit // 10)
                    continue
                aetcd.exceptions._handle_exception(e)
                raise
            revision = revision or response.header.revision
            kvs = [(kv.key.decode(errors="replace"), kv.value, kv.mod_revision) for kv in response.kvs]
            yield revision, kvs
            if not response.more or not response.kvs:
                return
            key, limit = response.kvs[-1].key + b"\0", PAGE

    async def network_definitions(self, vni: int | None = None) -> dict[int, Network]:
        """The networks defined in etcd (``networks/<vni>`` values), also those we do not follow:
        to join one by name or VNI. With ``vni`` one key is read; without, every key under
        ``networks/`` is listed (keys only: a join by name costs one pass over the key space,
        not a read of every value). Values that do not decode are left out (logged)."""
        from aetcd import rpc

        client = await self.connect()
        p = self.schema.prefix
        if vni is not None:
            keys = [f"{p}/networks/{vni}".encode()]
        else:
            keys, key, end = [], f"{p}/networks/".encode(), f"{p}/networks0".encode()
            while True:
                request = rpc.RangeRequest(key=key, range_end=end, limit=PAGE, keys_only=True)
                response = await client.kvstub.Range(request, timeout=REQUEST_TIMEOUT, metadata=client.metadata)
                keys += [
                    kv.key
                    for kv in response.kvs
                    if isinstance(self.schema.parse_key(kv.key.decode(errors="replace")), NetworkKey)
                ]
                if not response.more or not response.kvs:
                    break
                key = response.kvs[-1].key + b"\0"
        out: dict[int, Network] = {}
        for raw in keys:
            got = await client.get(raw)
            k = self.schema.parse_key(raw.decode(errors="replace"))
            if got is None or not isinstance(k, NetworkKey):
                continue
            try:
                network = self.schema.decode(k, got.value)
            except ValueError as e:
                log.warning("etcd: ignoring %s: %s", raw.decode(errors="replace"), e)
                continue
            assert isinstance(network, Network)
            out[k.vni] = network
        return out

    def _hand_over(self, events: list[Event]) -> None:
        self._report()
        if events:
            self.on_events(events)
            self._restore_held(events)

    async def watch(self) -> None:
        """Follow our ranges forever (a watch each, on one gRPC stream): resume after errors from
        where each range was, resync after a compaction. Events are applied in slices of at
        most SLICE seconds, between which the loop lets the data path and control socket run."""
        backoff = BACKOFF_MIN
        need_snapshot = False
        while True:
            client = None
            try:
                client = await self.connect()
                if need_snapshot:
                    await self.snapshot()
                    self.resyncs += 1
                    need_snapshot = False
                self._queue, self._watch_client = asyncio.Queue(), client
                for r in self.ranges():
                    await self._open(client, r)
                backoff = BACKOFF_MIN
                queue = self._queue
                while True:
                    item = await queue.get()
                    deadline = time.monotonic() + SLICE
                    while True:
                        if isinstance(item, BaseException):
                            raise item
                        self._event(*item)
                        if queue.empty() or time.monotonic() > deadline:
                            break
                        item = queue.get_nowait()
                    await asyncio.sleep(0)  # the data path and the control socket run between slices
            except aetcd.exceptions.RevisionCompactedError:
                log.info("etcd: a revision we watch from was compacted; reading everything again")
                need_snapshot = True
            except ERRORS as e:
                if self.connected:
                    log.warning(
                        "etcd: connection lost (%s); forwarding with what we know, reconnecting", e.__class__.__name__
                    )
                    self.reconnects += 1
                await self._drop(client)
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, BACKOFF_MAX)
                need_snapshot = need_snapshot or not self.registry.revision
            finally:
                await self._close_watches()

    async def _open(self, client: aetcd.Client, r: Range) -> None:
        """Watch range ``r`` from where we are in it; a range never read is read first."""
        if r not in self._watched_from:
            await self.snapshot(self._scope_of(r))
        stream = await client.watch(r[0], range_end=r[1], start_revision=self._watched_from[r] + 1, fragment=True)
        queue = self._queue
        assert queue is not None

        async def pump() -> None:
            try:
                async for ev in stream:
                    queue.put_nowait((r, ev, time.monotonic()))
                queue.put_nowait(aetcd.exceptions.ClientError("watch ended"))
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                queue.put_nowait(e)

        self._watches[r] = (stream, asyncio.get_running_loop().create_task(pump()))

    async def _close_watches(self, only: Range | None = None) -> None:
        for r in [only] if only is not None else list(self._watches):
            watch = self._watches.pop(r, None)
            if watch is None:
                continue
            stream, task = watch
            task.cancel()
            try:
                await asyncio.wait_for(stream.cancel(), 2)
            except BaseException:
                pass  # the connection is going anyway
        if only is None:
            self._queue = self._watch_client = None

    def _scope_of(self, r: Range) -> Scope:
        hosts = _prefix_range(f"{self.schema.prefix}/hosts/")
        if r == hosts:
            return Scope(hosts=True, vnis=frozenset())
        vni = r[0].decode()[len(self.schema.prefix) + len("/networks/") :]
        return Scope(hosts=False, vnis=frozenset({int(vni)}) if vni else None)

    def _event(self, r: Range, ev: aetcd.rtypes.Event, arrived: float) -> None:
        """One watch event: into the registry, its typed events handed over, the lag observed."""
        self.events += 1
        kv = ev.kv
        revision = kv.mod_revision
        if revision > self._watched_from.get(r, 0):
            self._watched_from[r] = revision
        key = kv.key.decode(errors="replace")
        if ev.kind == "PUT":
            events = self.registry.put(key, kv.value, revision)
        else:
            events = self.registry.delete(key, revision)
        self._hand_over(events)
        self._applied(revision, arrived)
        self._unfrozen += 1
        if self._unfrozen >= FREEZE_EVERY:  # a bulk import grows the registry by watch too (see snapshot)
            gc.freeze()
            self._unfrozen = 0

    def _applied(self, revision: int, arrived: float, observe: bool = True) -> None:
        if observe:
            self.lag.observe(time.monotonic() - arrived)
        if revision > self.applied_revision:
            self.applied_revision = revision
            self._history.append((revision, time.time()))
            while self._waiters and self._waiters[0][0] <= revision:
                _, _, waiter = heapq.heappop(self._waiters)
                if not waiter.done():
                    waiter.set_result(None)

    async def applied(self, revision: int, timeout: float) -> tuple[int, float | None]:
        """Wait until an event of ``revision`` or later is in the forwarding table: (the newest
        revision applied, the wall-clock time the first one at or after ``revision`` was);
        TimeoutError after ``timeout`` s. The time is None if that was long ago (forgotten)."""
        if revision > self.applied_revision:
            waiter = asyncio.get_running_loop().create_future()
            self._sequence += 1
            heapq.heappush(self._waiters, (revision, self._sequence, waiter))
            await asyncio.wait_for(waiter, timeout)
        for r, at in self._history:
            if r >= revision:
                return self.applied_revision, at
        return self.applied_revision, None

    async def follow(self, vni: int) -> None:
        """Follow network ``vni`` too: read its range, then watch it (joining a network)."""
        if self.scope.vnis is None or vni in self.scope.vnis:
            return  # followed already (or every network is)
        self.scope = self.registry.scope = Scope(self.scope.hosts, self.scope.vnis | {vni})
        (r,) = self.ranges(Scope(hosts=False, vnis=frozenset({vni})))
        await self.snapshot(self._scope_of(r))
        if self._watch_client is not None and self._queue is not None:
            await self._open(self._watch_client, r)

    async def leave(self, vni: int) -> None:
        """Stop following network ``vni``: its watch ends and the registry forgets it."""
        if self.scope.vnis is None or vni not in self.scope.vnis:
            return
        self.scope = self.registry.scope = Scope(self.scope.hosts, self.scope.vnis - {vni})
        scope = Scope(hosts=False, vnis=frozenset({vni}))
        (r,) = self.ranges(scope)
        await self._close_watches(r)
        self._watched_from.pop(r, None)
        self.registry.drop(scope)

    def _restore_held(self, events: list[Event]) -> None:
        """Our own keys (host, memberships, local endpoints) are ours while we live: if
        someone deletes one, write it back (logged: an operator should stop the agent)."""
        gone = [ev.key for ev in events if isinstance(ev, Deleted) and ev.key in self.held]
        if gone:
            log.warning("etcd: %d of this agent's keys were deleted by someone else; writing them back", len(gone))
            self._pending.update(gone)
            asyncio.get_running_loop().create_task(self._write_pending_quietly())

    async def _write_pending_quietly(self) -> None:
        try:
            await self._write_pending()
        except ERRORS:
            pass  # still pending: the next keepalive writes them

    def _report(self) -> None:
        for key, why in self.registry.rejected:
            log.warning("etcd: ignoring %s: %s", key, why)
        self.registry.rejected.clear()


async def retry(what: str, action: Callable[[], Awaitable[None]], give_up_after: float) -> None:
    """Run ``action`` until it succeeds; EtcdError naming ``what`` after ``give_up_after`` s."""
    deadline = asyncio.get_running_loop().time() + give_up_after
    delay = BACKOFF_MIN
    while True:
        try:
            await action()
            return
        except ERRORS as e:
            if asyncio.get_running_loop().time() > deadline:
                raise EtcdError(f"{what}: no etcd answered within {give_up_after:.0f} s ({e})") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
