"""Host keys as text (overlay/core/keys.py): the base64 form wg uses, the messages for what is not
a key, X25519 public keys and fingerprints."""

from __future__ import annotations

import base64
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.core import keys
from overlay.core.keys import KEY_BYTES, BadKey, encode, fingerprint, parse_private, parse_public, public_of

# RFC 7748 section 6.1: Alice's and Bob's X25519 key pairs.
ALICE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")


def test_public_of_matches_rfc_7748() -> None:
    assert public_of(ALICE) == ALICE_PUBLIC and public_of(BOB) == BOB_PUBLIC


@given(st.binary(min_size=KEY_BYTES, max_size=KEY_BYTES).filter(any))
def test_keys_round_trip_through_44_characters_of_base64(key: bytes) -> None:
    text = encode(key)
    assert len(text) == keys.KEY_CHARS and text.endswith("=") and text == base64.b64encode(key).decode()
    assert parse_public(text) == key and parse_private(text) == key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "public key is empty"),
        ("not a key at all!", "public key is not base64"),
        (encode(ALICE)[:-1], "public key is not base64"),  # padding gone
        (" " + encode(ALICE), "public key is not base64"),  # whitespace is the caller's to strip
        (base64.b64encode(b"\x01" * 31).decode(), "is 31 bytes, not 32"),
        (base64.b64encode(b"\x01" * 33).decode(), "is 33 bytes, not 32"),
        (base64.b64encode(bytes(32)).decode(), "public key is all zeros"),
        (encode(ALICE)[:-2] + "r=", "not the canonical base64"),  # same bytes, other trailing bits
        (encode(bytes([0xFB, 0xFF] * 16)).replace("+", "-").replace("/", "_"), "not base64"),  # urlsafe
    ],
)
def test_what_is_not_a_key_says_why_in_one_line(text: str, message: str) -> None:
    with pytest.raises(BadKey, match=message) as e:
        parse_public(text)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_a_bad_private_key_is_named_so_and_never_echoed() -> None:
    secret = encode(ALICE)[:-1]  # almost a key: it must not end up in a log
    with pytest.raises(BadKey, match="private key is not base64") as e:
        parse_private(secret)
    assert secret not in str(e.value)
    with pytest.raises(BadKey, match="private key is a bytes, not text"):
        parse_private(ALICE)  # type: ignore[arg-type]


def test_the_canonical_check_rejects_a_second_spelling_of_a_key() -> None:
    text = encode(ALICE)  # ...Kg= : the last character carries 2 unused bits
    other = text[:-2] + chr(ord(text[-2]) + 1) + "="
    assert base64.b64decode(other) == ALICE  # base64 itself takes both
    with pytest.raises(BadKey, match="canonical"):
        parse_public(other)


def test_fingerprint_is_8_characters_of_base64_of_sha256() -> None:
    import hashlib

    assert fingerprint(ALICE_PUBLIC) == base64.b64encode(hashlib.sha256(ALICE_PUBLIC).digest()).decode()[:8]
    assert len(fingerprint(BOB_PUBLIC)) == 8 and fingerprint(ALICE_PUBLIC) != fingerprint(BOB_PUBLIC)
    assert fingerprint(ALICE_PUBLIC) == fingerprint(bytes(ALICE_PUBLIC))  # stable


def test_encode_and_public_of_take_only_32_bytes() -> None:
    for bad in (b"", bytes(31), bytes(33)):
        with pytest.raises(BadKey, match="32 bytes"):
            encode(bad)
        with pytest.raises(BadKey, match="32 bytes"):
            public_of(bad)


def test_key_file_names() -> None:
    assert keys.key_file_name("h1") == "h1.key" and keys.key_file_name(None) == "static.key"


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools (wg) not installed")
def test_keys_of_wg_genkey_work_and_wg_pubkey_agrees() -> None:
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private + "\n", capture_output=True, text=True, check=True)
    assert encode(public_of(parse_private(private))) == public.stdout.strip()
    ours = encode(ALICE)
    theirs = subprocess.run(["wg", "pubkey"], input=ours + "\n", capture_output=True, text=True, check=True)
    assert parse_public(theirs.stdout.strip()) == ALICE_PUBLIC
