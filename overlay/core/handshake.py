"""The handshake of encrypted networks: Noise IK between two hosts' static X25519 keys, and the
wire format of its two messages. Pure: no IO, no clock, no randomness (ephemeral keys and
timestamps are parameters; overlay/core/sessions.py decides when to call what).

Protocol ``Noise_IK_25519_ChaChaPoly_SHA256``, prologue ``b"overlay v1"``, no PSK: the
initiator knows the responder's static key beforehand (the registry's ``pubkey``), and the
responder learns the initiator's from message 1 (and accepts it only if it is a known peer's).
The Noise state machine is written out below (MixHash, MixKey, EncryptAndHash, Split, as in
the Noise spec, rev. 34); tests hold it equal to the ``noiseprotocol`` package byte for byte.

Wire format (integers little endian; every message has one fixed size, anything else is
rejected)::

    INITIATION, 133 bytes
      0      1          4              8        40             88               117     133
      | 1    | 0  0  0  | sender index | e (32) | enc s (32+16) | enc payload    | mac1  |
                                                                (13+16)
      payload: timestamp (12: 8-byte big-endian TAI64 seconds, 4-byte big-endian ns)
               | ciphers (1: bit 0 AES-256-GCM, bit 1 ChaCha20-Poly1305)

    RESPONSE, 77 bytes
      0      1          4              8                12       44            61     77
      | 2    | 0  0  0  | sender index | receiver index | e (32) | enc payload | mac1 |
                                                                   (1+16)
      payload: the data cipher chosen (1 = AES-256-GCM, 2 = ChaCha20-Poly1305)

- The Noise part (from ``e`` to the end of the encrypted payload) is exactly Noise's message;
  the 8 or 12 bytes in front and mac1 are ours (WireGuard's layout).
- mac1 = HMAC-SHA256(SHA256(b"mac1----" + the receiver's static public key), every byte
  before it)[:16]. It is checked first: a message not made for this host (another key, a
  scan, garbage) costs one HMAC, never a DH. mac1 is not authentication (anyone knowing the
  public key can make it); the Noise AEADs are.
- The reserved bytes are zero on send and ignored on receive (mac1 covers them). The indices
  are outside Noise (as in WireGuard): one who can rewrite packets and recompute mac1 can
  change them, which only makes the handshake or its session fail, as dropping would.
- Type 4 is data (overlay/core/seal.py); no type equals 0x08, VXLAN's flags byte.

After message 2 both sides hold ``Keys`` from Noise's Split(): the initiator sends with the
first key and receives with the second, the responder the other way round. Every failure to
parse, check or decrypt a message raises ``HandshakeError`` and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL = b"Noise_IK_25519_ChaChaPoly_SHA256"
PROLOGUE = b"overlay v1"
INITIATION, RESPONSE = 1, 2  # message types; 4 is data (seal.py)
AES_256_GCM, CHACHA20_POLY1305 = 1, 2  # data cipher ids (the response's payload)
CAN_AES, CAN_CHACHA = 0x01, 0x02  # the initiation's capability bits
KEY_LEN = 32
TAG_LEN = 16
MAC_LEN = 16
TIMESTAMP_LEN = 12
TAI64_BASE = 0x400000000000000A  # TAI64's label of 1970-01-01 00:00:10 TAI (as WireGuard)

_INITIATION_HEAD = struct.Struct("<B3xI")
_RESPONSE_HEAD = struct.Struct("<B3xII")
_PAYLOAD1_LEN = TIMESTAMP_LEN + 1
INITIATION_LEN = _INITIATION_HEAD.size + KEY_LEN + (KEY_LEN + TAG_LEN) + (_PAYLOAD1_LEN + TAG_LEN) + MAC_LEN  # 133
RESPONSE_LEN = _RESPONSE_HEAD.size + KEY_LEN + (1 + TAG_LEN) + MAC_LEN  # 77
_MAC1_LABEL = b"mac1----"
_H1 = hashlib.sha256(PROTOCOL + PROLOGUE).digest()  # h after InitializeSymmetric + MixHash(prologue)
_U32 = 0xFFFFFFFF


class HandshakeError(ValueError):
    """A handshake message that is malformed, not for this host, or does not authenticate."""


@dataclass(frozen=True, slots=True)
class Keys:
    """The transport keys of one session, from this host's side."""

    send: bytes = field(repr=False)
    recv: bytes = field(repr=False)


