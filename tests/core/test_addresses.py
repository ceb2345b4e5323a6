"""core.addresses: the listen addresses (--metrics) and etcd endpoints users write."""

from __future__ import annotations

import pytest

from overlay.core.addresses import parse_address


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:9465", ("127.0.0.1", 9465)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("[::1]:9465", ("::1", 9465)),
        (":9465", ("127.0.0.1", 9465)),
        ("off", None),
        ("OFF", None),
    ],
)
def test_parse_address_accepts(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("9465", "no port"),
        ("127.0.0.1", "no port"),
        ("localhost:9465", "not an IP address"),
        ("::1:9465", "brackets"),
        ("[127.0.0.1]:9465", "brackets are for IPv6"),
        ("127.0.0.1:0", "1 to 65535"),
        ("127.0.0.1:65536", "1 to 65535"),
        ("127.0.0.1:http", "1 to 65535"),
        ("", "no port"),
    ],
)
def test_parse_address_refuses_with_a_message_saying_the_form(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_address(text)
