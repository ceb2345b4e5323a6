"""The seal/open stage of encrypted networks: the wire format of data datagrams, the replay
window, and the receive rules in their order. This is the reference (the specification) of
the fast path's C copy in ext/crypto.pxi; tests hold the two equal, as wire.py and codec.pxi.

A data datagram carries one whole VXLAN datagram (header + inner frame), sealed with the AEAD
key of a session between two hosts (overlay/core/sessions.py makes sessions)::

    0        1            4                 8                        16
    | type=4 | 0   0   0  | receiver index  | counter                |  (16-byte header)
    | AEAD ciphertext of the VXLAN datagram (8 + frame bytes) ...    | tag (16) |

- type 4 (data); 1 and 2 are the handshake (overlay/core/handshake.py). No type has bit 0x08,
  VXLAN's I flag, so the first byte tells encrypted from plaintext on one port.
- receiver index: little endian, the index the receiving host chose for the session.
- counter: little endian, per session and direction, from 0; never reused with one key.
- AEAD: AES-256-GCM (cipher 1) or ChaCha20-Poly1305 (cipher 2), 32-byte key, 12-byte nonce =
  4 zero bytes + the counter (little endian), additional data = the 16-byte header.
Overhead: 32 bytes over plaintext VXLAN (16 header + 16 tag).

Receive rules, in order: too short -> TOO_SHORT; unknown receiver index -> AUTH_FAILED; does
not authenticate -> AUTH_FAILED; counter seen or behind the window -> REPLAYED; nothing inside
-> a keepalive (it confirms the session; not a drop, nothing delivered); else the VXLAN
datagram goes on to wire.decode's rules. The replay window is updated only by datagrams
that authenticate (so forged counters cannot move it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from overlay.core.wire import Drop

DATA = 4
HEADER_LEN = 16
TAG_LEN = 16
OVERHEAD = HEADER_LEN + TAG_LEN  # bytes over plaintext VXLAN
AES_256_GCM = 1
CHACHA20_POLY1305 = 2
CIPHERS = {AES_256_GCM: "aes-256-gcm", CHACHA20_POLY1305: "chacha20-poly1305"}
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1  # a session never seals with a counter past this
WINDOW_WORDS = 64  # the replay window: 64 words of 64 bits,
WINDOW = (WINDOW_WORDS - 1) * 64  # of which 4032 counters behind the newest are always tracked
_HEADER = struct.Struct("<B3xIQ")


HANDSHAKE_TYPES = frozenset({1, 2})  # handshake.INITIATION, handshake.RESPONSE
HANDSHAKE_SIZES = {1: 133, 2: 77}  # handshake.INITIATION_LEN, RESPONSE_LEN: any other size is auth_failed
PUNTED = 255  # the fast path's status for a handshake message handed to the control plane


def kind(datagram: bytes) -> str:
    """The receive path's first rule, on one port: "data" (sealed, opened by open_datagram),
    "handshake" (to the control plane: overlay/core/sessions.py), "bad_handshake" (a handshake
    type of the wrong size: dropped as auth_failed, never handed up) or "vxlan" (wire.decode)."""
    if datagram[:1] == bytes([DATA]):
        return "data"
    if datagram and datagram[0] in HANDSHAKE_TYPES:
        return "handshake" if len(datagram) == HANDSHAKE_SIZES[datagram[0]] else "bad_handshake"
    return "vxlan"


def header(index: int, counter: int) -> bytes:
    return _HEADER.pack(DATA, index, counter)


def nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "little")


def _aead(cipher: int, key: bytes) -> AESGCM | ChaCha20Poly1305:
    if cipher == AES_256_GCM:
        return AESGCM(key)
    if cipher == CHACHA20_POLY1305:
        return ChaCha20Poly1305(key)
    raise ValueError(f"unknown data cipher {cipher}")


def seal(cipher: int, key: bytes, index: int, counter: int, datagram: bytes) -> bytes:
    """The data datagram carrying ``datagram`` (a VXLAN datagram) on a session."""
    if not 0 <= counter < REJECT_AFTER_MESSAGES:
        raise ValueError(f"counter {counter} is past the session's limit")
    h = header(index, counter)
    return h + _aead(cipher, key).encrypt(nonce(counter), datagram, h)


@dataclass
class ReplayWindow:
    """Which counters a session has received (RFC 6479's bitmap, as WireGuard's): a counter
    is new if it is ahead of the newest, or within WINDOW of it and not yet seen."""

    last: int = 0
    ring: list[int] = field(default_factory=lambda: [0] * WINDOW_WORDS)

    def accept(self, counter: int) -> bool:
        """Record ``counter`` (of a datagram that authenticated); False if it is a replay or
        too old, and then nothing changes."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        block = counter >> 6
        if counter > self.last:
            current = self.last >> 6
            for k in range(1, min(block - current, WINDOW_WORDS) + 1):
                self.ring[(current + k) % WINDOW_WORDS] = 0
            self.last = counter
        elif self.last - counter > WINDOW:
            return False
        word, bit = block % WINDOW_WORDS, 1 << (counter & 63)
        if self.ring[word] & bit:
            return False
        self.ring[word] |= bit
        return True


@dataclass
class RxSession:
    """What a receiver holds for one session: its cipher and key, and the window."""

    cipher: int
    key: bytes
    window: ReplayWindow = field(default_factory=ReplayWindow)


def open_datagram(sessions: dict[int, RxSession], packet: bytes) -> tuple[Drop | None, int, bytes]:
    """Apply the receive rules to a data datagram: (None, receiver index, the VXLAN datagram)
    when it passes, else (the Drop, index or -1, b"")."""
    if len(packet) < OVERHEAD:
        return Drop.TOO_SHORT, -1, b""
    kind, index, counter = _HEADER.unpack_from(packet)
    session = sessions.get(index)
    if kind != DATA or session is None:
        return Drop.AUTH_FAILED, index, b""
    try:
        datagram = _aead(session.cipher, session.key).decrypt(nonce(counter), packet[HEADER_LEN:], packet[:HEADER_LEN])
    except InvalidTag:
        return Drop.AUTH_FAILED, index, b""
    if not session.window.accept(counter):
        return Drop.REPLAYED, index, b""
    return None, index, datagram
