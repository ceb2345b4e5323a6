"""core.handshake: Noise IK held byte for byte to the noiseprotocol package (the oracle), and
every damaged, foreign or malformed message rejected with HandshakeError."""

from __future__ import annotations

import warnings

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

from overlay.core import handshake, keys, seal
from overlay.core.handshake import (
    AES_256_GCM,
    CAN_AES,
    CAN_CHACHA,
    CHACHA20_POLY1305,
    INITIATION_LEN,
    PROLOGUE,
    PROTOCOL,
    RESPONSE_LEN,
    HandshakeError,
    Identity,
    complete,
    initiate,
    mac1,
    mac1_key,
    respond_to,
    response,
    tai64n,
)


def fixed(seed: int) -> bytes:
    return handshake.generate_private(lambda n: bytes((seed + i) % 256 for i in range(n)))


ALICE, BOB, CAROL = Identity(fixed(1)), Identity(fixed(101)), Identity(fixed(201))
E_ALICE, E_BOB = fixed(11), fixed(111)
STAMP = tai64n(1_700_000_000_123_456_789)


def noise(role: str, static: bytes, ephemeral: bytes, remote: bytes | None = None) -> NoiseConnection:
    conn = NoiseConnection.from_name(PROTOCOL)
    conn.set_prologue(PROLOGUE)
    if role == "initiator":
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static)
    if remote is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "an ephemeral key is set: OK for testing"
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
        conn.start_handshake()
    return conn


def noise_part(message: bytes) -> bytes:
    head = 8 if message[0] == handshake.INITIATION else 12
    return message[head : -handshake.MAC_LEN]


def remac(message: bytes, receiver_public: bytes) -> bytes:
    body = message[: -handshake.MAC_LEN]
    return body + mac1(mac1_key(receiver_public), body)


