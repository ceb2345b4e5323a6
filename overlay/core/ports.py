"""Published ports: what ``overlay publish``, ``attach --publish`` and CNI ``portMappings`` ask
for, parsed and checked. Pure.

A publication maps a port of the host onto a port of one container:

    [HOSTIP:]HOSTPORT:PORT[/tcp|udp]    8080:80, 198.18.0.1:8080:80/udp, [2001:2::1]:8080:80
    [HOSTIP::]PORT[/tcp|udp]            80, 198.18.0.1::80: a random free high port of the host

HOSTIP (an address of this host; absent: every address of the host) is IPv4, or IPv6 in
brackets; ports are 1 to 65535; the protocol is tcp (the default) or udp. A spec without a
host port leaves ``host_port`` 0 until the agent has picked a free one. In JSON (the control
socket, the state file, ``overlay status``) a publication is
``{"host_ip": str | null, "host_port": int, "port": int, "proto": "tcp" | "udp"}``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from overlay.core.addresses import IPAddress

PROTOCOLS = ("tcp", "udp")
FORM = "[HOSTIP:]HOSTPORT:PORT[/tcp|udp], or PORT[/tcp|udp] for a random host port (e.g. 8080:80)"
EXPOSE_FORM = "PORT[/tcp|udp], e.g. 80 or 53/udp"


@dataclass(frozen=True, order=True)
class PortSpec:
    """One published port: ``host_ip``:``host_port`` on the host -> ``port`` of the container.
    ``host_port`` 0: not chosen yet (a random free high port is picked)."""

    proto: str
    host_port: int
    port: int
    host_ip: IPAddress | None = None

    @property
    def key(self) -> tuple[str, int]:
        """What two publications on one host may not share: protocol and host port (any
        address overlaps every one, so the address is left out)."""
        return self.proto, self.host_port

    def __str__(self) -> str:
        host = "" if self.host_ip is None else f"[{self.host_ip}]:" if self.host_ip.version == 6 else f"{self.host_ip}:"
        return (
            f"{host}{self.host_port or ''}:{self.port}/{self.proto}"
            if self.host_port or host
            else f"{self.port}/{self.proto}"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "host_ip": None if self.host_ip is None else str(self.host_ip),
            "host_port": self.host_port,
            "port": self.port,
            "proto": self.proto,
        }

    @classmethod
    def from_json(cls, record: object) -> PortSpec:
        """The publication ``to_json`` gave; ValueError saying what is wrong."""
        if not isinstance(record, dict):
            raise ValueError(f"a publication is an object, not {type(record).__name__}")
        host_ip = record.get("host_ip")
        if host_ip is not None and not isinstance(host_ip, str):
            raise ValueError("host_ip must be a string or null")
        proto = record.get("proto", "tcp")
        if proto not in PROTOCOLS:
            raise ValueError(f"proto {proto!r} is not tcp or udp")
        return cls(
            str(proto),
            _port(record.get("host_port"), "host_port", zero=True),
            _port(record.get("port"), "port"),
            _address(host_ip) if host_ip is not None else None,
        )


def _port(value: object, what: str, zero: bool = False) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not (0 if zero else 1) <= value <= 65535:
        raise ValueError(f"{what} {value!r} is not a port (1 to 65535)")
    return value


def _address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise ValueError(f"host address {text!r} is not an IPv4 or IPv6 address") from None


def parse_exposed(text: str) -> str:
    """An exposed port (``attach --expose``, an endpoint's ``ports``) in its one spelling,
    "PORT/proto" ("80/tcp"); ValueError with a one-line message saying the form."""
    port, _, proto = text.strip().partition("/")
    proto = (proto or "tcp").lower()
    if proto not in PROTOCOLS:
        raise ValueError(f"expose {text!r}: protocol {proto!r} is not tcp or udp ({EXPOSE_FORM})")
    try:
        return f"{_port(port, 'port')}/{proto}"
    except ValueError as e:
        raise ValueError(f"expose {text!r}: {e} ({EXPOSE_FORM})") from None


def exposed_spec(exposed: str) -> PortSpec:
    """The publication of an exposed port on a random host port (``publish --all``)."""
    port, proto = exposed.split("/")
    return PortSpec(proto, 0, int(port))


def parse(spec: str) -> PortSpec:
    """``spec`` (module doc) as a PortSpec; ValueError with a one-line message saying what is
    wrong and the form."""
    text = spec.strip()
    proto = "tcp"
    if "/" in text:
        text, proto = text.rsplit("/", 1)
        proto = proto.lower()
        if proto not in PROTOCOLS:
            raise ValueError(f"publish {spec!r}: protocol {proto!r} is not tcp or udp")
    host_ip: IPAddress | None = None
    if text.startswith("["):  # [V6]:HOSTPORT:PORT
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"publish {spec!r}: an IPv6 host address goes in brackets: [2001:2::1]:8080:80")
        host_ip, text = _address(text[1:end]), text[end + 2 :]
        parts = text.split(":")
        if len(parts) != 2:
            raise ValueError(f"publish {spec!r} is not {FORM}")
        host_port, port = parts
    else:
        parts = text.split(":")
        if len(parts) == 1:
            host_port, port = "", parts[0]
        elif len(parts) == 2:
            host_port, port = parts
        elif len(parts) == 3:
            host_ip = _address(parts[0])
            host_port, port = parts[1], parts[2]
        else:
            raise ValueError(f"publish {spec!r} is not {FORM}")
    if host_ip is not None and host_ip.is_unspecified:
        host_ip = None  # 0.0.0.0 or [::]: every address of the host, as Docker reads it
    try:
        return PortSpec(proto, _port(host_port, "host port") if host_port else 0, _port(port, "port"), host_ip)
    except ValueError as e:
        raise ValueError(f"publish {spec!r}: {e}") from None
