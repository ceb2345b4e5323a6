"""Addresses that users write: etcd endpoints (URLs) and the HOST:PORT a server listens on.
Pure: each parser returns the parsed form or raises ValueError saying the accepted form."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address  # either family, as ipaddress.ip_address returns
DEFAULT_ADDRESS = ("127.0.0.1", 9465)  # where the metrics are served unless told otherwise


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}\Z")


def is_ipv4(text: str) -> bool:
    """Whether ``text`` is an IPv4 address in the form ipaddress accepts (dotted decimal, no
    leading zeros), at a fraction of its cost: registry values are checked by the million."""
    return _IPV4.match(text) is not None


def ipv4(text: str) -> ipaddress.IPv4Address:
    """``ipaddress.IPv4Address(text)``, several times faster; ValueError as it raises."""
    if _IPV4.match(text) is None:
        raise ipaddress.AddressValueError(f"{text!r} is not an IPv4 address")
    a, b, c, d = text.split(".")
    return ipaddress.IPv4Address((int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d))


def parse_endpoint(url: str) -> tuple[str, int]:
    """'http://198.18.0.250:2379' -> ('198.18.0.250', 2379); ValueError saying the form."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"etcd endpoint {url!r}: write it as http://HOST:PORT")
    return parts.hostname, parts.port or 2379


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> tuple[str, int] | None:
    """The --metrics flag: "HOST:PORT", "[V6]:PORT", ":PORT" (loopback) or "off" (None)."""
    text = text.strip()
    if text.lower() == "off":
        return None
    form = "write IP:PORT, [IPv6]:PORT, :PORT (127.0.0.1) or off, e.g. 127.0.0.1:9465"
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"{text!r}: no port; {form}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"{text!r}: brackets are for IPv6 addresses; {form}")
    elif ":" in host:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:9465")
    host = host or DEFAULT_ADDRESS[0]
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address; {form}") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535; {form}")
    return host, int(port_text)
