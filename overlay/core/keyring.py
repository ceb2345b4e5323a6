"""Which peer holds which static key, and which networks are encrypted, from registry events.
Pure: the agent feeds it the events it applies; it answers with changes for the session layer
(overlay/io/encryption.py) at a cost of O(1) per event.

- A host's VTEP is the one the forwarding table uses (``Underlay.vtep``: the same family rule),
  so the sessions are with the addresses that datagrams go to and come from.
- A host without a ``pubkey`` (an older agent) is no peer: encrypted traffic to it is dropped
  (NO_SESSION), never sent in plaintext; ``without_key`` lists such hosts for the status.
- A key that does not decode never gets here: the registry refuses the whole host value.
- ``networks/<vni>`` with ``"encrypted": true``: that VNI is sealed, in both directions.
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
                value = None if isinstance(ev, Deleted) else ev.value
                on = isinstance(value, Network) and value.encrypted
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
        if before is not None and (after is None or before[0] != after[0]):
            out.append(PeerKey(before[0], None))
        if after is None:
            self.peers.pop(host, None)
        else:
            self.peers[host] = after
            out.append(PeerKey(after[0], after[1]))

    def without_key(self) -> list[str]:
        return sorted(self.keyless)
