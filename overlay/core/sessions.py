"""Sessions of encrypted networks: when to handshake with which peer, and which keys the fast
path holds. Pure (sans-IO, as aioquic and h11): no sockets, no clock, no randomness of its own.
The shell feeds it handshake datagrams (``receive``), the fast path's signals (``want``,
``confirmed``, the per-key send counters in ``tick``) and the time (``now``, monotonic seconds,
on every call), and carries out what it asks: ``datagrams_to_send`` (handshake messages, to a
peer's VTEP) and ``key_changes`` (what the fast path's session table must hold, in order).

The handshake is overlay/core/handshake.py (Noise IK). A peer is a VTEP (``fdb.Vtep``) with a
static public key (``set_peer``); one session per pair of hosts, whatever the VNIs.

Key changes (the fast path's session table, nothing else changes it):
  ``InstallRx(index, peer, key, cipher)``  accept data with receiver index ``index`` (ours) from
                                           ``peer``, opened with ``key``;
  ``RemoveRx(index)``;
  ``SetTx(peer, index, key, cipher)``      seal data to ``peer`` with ``key``, header index =
                                           the remote side's index; ``keepalive``: send an
                                           empty data message now (we just completed as the
                                           initiator: it confirms the session to the responder);
  ``ClearTx(peer)``                        send nothing to ``peer`` (data for it -> ``want``).

Per peer, three session slots (so at most 3 rx installed per peer): ``current`` (the tx
session, SetTx done), ``previous`` (the one before, rx kept for packets in flight), ``next``
(one the peer initiated that we answered, rx installed, no tx until confirmed), plus at most
one handshake of ours in flight (``pending``: an index reserved, nothing installed).

Transitions (t is the clock below; "drop S" = RemoveRx(S), and ClearTx first if S is current):
1. ``want(peer)`` (data for a peer without tx key): for a peer whose key is not known yet, the
   want is remembered (bounded; only our own fast path calls want) and ``set_peer`` initiates
   at once when the key comes; otherwise initiate unless there is a current session,
   or a pending initiation younger than rekey_timeout (5 s), or a next younger than
   rekey_timeout (its confirmation is likely on the way). Initiate = new local index (random
   32-bit from rng, not 0, unique among installed and pending indices), new ephemeral key,
   timestamp = wall_ns + elapsed ns (strictly increasing), send INITIATION; this replaces any
   pending one (whose late response is then rejected).
2. Valid RESPONSE to our pending one -> new session S (we are its initiator): drop previous;
   previous = current; current = S; InstallRx(S) then SetTx(S, keepalive). next is kept.
3. Valid INITIATION from the peer -> if we have a pending initiation to it too (crossing) and
   our static public key is greater (as bytes), ignore it (its timestamp is still recorded;
   counted ``crossed``) and send ours again at once: the peer, with the smaller key, answers
   ours (the first one may have reached it before it knew our key, and gone unanswered). Otherwise abandon our
   pending one (if any) and answer: new session S (the peer is its initiator): drop next;
   next = S; InstallRx(S); send RESPONSE. No SetTx yet: until the peer's first data on S
   arrives, the current session (if any) keeps sending, so a lost response strands nothing.
4. ``confirmed(index)`` of next (its first authenticated data) -> if next is newer than current
   (or there is none): drop previous; previous = current; current = next; SetTx(next).
   Else (we completed a newer one of ours meanwhile): drop previous; previous = next.
   ``confirmed`` of any other index changes nothing.
5. ``tick``: (a) every session reject_after_time (180 s) old is dropped (counted ``expired``);
   a peer idle past that has no session until the next ``want``. (b) Rekey: no pending, no
   next younger than rekey_timeout, and current is rekey_after_time (120 s) old if we are its
   initiator, responder_rekey_after_time (150 s) if we are its responder, and was used (its
   send counter moved since the last tick), or it sent rekey_after_messages (2**60) -> initiate
   (counted ``rekeys``). (c) A pending initiation unanswered for rekey_timeout is sent again
   (fresh), until rekey_attempt_time (90 s) after the first of the series; then given up.
6. ``remove_peer`` drops all the peer's sessions and its pending initiation. ``set_peer`` with
   a changed key (a host rotating its key, or the registry naming another one) starts a
   handshake to the new key at once and keeps the sessions made with the old one while it
   runs, so a rotation loses no traffic; once a session with the new key is current they go
   their usual way, and if none is within rekey_timeout they are dropped (a key the host does
   not hold gets nothing through after that). The change forgets the peer's last timestamp.
7. ``rotate(private)``: this host's own key changes (``overlay key rotate``). New handshakes
   use the new key; initiations made to the old one are still answered for
   reject_after_time (peers learn the new key from the registry meanwhile); sessions stay.

Acceptance of handshake messages, in order (each failure is counted, answered never):
- Only messages of type 1 or 2 and exactly their size (else ``rejected``).
- A source address that is no peer's, or a response to no initiation of ours: ``rejected``,
  before anything else (no bucket, no crypto).
- Rate limit per source IP address of a peer: a token bucket (``rate`` 20/s, ``burst`` 40) in a
  table of at most ``buckets`` (4096) entries, least recently used evicted; over it ->
  ``limited``, and no crypto at all. The buckets (one per peer address) are the only state an
  unauthenticated message can create.
- INITIATION: the source address must be a known peer's VTEP address (ports may differ), mac1
  and Noise must check out, the static key inside must be that of a peer at the source address
  (else ``rejected``: unknown key, wrong address, forgery), and the timestamp greater than the
  last one accepted from that peer (else ``replayed_initiations``). A host whose key is not
  known gets no answer at all.
- RESPONSE: its receiver index must be a pending initiation of ours, from that peer's address,
  mac1 and Noise must check out and the cipher must be one we offered (else ``rejected``).
- Data cipher: the responder picks AES-256-GCM if both sides offer it (``aes=True``: bit 0),
  else ChaCha20-Poly1305 (every host offers it).

Time: ``now`` may jump. The clock used for every rule (t) advances by ``now`` minus the last
``now`` when that is positive and stands still otherwise, so ``now`` going back can neither
crash anything nor make a session immortal, and a jump forward expires what it passes.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Union

from overlay.core import handshake
from overlay.core.addresses import IPAddress
from overlay.core.fdb import Vtep
from overlay.core.keys import fingerprint

_U32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Limits:
    """The timers and limits of sessions (WireGuard's values where it has one)."""

    rekey_after_time: float = 120.0  # the initiator of the current session rekeys it then
    responder_rekey_after_time: float = 150.0  # the responder, if the initiator did not
    reject_after_time: float = 180.0  # a session is removed then
    rekey_after_messages: int = 2**60
    rekey_timeout: float = 5.0  # an unanswered initiation is sent again after this
    rekey_attempt_time: float = 90.0  # and given up after this
    rate: float = 20.0  # handshake messages per second per source address
    burst: float = 40.0
    buckets: int = 4096  # source addresses tracked by the rate limiter


@dataclass(frozen=True, slots=True)
class InstallRx:
    index: int  # ours: the receiver index of data to us
    peer: Vtep
    key: bytes = field(repr=False)
    cipher: int


@dataclass(frozen=True, slots=True)
class RemoveRx:
    index: int


@dataclass(frozen=True, slots=True)
class SetTx:
    peer: Vtep
    index: int  # the remote side's index: the receiver index in our data headers
    key: bytes = field(repr=False)
    cipher: int
    keepalive: bool = False  # send an empty data message at once (confirms the session)


@dataclass(frozen=True, slots=True)
class ClearTx:
    peer: Vtep


KeyChange = Union[InstallRx, RemoveRx, SetTx, ClearTx]
State = Literal["none", "handshaking", "established"]


@dataclass
class Counters:
    handshakes_sent: int = 0  # initiations and responses
    initiations_received: int = 0  # initiations past the size check and the rate limiter
    responses_received: int = 0  # responses past the size check and the rate limiter
    completed: int = 0  # sessions made (as initiator or responder)
    rejected: int = 0  # malformed, not authenticated, unknown key, wrong source, unknown index
    limited: int = 0  # over the rate limit: dropped before any crypto
    replayed_initiations: int = 0  # authenticated, but not newer than the last one accepted
    rekeys: int = 0  # initiations because the current session was old or much used
    expired: int = 0  # sessions removed at reject_after_time
    crossed: int = 0  # initiations ignored because ours crossed them and our key is greater


@dataclass(frozen=True, slots=True)
class PeerSession:
    """One peer's sessions, for ``overlay status``."""

    peer: Vtep
    fingerprint: str  # keys.fingerprint of its static key
    state: State
    age_s: float | None  # of the current session
    rekeys: int
    handshakes_sent: int
    handshakes_received: int  # authenticated initiations and responses
    tx_index: int | None  # the remote index we send with


@dataclass
class _Session:
    index: int  # ours
    remote: int  # theirs
    keys: handshake.Keys
    cipher: int
    created: float
    initiator: bool  # we initiated it


@dataclass
class _Pending:
    initiator: handshake.Initiator
    sent_at: float
    first_at: float  # the first initiation of this series of attempts


@dataclass
class _Peer:
    vtep: Vtep
    public: bytes
    last_timestamp: bytes = b""
    current: _Session | None = None
    previous: _Session | None = None
    next: _Session | None = None
    pending: _Pending | None = None
    sent_seen: int = 0  # the send counter of current at the last tick
    key_changed_at: float | None = None  # set_peer changed the key: old sessions kept until replaced or rekey_timeout
    rekeys: int = 0
    handshakes_sent: int = 0
    handshakes_received: int = 0


def _source_ip(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # from a dual-stack socket
    return ip


class Sessions:
    """All of one host's sessions with its peers; the module docstring has the rules."""

    def __init__(
        self,
        static_private: bytes,
        *,
        wall_ns: int,
        now: float,
        rng: Callable[[int], bytes],
        aes: bool = True,
        limits: Limits = Limits(),
    ) -> None:
        self._identity = handshake.Identity(static_private)
        self._old_identity: handshake.Identity | None = None  # after rotate: still answered until _old_until
        self._old_until = 0.0
        self._rng = rng
        self._aes = aes
        self.limits = limits
        self.counters = Counters()
        self._ciphers = handshake.CAN_CHACHA | (handshake.CAN_AES if aes else 0)
        self._wall_ns = wall_ns
        self._last_now = now
        self._t = 0.0  # the clock of every rule: seconds since construction, never backwards
        self._last_stamp = -1  # ns of the last timestamp sent
        self._peers: dict[Vtep, _Peer] = {}
        self._by_ip: dict[IPAddress, list[Vtep]] = {}
        self._rx: dict[int, Vtep] = {}  # installed local index -> peer
        self._pending: dict[int, Vtep] = {}  # local index of a pending initiation -> peer
        self._unknown_wants: dict[Vtep, float] = {}  # VTEPs our fast path had data for before their key
        self._buckets: OrderedDict[IPAddress, tuple[float, float]] = OrderedDict()  # ip -> (tokens, at)
        self._out: list[tuple[bytes, Vtep]] = []
        self._changes: list[KeyChange] = []

    @property
    def public_key(self) -> bytes:
        return self._identity.public

    # --- peers ------------------------------------------------------------------------------

    def set_peer(self, peer: Vtep, public_key: bytes, now: float) -> None:
        """Add ``peer`` with its static key, or change its key (rule 6: a handshake with the new
        key at once, the old sessions kept until it works or rekey_timeout passes)."""
        if len(public_key) != handshake.KEY_LEN:
            raise ValueError(f"a public key is {handshake.KEY_LEN} bytes, not {len(public_key)}")
        self._advance(now)
        p = self._peers.get(peer)
        if p is not None:
            if p.public == public_key:
                return
            t = self._t
            p.public, p.last_timestamp = bytes(public_key), b""
            self._abandon(p)
            self._drop(p, p.next)  # not confirmed yet: made with the old key, never to be current
            if p.current is None and p.previous is None:
                return  # nothing to keep: the next want handshakes with the new key
            p.key_changed_at = t
            self._initiate(p, t, first_at=t)
            return
        self._peers[peer] = _Peer(peer, bytes(public_key))
        self._by_ip.setdefault(peer.ip, []).append(peer)
        wanted = self._unknown_wants.pop(peer, None)
        if wanted is not None and self._t - wanted < self.limits.rekey_attempt_time:
            self._initiate(self._peers[peer], self._t, first_at=self._t)  # traffic waited for its key

    def remove_peer(self, peer: Vtep, now: float) -> None:
        self._advance(now)
        p = self._peers.pop(peer, None)
        if p is None:
            return
        self._forget(p)
        same_ip = self._by_ip[peer.ip]
        same_ip.remove(peer)
        if not same_ip:
            del self._by_ip[peer.ip]

    def peers(self) -> list[Vtep]:
        return list(self._peers)

    def rotate(self, static_private: bytes, now: float) -> None:
        """This host's key becomes ``static_private`` (rule 7)."""
        t = self._advance(now)
        self._old_identity, self._old_until = self._identity, t + self.limits.reject_after_time
        self._identity = handshake.Identity(static_private)

    # --- events -----------------------------------------------------------------------------

    def want(self, peer: Vtep, now: float) -> None:
        """The fast path has data for ``peer`` and no tx key for it."""
        t = self._advance(now)
        p = self._peers.get(peer)
        if p is None:  # no key known yet (the registry is still coming): handshake when it is
            self._unknown_wants.pop(peer, None)
            self._unknown_wants[peer] = t
            while len(self._unknown_wants) > self.limits.buckets:
                del self._unknown_wants[next(iter(self._unknown_wants))]
            return
        self._expire(p, t)
        if p.current is not None:
            return
        if p.pending is not None and t - p.pending.sent_at < self.limits.rekey_timeout:
            return
        if p.next is not None and t - p.next.created < self.limits.rekey_timeout:
            return
        self._initiate(p, t, first_at=p.pending.first_at if p.pending is not None else t)  # one series

    def receive(self, data: bytes, source: tuple[IPAddress, int], now: float) -> None:
        """A handshake datagram from ``source`` (never raises on its content)."""
        t = self._advance(now)
        kind = handshake.message_type(data)
        if kind is None:
            self.counters.rejected += 1
            return
        ip = _source_ip(source[0])
        if ip not in self._by_ip or (
            kind == handshake.RESPONSE and handshake.response_receiver(data) not in self._pending
        ):
            self.counters.rejected += 1  # no peer there, or no initiation of ours: no bucket, no crypto
            return
        if not self._allow(ip, t):
            self.counters.limited += 1
            return
        if kind == handshake.INITIATION:
            self.counters.initiations_received += 1
            self._on_initiation(bytes(data), ip, t)
        else:
            self.counters.responses_received += 1
            self._on_response(bytes(data), ip, t)

    def confirmed(self, index: int, now: float) -> None:
        """The fast path opened the first data on rx ``index``."""
        t = self._advance(now)
        vtep = self._rx.get(index)
        if vtep is None:
            return
        p = self._peers[vtep]
        self._expire(p, t)
        s = p.next
        if s is None or s.index != index:
            return
        p.next = None
        self._drop(p, p.previous)
        if p.current is None or s.created >= p.current.created:
            p.previous = p.current
            self._set_current(p, s, keepalive=False)
        else:
            p.previous = s

    def tick(self, now: float, sent: Mapping[Vtep, int]) -> None:
        """Timers (about once a second); ``sent``: messages sealed per peer on its current tx key."""
        t = self._advance(now)
        limits = self.limits
        for p in list(self._peers.values()):
            self._expire(p, t)
            count = sent.get(p.vtep, p.sent_seen)
            used = count != p.sent_seen
            p.sent_seen = count
            current = p.current
            if (
                current is not None
                and p.pending is None
                and (p.next is None or t - p.next.created >= limits.rekey_timeout)
            ):
                age = t - current.created
                after = limits.rekey_after_time if current.initiator else limits.responder_rekey_after_time
                worn = count >= limits.rekey_after_messages and age >= limits.rekey_timeout
                if (used and age >= after) or worn:
                    self.counters.rekeys += 1
                    p.rekeys += 1
                    self._initiate(p, t, first_at=t)
                    continue
            pending = p.pending
            if pending is not None and t - pending.sent_at >= limits.rekey_timeout:
                if t - pending.first_at >= limits.rekey_attempt_time:
                    self._abandon(p)
                else:
                    self._initiate(p, t, first_at=pending.first_at)
        self._forget_idle_buckets(t)

    # --- outputs ----------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Vtep]]:
        out, self._out = self._out, []
        return out

    def key_changes(self) -> list[KeyChange]:
        out, self._changes = self._changes, []
        return out

    def status(self, now: float) -> list[PeerSession]:
        t = self._advance(now)
        out = []
        for vtep in sorted(self._peers, key=Vtep.order):
            p = self._peers[vtep]
            current = p.current
            state: State = "established"
            if current is None:
                state = "handshaking" if p.pending is not None or p.next is not None else "none"
            out.append(
                PeerSession(
                    peer=vtep,
                    fingerprint=fingerprint(p.public),
                    state=state,
                    age_s=None if current is None else round(t - current.created, 3),
                    rekeys=p.rekeys,
                    handshakes_sent=p.handshakes_sent,
                    handshakes_received=p.handshakes_received,
                    tx_index=None if current is None else current.remote,
                )
            )
        return out

    def rate_limited_sources(self) -> int:
        """Source addresses the rate limiter tracks now (at most ``limits.buckets``)."""
        return len(self._buckets)

    # --- handshake messages -----------------------------------------------------------------

    def _on_initiation(self, data: bytes, ip: IPAddress, t: float) -> None:
        candidates = self._by_ip.get(ip)
        if not candidates:
            self.counters.rejected += 1  # no peer there: no crypto, no answer
            return
        answered_with = self._identity
        try:
            initiation = handshake.respond_to(self._identity, data)
        except handshake.HandshakeError:
            old = self._old_identity if t < self._old_until else None
            try:  # made to our previous key by a peer that has not seen the new one yet
                if old is None:
                    raise
                initiation = handshake.respond_to(old, data)
                answered_with = old
            except handshake.HandshakeError:
                self.counters.rejected += 1
                return
        p = next((self._peers[v] for v in candidates if self._peers[v].public == initiation.remote_public), None)
        if p is None:
            self.counters.rejected += 1  # an unknown key, or a peer's key from another address
            return
        if initiation.timestamp <= p.last_timestamp:
            self.counters.replayed_initiations += 1
            return
        cipher = self._choose(initiation.ciphers)
        if cipher is None:
            self.counters.rejected += 1
            return
        p.last_timestamp = initiation.timestamp
        p.handshakes_received += 1
        self._expire(p, t)
        if p.pending is not None:
            # The peer breaks the tie with the key it knows for us: the one its initiation was made to
            # (our previous key, just after a rotation), so both sides decide alike.
            if answered_with is self._identity and self._identity.public > p.public:
                # The peer answers ours instead; but ours may have reached it before it knew our
                # key (both agents starting: it rejected it, silently), so ours goes again now
                # that the peer evidently knows us, instead of after rekey_timeout.
                self.counters.crossed += 1
                self._initiate(p, t, first_at=p.pending.first_at)
                return
            self._abandon(p)
        index = self._new_index()
        message, keys = handshake.response(initiation, index, cipher, self._rng(handshake.KEY_LEN))
        self._drop(p, p.next)
        p.next = _Session(index, initiation.sender_index, keys, cipher, t, initiator=False)
        self._install(p, p.next)
        self._send(p, message)
        self.counters.completed += 1

    def _on_response(self, data: bytes, ip: IPAddress, t: float) -> None:
        vtep = self._pending.get(handshake.response_receiver(data))
        p = None if vtep is None else self._peers[vtep]
        if p is None or p.pending is None or vtep is None or vtep.ip != ip:
            self.counters.rejected += 1  # not ours (any more), or from elsewhere: no crypto
            return
        try:
            remote, cipher, keys = handshake.complete(p.pending.initiator, data)
        except handshake.HandshakeError:
            self.counters.rejected += 1
            return
        if cipher == handshake.AES_256_GCM and not self._aes:
            self.counters.rejected += 1  # a cipher we did not offer
            return
        p.handshakes_received += 1
        index = p.pending.initiator.sender_index
        del self._pending[index]
        p.pending = None
        self._expire(p, t)
        session = _Session(index, remote, keys, cipher, t, initiator=True)
        self._drop(p, p.previous)
        p.previous = p.current
        self._install(p, session)
        self._set_current(p, session, keepalive=True)
        self.counters.completed += 1

    def _choose(self, offered: int) -> int | None:
        aes = bool(offered & handshake.CAN_AES)
        chacha = bool(offered & handshake.CAN_CHACHA)
        if aes and (self._aes or not chacha):
            return handshake.AES_256_GCM
        return handshake.CHACHA20_POLY1305 if chacha else None

    # --- internals --------------------------------------------------------------------------

    def _advance(self, now: float) -> float:
        if now > self._last_now:
            self._t += now - self._last_now
        self._last_now = now
        return self._t

    def _allow(self, ip: IPAddress, t: float) -> bool:
        limits = self.limits
        tokens, at = self._buckets.pop(ip, (limits.burst, t))
        tokens = min(limits.burst, tokens + (t - at) * limits.rate)
        allowed = tokens >= 1.0
        self._buckets[ip] = (tokens - 1.0 if allowed else tokens, t)
        while len(self._buckets) > limits.buckets:
            self._buckets.popitem(last=False)
        return allowed

    def _forget_idle_buckets(self, t: float) -> None:
        """Buckets full again hold nothing worth keeping (least recently used first)."""
        refill = self.limits.burst / self.limits.rate
        while self._buckets:
            ip, (_, at) = next(iter(self._buckets.items()))
            if t - at < refill:
                break
            del self._buckets[ip]

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._rng(4), "little") & _U32
            if index and index not in self._rx and index not in self._pending:
                return index

    def _timestamp(self, t: float) -> bytes:
        stamp = max(self._wall_ns + round(t * 1e9), self._last_stamp + 1)
        self._last_stamp = stamp
        return handshake.tai64n(stamp)

    def _initiate(self, p: _Peer, t: float, first_at: float) -> None:
        if p.pending is not None:
            del self._pending[p.pending.initiator.sender_index]
        index = self._new_index()
        message, initiator = handshake.initiate(
            self._identity, p.public, index, self._timestamp(t), self._ciphers, self._rng(handshake.KEY_LEN)
        )
        p.pending = _Pending(initiator, t, first_at)
        self._pending[index] = p.vtep
        self._send(p, message)

    def _abandon(self, p: _Peer) -> None:
        if p.pending is not None:
            del self._pending[p.pending.initiator.sender_index]
            p.pending = None

    def _send(self, p: _Peer, message: bytes) -> None:
        self._out.append((message, p.vtep))
        self.counters.handshakes_sent += 1
        p.handshakes_sent += 1

    def _install(self, p: _Peer, s: _Session) -> None:
        self._rx[s.index] = p.vtep
        self._changes.append(InstallRx(s.index, p.vtep, s.keys.recv, s.cipher))

    def _set_current(self, p: _Peer, s: _Session, keepalive: bool) -> None:
        p.current = s
        p.sent_seen = 0  # the fast path counts per key
        self._changes.append(SetTx(p.vtep, s.remote, s.keys.send, s.cipher, keepalive))

    def _drop(self, p: _Peer, s: _Session | None) -> None:
        if s is None:
            return
        if s is p.current:
            p.current = None
            self._changes.append(ClearTx(p.vtep))
        if s is p.previous:
            p.previous = None
        if s is p.next:
            p.next = None
        del self._rx[s.index]
        self._changes.append(RemoveRx(s.index))

    def _expire(self, p: _Peer, t: float) -> None:
        reject = self.limits.reject_after_time
        for s in (p.current, p.previous, p.next):
            if s is not None and t - s.created >= reject:
                self._drop(p, s)
                self.counters.expired += 1
        changed = p.key_changed_at
        if changed is not None:  # rule 6: the old key's sessions, kept while the new key is tried
            if p.current is not None and p.current.created > changed:
                p.key_changed_at = None  # the new key works
            elif t - changed >= self.limits.rekey_timeout:
                p.key_changed_at = None
                for s in (p.current, p.previous, p.next):
                    if s is not None and s.created <= changed:
                        self._drop(p, s)

    def _forget(self, p: _Peer) -> None:
        for s in (p.current, p.previous, p.next):
            self._drop(p, s)
        self._abandon(p)
