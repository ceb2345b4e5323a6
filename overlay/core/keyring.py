"""Which peer holds which static key, and which networks are encrypted, from registry events.
Pure: the agent feeds it the events it applies; it answers with changes for the session layer
(overlay/io/encryption.py) at a cost of O(1) per event.

- A host's VTEP is the one the forwarding table uses (``Underlay.vtep``: the same family rule),
  so the sessions are with the addresses that datagrams go to and come from.
- A host without a ``pubkey`` (an older agent) is no peer: encrypted traffic to it is dropped
  (NO_SESSION), never sent in plaintext; ``without_key`` lists such hosts for the status.
- A key that does not decode never gets here: the registry refuses the whole host value.
- Two host records may name one VTEP for a while (a machine re-registered under a new host id
  while the old record's lease runs out): the key of the record written last is the VTEP's, and
  when it goes, the other's again.
- ``networks/<vni>`` with ``"encrypted": true``: that VNI is sealed, in both directions. Only a
  value saying otherwise turns it off: a deleted network value stays encrypted here (fail closed).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Iterable

from overlay.core.fdb import Vtep
from overlay.core.registry import Deleted, Event, Host, HostKey, Network, NetworkKey
from overlay.core.underlay import Underlay


@dataclass(frozen=True)
class PeerKey:
    """``peer`` now has static public key ``key``, or (``key`` None) is no longer a peer."""

    peer: Vtep
    key: bytes | None


@dataclass(frozen=True)
class Encrypted:
    vni: int
    encrypted: bool


Change = PeerKey | Encrypted


def decode_key(text: str) -> bytes:
    """A registry ``pubkey`` (checked when decoded) as its 32 bytes."""
    return base64.b64decode(text, validate=True)


class Keyring:
    def __init__(self, host_id: str, underlay: Underlay) -> None:
        self.host_id, self.underlay = host_id, underlay
        self.peers: dict[str, tuple[Vtep, bytes]] = {}  # host -> (its VTEP, its key)
        self.by_vtep: dict[Vtep, list[str]] = {}  # VTEP -> hosts with a key there, the last written last
        self.keyless: set[str] = set()  # reachable hosts without a key
        self.encrypted: set[int] = set()

    def apply(self, events: Iterable[Event]) -> list[Change]:
        out: list[Change] = []
        for ev in events:
            k = ev.key
            if isinstance(k, HostKey) and k.host != self.host_id:
                value = None if isinstance(ev, Deleted) else ev.value
                self._host(k.host, value if isinstance(value, Host) else None, out)
            elif isinstance(k, NetworkKey):
                if isinstance(ev, Deleted) or not isinstance(ev.value, Network):
                    continue  # fail closed: only a value that says so makes a network plaintext
                on = ev.value.encrypted
                if on != (k.vni in self.encrypted):
                    (self.encrypted.add if on else self.encrypted.discard)(k.vni)
                    out.append(Encrypted(k.vni, on))
        return out

    def _host(self, host: str, value: Host | None, out: list[Change]) -> None:
        vtep = self.underlay.vtep(value) if value is not None else None
        key = decode_key(value.pubkey) if value is not None and value.pubkey else None
        before = self.peers.get(host)
        if vtep is not None and key is None:
            self.keyless.add(host)
        else:
            self.keyless.discard(host)
        after = (vtep, key) if vtep is not None and key is not None else None
        if before == after:
            return
        touched = {v: self._key_at(v) for v in (before[0] if before else None, after[0] if after else None) if v}
        if before is not None:
            self.by_vtep[before[0]].remove(host)
            if not self.by_vtep[before[0]]:
                del self.by_vtep[before[0]]
            del self.peers[host]
        if after is not None:
            self.peers[host] = after
            self.by_vtep.setdefault(after[0], []).append(host)
        for v, was in touched.items():
            now = self._key_at(v)
            if now != was:
                out.append(PeerKey(v, now))

    def _key_at(self, vtep: Vtep) -> bytes | None:
        """The key of the record written last among those naming ``vtep``."""
        hosts = self.by_vtep.get(vtep)
        return self.peers[hosts[-1]][1] if hosts else None

    def without_key(self) -> list[str]:
        return sorted(self.keyless)