def transport(key: bytes, counter: int, plaintext: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(b"\0\0\0\0" + counter.to_bytes(8, "little"), plaintext, b"")


def untransport(key: bytes, counter: int, ciphertext: bytes) -> bytes:
    return ChaCha20Poly1305(key).decrypt(b"\0\0\0\0" + counter.to_bytes(8, "little"), ciphertext, b"")


def handshake_pair() -> tuple[bytes, bytes, handshake.Keys, handshake.Keys]:
    first, initiator = initiate(ALICE, BOB.public, 0x01020304, STAMP, CAN_AES | CAN_CHACHA, E_ALICE)
    second, bob_keys = response(respond_to(BOB, first), 0xA0B0C0D0, AES_256_GCM, E_BOB)
    _, _, alice_keys = complete(initiator, second)
    return first, second, alice_keys, bob_keys


FIRST, SECOND, ALICE_KEYS, BOB_KEYS = handshake_pair()


# --- the wire format ------------------------------------------------------------------------


def test_an_initiation_is_133_bytes_and_a_response_77() -> None:
    assert INITIATION_LEN == len(FIRST) == 133
    assert RESPONSE_LEN == len(SECOND) == 77


def test_the_headers_carry_type_zero_reserved_bytes_and_little_endian_indices() -> None:
    assert FIRST[:8] == bytes([1, 0, 0, 0, 4, 3, 2, 1])
    assert SECOND[:12] == bytes([2, 0, 0, 0, 0xD0, 0xC0, 0xB0, 0xA0, 4, 3, 2, 1])


def test_mac1_is_the_keyed_hash_of_the_receivers_public_key_over_all_bytes_before_it() -> None:
    import hashlib
    import hmac

    key = hashlib.sha256(b"mac1----" + BOB.public).digest()
    assert FIRST[-16:] == hmac.new(key, FIRST[:-16], "sha256").digest()[:16]
    key = hashlib.sha256(b"mac1----" + ALICE.public).digest()
    assert SECOND[-16:] == hmac.new(key, SECOND[:-16], "sha256").digest()[:16]


def test_no_message_type_is_vxlans_flags_byte_and_data_is_the_seal_modules_type() -> None:
    assert 0x08 not in (handshake.INITIATION, handshake.RESPONSE, seal.DATA)
    assert seal.HANDSHAKE_TYPES == {handshake.INITIATION, handshake.RESPONSE}
    assert (AES_256_GCM, CHACHA20_POLY1305) == (seal.AES_256_GCM, seal.CHACHA20_POLY1305)


def test_timestamps_are_tai64n_and_later_times_compare_greater_as_bytes() -> None:
    assert tai64n(0) == (0x400000000000000A).to_bytes(8, "big") + bytes(4)
    assert tai64n(1_500_000_001) == (0x400000000000000A + 1).to_bytes(8, "big") + (500_000_001).to_bytes(4, "big")
    assert tai64n(10**18) < tai64n(10**18 + 1) < tai64n(10**18 + 10**9)


def test_keys_are_clamped_x25519_keys_that_the_keys_module_agrees_with() -> None:
    private = handshake.generate_private(lambda n: b"\xff" * n)
    assert private[0] & 7 == 0 and private[31] & 0x80 == 0 and private[31] & 0x40
    assert handshake.public_key(private) == keys.public_of(private) == Identity(private).public


def test_the_responder_reads_who_initiated_and_what_it_offered() -> None:
    got = respond_to(BOB, FIRST)
    assert got.remote_public == ALICE.public
    assert (got.sender_index, got.timestamp, got.ciphers) == (0x01020304, STAMP, CAN_AES | CAN_CHACHA)


def test_both_sides_derive_the_same_keys_crosswise() -> None:
    assert ALICE_KEYS.send == BOB_KEYS.recv and ALICE_KEYS.recv == BOB_KEYS.send
    assert ALICE_KEYS.send != ALICE_KEYS.recv


def test_the_initiator_learns_the_responders_index_and_chosen_cipher() -> None:
    _, initiator = initiate(ALICE, BOB.public, 7, STAMP, CAN_CHACHA, E_ALICE)
    second, _ = response(respond_to(BOB, initiate(ALICE, BOB.public, 7, STAMP, CAN_CHACHA, E_ALICE)[0]), 9, 2, E_BOB)
    index, cipher, _ = complete(initiator, second)
    assert (index, cipher) == (9, CHACHA20_POLY1305)


def test_keys_never_show_in_reprs() -> None:
    assert ALICE_KEYS.send.hex() not in repr(ALICE_KEYS)
    _, initiator = initiate(ALICE, BOB.public, 7, STAMP, CAN_CHACHA, E_ALICE)
    assert "ephemeral" not in repr(initiator) and fixed(1).hex() not in repr(ALICE)


# --- noiseprotocol as the oracle ------------------------------------------------------------


def test_our_initiator_and_a_noiseprotocol_responder_agree_byte_for_byte() -> None:
    first, initiator = initiate(ALICE, BOB.public, 5, STAMP, CAN_AES | CAN_CHACHA, E_ALICE)
    oracle = noise("responder", fixed(101), E_BOB)
    assert bytes(oracle.read_message(noise_part(first))) == STAMP + bytes([CAN_AES | CAN_CHACHA])
    oracle_second = bytes(oracle.write_message(bytes([AES_256_GCM])))
    ours, bob_keys = response(respond_to(BOB, first), 6, AES_256_GCM, E_BOB)
    assert noise_part(ours) == oracle_second
    index, cipher, alice_keys = complete(initiator, ours)
    assert (index, cipher) == (6, AES_256_GCM)
    assert untransport(alice_keys.recv, 0, oracle.encrypt(b"from noise")) == b"from noise"
    assert oracle.decrypt(transport(alice_keys.send, 0, b"to noise")) == b"to noise"
    assert untransport(bob_keys.recv, 1, transport(alice_keys.send, 1, b"x")) == b"x"


def test_a_noiseprotocol_initiator_and_our_responder_agree_byte_for_byte() -> None:
    oracle = noise("initiator", fixed(1), E_ALICE, remote=BOB.public)
    oracle_first = bytes(oracle.write_message(STAMP + bytes([CAN_CHACHA])))
    ours_first, _ = initiate(ALICE, BOB.public, 5, STAMP, CAN_CHACHA, E_ALICE)
    assert noise_part(ours_first) == oracle_first
    wrapped = remac(bytes([1, 0, 0, 0, 5, 0, 0, 0]) + oracle_first + bytes(16), BOB.public)
    got = respond_to(BOB, wrapped)
    assert (got.remote_public, got.timestamp, got.ciphers) == (ALICE.public, STAMP, CAN_CHACHA)
    second, bob_keys = response(got, 6, CHACHA20_POLY1305, E_BOB)
    assert bytes(oracle.read_message(noise_part(second))) == bytes([CHACHA20_POLY1305])
    assert oracle.handshake_finished
    assert untransport(bob_keys.recv, 0, oracle.encrypt(b"from noise")) == b"from noise"
    assert oracle.decrypt(transport(bob_keys.send, 0, b"to noise")) == b"to noise"


@settings(max_examples=25)
@given(
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=12, max_size=12),
)
def test_any_keys_give_the_same_handshake_as_noiseprotocol(
    static_i: bytes, static_r: bytes, ephemeral_i: bytes, ephemeral_r: bytes, stamp: bytes
) -> None:
    initiator_id, responder_id = Identity(static_i), Identity(static_r)
    first, initiator = initiate(initiator_id, responder_id.public, 1, stamp, 3, ephemeral_i)
    oracle = noise("responder", static_r, ephemeral_r)
    assert bytes(oracle.read_message(noise_part(first))) == stamp + b"\x03"
    second, _ = response(respond_to(responder_id, first), 2, 1, ephemeral_r)
    assert noise_part(second) == bytes(oracle.write_message(b"\x01"))
    _, _, keys_i = complete(initiator, second)
    assert untransport(keys_i.recv, 0, oracle.encrypt(b"hi")) == b"hi"


# --- rejection ------------------------------------------------------------------------------