class Identity:
    """A host's static key pair, with what it needs to answer handshakes cheaply (the mac1 key
    and the first handshake hash, both of its public key)."""

    __slots__ = ("_key", "public", "mac1_key", "_h0")

    def __init__(self, private: bytes) -> None:
        if len(private) != KEY_LEN:
            raise ValueError(f"a private key is {KEY_LEN} bytes, not {len(private)}")
        self._key = X25519PrivateKey.from_private_bytes(private)
        self.public = self._key.public_key().public_bytes_raw()
        self.mac1_key = mac1_key(self.public)
        self._h0 = _initial_hash(self.public)

    def __repr__(self) -> str:
        return f"Identity(public={self.public.hex()})"


@dataclass(frozen=True, slots=True)
class Initiator:
    """An initiation sent and not yet answered: what ``complete`` needs to read the response."""

    sender_index: int
    remote_public: bytes
    identity: Identity = field(repr=False)
    _ephemeral: X25519PrivateKey = field(repr=False)
    _ck: bytes = field(repr=False)
    _h: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Initiation:
    """A received initiation that authenticated: who sent it and what it says, and the Noise
    state to answer it with ``response``."""

    remote_public: bytes  # the initiator's static key (authenticated)
    sender_index: int  # the initiator's index: the receiver index of the response and of data to it
    timestamp: bytes  # 12 bytes, big endian: compare as bytes
    ciphers: int  # CAN_AES | CAN_CHACHA bits
    identity: Identity = field(repr=False)
    _re: bytes = field(repr=False)
    _ck: bytes = field(repr=False)
    _h: bytes = field(repr=False)


def generate_private(rng: Callable[[int], bytes]) -> bytes:
    """A new X25519 private key from 32 random bytes (clamped, as ``wg genkey`` prints)."""
    raw = bytearray(rng(KEY_LEN))
    if len(raw) != KEY_LEN:
        raise ValueError(f"rng gave {len(raw)} bytes, not {KEY_LEN}")
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return bytes(raw)


def public_key(private: bytes) -> bytes:
    """The X25519 public key of ``private``."""
    return Identity(private).public


def tai64n(wall_ns: int) -> bytes:
    """A 12-byte TAI64N-style timestamp of a wall clock in ns since the Unix epoch; later times
    compare greater as bytes."""
    seconds, nanos = divmod(max(wall_ns, 0), 1_000_000_000)
    return struct.pack(">QI", TAI64_BASE + seconds, nanos)


def mac1_key(receiver_public: bytes) -> bytes:
    return hashlib.sha256(_MAC1_LABEL + receiver_public).digest()


def mac1(key: bytes, body: bytes) -> bytes:
    return hmac.digest(key, body, "sha256")[:MAC_LEN]


def message_type(data: bytes) -> int | None:
    """INITIATION or RESPONSE if ``data`` has the type byte and the exact size of one, else None
    (no crypto: a first sieve before rate limiting)."""
    if len(data) == INITIATION_LEN and data[0] == INITIATION:
        return INITIATION
    if len(data) == RESPONSE_LEN and data[0] == RESPONSE:
        return RESPONSE
    return None


def response_receiver(data: bytes) -> int:
    """The receiver index of a response (the initiator's index, to find its ``Initiator``)."""
    if message_type(data) != RESPONSE:
        raise HandshakeError(f"not a handshake response ({RESPONSE_LEN} bytes, type {RESPONSE})")
    return int(_RESPONSE_HEAD.unpack_from(data)[2])


