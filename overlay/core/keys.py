"""Host identity for encrypted networks: X25519 static keys as text. Pure: no files, no
randomness (generating a key is IO: overlay/io/keys.py).

A key is 32 bytes, written as standard base64 with padding: 44 characters, the form WireGuard's
``wg genkey``/``wg pubkey`` print, so keys can be made or checked with either tool. Only the
canonical spelling of 32 bytes is accepted (one text per key, as registry values are compared
as text), and never all zeros.

Where keys live: a host's private key in a file of its own (``<state_dir>/<host_id>.key``, or
``static.key`` in static mode; ``key_file_name``), its public key in the registry as the host
value's ``pubkey`` (overlay/core/registry.py) or, in static mode, given to each peer with
``--peer-key ADDRESS=PUBKEY``.

``fingerprint``: the first 8 characters of base64(sha256(public key)), a short stable name of
a key for tables (``overlay host ls``); 48 bits, enough to tell keys apart by eye, not to
authenticate one (compare the whole key for that).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_BYTES = 32
KEY_CHARS = 44  # base64 of 32 bytes, with one '=' of padding
FINGERPRINT_CHARS = 8
STATIC_HOST_ID = "static"  # the key file's name in static mode, which has no host id
FORM = "44 characters of base64, as `overlay key show` or `wg pubkey` print"


class BadKey(ValueError):
    """Text that is not a key; the message says what is wrong with it (never the key itself)."""


def _parse(text: object, kind: str) -> bytes:
    if not isinstance(text, str):
        raise BadKey(f"{kind} is a {type(text).__name__}, not text ({FORM})")
    if not text:
        raise BadKey(f"{kind} is empty ({FORM})")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadKey(f"{kind} is not base64 ({FORM})") from None
    if len(raw) != KEY_BYTES:
        raise BadKey(f"{kind} is {len(raw)} bytes, not {KEY_BYTES} ({FORM})")
    if base64.b64encode(raw).decode() != text:
        raise BadKey(f"{kind} is not the canonical base64 of 32 bytes ({FORM})")
    if raw == bytes(KEY_BYTES):
        raise BadKey(f"{kind} is all zeros: not a real key")
    return raw


def parse_public(text: object) -> bytes:
    """The 32 bytes of a base64 public key; BadKey saying what is wrong."""
    return _parse(text, "public key")


def parse_private(text: object) -> bytes:
    """The 32 bytes of a base64 private key; BadKey saying what is wrong (never echoing it)."""
    return _parse(text, "private key")


def encode(key: bytes) -> str:
    """A key as 44 characters of standard base64."""
    if len(key) != KEY_BYTES:
        raise BadKey(f"a key is {KEY_BYTES} bytes, not {len(key)}")
    return base64.b64encode(key).decode()


def public_of(private: bytes) -> bytes:
    """The X25519 public key of a private key (32 bytes each)."""
    if len(private) != KEY_BYTES:
        raise BadKey(f"a private key is {KEY_BYTES} bytes, not {len(private)}")
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def fingerprint(public: bytes) -> str:
    """A short stable form of a public key for tables: the first 8 characters of
    base64(sha256(public))."""
    return base64.b64encode(hashlib.sha256(public).digest()).decode()[:FINGERPRINT_CHARS]


def key_file_name(host_id: str | None) -> str:
    """The key file's name in the state directory: ``<host_id>.key``, ``static.key`` without
    a host id (static mode)."""
    return f"{host_id if host_id is not None else STATIC_HOST_ID}.key"