def flips(message: bytes, start: int = 0, end: int | None = None) -> list[bytes]:
    stop = len(message) if end is None else end
    return [
        message[:i] + bytes([message[i] ^ (1 << bit)]) + message[i + 1 :]
        for i in range(start, stop)
        for bit in range(8)
    ]


def test_any_flipped_bit_in_an_initiation_is_rejected() -> None:
    for damaged in flips(FIRST):
        with pytest.raises(HandshakeError):
            respond_to(BOB, damaged)


def test_any_flipped_bit_in_the_noise_part_of_an_initiation_is_rejected_even_with_a_good_mac1() -> None:
    for damaged in flips(FIRST, 8, INITIATION_LEN - 16):
        with pytest.raises(HandshakeError):
            respond_to(BOB, remac(damaged, BOB.public))


def test_any_flipped_bit_in_a_response_is_rejected() -> None:
    _, initiator = initiate(ALICE, BOB.public, 0x01020304, STAMP, CAN_AES | CAN_CHACHA, E_ALICE)
    for damaged in flips(SECOND):
        with pytest.raises(HandshakeError):
            complete(initiator, damaged)
    for damaged in flips(SECOND, 12, RESPONSE_LEN - 16):
        with pytest.raises(HandshakeError):
            complete(initiator, remac(damaged, ALICE.public))


def test_a_message_for_another_key_is_rejected_at_mac1_without_any_dh(monkeypatch: pytest.MonkeyPatch) -> None:
    _, carols = initiate(CAROL, BOB.public, 0x01020304, STAMP, 3, E_ALICE)  # a response to Alice is not for Carol

    def no_dh(*_: object) -> bytes:
        raise AssertionError("a DH was computed")

    monkeypatch.setattr(handshake, "_dh", no_dh)
    with pytest.raises(HandshakeError, match="mac1"):
        respond_to(CAROL, FIRST)
    with pytest.raises(HandshakeError, match="mac1"):
        complete(carols, SECOND)


def test_a_response_to_another_initiation_is_rejected() -> None:
    _, other = initiate(ALICE, BOB.public, 99, STAMP, 3, E_ALICE)
    with pytest.raises(HandshakeError, match="index"):
        complete(other, SECOND)
    _, same_index = initiate(ALICE, BOB.public, 0x01020304, STAMP, 3, fixed(77))
    with pytest.raises(HandshakeError):
        complete(same_index, SECOND)


def test_a_low_order_ephemeral_key_is_rejected() -> None:
    zero_e = FIRST[:8] + bytes(32) + FIRST[40:]
    with pytest.raises(HandshakeError, match="low-order"):
        respond_to(BOB, remac(zero_e, BOB.public))


def test_a_response_choosing_an_unknown_cipher_is_rejected() -> None:
    with pytest.raises(ValueError):
        response(respond_to(BOB, initiate(ALICE, BOB.public, 1, STAMP, 3, E_ALICE)[0]), 2, 3, E_BOB)
    oracle = noise("responder", fixed(101), E_BOB)
    first, initiator = initiate(ALICE, BOB.public, 1, STAMP, 3, E_ALICE)
    oracle.read_message(noise_part(first))
    bad = remac(
        bytes([2, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0]) + bytes(oracle.write_message(b"\x07")) + bytes(16), ALICE.public
    )
    with pytest.raises(HandshakeError, match="cipher"):
        complete(initiator, bad)


@given(st.binary(max_size=300))
def test_garbage_of_any_size_is_rejected_with_handshake_error_only(data: bytes) -> None:
    _, initiator = initiate(ALICE, BOB.public, 0x01020304, STAMP, 3, E_ALICE)
    for read in (
        lambda: respond_to(BOB, data),
        lambda: complete(initiator, data),
        lambda: handshake.response_receiver(data),
    ):
        with pytest.raises(HandshakeError):
            read()


@given(st.sampled_from([FIRST, SECOND]), st.data())
def test_truncated_extended_or_overwritten_messages_are_rejected_with_handshake_error_only(
    message: bytes, data: st.DataObject
) -> None:
    how = data.draw(st.sampled_from(["truncate", "extend", "overwrite"]))
    if how == "truncate":
        damaged = message[: data.draw(st.integers(0, len(message) - 1))]
    elif how == "extend":
        damaged = message + data.draw(st.binary(min_size=1, max_size=40))
    else:
        at = data.draw(st.integers(0, len(message) - 1))
        patch = data.draw(st.binary(min_size=1, max_size=len(message) - at))
        damaged = message[:at] + patch + message[at + len(patch) :]
        if damaged == message:
            return
    _, initiator = initiate(ALICE, BOB.public, 0x01020304, STAMP, CAN_AES | CAN_CHACHA, E_ALICE)
    with pytest.raises(HandshakeError):
        if message is FIRST:
            respond_to(BOB, damaged)
        else:
            complete(initiator, damaged)


def test_the_seal_references_handshake_sizes_are_the_handshakes() -> None:
    assert seal.HANDSHAKE_SIZES == {
        handshake.INITIATION: handshake.INITIATION_LEN,
        handshake.RESPONSE: handshake.RESPONSE_LEN,
    }
