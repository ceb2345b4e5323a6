"""Holding a published host port, so that nothing else on the host takes it while the agent
DNATs it to a container, and so that a port already taken is refused with one line.

A reservation is a socket of the publication's protocol bound to its host address (the
wildcard of the container's family without one) and port: not listening (a TCP connection
to it is not accepted by it: the DNAT rule takes the traffic before), close-on-exec (Python's
default), without SO_REUSEADDR or SO_REUSEPORT, so any later bind of that port fails. An IPv6
wildcard reservation is IPv6 only (IPV6_V6ONLY): the DNAT of an IPv6 container takes IPv6
traffic only. Closing the socket gives the port back.
"""

from __future__ import annotations

import errno
import socket

from overlay.core.ports import PortSpec

_TYPES = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}


class PortError(RuntimeError):
    """A host port cannot be reserved; the message is one line with the fix."""


_VERSIONS = {socket.AF_INET: 4, socket.AF_INET6: 6, 4: 4, 6: 6}


def _family(spec: PortSpec, family: int) -> tuple[socket.AddressFamily, str]:
    """The socket family and address to bind for the container's ``family``."""
    version = _VERSIONS.get(family)
    if version is None:
        raise ValueError(f"family is socket.AF_INET or AF_INET6 (the container address's), not {family}")
    if spec.host_ip is not None and spec.host_ip.version != version:
        raise PortError(
            f"{spec.host_ip} is an IPv{spec.host_ip.version} address and the container's is IPv{version}: "
            f"publish on an IPv{version} address of this host, or on none"
        )
    host = str(spec.host_ip) if spec.host_ip is not None else "0.0.0.0" if version == 4 else "::"
    return (socket.AF_INET if version == 4 else socket.AF_INET6), host


def _bind(spec: PortSpec, family: int, port: int) -> socket.socket:
    if spec.proto not in _TYPES:
        raise ValueError(f"proto {spec.proto!r} is not tcp or udp")
    af, host = _family(spec, family)
    sock = socket.socket(af, _TYPES[spec.proto])  # non-inheritable: close-on-exec
    try:
        if af == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PortError(_message(spec, port, e)) from None
    return sock


def _message(spec: PortSpec, port: int, e: OSError) -> str:
    where = "this host" if spec.host_ip is None else str(spec.host_ip)
    if e.errno == errno.EADDRINUSE:
        return (
            f"port {port}/{spec.proto} is already in use on {where} (by another program or publication): "
            "choose another host port, or leave it out for a random free one"
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{spec.host_ip} is not an address of this host: give one of its addresses, or none for all"
    if e.errno == errno.EACCES:
        return (
            f"port {port}/{spec.proto} is privileged: run the agent as root (or with CAP_NET_BIND_SERVICE), "
            "or choose a host port of 1024 or more"
        )
    return f"cannot reserve port {port}/{spec.proto} on {where} ({e.strerror}): choose another host port"


def reserve(spec: PortSpec, family: int = socket.AF_INET) -> socket.socket:
    """Hold ``spec.host_port`` of ``spec.proto`` on ``spec.host_ip`` (without one, the wildcard
    of ``family``: the container address's, socket.AF_INET or AF_INET6; 4 and 6 also do);
    PortError if it cannot be had, or if ``host_ip`` is of the other family."""
    if not 1 <= spec.host_port <= 65535:
        raise ValueError(f"host port {spec.host_port} is not a port (1 to 65535): use reserve_random")
    return _bind(spec, family, spec.host_port)


def reserve_random(spec: PortSpec, family: int = socket.AF_INET) -> tuple[socket.socket, int]:
    """Hold a free random high port (the kernel's ephemeral range, net.ipv4.ip_local_port_range)
    of ``spec.proto`` on ``spec.host_ip`` (as ``reserve``); the socket and the port."""
    sock = _bind(spec, family, 0)
    return sock, int(sock.getsockname()[1])
