"""Keyring: registry events -> peers' keys and encrypted networks, as changes for the sessions."""

from __future__ import annotations

import base64

from overlay.core.fdb import Vtep
from overlay.core.keyring import Encrypted, Keyring, PeerKey
from overlay.core.registry import Deleted, Host, HostKey, Network, NetworkKey, Put
from overlay.core.underlay import Underlay

K1, K2 = bytes([1]) * 32, bytes([2]) * 32
V = Vtep.parse("198.18.0.2")


def host(key: bytes | None, address: str = "198.18.0.2") -> Host:
    return Host(address, 4789, pubkey=base64.b64encode(key).decode() if key else None)


def put(k: object, value: object, old: object = None) -> Put:
    return Put(k, value, old)  # type: ignore[arg-type]


def test_a_host_with_a_key_is_a_peer_and_one_without_is_listed_not_peered() -> None:
    ring = Keyring("h1", Underlay.any())
    assert ring.apply([put(HostKey("h2"), host(K1)), put(HostKey("h3"), host(None, "198.18.0.3"))]) == [PeerKey(V, K1)]
    assert ring.without_key() == ["h3"]
    assert ring.apply([put(HostKey("h1"), host(K2, "198.18.0.1"))]) == []  # this host itself
    assert ring.apply([Deleted(HostKey("h2"), host(K1))]) == [PeerKey(V, None)]


def test_two_records_on_one_vtep_the_last_written_wins_and_the_other_returns_when_it_goes() -> None:
    ring = Keyring("h1", Underlay.any())
    ring.apply([put(HostKey("old"), host(K1))])
    assert ring.apply([put(HostKey("new"), host(K2))]) == [PeerKey(V, K2)]
    assert ring.apply([Deleted(HostKey("new"), host(K2))]) == [PeerKey(V, K1)]  # the old record again
    assert ring.apply([put(HostKey("old"), host(K2))]) == [PeerKey(V, K2)]  # a key change in place
    assert ring.apply([Deleted(HostKey("old"), host(K2))]) == [PeerKey(V, None)]


def test_a_network_is_encrypted_by_its_value_and_a_deleted_value_leaves_it_encrypted() -> None:
    ring = Keyring("h1", Underlay.any())
    on = Network(42, "blue", None, None, encrypted=True)
    assert ring.apply([put(NetworkKey(42), on)]) == [Encrypted(42, True)]
    assert ring.apply([put(NetworkKey(42), on)]) == []
    assert ring.apply([Deleted(NetworkKey(42), on)]) == []  # fail closed
    assert ring.apply([put(NetworkKey(42), Network(42, "blue", None, None))]) == [Encrypted(42, False)]