# --- Noise ---------------------------------------------------------------------------------


def _initial_hash(responder_public: bytes) -> bytes:
    """h after the pre-message ``<- s``: MixHash(responder's static key)."""
    return hashlib.sha256(_H1 + responder_public).digest()


def _hkdf2(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """Noise's HKDF(ck, ikm) with two outputs: RFC 5869 with salt ck, empty info, 64 bytes."""
    out = HKDF(algorithm=hashes.SHA256(), length=64, salt=ck, info=b"").derive(ikm)
    return out[:32], out[32:]


def _nonce(n: int) -> bytes:
    return b"\0\0\0\0" + n.to_bytes(8, "little")


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise HandshakeError("a handshake key is a low-order point") from None


class _Symmetric:
    """Noise's SymmetricState with its CipherState (k, n); one message's worth at a time."""

    __slots__ = ("ck", "h", "k", "n")

    def __init__(self, ck: bytes, h: bytes) -> None:
        self.ck, self.h = ck, h
        self.k = b""
        self.n = 0

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = _hkdf2(self.ck, ikm)
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = ChaCha20Poly1305(self.k).encrypt(_nonce(self.n), plaintext, self.h)
        self.n += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        try:
            plaintext = ChaCha20Poly1305(self.k).decrypt(_nonce(self.n), ciphertext, self.h)
        except InvalidTag:
            raise HandshakeError("a handshake message does not authenticate") from None
        self.n += 1
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        return _hkdf2(self.ck, b"")


def _check_index(index: int) -> None:
    if not 0 <= index <= _U32:
        raise ValueError(f"a session index is a 32-bit unsigned integer, not {index}")


def _check_mac1(key: bytes, message: bytes) -> None:
    if not hmac.compare_digest(mac1(key, message[:-MAC_LEN]), message[-MAC_LEN:]):
        raise HandshakeError("mac1 does not match: the message is not for this host's key")


# --- the two messages ----------------------------------------------------------------------


def initiate(
    identity: Identity,
    remote_public: bytes,
    sender_index: int,
    timestamp: bytes,
    ciphers: int,
    ephemeral_private: bytes,
) -> tuple[bytes, Initiator]:
    """Message 1 to the host whose static key is ``remote_public``, and the state to read its
    response. ``sender_index`` is ours (the receiver index of the response and of data to us)."""
    if len(remote_public) != KEY_LEN or len(ephemeral_private) != KEY_LEN:
        raise ValueError(f"keys are {KEY_LEN} bytes")
    if len(timestamp) != TIMESTAMP_LEN:
        raise ValueError(f"a timestamp is {TIMESTAMP_LEN} bytes, not {len(timestamp)}")
    if not 0 <= ciphers <= 0xFF:
        raise ValueError(f"ciphers is a bitmask of one byte, not {ciphers}")
    _check_index(sender_index)
    state = _Symmetric(PROTOCOL, _initial_hash(remote_public))
    ephemeral = X25519PrivateKey.from_private_bytes(ephemeral_private)
    e = ephemeral.public_key().public_bytes_raw()
    state.mix_hash(e)  # -> e
    state.mix_key(_dh(ephemeral, remote_public))  # es
    encrypted_static = state.encrypt_and_hash(identity.public)  # s
    state.mix_key(_dh(identity._key, remote_public))  # ss
    payload = state.encrypt_and_hash(timestamp + bytes([ciphers]))
    body = _INITIATION_HEAD.pack(INITIATION, sender_index) + e + encrypted_static + payload
    message = body + mac1(mac1_key(remote_public), body)
    return message, Initiator(sender_index, remote_public, identity, ephemeral, state.ck, state.h)


def respond_to(identity: Identity, message: bytes) -> Initiation:
    """Read message 1 sent to ``identity``: mac1 first, then Noise. HandshakeError if it is not
    an initiation for this host that authenticates. Whether the sender is a known peer, its
    timestamp new and its address right is the caller's to check (sessions.py)."""
    if message_type(message) != INITIATION:
        raise HandshakeError(f"not a handshake initiation ({INITIATION_LEN} bytes, type {INITIATION})")
    _check_mac1(identity.mac1_key, message)
    sender_index = int(_INITIATION_HEAD.unpack_from(message)[1])
    at = _INITIATION_HEAD.size
    re = bytes(message[at : at + KEY_LEN])
    encrypted_static = bytes(message[at + KEY_LEN : at + 2 * KEY_LEN + TAG_LEN])
    encrypted_payload = bytes(message[at + 2 * KEY_LEN + TAG_LEN : -MAC_LEN])
    state = _Symmetric(PROTOCOL, identity._h0)
    state.mix_hash(re)  # -> e
    state.mix_key(_dh(identity._key, re))  # es
    rs = state.decrypt_and_hash(encrypted_static)  # s
    state.mix_key(_dh(identity._key, rs))  # ss
    payload = state.decrypt_and_hash(encrypted_payload)
    return Initiation(
        rs, sender_index, payload[:TIMESTAMP_LEN], payload[TIMESTAMP_LEN], identity, re, state.ck, state.h
    )


def response(initiation: Initiation, sender_index: int, cipher: int, ephemeral_private: bytes) -> tuple[bytes, Keys]:
    """Message 2 answering ``initiation`` (``sender_index`` is ours), and the session's keys."""
    if cipher not in (AES_256_GCM, CHACHA20_POLY1305):
        raise ValueError(f"unknown data cipher {cipher}")
    if len(ephemeral_private) != KEY_LEN:
        raise ValueError(f"keys are {KEY_LEN} bytes")
    _check_index(sender_index)
    state = _Symmetric(initiation._ck, initiation._h)
    ephemeral = X25519PrivateKey.from_private_bytes(ephemeral_private)
    e = ephemeral.public_key().public_bytes_raw()
    state.mix_hash(e)  # <- e
    state.mix_key(_dh(ephemeral, initiation._re))  # ee
    state.mix_key(_dh(ephemeral, initiation.remote_public))  # se
    payload = state.encrypt_and_hash(bytes([cipher]))
    body = _RESPONSE_HEAD.pack(RESPONSE, sender_index, initiation.sender_index) + e + payload
    message = body + mac1(mac1_key(initiation.remote_public), body)
    first, second = state.split()
    return message, Keys(send=second, recv=first)


def complete(initiator: Initiator, message: bytes) -> tuple[int, int, Keys]:
    """Read message 2 answering ``initiator``: (the responder's index, the data cipher, keys).
    HandshakeError if it is not that answer or does not authenticate."""
    receiver = response_receiver(message)
    _check_mac1(initiator.identity.mac1_key, message)
    if receiver != initiator.sender_index:
        raise HandshakeError(f"the response is for index {receiver}, not {initiator.sender_index}")
    responder_index = int(_RESPONSE_HEAD.unpack_from(message)[1])
    at = _RESPONSE_HEAD.size
    re = bytes(message[at : at + KEY_LEN])
    state = _Symmetric(initiator._ck, initiator._h)
    state.mix_hash(re)  # <- e
    state.mix_key(_dh(initiator._ephemeral, re))  # ee
    state.mix_key(_dh(initiator.identity._key, re))  # se
    payload = state.decrypt_and_hash(bytes(message[at + KEY_LEN : -MAC_LEN]))
    cipher = payload[0]
    if cipher not in (AES_256_GCM, CHACHA20_POLY1305):
        raise HandshakeError(f"the response chose an unknown data cipher {cipher}")
    first, second = state.split()
    return responder_index, cipher, Keys(send=first, recv=second)
