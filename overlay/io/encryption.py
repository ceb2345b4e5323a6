"""Runs encrypted networks' sessions: the thin shell around ``core.sessions.Sessions``.

It moves bytes and keys, and decides nothing:
- handshake messages the fast path handed over (``take_handshakes``, after each receive pump)
  go to ``Sessions.receive``; what Sessions wants sent goes out of the data socket of the
  peer's family (so handshakes use the same port as data);
- VTEPs the fast path had traffic for but no session (``take_wanted``, after each send pump)
  go to ``Sessions.want``, and so do peers whose data came with a receiver index we do not
  have (``take_stale``: they kept a session this host lost, e.g. by restarting; without this
  the session would heal only when it expires); receiver indexes with their first datagram (``take_confirmed``)
  to ``Sessions.confirmed``;
- Sessions' key changes go into the C tables (rx_add, rx_remove, tx_set, tx_clear);
- once a second ``Sessions.tick`` with the fast path's per-peer counters (rekeys, expiry).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from typing import Callable, Mapping

from overlay.core.addresses import IPAddress
from overlay.core.fdb import Vtep
from overlay.core.keyring import Change, Encrypted, PeerKey
from overlay.core.keys import encode, fingerprint
from overlay.core.sessions import ClearTx, InstallRx, RemoveRx, Sessions, SetTx
from overlay.core.status import EncryptionStatus, SessionStatus
from overlay.fastpath.api import ForwardingCore, from_c, to_c

log = logging.getLogger("overlay.encryption")
TICK = 1.0  # seconds between timer runs


def cpu_has_aes() -> bool:
    """Whether the CPU has AES instructions (then sessions prefer AES-256-GCM, else
    ChaCha20-Poly1305): the x86 ``aes`` flag, or the ARM ``aes`` feature, in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return "aes" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


class Encryption:
    def __init__(
        self,
        core: ForwardingCore,
        sessions: Sessions,
        sockets: Mapping[int, socket.socket],  # family (4, 6) -> the data socket
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core, self.sessions, self.sockets, self.clock = core, sessions, dict(sockets), clock
        self.peers: dict[Vtep, bytes] = {}
        self.by_ip: dict[IPAddress, list[Vtep]] = {}  # peers by underlay address (stale reports name one)
        self.rx_peer: dict[int, Vtep] = {}  # receiver indexes installed in the fast path
        self.send_errors = 0
        self._task: asyncio.Task[None] | None = None

    # --- what the registry (or the static config) says ---------------------------------------

    def apply(self, changes: list[Change]) -> None:
        now = self.clock()
        for c in changes:
            if isinstance(c, PeerKey):
                if c.key is None:
                    if self.peers.pop(c.peer, None) is not None:
                        self.by_ip[c.peer.ip].remove(c.peer)
                        if not self.by_ip[c.peer.ip]:
                            del self.by_ip[c.peer.ip]
                        self.sessions.remove_peer(c.peer, now)
                else:
                    if c.peer not in self.peers:
                        self.by_ip.setdefault(c.peer.ip, []).append(c.peer)
                    self.peers[c.peer] = c.key
                    self.sessions.set_peer(c.peer, c.key, now)
            elif isinstance(c, Encrypted):
                try:
                    self.core.vni_encrypt(c.vni, c.encrypted)
                except KeyError:
                    continue  # a network this host does not serve
                log.info("network %d is %s", c.vni, "encrypted" if c.encrypted else "plaintext")
        self.flush()

    # --- after the pumps, and the timer --------------------------------------------------------

    def after_rx(self) -> None:
        handshakes = self.core.take_handshakes()
        confirmed = self.core.take_confirmed()
        stale = self.core.take_stale()
        if not handshakes and not confirmed and not stale:
            return
        now = self.clock()
        for address in {from_c(ip) for ip in stale}:  # unauthenticated: at most one handshake per 5 s
            for peer in self.by_ip.get(address, ()):
                self.sessions.want(peer, now)
        for data, ip in handshakes:
            self.sessions.receive(data, (from_c(ip), 0), now)
        for index in confirmed:
            self.sessions.confirmed(index, now)
        self.flush()

    def after_tx(self) -> None:
        wanted = self.core.take_wanted()
        if not wanted:
            return
        now = self.clock()
        for ip, port in wanted:
            self.sessions.want(Vtep(from_c(ip), port), now)
        self.flush()

    def tick(self) -> None:
        self.sessions.tick(self.clock(), self._sent())
        self.flush()

    def _sent(self) -> dict[Vtep, int]:
        """Datagrams sealed per peer on its current tx key (the fast path's counters)."""
        return {Vtep(from_c(ip), port): counter for ip, port, _, counter in self.core.tx_counters()}

    def flush(self) -> None:
        """Key changes into the C tables, then the handshake messages out."""
        for change in self.sessions.key_changes():
            if isinstance(change, InstallRx):
                self.core.rx_remove(change.index)  # an index reused after its removal was lost
                self.core.rx_add(change.index, to_c(change.peer.ip), change.peer.port, change.key, change.cipher)
                self.rx_peer[change.index] = change.peer
            elif isinstance(change, RemoveRx):
                self.core.rx_remove(change.index)
                self.rx_peer.pop(change.index, None)
            elif isinstance(change, SetTx):
                self.core.tx_set(to_c(change.peer.ip), change.peer.port, change.index, change.key, change.cipher)
                if change.keepalive:  # the initiator confirms the new session to the responder at once
                    keepalive = self.core.seal_keepalive(to_c(change.peer.ip), change.peer.port)
                    if keepalive is not None:
                        self._send(keepalive, change.peer)
            elif isinstance(change, ClearTx):
                self.core.tx_clear(to_c(change.peer.ip), change.peer.port)
        for data, peer in self.sessions.datagrams_to_send():
            self._send(data, peer)

    def _send(self, data: bytes, peer: Vtep) -> None:
        sock = self.sockets.get(peer.ip.version)
        if sock is None:
            self.send_errors += 1
            return
        try:
            sock.sendto(data, (str(peer.ip), peer.port))
        except OSError as e:  # buffer full, no route: the handshake is retried (REKEY_TIMEOUT)
            self.send_errors += 1
            log.debug("handshake to %s not sent: %s", peer, e)

    def status(self, networks: list[int], without_key: list[str]) -> EncryptionStatus:
        now = self.clock()
        tx = self._sent()
        rx_by_index = {index: packets for index, packets, _ in self.core.rx_stats()}
        rx: dict[Vtep, int] = {}
        for index, peer in self.rx_peer.items():
            rx[peer] = rx.get(peer, 0) + rx_by_index.get(index, 0)
        public = self.sessions.public_key
        return EncryptionStatus(
            pubkey=encode(public),
            fingerprint=fingerprint(public),
            networks=networks,
            sessions=[
                SessionStatus(
                    peer=str(p.peer),
                    key=p.fingerprint,
                    state=p.state,
                    age_s=None if p.age_s is None else round(p.age_s, 1),
                    rekeys=p.rekeys,
                    handshakes_sent=p.handshakes_sent,
                    handshakes_received=p.handshakes_received,
                    tx_messages=tx.get(p.peer, 0),
                    rx_messages=rx.get(p.peer, 0),
                )
                for p in sorted(self.sessions.status(now), key=lambda p: p.peer.order())
            ],
            without_key=without_key,
            handshakes=dataclasses.asdict(self.sessions.counters) | {"send_errors": self.send_errors},
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        async def timers() -> None:
            while True:
                await asyncio.sleep(TICK)
                self.tick()

        self._task = loop.create_task(timers())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
